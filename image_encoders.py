"""Image encoders for evaluation and for losses: CLIP (image + text) and DINO ViT (the ArcFace face encoder is
face_encoder.py).

- `CLIPModel`: CLIP (Radford et al. 2021) with both towers and their projections, mirroring transformers'
  `CLIPModel` (models/clip/modeling_clip.py). The vision tower reuses text_encoder.py's `CLIPEncoder`
  without the causal mask; the text tower is text_encoder.py's `CLIPTextTransformer`. Checkpoints:
  `openai/clip-vit-base-patch32` (the CLIP-I / CLIP-T default), `openai/clip-vit-large-patch14`.
- `ViTModel`: the ViT of DINO (Caron et al. 2021), mirroring transformers' `ViTModel` (models/vit/
  modeling_vit.py) as it is saved on the Hub. Checkpoint: `facebook/dino-vits16`; the DINO metric is the
  CLS token after the final layernorm, as in DreamBooth's protocol (Ruiz et al. 2023, sec. 4.1).
- `Preprocess`: what each metric feeds its encoder (resize the short side, center crop, normalise), on PIL
  images for metrics, and as a differentiable function of a (b, 3, H, W) tensor in [-1, 1] for losses.

Checkpoint contract: module names equal the checkpoint keys (`vision_model.pre_layrnorm.weight` (sic),
`vision_model.encoder.layers.0.self_attn.q_proj.weight`, `visual_projection.weight`, `logit_scale`;
`encoder.layer.0.attention.attention.query.weight`, `embeddings.patch_embeddings.projection.weight`), so
weights load with strict=True. Dropped on load: the `position_ids` buffers of older CLIP files and ViT's
`pooler.*` (unused by DINO, absent from ours).

Shapes: b batch, p patches, d width; pixels (b, 3, s, s), tokens (b, 1 + p, d), embeddings (b, e).
"""
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image

import hub
from attention import attention
from text_encoder import ACTIVATIONS, CLIPEncoder, CLIPTextTransformer, CLIPTokenizer, TextEncoderConfig, shipped_vocab

