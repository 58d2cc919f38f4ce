"""schedulers.py against diffusers 0.42 (the reference): schedules, timesteps, every sampler step, loading.

All float32 on the CPU unless a test says otherwise; tolerance 1e-6.
"""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from hub import ModelLoadError
from schedulers import (SAMPLERS, NoiseSchedule, ddim_sample, ddim_step, ddpm_sample, dpmpp_2m_step,
                        randn)

# SD1.5's scheduler/scheduler_config.json as on the Hub (a PNDMScheduler file: no timestep_spacing).
SD_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}

CONFIGS = {
    "sd": SD_CONFIG,
    "sd_v": {**SD_CONFIG, "prediction_type": "v_prediction"},
    "trailing_eps": {**SD_CONFIG, "timestep_spacing": "trailing", "steps_offset": 0},
    "trailing_v": {**SD_CONFIG, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "linspace_eps": {**SD_CONFIG, "timestep_spacing": "linspace"},
    "linspace_v": {**SD_CONFIG, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    "leading_dpm": {**SD_CONFIG, "timestep_spacing": "leading"},   # DPM-Solver's own "leading" rule
    "defaults": {},   # diffusers' defaults: linear betas, clip_sample and set_alpha_to_one true
    # SDXL base 1.0's scheduler/scheduler_config.json (an EulerDiscreteScheduler file)
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
}
REFERENCE = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmpp": DPMSolverMultistepScheduler,
             "euler": EulerDiscreteScheduler}
TOL = dict(rtol=1e-6, atol=1e-6)


def fake_model(x, t):
    """A fixed model: nonlinear in x, varies with t, stays O(1)."""
    return 0.5 * torch.tanh(x) + 0.3 * math.sin(int(t) / 37.0) + 0.05 * x.roll(1, dims=-1)


def latents(seed=0):
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_cumprod_equal_diffusers(beta_schedule):
    cfg = {**SD_CONFIG, "beta_schedule": beta_schedule}
    ours, ref = NoiseSchedule.from_config(cfg), DDPMScheduler.from_config(cfg)
    assert ours.betas.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_sd_preset_is_the_sd_file():
    assert NoiseSchedule.sd() == NoiseSchedule.from_config(SD_CONFIG)
    assert NoiseSchedule.sd("v_prediction").prediction_type == "v_prediction"
    assert NoiseSchedule.from_config({}) == NoiseSchedule()


def test_forward_process_equals_diffusers():
    s, ref = NoiseSchedule.sd(), DDPMScheduler.from_config(SD_CONFIG)
    x0, noise = latents(1), latents(2)
    t = torch.tensor([0, 999])
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(s.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=0)
    assert torch.equal(s.target(x0, noise, t), noise)
    assert torch.equal(NoiseSchedule.sd("v_prediction").target(x0, noise, t), s.velocity(x0, noise, t))
    a = s.alphas_cumprod[t]
    torch.testing.assert_close(s.snr(t), a / (1 - a))
    assert s.snr(t)[0] > 100 > 1e-2 > s.snr(t)[1]   # almost clean at t = 0, almost pure noise at t = 999


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pred_x0_and_eps_invert_add_noise(prediction_type):
    # float64 inputs, so the inversion is checked without float32 error amplified by 1/sqrt(a_999) ~ 15
    s = NoiseSchedule.sd(prediction_type)
    x0, noise = latents(1).double(), latents(2).double()
    t = torch.tensor([0, 1, 500, 999])
    x0, noise = x0.repeat(2, 1, 1, 1), noise.repeat(2, 1, 1, 1)
    x_t = s.add_noise(x0, noise, t)
    out = s.target(x0, noise, t)
    torch.testing.assert_close(s.pred_x0(x_t, out, t), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.pred_eps(x_t, out, t), noise, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- timesteps and sampling loops

def reference_timesteps(cfg, sampler, n):
    ref = REFERENCE[sampler].from_config(cfg)
    ref.set_timesteps(n)
    return ref, ref.timesteps.tolist()


@pytest.mark.parametrize("n", [1, 10, 50, 999])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp", "euler"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_timesteps_equal_diffusers(name, sampler, n):
    cfg = CONFIGS[name]
    assert NoiseSchedule.from_config(cfg).timesteps(n, sampler) == reference_timesteps(cfg, sampler, n)[1]


def test_sd_timesteps_by_hand():
    s = NoiseSchedule.sd()
    assert s.timesteps(10, "ddim") == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]   # leading, steps_offset 1
    assert s.timesteps(10, "dpmpp") == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]  # linspace, 11 points


def reference_trajectory(cfg, sampler, n, x, eta=0.0, seed=0):
    """diffusers' own loop (as StableDiffusionPipeline runs it): the timesteps and x after every step."""
    ref, ts = reference_timesteps(cfg, sampler, n)
    g = torch.Generator().manual_seed(seed)
    kwargs = {"eta": eta, "generator": g} if sampler == "ddim" else {"generator": g}
    x = x * ref.init_noise_sigma   # 1 but for Euler
    xs, seen = [], []
    for t in ref.timesteps:
        seen.append(ref.scale_model_input(x, t))   # x itself but for Euler: x / sqrt(sigma^2 + 1)
        x = ref.step(fake_model(seen[-1], t), t, x, **kwargs).prev_sample
        xs.append(x)
    return ts, xs, seen


