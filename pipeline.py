"""The model bundle: load a Stable Diffusion model once (any layout), add tokens and LoRAs, generate images.

    models = load_trained("runs/dreambooth")          # a Hub id, a diffusers folder, a single file, a train.py output
    images = generate(models, ["a photo of sks dog on the beach"], seed=0, steps=50, guidance=7.5)

`generate` mirrors diffusers' `StableDiffusionPipeline.__call__` (and `StableDiffusionXLPipeline.__call__`
for SDXL) so that a seed gives the same image in both (tests/test_sample.py checks it within 1/255 per pixel):

    1. encode the prompts and the negative prompts with the CLIP text encoder -> c, c_neg (b, 77, d);
       SDXL: two encoders, their pooled text and the six size/crop numbers (`text_conditioning`, `time_ids`)
    2. draw z_T ~ N(0, I) of shape (b, 4, H/8, W/8) in float32 on the CPU from torch.Generator(seed), or each
       image from its own generator (a list of seeds, diffusers' `generator=[...]`)
    3. run a sampler (DDIM, DDPM, DPM-Solver++, Euler) on eps_hat = guided(unet, c, c_neg, w)
    4. decode x = D(z_0 / s) with the VAE (s = vae.config.scaling_factor) and map [-1, 1] -> [0, 255]

This is the library the scripts share: sample.py (the sampling CLI), train.py (class images, validation),
eval.py, export.py, pretrain.py and photoverse.py (whose image condition enters step 1 through `condition`).
A model is read from, and written to, a diffusers-layout folder (`load_models`, `save_models`) or an original
single file (`load_single_file`, `save_single_file`; single_file.py holds that layout's rename rules).
"""
import dataclasses
import json
import warnings
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from data import to_pil
from hub import ModelLoadError, atomic_write, component_dir, read_json, read_safetensors
from lora import load_lora, merged_state_dict
from schedulers import SAMPLERS, NoiseSchedule, check_sampler, guided
from single_file import (OPENCLIP, VOCAB_SIZE, XL_OPENCLIP, build, configs_for, detect_family, extract, family_of,
                         fuse_qkv, is_single_file, layout, ldm_shape, read_checkpoint)
from text_encoder import CLIPTextModel, CLIPTokenizer, TextEncoderConfig
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml/... is gone (docs/sd-reference.md section 1)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- models

@dataclass
class SDModels:
    """The four parts of a Stable Diffusion model plus its noise schedule; SDXL has a second text encoder."""
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: VAE
    schedule: NoiseSchedule
    _: KW_ONLY                                    # SDXL's parts, by keyword only, so subclasses can add fields
    tokenizer_2: CLIPTokenizer | None = None      # SDXL: OpenCLIP ViT-bigG's tokenizer (pads with "!")
    text_encoder_2: CLIPTextModel | None = None   # SDXL: OpenCLIP ViT-bigG's text tower, with text_projection
    force_zeros_for_empty_prompt: bool = False    # SDXL's model_index.json: an empty negative prompt is all zeros

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def text_encoders(self) -> dict:
        """{"text_encoder": ..., "text_encoder_2": ...} (the second for SDXL only), keyed as the folders are."""
        pairs = (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2))
        return {k: m for k, m in pairs if m is not None}


def read_model_index(name_or_path, revision=None) -> dict:
    """The pipeline's model_index.json ({} if a local folder has none): which parts there are (SDXL: text_encoder_2)."""
    root = component_dir(name_or_path, None, ["model_index.json"], revision)
    return read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}


def load_models(name_or_path=DEFAULT_MODEL, dtype=torch.float32, device="cpu", revision=None, variant=None) -> SDModels:
    """Load all parts from a Hub id or a local diffusers-layout folder (each part from its subfolder),
    or from an original single-file checkpoint (.safetensors / .ckpt, read by single_file.py)."""
    if is_single_file(name_or_path):
        return load_single_file(name_or_path, dtype=dtype, device=device)
    kw = dict(dtype=dtype, device=device, revision=revision, variant=variant)
    index = read_model_index(name_or_path, revision)
    second = {}
    if (index.get("text_encoder_2") or [None])[0]:  # SDXL: the second tokenizer and text encoder
        second = dict(tokenizer_2=CLIPTokenizer.from_pretrained(name_or_path, "tokenizer_2", revision=revision),
                      text_encoder_2=CLIPTextModel.from_pretrained(name_or_path, "text_encoder_2", **kw),
                      force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))  # pipeline default
    return SDModels(tokenizer=CLIPTokenizer.from_pretrained(name_or_path, revision=revision),
                    text_encoder=CLIPTextModel.from_pretrained(name_or_path, **kw),
                    unet=UNet.from_pretrained(name_or_path, **kw),
                    vae=VAE.from_pretrained(name_or_path, **kw, upcast=True),  # SDXL's VAE stays float32 (force_upcast)
                    schedule=NoiseSchedule.from_pretrained(name_or_path, revision=revision), **second)


