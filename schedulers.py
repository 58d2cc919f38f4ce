"""Noise schedule and samplers for Stable Diffusion: the forward process and four ways to reverse it.

- `NoiseSchedule`: the discrete forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) of DDPM
  (Ho et al. 2020, https://arxiv.org/abs/2006.11239), where a_t = prod_{s<=t} (1 - beta_s) is
  `alphas_cumprod`; read from `scheduler/scheduler_config.json`. It adds noise, gives the training
  target (eps, or v of Salimans & Ho 2022), converts a model output to x_0 / eps, and lists the
  inference timesteps of each sampler.
- Samplers, each a pure `*_step` function and a loop with one signature,
  `*_sample(model_fn, latents, schedule, steps, eta, generator, progress)`:
  DDIM (Song et al. 2020, https://arxiv.org/abs/2010.02502), ancestral DDPM, DPM-Solver++(2M)
  (Lu et al. 2022, https://arxiv.org/abs/2211.01095), and Euler's method on the probability-flow ODE in
  sigma (Karras et al. 2022, https://arxiv.org/abs/2206.00364, Algorithm 1 without its 2nd-order step;
  SDXL's default scheduler).
- `guided`: classifier-free guidance, a wrapper that turns the UNet into the `model_fn` a sampler calls.

Mirrors diffusers' `schedulers/scheduling_ddim.py`, `scheduling_ddpm.py`,
`scheduling_dpmsolver_multistep.py` (algorithm_type "dpmsolver++", solver_order 2, their defaults) and
`scheduling_euler_discrete.py` (s_churn 0, linear interpolation, no Karras sigmas) step for step: the
same config gives the same timesteps and, in float32, the same numbers. There is no `set_timesteps()`
state: a sampler asks the schedule for its timesteps and passes t, t_prev (and for DPM-Solver the
previous x_0 prediction) to its step function.

Config keys are diffusers' names and defaults (those of `DDIMScheduler`), so a config file reads the
same here as there. The SD1/SD2 files lack `timestep_spacing`; diffusers then uses "leading" for
DDIM/DDPM but "linspace" for DPM-Solver and Euler, so we keep it `None` and let each sampler pick. SDXL's
file says "leading" with `steps_offset` 1, which every sampler then follows.

Shapes: x, x_0, eps, v (b, c, h, w); per-sample timesteps t (b,) long; a sampler's t is a python int.
"""
import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from tqdm import tqdm

