"""Text-to-image sampling: load an SD model once, generate images, write PNGs and a grid.

    python sample.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a cat"
    python sample.py --model runs/dreambooth --prompt "a photo of sks dog on the beach" --num_images 4
    python sample.py --model stabilityai/stable-diffusion-xl-base-1.0 --sampler euler --prompt "a photo of a cat"

The pipeline mirrors diffusers' `StableDiffusionPipeline.__call__` (and `StableDiffusionXLPipeline.__call__`
for SDXL) so that a seed gives the same image in both (tests/test_sample.py checks it within 1/255 per pixel):

    1. encode the prompts and the negative prompts with the CLIP text encoder -> c, c_neg (b, 77, d);
       SDXL: two encoders, their pooled text and the six size/crop numbers (`text_conditioning`, `time_ids`)
    2. draw z_T ~ N(0, I) of shape (b, 4, H/8, W/8) in float32 on the CPU from torch.Generator(seed), or each
       image from its own generator (a list of seeds, diffusers' `generator=[...]`)
    3. run a sampler (DDIM, DDPM, DPM-Solver++, Euler) on eps_hat = guided(unet, c, c_neg, w)
    4. decode x = D(z_0 / s) with the VAE (s = vae.config.scaling_factor) and map [-1, 1] -> [0, 255]

`generate()` is the function other modules (class-image generation in train.py, eval.py) call. The CLI gives
image i the seed --seed + i, so any image is drawn again alone with its recorded seed, and writes each PNG's
settings as text chunks plus AUTOMATIC1111's `parameters` chunk (`a1111_parameters`).
"""
import dataclasses
import json
import math
import warnings
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import cli
from hub import ModelLoadError, atomic_write, component_dir, looks_like_path, read_json, read_safetensors
from schedulers import SAMPLERS, NoiseSchedule
from text_encoder import CLIPTextModel, CLIPTokenizer
from unet import UNet
from vae import VAE

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
    if str(name_or_path).endswith((".safetensors", ".ckpt")):
        from single_file import load_single_file
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
        from lora import load_lora
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


def guided(unet, cond, uncond, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps(c_neg) + w * (eps(c) - eps(c_neg)).

    As in diffusers, guidance only runs when w > 1; then both halves go through the UNet as one batch
    ordered [negative, positive]. `cond` is the text tokens (b, m, d) or a dict of the UNet's inputs
    (`text_conditioning`; SDXL adds text_embeds and time_ids).
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


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(b, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers' `numpy_to_pil` does."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]


@torch.no_grad()
def generate(models: SDModels, prompts: list[str], negative_prompt: str | list[str] = "", seed: int | list[int] = 0,
             steps: int = 50, guidance: float = 7.5, sampler: str = "ddim", eta: float = 0.0,
             height: int = 512, width: int = 512, latents: torch.Tensor | None = None,
             progress: bool = True, output: str = "pil"):
    """Generate one image per prompt. Returns PIL images (output="pil") or the decoded tensor in [-1, 1]. `seed`: one
    seed for the batch (diffusers' `generator=Generator().manual_seed(seed)`), or one per image."""
    check_settings(height, width, steps, guidance, sampler)
    # The parts may hold different dtypes (train.py keeps what trains float32 and casts frozen parts to the
    # mixed-precision dtype), so each input is cast to the dtype of the part that reads it.
    device, dtype = models.device, next(models.unet.parameters()).dtype
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    cond, uncond = text_conditioning(models, prompts), None
    if guidance > 1.0 and models.force_zeros_for_empty_prompt and not any(negatives):
        uncond = {k: torch.zeros_like(v) for k, v in cond.items()}  # SDXL: no negative prompt -> zero embeddings
    elif guidance > 1.0:
        uncond = text_conditioning(models, negatives)
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


# ----------------------------------------------------------------------------- checks and files

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
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{sampler}'")


def warn_long_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> None:
    for p in dict.fromkeys(prompts):
        dropped = tokenizer.dropped_words(p)
        if dropped:
            warnings.warn(f"prompt longer than {tokenizer.max_length} tokens; CLIP drops: '{dropped}'", stacklevel=2)


def save_png(image: Image.Image, path: Path, meta: dict) -> None:
    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info))


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = cli.Parser(description="Generate images with a Stable Diffusion model (Hub id or folder).")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub repo id, local diffusers-layout folder, "
                   "single-file checkpoint (.safetensors/.ckpt), or a train.py output/checkpoint folder")
    p.add_argument("--prompt", action="append", help="prompt (repeat the flag for several)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--negative_prompt", default="", help="what the images should not show")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed + i, recorded in its PNG: `--seed S "
                   "--num_images 1` with its seed draws it again alone")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1: off)")
    p.add_argument("--sampler", default="ddim", help="ddim, ddpm, dpmpp (DPM-Solver++ 2M) or euler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (None: the UNet's "
                   "sample_size * the VAE's factor)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (None: as for --height)")
    p.add_argument("--batch_size", type=int, default=4, help="images per forward pass (does not change the images)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model weights' dtype")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    p.add_argument("--lora", default=None, help="a LoRA file or folder written by train.py")
    p.add_argument("--lora_scale", type=float, default=None, help="the LoRA update's weight at inference (default: "
                   "as trained, alpha / rank; 0 = the base model); photoverse: the paper's alpha in K = W + alpha dW")
    p.add_argument("--out", default="samples", help="output folder; a folder that holds images gets a new numbered "
                   "set beside them")
    p.add_argument("--method", default="text2image", choices=["text2image", "photoverse"],
                   help="photoverse: one face image conditions the images (photoverse.py)")
    p.add_argument("--adapter", help="photoverse: the adapter checkpoint (photoverse.safetensors or its folder)")
    p.add_argument("--face", help="photoverse: one face image; the prompt names the person S*")
    p.add_argument("--face_mask", help="photoverse: the face region of --face (white = face): the adapters then see "
                   "its 1.3x crop with the rest masked, as in pretraining with masks or boxes")
    p.add_argument("--gamma", type=float, default=1.0, help="photoverse: weight of the text branch")
    p.add_argument("--sigma", type=float, default=1.0, help="photoverse: weight of the image branch")
    p.add_argument("--num_words", type=int, default=1, help="photoverse: pseudo-words that replace S*")
    return p.parse_args(argv)


