"""PhotoVerse: personalization from one face image, with no fine-tuning per person.

Chen et al. 2023, "PhotoVerse: Tuning-Free Image Customization with Text-to-Image Diffusion Models",
arXiv 2309.05793; its equations are docs/methods.md section 4, whose [paper] / [ours]
marks the comments below repeat. Adapters trained once over a dataset of aligned faces map a face to

    - m pseudo-words p_f (text adapters, one per CLIP layer), which replace the placeholder S* in the
      prompt at the text encoder's input embeddings, and
    - image tokens f (image adapter), which every UNet cross-attention reads through new projections:

          O = gamma * Attn(Q, K_T, V_T) + sigma * Attn(Q, K_S, V_S),   K_S = W_k^S f,  V_S = W_v^S f

with LoRA on the text branch's W_k, W_v. Training (photoverse_train.py) minimises

    L = L_ldm + 0.01 L_face + 0.01 mean|p_f| + 0.001 mean|V_S|,   L_face = 1 - cos(F(x_face), F(x_hat_face))

Where each part comes from: the text and image adapters follow ELITE's `Mapper` and `MapperLocal` (Wei et al.
2023, arXiv 2302.13848, github.com/csyxwei/ELITE), which the paper builds on; the cross-attention mirrors
unet.py's `Attention` with two projections added (`to_k_s`, `to_v_s`); LoRA is lora.py's.

This is a different kind of training from train.py's: adapters over a face dataset, not a fine-tune on
one subject's photos, and its models are more than `SDModels` (a CLIP image tower, the adapters, a face
encoder). This file is the model and its use: the adapters, the dual-branch cross-attention and random fusion,
the placeholder S*, the checkpoint, and inference (`face_condition`, which sample.py --method photoverse uses). Its
pretraining (the loss, the face data, the batches) is photoverse_train.py, and it runs through train.py's loop
(`--method photoverse`: methods.py's table names its pieces).

Checkpoint contract: the base UNet keeps its key names (`...attn2.to_k.weight` still loads strict=True);
the trained parts are one safetensors file, `photoverse.safetensors`, holding only `adapters.*` and
`unet.{...}.attn2.to_k.lora_A.weight` / `lora_B` / `to_v...` / `to_k_s.weight` / `to_v_s.weight`, with the
PhotoVerse config and the base model's identity (widths, UNet config hash, CLIP vision config) in its metadata.

Shapes: b batch, m pseudo-words, p image patches, d_v CLIP vision width, d text width, n = 77 tokens;
CLIP states (b, 1 + p, d_v), words (b, m, d), image tokens f (b, p, d_ctx), prompt embeddings (b, n, d).
"""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import pipeline
from attention import attention
from data import prepare
from hub import atomic_write, read_safetensors
from image_encoders import CLIPModel, ViTModel
from lora import inject_lora, set_lora_scale
from pipeline import SDModels, load_models, text_conditioning
from unet import Attention

PLACEHOLDER = "S*"                  # the word a prompt names the person with
CHECKPOINT_NAME = "photoverse.safetensors"

# ----------------------------------------------------------------------------- adapters