# ----------------------------------------------------------------------------- preprocessing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)    # OpenAI CLIP's clip/clip.py `_transform`
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)              # torchvision's ImageNet statistics, used by DINO's eval
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' `convert_to_rgb` does)."""
    if "A" in image.getbands() or "transparency" in image.info:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize` (bicubic), center crop `crop` x `crop`, normalise by mean/std."""
    resize: int
    crop: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        # the long side is truncated, as torchvision's Resize(int) and transformers' resize compute it
        if width <= height:
            return int(self.resize * height / width), self.resize
        return self.resize, int(self.resize * width / height)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (b, 3, crop, crop) float32: PIL's bicubic on uint8, as transformers' CLIPImageProcessor."""
        crops = []
        for image in images:
            image = to_rgb(image)
            h, w = self.resized_size(image.height, image.width)
            a = np.asarray(image.resize((w, h), Image.BICUBIC))
            top, left = (h - self.crop) // 2, (w - self.crop) // 2  # floor, as transformers' center_crop
            crops.append(a[top:top + self.crop, left:left + self.crop])
        x = torch.from_numpy(rearrange(np.stack(crops), "b h w c -> b c h w").astype(np.float32) / 255)
        return self.normalize(x)

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, 3, crop, crop), differentiable (for losses through an encoder).
        torch's antialiased bicubic uses PIL's kernel; without uint8 rounding it differs from `__call__` by ~1e-2."""
        h, w = self.resized_size(*x.shape[-2:])
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        return self.normalize((x[..., top:top + self.crop, left:left + self.crop] + 1) / 2)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in (self.mean, self.std))
        return (x - mean) / std


def clip_preprocess(size: int = 224) -> Preprocess:  # CLIPImageProcessor: shortest_edge = crop = image size
    return Preprocess(size, size, CLIP_MEAN, CLIP_STD)


def dino_preprocess(size: int = 224) -> Preprocess:
    # DINO's eval_linear.py: Resize(256, bicubic), CenterCrop(224). torchvision rounds the crop offset where
    # we floor it (as transformers), so an odd margin shifts the crop by one pixel
    return Preprocess(size * 256 // 224, size, IMAGENET_MEAN, IMAGENET_STD)

# ----------------------------------------------------------------------------- configs and presets


def config_from_json(cls, d: dict):
    """A config dataclass from a transformers config.json dict; missing keys take the dataclass defaults."""
    if d.get("hidden_act", cls.hidden_act) not in ACTIVATIONS:
        raise ValueError(f"{cls.__name__}: hidden_act={d['hidden_act']!r}, expected one of {list(ACTIVATIONS)}")
    return cls(**{k: d.get(k, v) for k, v in asdict(cls()).items()})


@dataclass(frozen=True)
class CLIPVisionConfig:  # defaults: transformers' CLIPVisionConfig, which is ViT-B/32
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_json(cls, d: dict) -> "CLIPVisionConfig":
        return config_from_json(cls, d)


@dataclass(frozen=True)
class CLIPConfig:
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig.from_json({}))
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512

    @classmethod
    def from_json(cls, d: dict) -> "CLIPConfig":
        """transformers' CLIPConfig json; older files keep overrides in `*_config_dict`, which win (as there)."""
        text = {**d.get("text_config", {}), **(d.get("text_config_dict") or {})}
        vision = {**d.get("vision_config", {}), **(d.get("vision_config_dict") or {})}
        return cls(TextEncoderConfig.from_json(text), CLIPVisionConfig.from_json(vision), d.get("projection_dim", 512))

    def to_json(self) -> dict:
        text = {k: v for k, v in self.text.to_json().items() if k != "architectures"}
        vision = {"model_type": "clip_vision_model", **asdict(self.vision)}
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
                "text_config": text, "vision_config": vision}

    @classmethod
    def vit_b32(cls):  # openai/clip-vit-base-patch32/config.json
        text = TextEncoderConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8)
        return cls(text, CLIPVisionConfig(), 512)

    @classmethod
    def vit_l14(cls):  # openai/clip-vit-large-patch14/config.json; its text tower is SD1's text encoder
        return cls(TextEncoderConfig.sd15(), CLIPVisionConfig(1024, 4096, 24, 16, patch_size=14), 768)

    @classmethod
    def tiny(cls):  # tests: 224 px so the real preprocessing runs, 32 px patches -> 49 tokens
        return cls(TextEncoderConfig.tiny(), CLIPVisionConfig(32, 37, 2, 4), 16)

    @classmethod
    def toy(cls):  # the toy world's CLIP (pretrain.py): 64 px images in 8 px patches, the toy text tower
        return cls(TextEncoderConfig.toy(), CLIPVisionConfig(128, 512, 4, 4, image_size=64, patch_size=8), 64)


@dataclass(frozen=True)
class ViTConfig:  # defaults: transformers' ViTConfig (ViT-B/16)
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    @classmethod
    def from_json(cls, d: dict) -> "ViTConfig":
        return config_from_json(cls, d)

    def to_json(self) -> dict:
        return {"architectures": ["ViTModel"], "model_type": "vit", **asdict(self)}

    @classmethod
    def dino_vits16(cls):  # facebook/dino-vits16/config.json
        return cls(hidden_size=384, intermediate_size=1536, num_attention_heads=6)

    @classmethod
    def tiny(cls):
        return cls(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)

    @classmethod
    def toy(cls):  # the toy world's factor classifier backbone (pretrain.py), also its "DINO" in toy runs
        return cls(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64,
                   patch_size=8)

# ----------------------------------------------------------------------------- CLIP: vision tower and full model


def check_pixels(pixels: torch.Tensor, size: int) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (size, size):
        raise ValueError(f"expected pixels of shape (b, 3, {size}, {size}), got {tuple(pixels.shape)}: "
                         f"run the model's `preprocess` first")


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels):
        x = rearrange(self.patch_embedding(pixels), "b d h w -> b (h w) d")
        cls = repeat(self.class_embedding, "d -> b 1 d", b=x.shape[0])
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """pixels -> (tokens, pooled): pre-LN (CLIP's extra `pre_layrnorm`), the layer stack, LN of the CLS token."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, the checkpoint's name
        self.encoder = CLIPEncoder(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                                   cfg.num_hidden_layers, cfg.hidden_act, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels, ckpt: bool = False):
        check_pixels(pixels, self.image_size)
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False, ckpt=ckpt)
        return x, self.post_layernorm(x[:, 0])

    def hidden_states(self, pixels, layers: list[int]) -> list[torch.Tensor]:
        """Token states numbered as transformers' `hidden_states`: 0 = the input of layer 0 (after pre_layrnorm),
        i = the output of layer i; negative indices count from the end (-1 = the last layer's output)."""
        check_pixels(pixels, self.image_size)
        n = len(self.encoder.layers)
        if any(not -n - 1 <= i <= n for i in layers):
            raise ValueError(f"hidden state indices must be in [{-n - 1}, {n}], got {layers}")
        wanted = [i % (n + 1) for i in layers]
        states = [self.pre_layrnorm(self.embeddings(pixels))]
        for layer in self.encoder.layers[:max(wanted, default=0)]:
            states.append(layer(states[-1], causal=False))
        return [states[i] for i in wanted]


def clip_keys(sd: dict) -> dict:
    """Files written by transformers < 4.31 carry `embeddings.position_ids` buffers (arange): we compute them."""
    return {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


class CLIPModel(nn.Module):
    """Both CLIP towers. Features are projected but not normalised, as transformers' `get_*_features`."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP paper's initial temperature

    @property
    def preprocess(self) -> Preprocess:
        return clip_preprocess(self.config.vision.image_size)

    def _ckpt(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def get_image_features(self, pixels):
        """(b, 3, s, s) normalised pixels -> (b, projection_dim)."""
        return self.visual_projection(self.vision_model(pixels, self._ckpt())[1])

    def tokenizer(self) -> CLIPTokenizer:
        """OpenAI CLIP's vocabulary (SD's too), padded to the text tower's context: 77 (the toy CLIP's: 32)."""
        return CLIPTokenizer(*shipped_vocab(), max_length=self.config.text.max_position_embeddings)

    def get_text_features(self, input_ids):
        """(b, 77) token ids -> (b, projection_dim), from the state at the first EOS."""
        return self.text_projection(self.text_model(input_ids, ckpt=self._ckpt())[1])

    def vision_hidden_states(self, pixels, layers: list[int]) -> list[torch.Tensor]:
        """(b, 1 + p, d) token states of the chosen vision layers (PhotoVerse takes 4, 8, 12, 16 and -1)."""
        return self.vision_model.hidden_states(pixels, layers)

    @classmethod
    def from_pretrained(cls, name_or_path="openai/clip-vit-base-patch32", dtype=torch.float32, device="cpu",
                        revision=None) -> "CLIPModel":
        """A Hub id or a local folder written by transformers' `CLIPModel.save_pretrained` -> model in eval mode."""
        stems = ["model", "pytorch_model"]
        folder = hub.fetch_component(name_or_path, None, stems, revision=revision)
        config = CLIPConfig.from_json(hub.read_json(folder / "config.json"))
        return hub.load_model(lambda: cls(config), folder, stems, None, dtype, device, fix_keys=clip_keys)

    def save_pretrained(self, folder, dtype=None) -> None:
        hub.save_model(self, folder, self.config.to_json(), "model.safetensors", dtype)

# ----------------------------------------------------------------------------- DINO: ViT in transformers' Hub names


class ViTSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden, bias=bias) for _ in range(3))

    def forward(self, x):
        return attention(self.query(x), self.key(x), self.value(x), self.heads)


class Dense(nn.Module):
    """A Linear named `dense`, as transformers' ViTSelfOutput, ViTIntermediate and ViTOutput hold theirs."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool):
        super().__init__()
        self.attention = ViTSelfAttention(hidden, heads, bias)
        self.output = Dense(hidden, hidden)

    def forward(self, x):
        return self.output(self.attention(x))


class ViTLayer(nn.Module):
    """The same pre-norm layer as CLIP's, under ViT's names: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attention = ViTAttention(d, cfg.num_attention_heads, cfg.qkv_bias)
        self.intermediate = Dense(d, cfg.intermediate_size)   # MLP in
        self.output = Dense(cfg.intermediate_size, d)         # MLP out
        self.layernorm_before = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, (cfg.image_size // cfg.patch_size) ** 2 + 1,
                                                            cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)

    def forward(self, pixels):
        x = rearrange(self.patch_embeddings.projection(pixels), "b d h w -> b (h w) d")
        cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0])
        return torch.cat([cls, x], dim=1) + self.position_embeddings


def vit_keys(sd: dict) -> dict:
    """Drop ViTModel's `pooler.*` (a tanh head on the CLS token that DINO never trained and the metric skips)."""
    return {k: v for k, v in sd.items() if not k.startswith("pooler.")}


class ViTModel(nn.Module):
    """pixels -> tokens after the final layernorm, (b, 1 + p, d); `features` is the CLS token (the DINO metric)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def preprocess(self) -> Preprocess:
        return dino_preprocess(self.config.image_size)

    def forward(self, pixels):
        check_pixels(pixels, self.config.image_size)
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

    def features(self, pixels):
        return self(pixels)[:, 0]

    @classmethod
    def from_pretrained(cls, name_or_path="facebook/dino-vits16", dtype=torch.float32, device="cpu",
                        revision=None) -> "ViTModel":
        stems = ["model", "pytorch_model"]
        folder = hub.fetch_component(name_or_path, None, stems, revision=revision)
        config = ViTConfig.from_json(hub.read_json(folder / "config.json"))
        return hub.load_model(lambda: cls(config), folder, stems, None, dtype, device, fix_keys=vit_keys)

    def save_pretrained(self, folder, dtype=None) -> None:
        hub.save_model(self, folder, self.config.to_json(), "model.safetensors", dtype)

# ----------------------------------------------------------------------------- the toy world's factor classifier


@dataclass(frozen=True)
class FactorClassifierConfig:
    factors: dict                           # factor -> its labels, e.g. {"shape": ["circle", ...], ...}
    widths: tuple = (16, 32, 64, 128)       # channels per level; each level after the first halves the image
    image_size: int = 64

    def to_json(self) -> dict:
        return {"architectures": ["FactorClassifier"], **asdict(self), "widths": list(self.widths)}


class FactorClassifier(nn.Module):
    """The toy world's factor classifier (world.py, pretrain.py): a small CNN (two 3x3 conv + GroupNorm + SiLU per
    level, global average pool) and one linear head per factor (shape, colour, scene). A CNN, because a ViT with
    8 px patches learned shapes slowly (under 60% after 1000 steps, where this one passes 95%). Files: config.json
    (the factors with their labels) and model.safetensors."""

    def __init__(self, config: FactorClassifierConfig):
        super().__init__()
        self.config = config
        layers, c = [], 3
        for i, w in enumerate(config.widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(c, len(labels)) for name, labels in config.factors.items()})

    @property
    def factors(self) -> dict[str, list[str]]:
        return self.config.factors

    @property
    def preprocess(self) -> Preprocess:   # the image as it is (64 px), ImageNet-normalised
        return Preprocess(self.config.image_size, self.config.image_size, IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, pixels) -> dict[str, torch.Tensor]:
        """(b, 3, s, s) normalised pixels -> {factor: logits (b, labels)}."""
        check_pixels(pixels, self.config.image_size)
        feature = self.features(pixels).mean(dim=(2, 3))
        return {name: head(feature) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: list[Image.Image], batch_size: int = 64) -> dict[str, list[str]]:
        """PIL images -> {factor: predicted label per image}."""
        device = next(self.parameters()).device
        out = {name: [] for name in self.factors}
        for start in range(0, len(images), batch_size):
            logits = self(self.preprocess(images[start:start + batch_size]).to(device))
            for name, labels in self.factors.items():
                out[name] += [labels[i] for i in logits[name].argmax(-1).tolist()]
        return out

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> "FactorClassifier":
        d = hub.read_json(Path(folder) / "config.json")
        config = FactorClassifierConfig(d["factors"], tuple(d["widths"]), d["image_size"])
        return hub.load_model(lambda: cls(config), Path(folder), ["model"], device=device)

    def save_pretrained(self, folder, dtype=None) -> None:
        hub.save_model(self, folder, self.config.to_json(), "model.safetensors", dtype)