PHOTOVERSE_FLAGS = {"adapter": None, "face": None, "gamma": 1.0, "sigma": 1.0, "num_words": 1}


def check_args(args) -> None:
    """The checks of the command line that need no model: numbers, flags of another method, paths, device."""
    if args.method != "photoverse":
        extra = [f"--{k}" for k, v in PHOTOVERSE_FLAGS.items() if getattr(args, k) != v]
        if extra:
            raise ValueError(f"{', '.join(extra)} {'is an option' if len(extra) == 1 else 'are options'} of --method "
                             f"photoverse: add --method photoverse, or drop {'it' if len(extra) == 1 else 'them'}")
    check_settings(8 if args.height is None else args.height, 8 if args.width is None else args.width, args.steps,
                   args.guidance, args.sampler)
    for flag in ("num_images", "batch_size"):
        cli.check_number(f"--{flag}", getattr(args, flag), ">= 1")
    cli.check_number("--seed", args.seed, ">= 0")
    cli.check_number("--eta", args.eta, "[0, 1]")
    cli.check_number("--gamma", args.gamma, ">= 0")
    cli.check_number("--sigma", args.sigma, ">= 0")
    if args.lora and not args.method == "photoverse":
        from lora import lora_file
        if not lora_file(args.lora).is_file():
            raise ValueError(f"--lora: no LoRA file at '{lora_file(args.lora)}'")
    cli.check_out_dir("--out", args.out)
    cli.check_device(args.device)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ValueError(f"--prompts file '{path}' does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt, or --prompts FILE")
    return prompts


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    # 1. everything that can be checked without loading a model
    check_args(args)
    if args.method == "photoverse":             # one face image -> adapters -> images (photoverse.py)
        import photoverse
        return photoverse.sample_main(args)
    prompts = read_prompts(args)
    model = Path(args.model).expanduser()
    single_file = model.suffix in (".safetensors", ".ckpt") and model.is_file()
    if looks_like_path(str(args.model)) and not (model.is_dir() or single_file):
        raise ModelLoadError(f"--model folder or file '{args.model}' does not exist")
    device = default_device() if args.device == "auto" else args.device
    # 2. load once
    models = load_trained(args.model, dtype=DTYPES[args.dtype], device=device)
    if args.lora:
        from lora import load_lora, lora_file
        load_lora(lora_file(args.lora), {"unet": models.unet, **models.text_encoders})
    if args.lora_scale is not None:
        from lora import lora_layers, set_lora_scale
        if not any(lora_layers(m) for m in (models.unet, *models.text_encoders.values())):
            raise ValueError("--lora_scale needs a LoRA: --lora FILE, or a --model folder train.py wrote with a LoRA")
        for m in (models.unet, *models.text_encoders.values()):
            set_lora_scale(m, args.lora_scale)
    warn_long_prompts(models.tokenizer, prompts)
    size = models.unet.config.sample_size * models.vae.factor
    height = size if args.height is None else args.height
    width = size if args.width is None else args.width
    check_settings(height, width, args.steps, args.guidance, args.sampler)
    # 3. one latent per image, each from its own seed, then batches
    def make_images(batch, latents, seeds):
        return generate(models, batch, args.negative_prompt, seed=seeds, steps=args.steps, guidance=args.guidance,
                        sampler=args.sampler, eta=args.eta, height=height, width=width, latents=latents)
    meta = {"model": str(args.model), "lora": str(args.lora or ""),
            **({"lora_scale": args.lora_scale} if args.lora_scale is not None else {})}
    return write_images(args, prompts, height, width, make_images, meta, models.vae.factor)


