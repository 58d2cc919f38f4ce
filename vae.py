"""The KL autoencoder of Stable Diffusion: images (b, 3, H, W) in [-1, 1] <-> latents (b, 4, H/8, W/8).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752),
section 3.1: a convolutional encoder E maps an image to a diagonal Gaussian over latents, a decoder D maps
a latent back to an image; the diffusion model works on the latents. Mirrors diffusers'
`models/autoencoders/autoencoder_kl.py` (AutoencoderKL) and `models/autoencoders/vae.py` (Encoder, Decoder,
DiagonalGaussianDistribution), which port CompVis' `ldm/modules/diffusionmodules/model.py`.

Checkpoint-name contract: module names are the keys of the diffusers `vae/diffusion_pytorch_model.safetensors`
(`encoder.down_blocks.0.resnets.1.conv2.weight`, `encoder.mid_block.attentions.0.to_q.weight`,
`decoder.up_blocks.3.resnets.2.conv_shortcut.bias`, `quant_conv.weight`, ...), so official weights load with
`load_state_dict(strict=True)`. Older files name the mid-block attention `query/key/value/proj_attn`:
`rename_legacy_attention` below is the one rename rule.

Shapes: b batch, c channels, h w feature-map height and width, (h w) the tokens of the mid-block attention.
"""
import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

import hub
from attention import attention

# ----------------------------------------------------------------------------- blocks

# Every GroupNorm of the VAE uses eps 1e-6 (diffusers' Encoder/Decoder pass resnet_eps=1e-6; LDM's Normalize).
EPS = 1e-6


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), a 1x1 conv on the skip when the width changes.

    diffusers' ResnetBlock2D with no timestep embedding and dropout 0 (the VAE uses neither).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual connection.

    diffusers builds it as `Attention(heads=channels // attention_head_dim)` with attention_head_dim = channels,
    i.e. one head of width c, as LDM's `AttnBlock`. No float32 upcast: diffusers' default (SDPA) processor
    ignores this block's `upcast_softmax=True` too.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list so the key reads `to_out.0`

    def forward(self, x):
        h, w = x.shape[-2:]
        t = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        t = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1)
        t = self.to_out[0](t)
        return x + rearrange(t, "b (h w) c -> b c h w", h=h, w=w)


class Downsample(nn.Module):
    """Halve h and w with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # The original pads only right and bottom, then convolves with no padding (LDM `Downsample`:
        # "no asymmetric padding in torch conv, must do it ourselves"; diffusers Downsample2D with padding=0).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    """One encoder level: `layers` resnets, then a downsampler (none at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    """One decoder level: `layers` resnets, then an upsampler (none at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (diffusers' UNetMidBlock2D, one attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


def run(block, x, checkpointed: bool):
    """block(x), or the same with its activations recomputed in the backward pass to save memory (only when a
    graph is built: under no_grad there is nothing to save)."""
    return checkpoint(block, x, use_reentrant=False) if checkpointed and torch.is_grad_enabled() else block(x)


# ----------------------------------------------------------------------------- encoder and decoder

class Encoder(nn.Module):
    """Image (b, in, H, W) -> moments (b, 2 * latent, H/f, W/f), f = 2 ** (levels - 1)."""

    def __init__(self, cfg: "VAEConfig"):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block, groups, i < len(widths) - 1)
            for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x, checkpointed: bool = False):
        x = self.conv_in(x)
        for block in [*self.down_blocks, self.mid_block]:
            x = run(block, x, checkpointed)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (b, latent, h, w) -> image (b, out, h*f, w*f). Each level has one resnet more than the encoder's."""

    def __init__(self, cfg: "VAEConfig"):
        super().__init__()
        widths, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1, groups, i < len(widths) - 1)
            for i in range(len(widths))])
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z, checkpointed: bool = False):
        x = self.conv_in(z)
        for block in [self.mid_block, *self.up_blocks]:
            x = run(block, x, checkpointed)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------- the latent distribution

