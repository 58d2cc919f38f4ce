"""losses.py: every DreamBooth-family term equals a hand computation on small tensors."""
from types import SimpleNamespace

import torch

from losses import draw_noise, dreambooth_loss, dreambooth_objective, min_snr_weights
from schedulers import NoiseSchedule

SD = NoiseSchedule.sd()


def test_instance_plus_weighted_prior():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([1, 2, 3, 4])
    loss, logs = dreambooth_objective(pred, target, t, n_instance=2, schedule=SD, prior_weight=0.7)
    inst = ((pred[:2] - target[:2]) ** 2).mean()
    prior = ((pred[2:] - target[2:]) ** 2).mean()
    assert torch.allclose(loss, inst + 0.7 * prior, atol=1e-7)
    assert abs(logs["loss_instance"] - inst.item()) < 1e-6 and abs(logs["loss_prior"] - prior.item()) < 1e-6


def test_min_snr_with_prior_splits_timesteps_with_predictions():
    """Batch 2 instance + 2 prior; each row's weight comes from its own timestep."""
    torch.manual_seed(1)
    pred, target = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    t = torch.tensor([10, 999, 500, 20])
    gamma = 5.0
    loss, _ = dreambooth_objective(pred, target, t, n_instance=2, schedule=SD, prior_weight=1.0, snr_gamma=gamma)
    abar = SD.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    w = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    mse = ((pred - target) ** 2).double().mean(dim=(1, 2, 3))
    expected = (w[:2] * mse[:2]).mean() + (w[2:] * mse[2:]).mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    # the diffusers bug this guards against: weights of the whole batch applied to the instance half
    wrong = (w[:2] * mse[:2]).mean() + (w[:2] * mse[2:]).mean()
    assert abs(wrong.item() - expected.item()) > 1e-3


def test_min_snr_v_prediction_weights():
    v = NoiseSchedule.sd(prediction_type="v_prediction")
    t = torch.tensor([5, 400, 950])
    abar = v.alphas_cumprod[t]
    snr = abar / (1 - abar)
    assert torch.allclose(min_snr_weights(v, t, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), atol=1e-6)
    assert torch.equal(min_snr_weights(v, t, None), torch.ones(3))


def test_v_prediction_target():
    v = NoiseSchedule.sd(prediction_type="v_prediction")
    torch.manual_seed(2)
    z0, eps, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([3, 700])
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v.target(z0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * z0, atol=1e-6)
    assert torch.equal(SD.target(z0, eps, t), eps)


def test_noise_offset_changes_only_the_noise():
    """Same generator seed: the timesteps and every UNet input but the noise are unchanged, and the noise
    differs by offset * (one N(0,1) per sample and channel), constant over the image."""
    seen = []

    def unet(z_t, t, c):
        seen.append((z_t.clone(), t.clone(), c.clone()))
        return torch.zeros_like(z_t)
    models = SimpleNamespace(unet=unet, schedule=SD)
    z0 = torch.randn(2, 4, 4, 4)
    for offset in (0.0, 0.1):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        batch = {"latent_mean": z0, "latent_std": torch.zeros_like(z0), "generators": gens,
                 "encoder_hidden_states": torch.ones(2, 3, 8)}
        cfg = SimpleNamespace(noise_offset=offset, prior_loss_weight=1.0, snr_gamma=None)
        dreambooth_loss(batch, models, cfg)
    (z_a, t_a, c_a), (z_b, t_b, c_b) = seen
    assert torch.equal(t_a, t_b) and torch.equal(c_a, c_b)
    s = (1 - SD.alphas_cumprod[t_a]).sqrt().view(-1, 1, 1, 1)
    delta = (z_b - z_a) / s                                  # = offset * per-(sample, channel) draw
    assert delta.abs().max() > 1e-3
    assert torch.allclose(delta, delta.mean(dim=(2, 3), keepdim=True).expand_as(delta), atol=1e-5)
    plain = draw_noise(z0, [torch.Generator().manual_seed(i) for i in (5, 6)])
    assert torch.equal(draw_noise(z0, [torch.Generator().manual_seed(i) for i in (5, 6)], 0.0), plain)
    first_row = draw_noise(z0[:1], [torch.Generator().manual_seed(5)])
    assert torch.equal(first_row[0], plain[0])              # a row's noise does not depend on the other rows