SAMPLER_CASES = [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpmpp", 0.0), ("euler", 0.0)]


@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize("sampler,eta", SAMPLER_CASES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampler_loop_matches_diffusers_at_every_step(name, sampler, eta, n):
    cfg = CONFIGS[name]
    ts_ref, xs_ref, seen_ref = reference_trajectory(cfg, sampler, n, latents(), eta)
    seen_t, seen_x = [], []

    def model_fn(x, t):   # records what the loop feeds the model: the timesteps and every step's output
        seen_t.append(t)
        seen_x.append(x)
        return fake_model(x, t)

    out = SAMPLERS[sampler](model_fn, latents(), NoiseSchedule.from_config(cfg), n, eta=eta,
                            generator=torch.Generator().manual_seed(0), progress=False)
    assert seen_t == ts_ref   # python numbers: ints, but Euler's unrounded "linspace" floats
    assert all(isinstance(t, int) for t in seen_t) or (sampler == "euler" and cfg.get("timestep_spacing") is None
                                                       or cfg.get("timestep_spacing") == "linspace")
    for ours, ref in zip(seen_x, seen_ref, strict=True):   # the model's inputs at every step
        torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(out, xs_ref[-1], **TOL)
    assert not torch.allclose(out, latents(), atol=0.1)   # it did denoise


def test_noise_draws_follow_the_generator():
    s, x = NoiseSchedule.sd(), latents()
    run = lambda seed: ddpm_sample(fake_model, x, s, 10, generator=torch.Generator().manual_seed(seed), progress=False)
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    ddim = lambda eta, seed: ddim_sample(fake_model, x, s, 10, eta, torch.Generator().manual_seed(seed), False)
    assert torch.equal(ddim(0.0, 3), ddim(0.0, 4))   # eta = 0 draws nothing
    assert not torch.allclose(ddim(1.0, 3), ddim(1.0, 4))
    assert torch.equal(randn((2, 3), torch.Generator().manual_seed(5)),
                       torch.randn((2, 3), generator=torch.Generator().manual_seed(5)))


# ----------------------------------------------------------------------------- step functions directly

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_equals_diffusers_step(prediction_type):
    cfg = {**SD_CONFIG, "prediction_type": prediction_type}
    s, ref = NoiseSchedule.from_config(cfg), DDIMScheduler.from_config(cfg)
    ref.set_timesteps(50)
    x, noise = latents(1), latents(2)
    for t in (981, 501, 1):   # 1 -> -19: past the end, a_prev = a_0 (set_alpha_to_one false)
        out = fake_model(x, t)
        want = ref.step(out, t, x, eta=0.7, variance_noise=noise)
        got = ddim_step(s, out, t, t - 20, x, eta=0.7, noise=noise)
        torch.testing.assert_close(got[0], want.prev_sample, **TOL)
        torch.testing.assert_close(got[1], want.pred_original_sample, **TOL)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(s, out, 21, 1, x, eta=0.5)


def test_dpmpp_first_step_is_ddim_and_last_step_returns_x0():
    s, x = NoiseSchedule.sd(), latents()
    out = fake_model(x, 999)
    # first order DPM-Solver++ is DDIM (Lu et al. 2022, sec. 4.1): same x_{t_prev} from the same x, eps
    torch.testing.assert_close(dpmpp_2m_step(s, out, 999, 500, x)[0], ddim_step(s, out, 999, 500, x)[0],
                               rtol=1e-5, atol=1e-5)
    x_end, x0 = dpmpp_2m_step(s, out, 20, -1, x, x0_last=x, t_last=40)
    assert torch.equal(x_end, x0)   # sigma = 0 at the end: the sample is the x_0 prediction
    # the second-order correction uses x0_last: changing it changes the step
    a = dpmpp_2m_step(s, out, 500, 400, x, x0_last=x, t_last=600)[0]
    b = dpmpp_2m_step(s, out, 500, 400, x, x0_last=2 * x, t_last=600)[0]
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- config I/O

def test_from_pretrained_reads_diffusers_files(tmp_path):
    cfg = CONFIGS["trailing_v"]
    DDIMScheduler.from_config(cfg).save_pretrained(tmp_path / "scheduler")
    from_root = NoiseSchedule.from_pretrained(tmp_path)                     # pipeline folder + subfolder
    from_folder = NoiseSchedule.from_pretrained(tmp_path / "scheduler")     # the component folder itself
    assert from_root == from_folder == NoiseSchedule.from_config(cfg)
    assert from_root.prediction_type == "v_prediction" and from_root.timestep_spacing == "trailing"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="scheduler_config.json"):
        NoiseSchedule.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("name", ["sd", "trailing_v", "defaults"])
def test_to_config_builds_the_same_diffusers_schedulers(name):
    s = NoiseSchedule.from_config(CONFIGS[name])
    assert NoiseSchedule.from_config(s.to_config()) == s
    for sampler, cls in REFERENCE.items():
        ref = cls.from_config(s.to_config())
        ref.set_timesteps(20)
        assert ref.timesteps.tolist() == s.timesteps(20, sampler)
        assert torch.equal(ref.alphas_cumprod, s.alphas_cumprod)


@pytest.mark.parametrize("key,value,match", [("beta_schedule", "cosine", "beta_schedule 'cosine'"),
                                             ("prediction_type", "sample", "prediction_type 'sample'"),
                                             ("timestep_spacing", "even", "timestep_spacing"),
                                             ("trained_betas", [0.1] * 1000, "trained_betas"),
                                             ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr")])
def test_bad_config_is_a_clear_error(key, value, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config({**SD_CONFIG, key: value})


def test_bad_sampler_or_step_count():
    with pytest.raises(ValueError, match="unknown sampler"):
        NoiseSchedule.sd().timesteps(10, "heun")
    with pytest.raises(ValueError, match="1 to 1000"):
        NoiseSchedule.sd().timesteps(0)