class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents, from the encoder's moments (b, 2 * latent, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as LDM's and diffusers' DiagonalGaussianDistribution do, so exp() stays finite.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self):
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self):
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. As diffusers' `randn_tensor`: eps is drawn on the generator's device (a CPU
        generator draws on the CPU, so a seed gives the same latents on every machine), then moved."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over channels and positions: (b,)."""
        return 0.5 * (self.mean ** 2 + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- config and presets

# What our code assumes of a `vae/config.json`; other autoencoders (no quant convs, other blocks) are refused.
SD_ONLY = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


@dataclass(frozen=True)
class VAEConfig:
    """The fields of `vae/config.json` that vary; defaults are SD 1.x/2.x's VAE (docs/sd-reference.md section 3)."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    sample_size: int = 512
    # Latents are multiplied by this before the UNet sees them (LDM's `scale_factor`, chosen so they have
    # unit variance). diffusers' default, also when SD2's config.json leaves it out (docs/sd-reference.md section 3).
    scaling_factor: float = 0.18215
    # SDXL's VAE (scaling_factor 0.13025) overflows in float16, so its file sets force_upcast and diffusers decodes
    # in float32 unless a fixed VAE says false. diffusers' default is true, but the SD1/2 files predate the key and
    # their pipelines ignore it: false here when a file lacks it.
    force_upcast: bool = False

    @classmethod
    def sd(cls) -> "VAEConfig":
        return PRESETS["sd15"]

    @classmethod
    def sd15(cls) -> "VAEConfig":
        return PRESETS["sd15"]

    @classmethod
    def sd21(cls) -> "VAEConfig":
        return PRESETS["sd21"]

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return PRESETS["tiny"]

    @classmethod
    def toy(cls) -> "VAEConfig":
        return PRESETS["toy"]

    @classmethod
    def from_json(cls, d: dict) -> "VAEConfig":
        """From a diffusers `vae/config.json` dict; missing keys take the defaults above."""
        levels = len(d.get("block_out_channels", cls.block_out_channels))
        expected = {**SD_ONLY, "down_block_types": ["DownEncoderBlock2D"] * levels,
                    "up_block_types": ["UpDecoderBlock2D"] * levels}
        for key, value in expected.items():
            got = list(d[key]) if isinstance(d.get(key), (list, tuple)) else d.get(key, value)
            if got != value:
                raise ValueError(f"vae config has {key}={d[key]!r}: nanobooth's VAE is SD's AutoencoderKL, "
                                 f"which needs {key}={value!r}")
        known = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        return cls(**known)

    def to_json(self) -> dict:
        """A `config.json` dict that `diffusers.AutoencoderKL.from_config` loads back."""
        levels = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self), **SD_ONLY,
                "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}


PRESETS = {
    # SD 1.x/2.x's one VAE: [128, 256, 512, 512], 2 layers per level, 4 latent channels (docs/sd-reference.md section 3)
    "sd15": VAEConfig(),
    # SD 2.x's file says sample_size 768 (even 2.1-base's); diffusers uses it only for tiling, we never do.
    "sd21": VAEConfig(sample_size=768),
    # Four levels like SD (downsampling factor 8, so latents are (b, 4, H/8, W/8)) with tiny widths, for tests.
    "tiny": VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    # The toy world's VAE (pretrain.py): three levels, so 64 px images -> (b, 4, 16, 16) latents (factor 4). Its
    # scaling_factor is measured after training (1 / std of the latents, as LDM chose 0.18215).
    "toy": VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64),
    # stabilityai/stable-diffusion-xl-base-1.0, vae/config.json: SD's architecture, retrained
    "sdxl": VAEConfig(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "tiny_sdxl": VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                           scaling_factor=0.13025, force_upcast=True),
}


# ----------------------------------------------------------------------------- the model

class VAE(nn.Module):
    """encode(x in [-1, 1]) -> DiagonalGaussian over unscaled latents; decode(z) -> x.

    The caller scales: the UNet sees `z * config.scaling_factor`, decode gets `z_unet / config.scaling_factor`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.gradient_checkpointing = False

    @property
    def factor(self) -> int:
        """Pixels per latent side: each level but the last halves the image (8 for SD; diffusers' vae_scale_factor)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x, self.gradient_checkpointing)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z), self.gradient_checkpointing)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct x through a latent sampled from q(z|x)."""
        return self.decode(self.encode(x).sample(generator))

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder: str | None = "vae", dtype=torch.float32, device="cpu",
                        variant: str | None = None, revision: str | None = None, upcast: bool = False) -> "VAE":
        """From a Hub repo id, a pipeline folder (uses `subfolder`) or a `vae/` folder in the diffusers layout.
        `upcast`: float32 instead of a float16 `dtype` when the config says `force_upcast` (SDXL)."""
        folder = hub.fetch_component(name_or_path, subfolder, WEIGHTS_STEMS, variant, revision)
        config = VAEConfig.from_json(hub.read_json(folder / "config.json"))
        if upcast and config.force_upcast and dtype == torch.float16:
            dtype = torch.float32
        return hub.load_model(lambda: cls(config), folder, WEIGHTS_STEMS, variant, dtype, device,
                              fix_keys=rename_legacy_attention)

    def save_pretrained(self, folder, dtype: torch.dtype | None = None) -> None:
        """Write `config.json` and `diffusion_pytorch_model.safetensors`, loadable by diffusers too."""
        hub.save_model(self, folder, self.config.to_json(), f"{WEIGHTS_STEMS[0]}.safetensors", dtype)


# ----------------------------------------------------------------------------- loading

WEIGHTS_STEMS = ["diffusion_pytorch_model"]

# Older diffusers files (and LDM conversions) name the mid-block attention's projections after LDM's AttnBlock;
# diffusers' ModelMixin `_convert_deprecated_attention_blocks` applies the same renames.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
LEGACY_PATTERN = re.compile(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.")
PROJECTION = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def rename_legacy_attention(sd: dict) -> dict:
    """Rename `query/key/value/proj_attn` to `to_q/to_k/to_v/to_out.0`; 1x1-conv weights (c, c, 1, 1) -> (c, c)."""
    fixed = {}
    for name, tensor in sd.items():
        name = LEGACY_PATTERN.sub(lambda m: m[1] + LEGACY_ATTENTION[m[2]] + ".", name)
        if PROJECTION.search(name) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        fixed[name] = tensor
    return fixed