def save_models(models: SDModels, folder, dtype=None) -> None:
    """Write a complete diffusers-layout folder that `load_models` and diffusers' `StableDiffusionPipeline`
    both load. Each file is written atomically; model_index.json goes last, so a folder that has it is whole."""
    folder = Path(folder)
    models.tokenizer.save_pretrained(folder / "tokenizer")
    models.text_encoder.save_pretrained(folder / "text_encoder", dtype=dtype)
    models.unet.save_pretrained(folder / "unet", dtype=dtype)
    models.vae.save_pretrained(folder / "vae", dtype=dtype)
    config = {"_class_name": "DDIMScheduler", **models.schedule.to_config()}
    atomic_write(folder / "scheduler" / "scheduler_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if models.text_encoder_2 is not None:  # SDXL: StableDiffusionXLPipeline's parts
        models.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        models.text_encoder_2.save_pretrained(folder / "text_encoder_2", dtype=dtype)
        del index["requires_safety_checker"], index["safety_checker"]
        index.update({"_class_name": "StableDiffusionXLPipeline", "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "force_zeros_for_empty_prompt": models.force_zeros_for_empty_prompt})
    atomic_write(folder / "model_index.json", lambda p: p.write_text(json.dumps(index, indent=2)))


# ----------------------------------------------------------------------------- one original-layout file
# The CompVis / A1111 / ComfyUI layout: single_file.py renames its keys to ours and back; here are the models.

def load_single_file(path, unet_config: UNetConfig | None = None, vae_config: VAEConfig | None = None,
                     text_config: TextEncoderConfig | None = None, prediction_type: str | None = None,
                     dtype=torch.float32, device="cpu") -> SDModels:
    """An SD 1.x/2.x single file -> SDModels. Configs: the arguments, else the file's `nanobooth` metadata,
    else the SD1.5 / SD2.1-base presets of the detected family. EMA copies (`model_ema.*`) and LDM's
    schedule buffers (`alphas_cumprod`, ...) are ignored: the schedule is SD's (NoiseSchedule.sd)."""
    sd, metadata = read_checkpoint(path)
    family = detect_family(sd, path)
    unet_cfg, vae_cfg, text_cfg, schedule, text_cfg_2 = configs_for(family, metadata, prediction_type)
    unet_cfg, vae_cfg, text_cfg = unet_config or unet_cfg, vae_config or vae_cfg, text_config or text_cfg
    if family == "sdxl":
        return load_sdxl(sd, path, unet_cfg, vae_cfg, text_cfg, text_cfg_2, schedule, dtype, device)
    if family_of(text_cfg) != family:
        raise ModelLoadError(f"'{path}' is {family.upper()} (its text encoder keys) but the text config is "
                             f"{family_of(text_cfg).upper()}'s ({text_cfg.hidden_act}): pass a matching text_config")
    parts = layout(unet_cfg, vae_cfg, text_cfg)
    part = {name: extract(sd, prefix, names, text_cfg.num_hidden_layers) for name, (prefix, names) in parts.items()}
    return SDModels(tokenizer=CLIPTokenizer.from_pretrained(None, pad_token="!" if family == "sd2" else None),
                    text_encoder=build(CLIPTextModel, text_cfg, part["text_encoder"], path, dtype, device),
                    unet=build(UNet, unet_cfg, part["unet"], path, dtype, device),
                    vae=build(VAE, vae_cfg, part["vae"], path, dtype, device),
                    schedule=schedule)


def load_sdxl(sd: dict, path, unet_cfg, vae_cfg, text_cfg, text_cfg_2, schedule, dtype, device) -> SDModels:
    """The SDXL branch of `load_single_file`: two text encoders, the shipped vocabulary for both tokenizers
    (CLIP-L pads with EOS, OpenCLIP-bigG with '!'), and the pipeline's force_zeros_for_empty_prompt."""
    parts = layout(unet_cfg, vae_cfg, text_cfg, text_cfg_2)
    part = {name: extract(sd, prefix, names, 0) for name, (prefix, names) in parts.items()}
    return SDModels(tokenizer=CLIPTokenizer.from_pretrained(None),
                    text_encoder=build(CLIPTextModel, text_cfg, part["text_encoder"], path, dtype, device),
                    unet=build(UNet, unet_cfg, part["unet"], path, dtype, device),
                    vae=build(VAE, vae_cfg, part["vae"], path, torch.float32 if vae_cfg.force_upcast and
                              dtype == torch.float16 else dtype, device),
                    schedule=schedule, tokenizer_2=CLIPTokenizer.from_pretrained(None, pad_token="!"),
                    text_encoder_2=build(CLIPTextModel, text_cfg_2, part["text_encoder_2"], path, dtype, device),
                    force_zeros_for_empty_prompt=True)


def to_single_file(models: SDModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The models' weights in the single-file layout; LoRA updates are merged in (the models are not changed)."""
    text_cfg = models.text_encoder.config
    if text_cfg.vocab_size != VOCAB_SIZE:
        raise ValueError(f"the text encoder has {text_cfg.vocab_size - VOCAB_SIZE} added token(s) (Textual "
                         f"Inversion): a single file has no tokenizer to hold them; share the embeddings file instead")
    text_cfg_2 = models.text_encoder_2.config if models.text_encoder_2 is not None else None
    parts = layout(models.unet.config, models.vae.config, text_cfg, text_cfg_2)
    sd = {}
    for name, model in (("unet", models.unet), ("vae", models.vae), *models.text_encoders.items()):
        prefix, names = parts[name]
        weights = merged_state_dict(model)
        if prefix in (OPENCLIP, XL_OPENCLIP):
            weights = fuse_qkv(weights)
        for key, tensor in weights.items():
            tensor = tensor.detach().to("cpu", dtype or tensor.dtype)
            sd[prefix + names[key]] = ldm_shape(names[key], tensor).contiguous()
    return sd


def architecture(models: SDModels) -> str:
    """The Stability AI model spec's id (github.com/Stability-AI/ModelSpec), which web UIs show."""
    if models.text_encoder_2 is not None:
        return "stable-diffusion-xl-v1-base"
    if family_of(models.text_encoder.config) == "sd1":
        return "stable-diffusion-v1"
    v_model = models.schedule.prediction_type == "v_prediction"
    return "stable-diffusion-v2-768-v" if v_model else "stable-diffusion-v2-512"


def save_single_file(models: SDModels, path, dtype: torch.dtype | None = None, title: str | None = None) -> Path:
    """Write one original-layout `.safetensors` (dtype None keeps the models' dtype). Its metadata holds
    the model spec's architecture id and our configs (`nanobooth`), so `load_single_file` rebuilds any size."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file output must end in .safetensors (we never write pickles), got '{path}'")
    sd = to_single_file(models, dtype)
    configs = {"unet": dataclasses.asdict(models.unet.config), "vae": dataclasses.asdict(models.vae.config),
               "text_encoder": dataclasses.asdict(models.text_encoder.config),
               "scheduler": models.schedule.to_config()}
    if models.text_encoder_2 is not None:
        configs["text_encoder_2"] = dataclasses.asdict(models.text_encoder_2.config)
    metadata = {"format": "pt", "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture(models),
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.title": title or path.stem, "nanobooth": json.dumps(configs)}
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))
    return path


RESULT_INFO = "nanobooth.json"  # written by train.py next to a LoRA or embeddings file: base model + files


def write_result_info(folder, info: dict) -> None:
    atomic_write(Path(folder) / RESULT_INFO, lambda p: p.write_text(json.dumps(info, indent=2)))


def add_token(models: SDModels, token: str, vector: torch.Tensor, encoder: str = "text_encoder") -> list[int]:
    """Add a word to the tokenizer and its row `vector` (d,) to the text encoder's embedding table (Textual
    Inversion); `encoder="text_encoder_2"`: SDXL's second pair. A (n, d) `vector` is a multi-vector token, written
    as n tokens wherever the word is (CLIPTokenizer.add_vectors). Returns the new token ids."""
    tokenizer, text_encoder = getattr(models, encoder.replace("text_encoder", "tokenizer")), getattr(models, encoder)
    rows = vector.reshape(-1, vector.shape[-1])
    ids = tokenizer.add_vectors(token, rows.shape[0])
    embeddings = text_encoder.text_model.embeddings
    old = embeddings.token_embedding.weight
    table = torch.nn.Embedding(old.shape[0] + len(ids), old.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        table.weight[:old.shape[0]] = old
        table.weight[ids] = rows.to(old)
    embeddings.token_embedding = table
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=table.weight.shape[0])
    return ids


SDXL_EMBEDDINGS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # A1111's SDXL embeddings (diffusers reads)


def add_embeddings(models: SDModels, embeddings: dict[str, torch.Tensor], tokens: list[str]) -> None:
    """A Textual Inversion file into the models: {token: (d,) or (n, d)} (SD1/2, diffusers' learned_embeds), or
    SDXL's {"clip_l": (n, 768), "clip_g": (n, 1280)}: one row per token of `tokens` in each encoder, or, for one
    token, its n vectors."""
    if set(embeddings) == set(SDXL_EMBEDDINGS):
        for key, encoder in SDXL_EMBEDDINGS.items():
            if len(tokens) == 1:
                add_token(models, tokens[0], embeddings[key], encoder)
                continue
            for token, vector in zip(tokens, embeddings[key]):
                add_token(models, token, vector, encoder)
        return
    for token, vector in embeddings.items():
        add_token(models, token, vector)


def load_trained(name_or_path, dtype=torch.float32, device="cpu") -> SDModels:
    """`load_models`, and also a train.py output or checkpoint folder: a complete model folder loads as it is;
    a LoRA or Textual Inversion result loads its base model (named in nanobooth.json) and applies its file."""
    folder = Path(name_or_path)
    if (folder / "model_index.json").is_file() or not (folder / RESULT_INFO).is_file():
        return load_models(name_or_path, dtype=dtype, device=device)
    info = read_json(folder / RESULT_INFO)
    models = load_models(info["base_model"], dtype=dtype, device=device)
    if "lora" in info:
        load_lora(folder / info["lora"], {"unet": models.unet, **models.text_encoders})
    if "embeddings" in info:                  # one file, or one per token (diffusers reads one token per file)
        files = [info["embeddings"]] if isinstance(info["embeddings"], str) else info["embeddings"]
        for file in files:
            add_embeddings(models, read_safetensors(folder / file)[0], info.get("tokens", []))
    return models


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ----------------------------------------------------------------------------- the pipeline

def text_conditioning(models: SDModels, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The UNet's text inputs for `prompts`, for sampling and training alike (no no_grad: the encoders may train).

    SD1/2: {"encoder_hidden_states": the text encoder's last hidden state (b, 77, d)}; the pooled output is unused.
    SDXL (Podell et al. 2023, sec. 2.1; diffusers' `StableDiffusionXLPipeline.encode_prompt`): each encoder's
    penultimate hidden state (hidden_states[-2], before the final LayerNorm), concatenated along features
    (b, 77, 768 + 1280), and "text_embeds", text_encoder_2's projected pooled output (b, 1280).
    """
    if models.text_encoder_2 is None:
        return {"encoder_hidden_states": models.text_encoder(models.tokenizer(prompts).to(models.device))[0]}
    states = []
    for tokenizer, encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
        _, pooled, hidden_states = encoder(tokenizer(prompts).to(models.device), output_hidden_states=True)
        states.append(hidden_states[-2])
    return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}  # pooled: text_encoder_2's


def time_ids(original_size, crop_top_left, target_size, n: int = 1) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2), (n, 6): the training image's size before resizing
    (h, w), the top-left corner (top, left) of the crop taken from it, and the output size (h, w)."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]] * n, dtype=torch.float32)


@torch.no_grad()
def encode_prompts(models: SDModels, prompts: list[str]) -> torch.Tensor:
    """c = the `encoder_hidden_states` of `text_conditioning`: (b, 77, d)."""
    return text_conditioning(models, prompts)["encoder_hidden_states"]


def generators(seed: int | list[int]):
    """One CPU generator seeded `seed`, or one per image for a list of seeds (as diffusers' `generator=[...]`)."""
    if isinstance(seed, (list, tuple)):
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
    return torch.Generator("cpu").manual_seed(int(seed))


def initial_latents(n: int, height: int, width: int, seed: int | list[int], channels: int = 4,
                    factor: int = 8) -> torch.Tensor:
    """z_T drawn exactly as diffusers draws it: float32, on the CPU, from one generator seeded once, or with a list
    of n seeds image i from its own (then image i alone, with its seed, is the same image). `factor`: the VAE's
    downsampling (8 for SD, 4 for the toy world's model)."""
    shape = (n, channels, height // factor, width // factor)
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"{n} images need {n} seeds, got {len(seed)}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators(seed)])
    return torch.randn(shape, generator=generators(seed), dtype=torch.float32)


def prompt_conditioning(models: SDModels, prompts: list[str], negatives: list[str], guidance: float):
    """(cond, uncond): the UNet's inputs (`text_conditioning`) for the prompts and, with guidance (w > 1), for the
    negative prompts; uncond is None without guidance."""
    cond = text_conditioning(models, prompts)
    if guidance <= 1.0:
        return cond, None
    if models.force_zeros_for_empty_prompt and not any(negatives):
        return cond, {k: torch.zeros_like(v) for k, v in cond.items()}  # SDXL: no negative prompt -> zero embeddings
    return cond, text_conditioning(models, negatives)


@torch.no_grad()
def generate(models: SDModels, prompts: list[str], negative_prompt: str | list[str] = "", seed: int | list[int] = 0,
             steps: int = 50, guidance: float = 7.5, sampler: str = "ddim", eta: float = 0.0,
             height: int = 512, width: int = 512, latents: torch.Tensor | None = None,
             progress: bool = True, output: str = "pil", condition=None):
    """Generate one image per prompt. Returns PIL images (output="pil") or the decoded tensor in [-1, 1]. `seed`: one
    seed for the batch (diffusers' `generator=Generator().manual_seed(seed)`), or one per image. `condition`: a
    function with `prompt_conditioning`'s signature that gives the UNet's inputs instead (photoverse.py's face)."""
    check_settings(height, width, steps, guidance, sampler)
    # The parts may hold different dtypes (train.py keeps what trains float32 and casts frozen parts to the
    # mixed-precision dtype), so each input is cast to the dtype of the part that reads it.
    device, dtype = models.device, next(models.unet.parameters()).dtype
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    cond, uncond = (condition or prompt_conditioning)(models, prompts, negatives, guidance)
    if models.unet.config.addition_embed_type == "text_time":  # SDXL: generate at the size asked for, uncropped
        ids = time_ids((height, width), (0, 0), (height, width), len(prompts)).to(device, dtype)
        for c in filter(None, (cond, uncond)):
            c["time_ids"] = ids
    cond, uncond = ({k: v.to(dtype) for k, v in c.items()} if c else None for c in (cond, uncond))
    if latents is None:
        latents = initial_latents(len(prompts), height, width, seed, factor=models.vae.factor)
    generator = generators(seed)                # only DDPM and DDIM with eta > 0 draw more noise
    z0 = SAMPLERS[sampler](guided(models.unet, cond, uncond, guidance), latents.to(device, dtype), models.schedule,
                           steps, eta=eta, generator=generator, progress=progress)
    vae_dtype = next(models.vae.parameters()).dtype  # float32 for a force_upcast VAE loaded as float16
    images = models.vae.decode(z0.to(vae_dtype) / models.vae.config.scaling_factor)
    return to_pil(images) if output == "pil" else images


# ----------------------------------------------------------------------------- checks

def check_settings(height, width, steps, guidance, sampler) -> None:
    """Cheap checks with a one-line message saying what to change, before any model loads."""
    for name, size in (("height", height), ("width", width)):
        if size % 8 or size <= 0:
            raise ValueError(f"--{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {size}: "
                             f"try {max(8, size // 8 * 8)}")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (1 disables guidance; 7.5 is the usual value), got {guidance}")
    check_sampler(sampler)


def warn_long_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> None:
    for p in dict.fromkeys(prompts):
        dropped = tokenizer.dropped_words(p)
        if dropped:
            warnings.warn(f"prompt longer than {tokenizer.max_length} tokens; CLIP drops: '{dropped}'", stacklevel=2)