def mapping(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    """Two MLP layers of width `hidden` (1024 [paper]) with LayerNorm and leaky ReLU, then a projection to d_out:
    ELITE's mapping network, layer for layer."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, d_out))


class TextAdapter(nn.Module):
    """One pseudo-word per CLIP layer [paper]: p_i = mapping_i(CLS_i) + mean_patches mapping_patch_i(patch_i).

    The paper's "two blocks" are read as ELITE's pair, one block for the CLS token and one for the patch
    tokens, averaged over patches [ours, following ELITE's `Mapper`]."""

    def __init__(self, layers: int, d_vision: int, d_text: int, hidden: int):
        super().__init__()
        self.mapping = nn.ModuleList(mapping(d_vision, d_text, hidden) for _ in range(layers))
        self.mapping_patch = nn.ModuleList(mapping(d_vision, d_text, hidden) for _ in range(layers))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        words = [cls_map(s[:, 0]) + patch_map(s[:, 1:]).mean(dim=1)
                 for s, cls_map, patch_map in zip(states, self.mapping, self.mapping_patch)]
        return torch.stack(words, dim=1)                                   # (b, m, d)


class ImageAdapter(nn.Module):
    """Image tokens f [paper: same structure as the text adapter]: one token per patch,
    f_j = mean over layers i of (mapping_i(CLS_i) + mapping_patch_i(patch_ij)) [ours, ELITE's `MapperLocal`]."""

    def __init__(self, layers: int, d_vision: int, d_context: int, hidden: int):
        super().__init__()
        self.mapping = nn.ModuleList(mapping(d_vision, d_context, hidden) for _ in range(layers))
        self.mapping_patch = nn.ModuleList(mapping(d_vision, d_context, hidden) for _ in range(layers))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        tokens = [cls_map(s[:, :1]) + patch_map(s[:, 1:])               # the CLS term broadcasts over patches
                  for s, cls_map, patch_map in zip(states, self.mapping, self.mapping_patch)]
        return torch.stack(tokens).mean(dim=0)                             # (b, p, d_ctx)


class Adapters(nn.Module):
    """Both adapters: the chosen CLIP layers' states -> (pseudo-words (b, m, d), image tokens (b, p, d_ctx))."""

    def __init__(self, layers: int, d_vision: int, d_text: int, d_context: int, hidden: int):
        super().__init__()
        self.text = TextAdapter(layers, d_vision, d_text, hidden)
        self.image = ImageAdapter(layers, d_vision, d_context, hidden)

    def forward(self, states):
        return self.text(states), self.image(states)

# ----------------------------------------------------------------------------- dual-branch cross-attention


def per_row(w, x: torch.Tensor):
    """A fusion weight as a number, or a (b,) tensor of one weight per row, shaped to scale (b, n, c)."""
    return w if isinstance(w, (int, float)) else w.to(x.device, x.dtype).view(-1, 1, 1)


class DualAttention(Attention):
    """unet.Attention's cross-attention with an image branch [paper]:
    O = gamma * Attn(Q, K_T, V_T) + sigma * Attn(Q, K_S, V_S), through the one `attention` function.

    It holds the base projections themselves under their names (to_q, to_k, to_v, to_out), so the base
    weights load strict=True and LoRA can replace `to_k` / `to_v`. The image tokens f and the weights
    gamma, sigma are set before a UNet forward by `set_image_condition`; they stay set (so gradient
    checkpointing recomputes the same forward) until the next call."""

    def __init__(self, base: Attention):
        nn.Module.__init__(self)                                           # the base modules, not new ones
        self.heads, self.upcast = base.heads, base.upcast
        self.to_q, self.to_k, self.to_v, self.to_out = base.to_q, base.to_k, base.to_v, base.to_out
        # W_k^S, W_v^S initialised from the text W_k, W_v [ours]; float32, as every trained weight
        self.to_k_s, self.to_v_s = (nn.Linear(lin.weight.shape[1], lin.weight.shape[0], bias=False,
                                              device=lin.weight.device) for lin in (base.to_k, base.to_v))
        with torch.no_grad():
            self.to_k_s.weight.copy_(base.to_k.weight)
            self.to_v_s.weight.copy_(base.to_v.weight)
        self.image_tokens, self.gamma, self.sigma = None, 1.0, 1.0

    def forward(self, x, context=None):
        if self.image_tokens is None:
            raise RuntimeError("PhotoVerse cross-attention without image tokens: call set_image_condition first")
        f = self.image_tokens
        q = self.to_q(x)
        text = attention(q, self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        image = attention(q, self.to_k_s(f), self.to_v_s(f), self.heads, upcast=self.upcast)
        return self.to_out(per_row(self.gamma, text) * text + per_row(self.sigma, image) * image)


def add_image_branch(unet: nn.Module) -> list[str]:
    """Replace every cross-attention (`attn2`) by a DualAttention around it; returns their names."""
    names = [name for name, m in unet.named_modules() if name.endswith("attn2") and type(m) is Attention]
    if not names:
        raise ValueError("add_image_branch: the UNet has no plain `attn2` cross-attention (already added?)")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, DualAttention(unet.get_submodule(name)))
    return names


def dual_layers(unet: nn.Module) -> list[DualAttention]:
    return [m for m in unet.modules() if isinstance(m, DualAttention)]


def set_image_condition(unet: nn.Module, tokens: torch.Tensor, gamma=1.0, sigma=1.0) -> None:
    """Give every cross-attention the image tokens f (b, p, d_ctx) and the fusion weights (numbers, or (b,)
    tensors with one weight per row) for the next UNet forward."""
    layers = dual_layers(unet)
    if not layers:
        raise ValueError("the UNet has no image branch: call add_image_branch first")
    for m in layers:
        m.image_tokens, m.gamma, m.sigma = tokens, gamma, sigma


def draw_fusion(generator: torch.Generator | None = None) -> tuple[float, float]:
    """Random fusion [paper], one draw per training forward: u ~ U(0, 1); u < 1/3 -> (gamma, sigma) = (2, 0),
    text branch only; u > 2/3 -> (0, 2), image branch only; otherwise (1, 1), both."""
    u = float(torch.rand(1, generator=generator))
    if u < 1 / 3:
        return 2.0, 0.0
    if u > 2 / 3:
        return 0.0, 2.0
    return 1.0, 1.0

# ----------------------------------------------------------------------------- the placeholder S*


def add_placeholder(tokenizer) -> int:
    """Make S* one token (CLIP's BPE splits it in two), so a prompt marks one position; returns its id. The
    id is past the text encoder's embedding table: its row is never looked up, the pseudo-words replace it."""
    return tokenizer.vocab[PLACEHOLDER] if PLACEHOLDER in tokenizer.vocab else tokenizer.add_token(PLACEHOLDER)


def check_prompts(prompts: list[str], negatives: list[str] = ()) -> None:
    for p in prompts:
        if p.count(PLACEHOLDER) != 1:
            raise ValueError(f"a PhotoVerse prompt names the person with {PLACEHOLDER} exactly once, e.g. "
                             f"'a photo of {PLACEHOLDER} as a chef'; got {p.count(PLACEHOLDER)} in '{p}'")
    for p in negatives:
        if PLACEHOLDER in p:
            raise ValueError(f"the negative prompt '{p}' must not contain {PLACEHOLDER}")


def expand_placeholder(ids: list[int], placeholder: int, m: int, eos: int, pad: int, length: int = 77):
    """[BOS, ..., S*, ..., EOS] -> S* repeated m times, the rest shifted right, cut to `length` with EOS kept
    last (as the tokenizer cuts), padded. Returns (ids, position of the first pseudo-word)."""
    p = ids.index(placeholder)
    ids = ids[:p] + [placeholder] * m + ids[p + 1:]
    if len(ids) > length:
        if p + m > length - 1:
            raise ValueError(f"{PLACEHOLDER} falls past CLIP's {length} tokens once its {m} pseudo-words are in: "
                             f"shorten the prompt before {PLACEHOLDER}")
        ids = ids[:length - 1] + [eos]
    return ids + [pad] * (length - len(ids)), p


def embed_prompts(tokenizer, text_encoder, prompts: list[str], words: torch.Tensor):
    """Prompts with one S* each and words (b, m, d) -> (input_ids (b, n), inputs_embeds (b, n, d)): the token
    embeddings with S*'s row replaced by the m pseudo-words [paper]. The ids keep the placeholder id at the
    word positions; the text encoder reads them only to find the (shifted) EOS it pools at."""
    check_prompts(prompts)
    placeholder = add_placeholder(tokenizer)
    table = text_encoder.text_model.embeddings.token_embedding
    device = table.weight.device
    all_ids, all_embeds = [], []
    for prompt, w in zip(prompts, words):
        ids, p = expand_placeholder(tokenizer.encode(prompt), placeholder, w.shape[0], tokenizer.eos_token_id,
                                    tokenizer.pad_token_id, tokenizer.max_length)
        ids = torch.tensor(ids, device=device)
        rows = table(ids.masked_fill(ids == placeholder, tokenizer.pad_token_id))  # any valid id: replaced below
        all_ids.append(ids)
        all_embeds.append(torch.cat([rows[:p], w.to(rows.dtype), rows[p + w.shape[0]:]]))
    return torch.stack(all_ids), torch.stack(all_embeds)


def encode_with_words(tokenizer, text_encoder, prompts: list[str], words: torch.Tensor) -> torch.Tensor:
    """c for prompts with S*: the text encoder's last hidden state (b, 77, d) on the injected embeddings."""
    ids, embeds = embed_prompts(tokenizer, text_encoder, prompts, words)
    return text_encoder(ids, inputs_embeds=embeds)[0]

# ----------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class PhotoVerseConfig:
    """What rebuilds the trained parts; stored in the checkpoint."""
    vision_layers: tuple[int, ...] = (-1, 4, 8, 12, 16)  # CLIP hidden states [ours, ELITE's layers and order]
    adapter_dim: int = 1024                              # adapter width [paper]
    rank: int = 4                                        # LoRA rank [ours]
    lora_alpha: float | None = None                      # LoRA alpha; None: = rank, so the scale alpha / rank is 1,
                                                         # the paper's K = W_k + alpha dW with alpha = 1 [paper]
    resolution: int = 512                                # of training images; inference prepares a face alike

    @classmethod
    def from_json(cls, d: dict) -> "PhotoVerseConfig":
        return cls(**{**d, "vision_layers": tuple(d["vision_layers"])})


@dataclass
class IdentityEncoder:
    """F in L_face: (b, 3, H, W) in [-1, 1] -> (b, e) identity embeddings. An ArcFace IResNet when a checkpoint
    is given, otherwise DINO [ours]; `name` says which, for logs and reports."""
    model: object              # the network, kept frozen and in eval mode
    transform: object          # differentiable preprocessing of a [-1, 1] tensor (Preprocess.tensor)
    name: str

    def __call__(self, x):
        pixels = self.transform(x.float())              # antialiased resizing has no half-precision CPU kernel
        if isinstance(self.model, nn.Module):
            pixels = pixels.to(next(self.model.parameters()).dtype)
        return (self.model.features if isinstance(self.model, ViTModel) else self.model)(pixels)


@dataclass
class PhotoVerseModels(SDModels):
    """SD's parts plus the frozen CLIP image tower, the adapters, and (training only) the face encoder."""
    vision: CLIPModel
    adapters: Adapters
    config: PhotoVerseConfig
    identity: IdentityEncoder | None = None


def is_trained(name: str) -> bool:
    """UNet parameters PhotoVerse trains: LoRA on the text branch, and W_k^S, W_v^S [paper]."""
    return ".lora_" in name or name.endswith((".to_k_s.weight", ".to_v_s.weight"))


def check_layers(layers, n: int) -> tuple[int, ...]:
    """Hidden-state indices of a CLIP image tower with n layers (0 = its input, n or -1 = the last output)."""
    bad = [i for i in layers if not -n - 1 <= i <= n]
    if bad or not layers or len(set(i % (n + 1) for i in layers)) != len(layers):
        raise ValueError(f"--vision_layers {','.join(map(str, layers))}: give distinct CLIP hidden-state indices in "
                         f"[{-n - 1}, {n}] (the image tower has {n} layers; -1 is the last)")
    return tuple(layers)


def attach(sd: SDModels, vision: CLIPModel, config: PhotoVerseConfig, identity: IdentityEncoder | None = None,
           lora_init: str = "gaussian"):
    """Freeze every pretrained part, then add the trained ones [paper]: the adapters, the image branch
    (W_k^S, W_v^S) in every cross-attention, LoRA on the text branch's to_k / to_v (A initialised by `lora_init`,
    lora.py's INITS). Returns PhotoVerseModels."""
    check_layers(config.vision_layers, vision.config.vision.num_hidden_layers)
    frozen = [sd.unet, sd.vae, sd.text_encoder, vision] + ([identity.model] if identity else [])
    for m in frozen:
        m.requires_grad_(False).eval()                                     # eval: no BatchNorm statistics move
    add_placeholder(sd.tokenizer)
    add_image_branch(sd.unet)
    inject_lora(sd.unet, ("to_k", "to_v"), rank=config.rank, alpha=config.lora_alpha, filter=lambda n: ".attn2." in n,
                init=lora_init)
    adapters = Adapters(len(config.vision_layers), vision.config.vision.hidden_size, sd.text_encoder.config.hidden_size,
                        sd.unet.config.cross_attention_dim, config.adapter_dim).to(sd.device)
    models = PhotoVerseModels(**vars(sd), vision=vision, adapters=adapters, config=config, identity=identity)
    for p in trainable_parameters(models):
        p.requires_grad_(True)
    return models


def trainable_parameters(models: PhotoVerseModels) -> list[nn.Parameter]:
    return list(models.adapters.parameters()) + [p for n, p in models.unet.named_parameters() if is_trained(n)]


FACE_CROP = 1.3                     # the reference image: the face box enlarged 1.3 times [paper]


def reference_faces(x: torch.Tensor, masks: torch.Tensor, expand: float = FACE_CROP) -> torch.Tensor:
    """What the adapters see [paper]: per row, the face region's bounding box enlarged `expand` times about its centre
    (kept inside the image), cropped from the image with the non-face pixels masked to 0 (mid-grey in [-1, 1]
    [ours]) and resized back to H x W. x (b, 3, H, W) in [-1, 1], masks (b, 1, H, W) in [0, 1]. An all-ones mask
    (an aligned face with no region given) returns the image unchanged."""
    out = []
    H, W = x.shape[-2:]
    for xi, mi in zip(x, masks):
        rows, cols = torch.nonzero(mi[0] > 0.5, as_tuple=True)
        box = []
        for lo, hi, size in ((rows.min().item(), rows.max().item() + 1, H), (cols.min().item(), cols.max().item() + 1, W)):
            n = min(size, round((hi - lo) * expand))                     # the enlarged side, in pixels
            start = min(max((lo + hi - n) // 2, 0), size - n)            # centred on the box, inside the image
            box += [start, start + n]
        top, bottom, left, right = box
        crop = (xi * (mi > 0.5).to(xi.dtype))[:, top:bottom, left:right]
        if crop.shape[-2:] != (H, W):
            crop = torch.nn.functional.interpolate(crop[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        out.append(crop)
    return torch.stack(out)


def image_states(models: PhotoVerseModels, x: torch.Tensor) -> list[torch.Tensor]:
    """Images (b, 3, H, W) in [-1, 1] -> the chosen CLIP layers' token states, each (b, 1 + p, d_v), in the
    adapters' dtype; the tower is frozen."""
    vision, dtype = models.vision, next(models.adapters.parameters()).dtype
    with torch.no_grad():
        pixels = vision.preprocess.tensor(x.float()).to(next(vision.parameters()).dtype)
        return [s.to(dtype) for s in vision.vision_hidden_states(pixels, list(models.config.vision_layers))]

# ----------------------------------------------------------------------------- checkpoint: the trained parts only


def base_identity(sd: SDModels, vision: CLIPModel) -> dict:
    """What an adapter checkpoint must match: the widths it maps into, the UNet it adds layers to, the CLIP
    tower it reads. Weights are not hashed: a fine-tune of the same base (same configs) fits."""
    unet_config = json.dumps(sd.unet.config.to_json(), sort_keys=True)
    return {"text_hidden_size": sd.text_encoder.config.hidden_size,
            "cross_attention_dim": sd.unet.config.cross_attention_dim,
            "unet_config_sha256": hashlib.sha256(unet_config.encode()).hexdigest(),
            "clip_vision": asdict(vision.config.vision)}


def trained_state(models: PhotoVerseModels) -> dict[str, torch.Tensor]:
    state = {f"adapters.{k}": v for k, v in models.adapters.state_dict().items()}
    return state | {f"unet.{n}": p for n, p in models.unet.named_parameters() if is_trained(n)}


def save_adapter(path, models: PhotoVerseModels, info: dict) -> Path:
    """Write the trained parts and, in the metadata, the config, the base identity and `info` (base model,
    CLIP model, face loss, step)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in trained_state(models).items()}
    meta = {"config": asdict(models.config), "base": base_identity(models, models.vision), **info}
    path = Path(path)
    metadata = {"format": "pt", "photoverse": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def adapter_file(path) -> Path:
    path = Path(path).expanduser()
    return path / CHECKPOINT_NAME if path.is_dir() else path


def read_adapter_meta(path) -> dict:
    """The metadata of a PhotoVerse checkpoint (a file, or a train.py output or checkpoint folder); no tensors read."""
    file = adapter_file(path)
    if not file.is_file():
        raise ValueError(f"--adapter '{path}' does not exist: pass photoverse.safetensors or the folder train.py "
                         f"--method photoverse wrote")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = (f.metadata() or {}).get("photoverse")
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read adapter checkpoint '{file}': {e}") from None
    if meta is None:
        raise ValueError(f"'{file}' is not a PhotoVerse adapter checkpoint (no 'photoverse' metadata)")
    return json.loads(meta)


def check_base(meta: dict, sd: SDModels, vision: CLIPModel, path) -> None:
    """One clear line when the checkpoint was built for another base model or another CLIP tower."""
    have = base_identity(sd, vision)
    for key, want in meta["base"].items():
        if have.get(key) != want:
            raise ValueError(f"adapter '{path}' was built for another base model: {key} is {want} there, "
                             f"{have.get(key)} here; use the base it was trained on ('{meta.get('base_model')}', CLIP "
                             f"'{meta.get('clip_model')}')")


@torch.no_grad()
def load_trained_parts(models: PhotoVerseModels, path) -> None:
    """Copy a checkpoint's tensors into the attached parts; the key sets must be equal."""
    file = adapter_file(path)
    tensors = read_safetensors(file)[0]
    own = trained_state(models)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter '{file}' does not fit these models: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, target in own.items():
        if target.shape != tensors[name].shape:
            raise ValueError(f"adapter '{file}': {name} has shape {tuple(tensors[name].shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(tensors[name])


def load_photoverse(adapter, model: str | None = None, dtype=torch.float32, device="cpu",
                    lora_scale: float | None = None) -> PhotoVerseModels:
    """Inference models from an adapter checkpoint: its base SD model (or `model`), its CLIP tower, the parts.
    `lora_scale`: the paper's alpha in K = W_k + alpha dW, V = W_v + alpha dW at inference (None: as trained, 1 by
    default; 0: the base text branch)."""
    meta = read_adapter_meta(adapter)
    sd = load_models(model or meta["base_model"], dtype=dtype, device=device)
    vision = CLIPModel.from_pretrained(meta["clip_model"], dtype=dtype, device=device)
    check_base(meta, sd, vision, adapter)
    models = attach(sd, vision, PhotoVerseConfig.from_json(meta["config"]))
    load_trained_parts(models, adapter)
    if lora_scale is not None:
        set_lora_scale(models.unet, lora_scale)
    models.unet.to(dtype)                       # the trained parts in the inference dtype too
    models.adapters.to(dtype)
    return models

# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def face_condition(models: PhotoVerseModels, face: Image.Image, num_words: int = 1, gamma: float = 1.0,
                   sigma: float = 1.0, face_mask: Image.Image | None = None):
    """The image condition of the person in `face`, as pipeline.generate's `condition`: one forward of the adapters
    here, then for each batch of prompts the text with the pseudo-words and the image tokens in every cross-attention.

    face_mask: the face region of `face` (white = face, the image's size); given, the adapters see the 1.3x face crop
    with the rest masked, as in pretraining with masks or boxes (`reference_faces`); None: the whole aligned image.

    num_words m: the first m pseudo-words (the last CLIP layer's first) replace S*; 1 by default [paper].
    gamma, sigma: the fusion weights, options at inference (default 1, 1 [paper]). With guidance, the
    unconditional half has no image branch (gamma 1, sigma 0) [ours, as ELITE and IP-Adapter drop the
    image condition from the unconditional prediction], so guidance strengthens the face too."""
    if not 1 <= num_words <= len(models.config.vision_layers):
        raise ValueError(f"--num_words must be in 1..{len(models.config.vision_layers)} (one per CLIP layer), "
                         f"got {num_words}")
    device, dtype = models.device, next(models.unet.parameters()).dtype
    x = prepare(face, models.config.resolution)[None].to(device)          # as the pretraining prepared faces
    if face_mask is not None:
        if face_mask.size != face.size:
            raise ValueError(f"the face mask is {face_mask.size[0]}x{face_mask.size[1]}, the face image "
                             f"{face.size[0]}x{face.size[1]}: a mask must have its image's size")
        m = (prepare(face_mask.convert("RGB"), models.config.resolution).mean(dim=0, keepdim=True) + 1) / 2
        if not (m > 0.5).any():
            raise ValueError("the face mask is empty after cropping to the adapters' resolution: white marks the face")
        x = reference_faces(x, m[None].to(device))
    words, tokens = models.adapters(image_states(models, x))
    words, tokens = words[:, :num_words], tokens.to(dtype)

    def condition(models, prompts, negatives, guidance):
        check_prompts(prompts, negatives)
        b = len(prompts)
        cond = {"encoder_hidden_states": encode_with_words(models.tokenizer, models.text_encoder, prompts,
                                                           words.expand(b, -1, -1))}
        f = tokens.expand(b, -1, -1)
        if guidance <= 1.0:
            set_image_condition(models.unet, f, gamma, sigma)
            return cond, None
        ones = torch.ones(b)                    # rows [unconditional, conditional], the order `guided` uses
        set_image_condition(models.unet, torch.cat([f, f]), torch.cat([ones, gamma * ones]),
                            torch.cat([0 * ones, sigma * ones]))
        return cond, text_conditioning(models, negatives)
    return condition


def generate(models: PhotoVerseModels, face: Image.Image, prompts: list[str], negative_prompt: str | list[str] = "",
             num_words: int = 1, gamma: float = 1.0, sigma: float = 1.0, face_mask: Image.Image | None = None,
             **settings):
    """One image per prompt of the person in `face` (`face_condition`); `settings`: pipeline.generate's (seed,
    steps, guidance, sampler, eta, height, width, latents, progress, output)."""
    return pipeline.generate(models, prompts, negative_prompt, **settings,
                             condition=face_condition(models, face, num_words, gamma, sigma, face_mask))