A1111_SAMPLERS = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp": "DPM++ 2M", "euler": "Euler"}   # the names A1111 shows for ours


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, guidance: float, seed: int,
                     width: int, height: int, extra: dict | None = None) -> str:
    """The `parameters` text chunk AUTOMATIC1111's web UI writes, which its PNG Info tab, Civitai and ComfyUI read:
    the prompt, a `Negative prompt:` line (when there is one), then `Steps: N, Sampler: ..., CFG scale: ...,
    Seed: ..., Size: WxH` and more `key: value` pairs (a value with a comma, colon or newline JSON-quoted, as
    A1111 does)."""
    def quote(v):
        v = str(v)
        return json.dumps(v) if any(c in v for c in ",:\n") else v
    pairs = {"Steps": steps, "Sampler": A1111_SAMPLERS.get(sampler, sampler), "CFG scale": guidance, "Seed": seed,
             "Size": f"{width}x{height}", **{k: v for k, v in (extra or {}).items() if v not in (None, "")}}
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{k}: {quote(v)}" for k, v in pairs.items())])


def next_set(out: Path) -> tuple[int, int]:
    """(set number, first image number) for a new run into `out`: a folder that already holds sample.py's
    images gets the next set, numbered after them, so runs never mix or overwrite each other."""
    old = sorted(p for p in out.glob("[0-9][0-9][0-9][0-9]*.png") if p.stem.isdigit()) if out.is_dir() else []
    if not old:
        return 1, 0
    with Image.open(old[-1]) as im:
        last_set = int(getattr(im, "text", {}).get("set", 1))
    return last_set + 1, int(old[-1].stem) + 1


def write_images(args, prompts: list[str], height: int, width: int, make_images, meta: dict,
                 factor: int = 8) -> list[Path]:
    """The CLI's batch loop: image i gets seed args.seed + i and its own initial latent (so neither the batch
    size nor the other images change it, and `--seed S --num_images 1` redraws it alone), `make_images(prompts,
    latents, seeds)` per batch of `args.batch_size`, one PNG per image with its settings in the PNG text (and
    A1111's `parameters`), and a grid. A folder that already holds images gets a new numbered set (`next_set`).
    Also used by photoverse.py's CLI."""
    jobs = [p for p in prompts for _ in range(args.num_images)]
    seeds = [args.seed + i for i in range(len(jobs))]
    latents = initial_latents(len(jobs), height, width, seeds, factor=factor)
    out = Path(args.out)
    set_id, first = next_set(out)
    paths, images = [], []
    for start in range(0, len(jobs), args.batch_size):
        batch, batch_seeds = jobs[start:start + args.batch_size], seeds[start:start + args.batch_size]
        for i, (prompt, seed, im) in enumerate(zip(batch, batch_seeds, make_images(
                batch, latents[start:start + len(batch)], batch_seeds)), start=start):
            settings = dict(prompt=prompt, negative_prompt=args.negative_prompt, seed=seed, index=i, set=set_id,
                            steps=args.steps, guidance=args.guidance, sampler=args.sampler, eta=args.eta, **meta)
            extra = {"Eta": args.eta or None, "Model": meta.get("model"), "Lora": meta.get("lora")}
            settings["parameters"] = a1111_parameters(prompt, args.negative_prompt, args.steps, args.sampler,
                                                      args.guidance, seed, width, height, extra)
            paths.append(out / f"{first + i:04d}.png")
            save_png(im, paths[-1], settings)
            images.append(im)
    grid = out / ("grid.png" if set_id == 1 else f"grid-{set_id}.png")
    save_png(make_grid(images, cols=args.num_images if len(prompts) > 1 else None), grid,
             {"prompts": json.dumps(prompts), "seed": args.seed, "set": set_id, **meta})
    where = f" (set {set_id}, after the {first} images already there)" if set_id > 1 else ""
    print(f"wrote {len(paths)} images and {grid.name} to {out}{where}")
    return paths


if __name__ == "__main__":
    cli.run(main)
