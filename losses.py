"""The training objective of every method, one function per method with one signature:

    loss, logs = METHOD_loss(batch, models, cfg)

`batch` holds the step's data (latents or pixel values, prompt embeddings, and `generators`: one CPU
generator per row, seeded by train.py from (seed, step, row), so the noise and timestep draws are the
same after a resume and however the batch is split across processes);
`models` the networks (unet, vae, text_encoder, schedule); `cfg` the TrainConfig. `logs` has every
loss term as a float, so train.py can log each one separately.

Notation (see README, "Methods"): z0 = s * E(x) VAE latents, eps ~ N(0, I), t ~ U{0..T-1} per sample,
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and the base loss L_ldm = || target - unet(z_t, t, c) ||^2
with target = eps (epsilon models) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (v-prediction models).

Each function says which parts are the paper's ([paper]) and which are our reading ([ours]).
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- shared pieces

def randn_rows(shape, generators: list, device=None, dtype=None) -> torch.Tensor:
    """One N(0, I) draw of `shape` per batch row, each from that row's own generator, on the CPU.

    train.py gives every row of the *global* batch a generator seeded from (seed, step, row), so a row's
    noise does not depend on the device, on how rows are split across processes, or on a resume."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)


def draw_timesteps(generators: list, schedule, device) -> torch.Tensor:
    """t ~ U{0 .. T-1} per sample (DDPM training, Ho et al. 2020, Algorithm 1)."""
    return torch.cat([torch.randint(0, schedule.num_train_timesteps, (1,), generator=g) for g in generators]).to(device)


def draw_noise(z0: torch.Tensor, generators: list, noise_offset: float = 0.0):
    """eps ~ N(0, I), plus the optional noise offset (Guttenberg 2023, as diffusers' `--noise_offset`):
    eps += offset * N(0, 1) per sample and channel, which lets the model learn very dark or bright images."""
    noise = randn_rows(z0.shape[1:], generators, z0.device, z0.dtype)
    if noise_offset:
        noise = noise + noise_offset * randn_rows((z0.shape[1], 1, 1), generators, z0.device, z0.dtype)
    return noise


def min_snr_weights(schedule, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556), per sample.

    w_t = min(SNR_t, gamma) / SNR_t for epsilon targets and min(SNR_t, gamma) / (SNR_t + 1) for v targets,
    SNR_t = abar_t / (1 - abar_t). Without gamma every weight is 1.
    """
    if not gamma:
        return torch.ones(t.shape[0], device=t.device)
    snr = schedule.snr(t).to(t.device).float()
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if schedule.prediction_type == "v_prediction" else clipped / snr


def weighted_mse(pred, target, weights) -> torch.Tensor:
    """mean_i w_i * mean_{c,h,w} (pred_i - target_i)^2, computed in float32."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def dreambooth_objective(pred, target, t, n_instance: int, schedule, prior_weight: float = 1.0,
                         snr_gamma: float | None = None):
    """L = L_ldm(instance) + lambda * L_ldm(prior) on a batch ordered [instance..., class...].

    The predictions, the targets AND the timesteps are split at the same place, so each half gets its
    own min-SNR weights: diffusers' train_dreambooth.py computed the weights for the whole batch and then
    applied them to half of it (the shape bug methods.md warns about).
    """
    w = min_snr_weights(schedule, t, snr_gamma)
    loss_instance = weighted_mse(pred[:n_instance], target[:n_instance], w[:n_instance])
    logs = {"loss_instance": loss_instance.item()}
    loss = loss_instance
    if pred.shape[0] > n_instance:
        loss_prior = weighted_mse(pred[n_instance:], target[n_instance:], w[n_instance:])
        loss = loss + prior_weight * loss_prior
        logs["loss_prior"] = loss_prior.item()
    logs["loss"] = loss.item()
    return loss, logs


def latents_of(batch, models) -> torch.Tensor:
    """z0 = s * E(x), one sample of the VAE's Gaussian per step. With --cache_latents the batch holds the
    moments already scaled by s (train.py encodes each image once); otherwise the frozen VAE encodes."""
    gens = batch["generators"]
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
        return mean + std * randn_rows(mean.shape[1:], gens, mean.device, mean.dtype)
    with torch.no_grad():
        dist = models.vae.encode(batch["pixel_values"])
        z = dist.mean + dist.std * randn_rows(dist.mean.shape[1:], gens, dist.mean.device, dist.mean.dtype)
    return z * models.vae.config.scaling_factor


def predict(batch, models, z0, cfg):
    """Noise z0 at random timesteps and run the UNet once: returns (prediction, target, t)."""
    schedule, gens = models.schedule, batch["generators"]
    t = draw_timesteps(gens, schedule, z0.device)             # drawn first: a noise offset changes only the noise
    noise = draw_noise(z0, gens, cfg.noise_offset)
    z_t = schedule.add_noise(z0, noise, t)
    pred = models.unet(z_t, t, batch["encoder_hidden_states"])
    return pred, schedule.target(z0, noise, t), t


# ----------------------------------------------------------------------------- methods

def dreambooth_loss(batch, models, cfg):
    """DreamBooth (Ruiz et al. 2022, arXiv 2208.12242), eq. 2 [paper]:

        L = E[ || eps - eps_theta(z_t, t, c_instance) ||^2 ] + lambda E[ || eps' - eps_theta(z'_t', t', c_class) ||^2 ]

    with z' the latents of class images generated by the frozen model (prior preservation), independent
    noise and timesteps, lambda = cfg.prior_loss_weight (1.0 [paper]). The batch holds the instance rows
    first, then `batch["n_prior"]` class rows; both halves go through the UNet as one batch (as diffusers).
    Also used, unchanged, by DreamBooth-LoRA (only the trainable set differs) and by Textual Inversion
    (Gal et al. 2022, arXiv 2208.01618, whose loss is L_ldm on the instance images: n_prior = 0).
    Min-SNR weighting (cfg.snr_gamma) and the noise offset are [ours] options, off by default.
    """
    z0 = latents_of(batch, models)
    pred, target, t = predict(batch, models, z0, cfg)
    n_instance = z0.shape[0] - batch.get("n_prior", 0)
    return dreambooth_objective(pred, target, t, n_instance, models.schedule, cfg.prior_loss_weight, cfg.snr_gamma)


LOSSES = {
    "dreambooth": dreambooth_loss,
    "dreambooth_lora": dreambooth_loss,
    "textual_inversion": dreambooth_loss,
}