from hub import component_dir, read_json

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Config keys that would change the schedule, with the only value we support (diffusers' default).
_UNSUPPORTED = {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero"}


# ----------------------------------------------------------------------------- helpers

def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """'squaredcos_cap_v2': betas from abar(t) = cos^2((t + s) / (1 + s) * pi / 2) with s = 0.008 and
    beta capped at 0.999 (Nichol & Dhariwal 2021, eq. 17; diffusers' `betas_for_alpha_bar`)."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _per_sample(values: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """values[t] as x's dtype/device, shaped (b, 1, 1, 1) to broadcast over x (diffusers' order of casts)."""
    t = torch.as_tensor(t, device=x.device)
    return values.to(x.device).to(x.dtype)[t].reshape(-1, *[1] * (x.ndim - 1))


def _x0_and_eps(model_out, x, alpha, sigma, prediction_type):
    """x_t = alpha x_0 + sigma eps: recover (x_0, eps) from eps, or from v = alpha eps - sigma x_0."""
    if prediction_type == "epsilon":
        return (x - sigma * model_out) / alpha, model_out
    return alpha * x - sigma * model_out, alpha * model_out + sigma * x


def randn(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved (as diffusers' `randn_tensor`), so a
    CPU generator gives the same numbers whatever device the sampler runs on. A list of generators draws row i
    from generator i (diffusers does the same), so an image's noise does not depend on its batch."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)


# ----------------------------------------------------------------------------- noise schedule

@dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 0              # added to "leading" timesteps (SD files: 1)
    set_alpha_to_one: bool = True      # DDIM's a_prev after the last step: 1, or a_0 (SD files: false)
    clip_sample: bool = True           # clamp predicted x_0 in DDIM/DDPM (SD files: false; pixels only)
    clip_sample_range: float = 1.0
    timestep_spacing: str | None = None  # None: each sampler's diffusers default (see module docstring)
    betas: torch.Tensor = field(init=False, repr=False, compare=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for key, value, allowed in (("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                    ("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                    ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS + (None,))):
            if value not in allowed:
                raise ValueError(f"scheduler {key} '{value}' is not supported: use one of {allowed}")
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the LDM / SD schedule
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float32) ** 2
        else:
            betas = cosine_betas(n)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    # --- construction

    @classmethod
    def sd(cls, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """The scheduler_config.json of SD1.x / SD2.x (v_prediction for the 768px SD2 models)."""
        return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
                   steps_offset=1, set_alpha_to_one=False, clip_sample=False)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """From a diffusers scheduler config (any scheduler class); keys we do not use are ignored."""
        for key, default in _UNSUPPORTED.items():
            if config.get(key, default) != default:
                raise ValueError(f"scheduler config sets '{key}', which nanobooth does not support "
                                 f"(only {key}={default!r}): use a standard SD scheduler_config.json")
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder: str = "scheduler", revision: str | None = None):
        """From `scheduler_config.json` in a Hub repo, a pipeline folder, or the scheduler folder itself."""
        folder = component_dir(name_or_path, subfolder, ["scheduler_config.json"], revision)
        return cls.from_config(read_json(folder / "scheduler_config.json"))

    def to_config(self) -> dict:
        """A dict that diffusers' DDIM/DDPM/DPMSolverMultistep `from_config` reads as the same schedule."""
        config = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if config["timestep_spacing"] is None:
            del config["timestep_spacing"]
        return config

    # --- forward process and training targets (t per sample, shape (b,))

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (DDPM eq. 4)."""
        a = _per_sample(self.alphas_cumprod, t, x0)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def velocity(self, x0, noise, t):
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022, sec. 4)."""
        a = _per_sample(self.alphas_cumprod, t, x0)
        return a ** 0.5 * noise - (1 - a) ** 0.5 * x0

    def target(self, x0, noise, t):
        """What the model learns to output: eps or v, by `prediction_type`."""
        return noise if self.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t), shape (b,) (for min-SNR weighting, Hang et al. 2023)."""
        a = self.alphas_cumprod.to(torch.as_tensor(t).device)[t]
        return a / (1 - a)

    def pred_x0(self, x_t, model_out, t):
        a = _per_sample(self.alphas_cumprod, t, x_t)
        return _x0_and_eps(model_out, x_t, a ** 0.5, (1 - a) ** 0.5, self.prediction_type)[0]

    def pred_eps(self, x_t, model_out, t):
        a = _per_sample(self.alphas_cumprod, t, x_t)
        return _x0_and_eps(model_out, x_t, a ** 0.5, (1 - a) ** 0.5, self.prediction_type)[1]

    # --- inference

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        """DDIM's a_prev after its last step: 1 (a clean x_0) or a_0 with set_alpha_to_one false."""
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, n: int, sampler: str = "ddim") -> list[int]:
        """The n timesteps, high to low, that diffusers' scheduler for `sampler` visits.

        Spacings are Table 2 of Lin et al. 2023 (https://arxiv.org/abs/2305.08891). DPM-Solver lays a
        grid of n + 1 points and drops the last (t = 0), which its final step replaces with sigma = 0.
        Euler's "linspace" points are not rounded (floats: its sigmas are interpolated between timesteps).
        """
        T = self.num_train_timesteps
        check_sampler(sampler)
        if not 1 <= n <= T:
            raise ValueError(f"{n} inference steps: use 1 to {T} (num_train_timesteps)")
        grid = n + 1 if sampler == "dpmpp" else n
        spacing = self.timestep_spacing or ("linspace" if sampler in ("dpmpp", "euler") else "leading")
        if spacing == "linspace" and sampler == "euler":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].tolist()
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, grid).round()[::-1][:n]
        elif spacing == "leading":
            ts = (np.arange(0, grid) * (T // grid)).round()[::-1][:n] + self.steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        return ts.astype(np.int64).tolist()


# ----------------------------------------------------------------------------- DDIM (Song et al. 2020)

def ddim_step(schedule: NoiseSchedule, model_out, t: int, t_prev: int, x, eta: float = 0.0, noise=None):
    """One DDIM update x_t -> x_{t_prev} (eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like.
    Returns (x_{t_prev}, predicted x_0). `noise` ~ N(0, I) is needed when eta > 0."""
    # 1. alphas: a_t and a_{t_prev} (past the last step: `final_alpha_cumprod`)
    a_t = schedule.alphas_cumprod[t]
    a_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else schedule.final_alpha_cumprod
    b_t, b_prev = 1 - a_t, 1 - a_prev
    # 2. predicted x_0 and eps from the model output: "f_theta(x_t, t)" of eq. 9
    x0, eps = _x0_and_eps(model_out, x, a_t ** 0.5, b_t ** 0.5, schedule.prediction_type)
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    # 3. sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16)
    sigma = eta * ((b_prev / b_t) * (1 - a_t / a_prev)) ** 0.5
    # 4. x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z   (eq. 12)
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_sample(model_fn, latents, schedule: NoiseSchedule, steps: int, eta: float = 0.0, generator=None,
                progress: bool = True):
    """Denoise `latents` (pure noise: init_noise_sigma is 1 here) in `steps` DDIM steps."""
    x = latents
    for t in tqdm(schedule.timesteps(steps, "ddim"), desc="DDIM", disable=not progress):
        out = model_fn(x, t)
        noise = randn(out.shape, generator, out.dtype, out.device) if eta > 0 else None
        # diffusers' DDIMScheduler always steps to t - T // steps: the next listed timestep under "leading"
        # (and "trailing" when steps divides T), not under "linspace". We step where it does.
        x, _ = ddim_step(schedule, out, t, t - schedule.num_train_timesteps // steps, x, eta, noise)
    return x


# ----------------------------------------------------------------------------- DDPM (Ho et al. 2020)

def ddpm_step(schedule: NoiseSchedule, model_out, t: int, t_prev: int, x, noise=None):
    """One ancestral step x_t -> x_{t_prev}, a sample of the posterior q(x_{t_prev} | x_t, x_0) with
    x_0 predicted; "fixed_small" variance. t_prev = t - 1 in training order, the next listed timestep
    with fewer inference steps, -1 after the last. Returns (x_{t_prev}, predicted x_0).
    `noise` ~ N(0, I) is needed when t > 0."""
    # 1. alphas over the jump t -> t_prev: alpha_t = a_t / a_prev, beta_t = 1 - alpha_t
    a_t = schedule.alphas_cumprod[t]
    a_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    # 2. predicted x_0 (eq. 15)
    x0, _ = _x0_and_eps(model_out, x, a_t ** 0.5, b_t ** 0.5, schedule.prediction_type)
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    # 3. posterior mean mu = sqrt(a_prev) beta_t / (1 - a_t) x_0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t   (eq. 7)
    mean = (a_prev ** 0.5 * beta_t) / b_t * x0 + alpha_t ** 0.5 * b_prev / b_t * x
    if t == 0:
        return mean, x0
    if noise is None:
        raise ValueError("ddpm_step with t > 0 needs `noise`")
    # 4. x_prev = mu + sigma z, sigma^2 = (1 - a_prev) / (1 - a_t) beta_t (eq. 7's beta-tilde), floored at
    # 1e-20 (diffusers: it is logged in other variance types) so the final step adds ~1e-10 noise
    variance = torch.clamp(b_prev / b_t * beta_t, min=1e-20)
    return mean + variance ** 0.5 * noise, x0


def ddpm_sample(model_fn, latents, schedule: NoiseSchedule, steps: int, eta: float = 0.0, generator=None,
                progress: bool = True):
    """Denoise `latents` in `steps` ancestral steps (`eta` is unused: DDPM is always stochastic)."""
    x, ts = latents, schedule.timesteps(steps, "ddpm")
    for i, t in enumerate(tqdm(ts, desc="DDPM", disable=not progress)):
        out = model_fn(x, t)
        noise = randn(out.shape, generator, out.dtype, out.device) if t > 0 else None
        x, _ = ddpm_step(schedule, out, t, ts[i + 1] if i + 1 < len(ts) else -1, x, noise)
    return x


# ----------------------------------------------------------------------------- DPM-Solver++(2M) (Lu et al. 2022)

def _dpm_alpha_sigma(schedule: NoiseSchedule, t: int):
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps, via diffusers' route sigma = sqrt((1 - a) / a),
    alpha = 1 / sqrt(sigma^2 + 1), so the float32 numbers are theirs. t < 0 is the end: sigma = 0."""
    a = schedule.alphas_cumprod
    s = ((1 - a) / a) ** 0.5
    s = s[t] if t >= 0 else torch.tensor(0.0)
    alpha = 1 / (s ** 2 + 1) ** 0.5
    return alpha, s * alpha


def dpmpp_2m_step(schedule: NoiseSchedule, model_out, t: int, t_prev: int, x, x0_last=None, t_last: int | None = None):
    """One DPM-Solver++(2M) step t -> t_prev (Algorithm 2; t_{i-1} -> t_i in the paper), t_prev = -1 to
    end at sigma = 0. `x0_last` is the x_0 predicted at the previous step's timestep `t_last`; without
    it (the first step), or when ending (diffusers' final_sigmas_type "zero"), the step is first order,
    i.e. DDIM. Returns (x_{t_prev}, predicted x_0), the latter for the next call's `x0_last`."""
    # 1. alpha, sigma and lambda = log(alpha / sigma) (half the log-SNR) at t_i = t_prev and t_{i-1} = t
    alpha_i, sigma_i = _dpm_alpha_sigma(schedule, t_prev)
    alpha_s, sigma_s = _dpm_alpha_sigma(schedule, t)
    lambda_i = torch.log(alpha_i) - torch.log(sigma_i)
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
    # 2. the data prediction x_theta(x_{t_{i-1}}, t_{i-1}): DPM-Solver++ integrates x_0, not eps
    x0, _ = _x0_and_eps(model_out, x, alpha_s, sigma_s, schedule.prediction_type)
    # 3. h_i = lambda_{t_i} - lambda_{t_{i-1}}; the update runs in float32 (as diffusers) whatever x's dtype
    h = lambda_i - lambda_s
    dtype, x = model_out.dtype, x.float()
    if x0_last is None or t_prev < 0:
        # 4a. first order: x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x - alpha_{t_i} (e^{-h_i} - 1) x_theta
        return ((sigma_i / sigma_s) * x - (alpha_i * (torch.exp(-h) - 1.0)) * x0).to(dtype), x0
    # 4b. second order: r_i = h_{i-1} / h_i and D_i = (1 + 1/(2 r_i)) x_theta(i-1) - 1/(2 r_i) x_theta(i-2),
    # written as diffusers does: D0 + D1 / 2 with D0 = x_theta(i-1), D1 = (x_theta(i-1) - x_theta(i-2)) / r_i
    alpha_last, sigma_last = _dpm_alpha_sigma(schedule, t_last)
    lambda_last = torch.log(alpha_last) - torch.log(sigma_last)
    r = (lambda_s - lambda_last) / h
    D0, D1 = x0, (1.0 / r) * (x0 - x0_last)
    x_prev = (sigma_i / sigma_s) * x - (alpha_i * (torch.exp(-h) - 1.0)) * D0 \
        - 0.5 * (alpha_i * (torch.exp(-h) - 1.0)) * D1
    return x_prev.to(dtype), x0


def dpmpp_sample(model_fn, latents, schedule: NoiseSchedule, steps: int, eta: float = 0.0, generator=None,
                 progress: bool = True):
    """Denoise `latents` in `steps` DPM-Solver++(2M) steps (deterministic: `eta`, `generator` unused)."""
    x, ts = latents, schedule.timesteps(steps, "dpmpp")
    x0_last = t_last = None
    for i, t in enumerate(tqdm(ts, desc="DPM-Solver++", disable=not progress)):
        out = model_fn(x, t)
        x, x0 = dpmpp_2m_step(schedule, out, t, ts[i + 1] if i + 1 < len(ts) else -1, x, x0_last, t_last)
        x0_last, t_last = x0, t
    return x


# ----------------------------------------------------------------------------- Euler (Karras et al. 2022)

def euler_sigmas(schedule: NoiseSchedule, timesteps) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) at each timestep (linearly interpolated between integer ones), then a
    final 0: x_t / sqrt(a_t) = x_0 + sigma_t eps is the variance-exploding form the ODE runs in."""
    sigmas = (((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod) ** 0.5).numpy()
    sigmas = np.interp(np.asarray(timesteps, dtype=np.float32), np.arange(len(sigmas)), sigmas)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def euler_step(schedule: NoiseSchedule, model_out, sigma, sigma_next, x):
    """One Euler step of dx/dsigma = (x - x_0) / sigma from sigma to sigma_next, x in the scaled form
    x = x_t / sqrt(a_t) (Karras et al. Algorithm 1, lines 5-8, with gamma = 0). Returns (x_next, predicted x_0)."""
    dtype, x = model_out.dtype, x.float()  # diffusers steps in float32 whatever the model's dtype
    # 1. x_0 from the model output, which saw x / sqrt(sigma^2 + 1) = sqrt(a_t) x / ... = x_t
    if schedule.prediction_type == "epsilon":
        x0 = x - sigma * model_out
    else:  # v = alpha eps - sigma_vp x_0, written in the VE form
        x0 = model_out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    # 2. d = (x - x_0) / sigma; x_next = x + (sigma_next - sigma) d
    derivative = (x - x0) / sigma
    return (x + derivative * (sigma_next - sigma)).to(dtype), x0


def euler_sample(model_fn, latents, schedule: NoiseSchedule, steps: int, eta: float = 0.0, generator=None,
                 progress: bool = True):
    """Denoise `latents` ~ N(0, I) in `steps` Euler steps (deterministic: `eta`, `generator` unused)."""
    ts = schedule.timesteps(steps, "euler")
    sigmas = euler_sigmas(schedule, ts)
    # x_T = sigma_max eps in the VE form; diffusers' "leading" files use sqrt(sigma_max^2 + 1) (`init_noise_sigma`)
    spacing = schedule.timestep_spacing or "linspace"
    x = latents * (sigmas.max() if spacing in ("linspace", "trailing") else (sigmas.max() ** 2 + 1) ** 0.5)
    for i, t in enumerate(tqdm(ts, desc="Euler", disable=not progress)):
        sigma = sigmas[i]
        out = model_fn(x / (sigma ** 2 + 1) ** 0.5, t)  # back to the x_t the model was trained on (scale_model_input)
        x, _ = euler_step(schedule, out, sigma, sigmas[i + 1], x)
    return x


# ----------------------------------------------------------------------------- classifier-free guidance and the table

def guided(unet, cond, uncond, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps(c_neg) + w * (eps(c) - eps(c_neg)).

    As in diffusers, guidance only runs when w > 1; then both halves go through the UNet as one batch
    ordered [negative, positive]. `cond` is the text tokens (b, m, d) or a dict of the UNet's inputs
    (pipeline.py's `text_conditioning`; SDXL adds text_embeds and time_ids).
    """
    cond, uncond = ({"encoder_hidden_states": c} if torch.is_tensor(c) else c for c in (cond, uncond))
    if scale <= 1.0:
        return lambda x, t: unet(x, t, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def model_fn(x, t):
        out = unet(torch.cat([x, x]), t, **both)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)
    return model_fn


SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample, "dpmpp": dpmpp_sample, "euler": euler_sample}


def check_sampler(name: str) -> None:
    """The one check of a sampler's name (the CLIs' --sampler, `generate`, `NoiseSchedule.timesteps`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}': --sampler must be one of {', '.join(SAMPLERS)}")
