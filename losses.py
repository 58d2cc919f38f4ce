"""The training objective of every method, one function per method with one signature:

    loss, logs = METHOD_loss(batch, models, cfg)

`batch` holds the step's data (latents or pixel values, prompt embeddings, and `generators`: one CPU
generator per row, seeded by train.py from (seed, step, row), so the noise and timestep draws are the
same after a resume and however the batch is split across processes; object masks; ComFusion's fusion rows);
`models` the networks (unet, vae, text_encoder, schedule, and the frozen `encoders` a loss reads); `cfg` the
TrainConfig. `logs` has every loss term as a float, so train.py can log each one separately.

Notation (see README, "Methods"): z0 = s * E(x) VAE latents, eps ~ N(0, I), t ~ U{0..T-1} per sample,
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and the base loss L_ldm = || target - unet(z_t, t, c) ||^2
with target = eps (epsilon models) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (v-prediction models).

Each function says which parts are the paper's ([paper]) and which are our reading ([ours]), with the same
marks as the README's method table.
"""
import numpy as np
import torch
import torch.nn.functional as F

from schedulers import ddim_step, guided


# ----------------------------------------------------------------------------- shared pieces

def row_generator(cfg, step: int, micro: int, kind: int, row: int) -> torch.Generator:
    """The generator of one row of the *global* batch (kind 0 instance, 1 class) at one micro-step. Every
    random choice for that row comes from it (image, crop, flip, template, latent sample, timestep, noise),
    so a resumed run draws the same numbers, and N processes x batch B draw what 1 process x batch N*B does."""
    seed = np.random.SeedSequence([cfg.seed, step, micro, kind, row]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


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
    applied them to half of it (the shape bug docs/methods.md section 1 warns about).
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
    added = {k: batch[k] for k in ("text_embeds", "time_ids") if k in batch}   # SDXL: pooled text, sizes and crop
    pred = models.unet(z_t, t, batch["encoder_hidden_states"], **added)
    return pred, schedule.target(z0, noise, t), t


def masked_mse(pred, target, mask, background_weight: float, weights) -> torch.Tensor:
    """mean_i w_i * sum(W_i (pred_i - target_i)^2) / sum(W_i), with the weight map W = M + b (1 - M): M the (b, 1, h, w)
    mask broadcast over channels, b the background weight. b = 0 is object-only; b = 1 is plain MSE.
    A row whose (cropped) mask is empty contributes 0 rather than 0 / 0."""
    W = (mask + background_weight * (1 - mask)).float().expand_as(pred)
    err = (pred.float() - target.float()) ** 2
    per_sample = (W * err).sum(dim=(1, 2, 3)) / W.sum(dim=(1, 2, 3)).clamp_min(1e-12)
    return (per_sample * weights).mean()


def cosine_distance(a, b) -> torch.Tensor:
    """mean_i (1 - cos(a_i, b_i)) over rows of (n, e) embeddings, in float32."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def clip_text_features(models, clip, input_ids, rows: dict | None = None) -> torch.Tensor:
    """T(prompt) of the object-driven method: SD's own text encoder, pooled at the EOS, through the CLIP text
    projection (b, e) [paper: T in the joint CLIP space; ours: this way of getting there for SD1, whose text encoder
    *is* OpenAI CLIP ViT-L/14's text tower]. `rows` {token id: (d,) vector} replaces those ids' embedding rows, so
    a gradient reaches the vector and not the table."""
    embeddings = models.text_encoder.text_model.embeddings.token_embedding(input_ids).detach()   # (b, 77, d)
    for token, row in (rows or {}).items():
        embeddings = torch.where((input_ids == token)[..., None], row.to(embeddings), embeddings)
    pooled = models.text_encoder(input_ids, inputs_embeds=embeddings)[1]
    return clip.text_projection(pooled)


def prototypical_target(image, masked_image, class_text) -> torch.Tensor:
    """The object-driven prototypical target [paper, via a review]: g = mean(n(I(x)), n(I(x * m)),
    n(T("a photo of {class}"))), n the L2 normalisation, so the mean of three unit vectors (not renormalised: the
    cosine of L_pe = 1 - cos(T("a photo of <o>"), g) ignores its length)."""
    return torch.stack([F.normalize(v.float(), dim=-1) for v in (image, masked_image, class_text)]).mean(0)


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


@torch.no_grad()
def fusion_prefix(fusion, models, cfg, shape, dtype) -> torch.Tensor:
    """ComFusion's fusion stream before its one UNet call with gradients: z_T ~ N(0, I) (one draw per row from the
    row's generator), then `cfg.fusion_steps` DDIM steps (Song et al. 2020) with classifier-free guidance under the
    instance-scene prompt, from t = T - 1 down to tau, all without gradients. Returns z_tau.
    [paper] no gradients before tau; [ours] the steps evenly spaced from T - 1 to tau, guidance cfg.fusion_guidance."""
    schedule = models.schedule
    z = randn_rows(shape, fusion["generators"], models.device, dtype)
    model_fn = guided(models.unet, fusion["encoder_hidden_states"], fusion["uncond"], cfg.fusion_guidance)
    ts = torch.linspace(schedule.num_train_timesteps - 1, fusion["tau"], cfg.fusion_steps + 1).round().long().tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        z, _ = ddim_step(schedule, model_fn(z, t), t, t_next, z)
    return z


def fusion_matching(fusion, models, z_tau, out, tau):
    """ComFusion's visual-textual matching on the fusion rows, from the UNet output `out` at tau (with gradients):
    1. one-step clean estimate z0_hat = (z_tau - sqrt(1 - abar) eps_hat) / sqrt(abar), x_hat = D(z0_hat / s) through
       the frozen VAE decoder (no clamp, so no pixel loses its gradient);
    2. L_v = 1 - cos(DINO(x_hat), DINO(x_instance)), the DINO ViT-S/16 CLS token;
    3. L_t = 1 - cos(CLIP_img(x_hat), CLIP_txt("a photo of {class} {scene}")).
    The encoders are frozen; gradients pass through them and the decoder to the UNet. Returns (L_v, L_t)."""
    z0_hat = models.schedule.pred_x0(z_tau, out, tau)
    x_hat = models.vae.decode(z0_hat / models.vae.config.scaling_factor)               # (b, 3, H, W) in ~[-1, 1]
    x_hat = x_hat.float()                       # the encoders' resize: antialiased bicubic has no half kernel on CPU
    dino, clip = models.encoders["dino"], models.encoders["clip"]
    loss_visual = cosine_distance(dino.features(dino.preprocess.tensor(x_hat)), fusion["image_target"])
    loss_textual = cosine_distance(clip.get_image_features(clip.preprocess.tensor(x_hat)), fusion["text_target"])
    return loss_visual, loss_textual


def comfusion_loss(batch, models, cfg):
    """ComFusion: "Personalized Subject Generation in Multiple Specific Scenes From Single Image", arXiv 2402.11849.
    Only the abstract and summaries could be read: the stream and loss names are [paper], every equation is [ours]
    (docs/methods.md section 2).

        L = lambda_inst L_inst + lambda_cs L_cs + lambda_v L_v + lambda_t L_t        [ours; defaults 1, 1, 0.1, 0.1]

    Composite stream, one UNet batch as DreamBooth's:
    - L_inst [paper]: L_ldm on the instance images under "a photo of {token} {class}" (DreamBooth's instance term);
    - L_cs [paper name, ours form]: L_ldm on frozen-model images of "a photo of {class} {scene}" under that prompt,
      which keeps the class *and* the scenes (train.py generates them once, per scene).
    Fusion stream [paper names, ours form], on steps where train.py put `batch["fusion"]` (every cfg.fusion_every):
    DDIM without gradients from noise to tau (`fusion_prefix`) under "a photo of {token} {class} {scene}", one UNet
    call with gradients at tau, then `fusion_matching`: L_v (DINO against the instance image) and L_t (CLIP against the
    class-scene text). tau ~ U{tau_min..tau_max} per step [ours: 200..600]: small tau favours instance detail, large
    tau the scene layout. The fusion rows join the composite rows in the one UNet call that builds a graph.
    lambda_cs is cfg.prior_loss_weight; min-SNR weights (cfg.snr_gamma) apply to the composite stream only [ours].
    """
    schedule, gens = models.schedule, batch["generators"]
    z0 = latents_of(batch, models)                                  # instance rows, then class-scene rows
    n, n_instance = z0.shape[0], z0.shape[0] - batch["n_prior"]
    t = draw_timesteps(gens, schedule, z0.device)
    noise = draw_noise(z0, gens, cfg.noise_offset)
    z_t, c = schedule.add_noise(z0, noise, t), batch["encoder_hidden_states"]
    fusion = batch.get("fusion")
    if fusion is not None:
        z_tau = fusion_prefix(fusion, models, cfg, z0.shape[1:], z0.dtype)
        tau = torch.full((z_tau.shape[0],), fusion["tau"], device=z0.device)
        z_t, t, c = torch.cat([z_t, z_tau]), torch.cat([t, tau]), torch.cat([c, fusion["encoder_hidden_states"]])
    out = models.unet(z_t, t, c)
    target = schedule.target(z0, noise, t[:n])
    w = min_snr_weights(schedule, t[:n], cfg.snr_gamma)
    loss_instance = weighted_mse(out[:n_instance], target[:n_instance], w[:n_instance])
    loss_class_scene = weighted_mse(out[n_instance:n], target[n_instance:], w[n_instance:])
    loss = cfg.instance_loss_weight * loss_instance + cfg.prior_loss_weight * loss_class_scene
    logs = {"loss_instance": loss_instance.item(), "loss_class_scene": loss_class_scene.item()}
    if fusion is not None:
        loss_visual, loss_textual = fusion_matching(fusion, models, z_t[n:], out[n:], t[n:])
        loss = loss + cfg.visual_loss_weight * loss_visual + cfg.textual_loss_weight * loss_textual
        logs |= {"loss_visual": loss_visual.item(), "loss_textual": loss_textual.item(), "tau": float(fusion["tau"])}
    logs["loss"] = loss.item()
    return loss, logs


def objectdriven_loss(batch, models, cfg):
    """Object-driven one-shot fine-tuning, prototypical embedding (arXiv 2401.15708; docs/methods.md section 3), stage 2
    Stage 1, the prototypical embedding [paper], runs before the loop (methods.py `prototypical_stage`, loss L_pe).

        L = L_os + lambda L_prior                                                    [ours form; lambda = 1]

    - Object-specific loss [paper name, ours form]: L_os = sum(W (target - pred)^2) / sum(W) per instance row, W the
      object mask M (the union over the objects of that image) resized to the latent grid by area interpolation and
      broadcast over channels, plus cfg.background_weight (1 - M) (default 0: the background is not learned).
    - Class-characterizing regularisation [paper name, ours form]: DreamBooth's prior term on frozen-model images of
      "a photo of {class}", weight cfg.prior_loss_weight.
    The prompt of an image is "a photo of <o1> {class1} and <o2> {class2}" over its objects [ours]. What trains (LoRA
    on the UNet's attention, the new tokens' rows at cfg.token_lr) is train.py's choice [ours]. Min-SNR weights
    (cfg.snr_gamma) and the noise offset are [ours] options, off by default.
    """
    z0 = latents_of(batch, models)
    pred, target, t = predict(batch, models, z0, cfg)
    n_instance = z0.shape[0] - batch["n_prior"]
    w = min_snr_weights(models.schedule, t, cfg.snr_gamma)
    mask = F.interpolate(batch["mask"].float(), size=z0.shape[-2:], mode="area")      # (b, 1, h, w) in [0, 1]
    loss_object = masked_mse(pred[:n_instance], target[:n_instance], mask, cfg.background_weight, w[:n_instance])
    loss_prior = weighted_mse(pred[n_instance:], target[n_instance:], w[n_instance:])
    loss = loss_object + cfg.prior_loss_weight * loss_prior
    return loss, {"loss_object": loss_object.item(), "loss_prior": loss_prior.item(), "loss": loss.item()}

