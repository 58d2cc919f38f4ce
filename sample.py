"""Sampling from the command line, for every method: load a model once, generate images, write PNGs and a grid.

    python sample.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a cat"
    python sample.py --model runs/dreambooth --prompt "a photo of sks dog on the beach" --num_images 4
    python sample.py --model stabilityai/stable-diffusion-xl-base-1.0 --sampler euler --prompt "a photo of a cat"
    python sample.py --method photoverse --adapter runs/faces --face me.png --prompt "a photo of S* as a chef"

The pipeline (encode the prompts, draw z_T, sample, decode) is pipeline.py's `generate`; PhotoVerse gives it the
face as its `condition` (photoverse.py's `face_condition`). The CLI gives image i the seed --seed + i, so any
image is drawn again alone with its recorded seed, and writes each PNG's settings as text chunks plus
AUTOMATIC1111's `parameters` chunk (data.py's `a1111_parameters`).
"""
import json
from pathlib import Path

from PIL import Image

import cli
import photoverse
from data import a1111_parameters, load_image, make_grid, save_png
from hub import ModelLoadError, looks_like_path
from lora import load_lora, lora_file, lora_layers, set_lora_scale
from pipeline import (DEFAULT_MODEL, DTYPES, SDModels, check_settings, default_device, generate, initial_latents,
                      load_trained, warn_long_prompts)


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


def check_photoverse(args, prompts: list[str]):
    """--method photoverse's checks before any model loads; returns (face, face mask or None, base model)."""
    photoverse.check_prompts(prompts, [args.negative_prompt])
    if not args.adapter or not args.face:
        raise ValueError("--method photoverse needs --adapter CKPT (photoverse.safetensors or its folder) and "
                         "--face IMG")
    if args.lora:
        raise ValueError("--lora does not apply to --method photoverse: its LoRA is inside the adapter checkpoint")
    face = load_image(args.face)
    face_mask = load_image(args.face_mask) if args.face_mask else None
    if face_mask is not None and face_mask.size != face.size:
        raise ValueError(f"--face_mask is {face_mask.size[0]}x{face_mask.size[1]}, --face {face.size[0]}x"
                         f"{face.size[1]}: a mask must have its image's size")
    meta = photoverse.read_adapter_meta(args.adapter)
    if not 1 <= args.num_words <= len(meta["config"]["vision_layers"]):
        raise ValueError(f"--num_words must be in 1..{len(meta['config']['vision_layers'])}, got {args.num_words}")
    model = args.model if args.model != DEFAULT_MODEL else meta["base_model"]  # the adapter's base unless --model
    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise ModelLoadError(f"base model '{model}' (recorded in the adapter) does not exist: pass it with --model")
    if looks_like_path(meta["clip_model"]) and not Path(meta["clip_model"]).expanduser().exists():
        raise ModelLoadError(f"the adapter's CLIP model '{meta['clip_model']}' does not exist")
    return face, face_mask, model


def check_model(model) -> None:
    path = Path(model).expanduser()
    single_file = path.suffix in (".safetensors", ".ckpt") and path.is_file()
    if looks_like_path(str(model)) and not (path.is_dir() or single_file):
        raise ModelLoadError(f"--model folder or file '{model}' does not exist")


def load_with_lora(args, device) -> SDModels:
    """--model (anything `load_trained` reads), then --lora and --lora_scale."""
    models = load_trained(args.model, dtype=DTYPES[args.dtype], device=device)
    if args.lora:
        load_lora(lora_file(args.lora), {"unet": models.unet, **models.text_encoders})
    if args.lora_scale is not None:
        if not any(lora_layers(m) for m in (models.unet, *models.text_encoders.values())):
            raise ValueError("--lora_scale needs a LoRA: --lora FILE, or a --model folder train.py wrote with a LoRA")
        for m in (models.unet, *models.text_encoders.values()):
            set_lora_scale(m, args.lora_scale)
    return models


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    # 1. everything that can be checked without loading a model
    check_args(args)
    prompts = read_prompts(args)
    if args.method == "photoverse":
        face, face_mask, model = check_photoverse(args, prompts)
    else:
        check_model(args.model)
    device = default_device() if args.device == "auto" else args.device
    # 2. load once (PhotoVerse: the base model of its adapter checkpoint, unless --model names another)
    if args.method == "photoverse":
        models = photoverse.load_photoverse(args.adapter, model, dtype=DTYPES[args.dtype], device=device,
                                            lora_scale=args.lora_scale)
        meta = dict(model=str(model), method="photoverse", adapter=str(args.adapter), face=str(args.face),
                    gamma=args.gamma, sigma=args.sigma, num_words=args.num_words,
                    lora_scale="as trained" if args.lora_scale is None else args.lora_scale)
    else:
        models = load_with_lora(args, device)
        meta = {"model": str(args.model), "lora": str(args.lora or ""),
                **({"lora_scale": args.lora_scale} if args.lora_scale is not None else {})}
    warn_long_prompts(models.tokenizer, prompts)
    size = models.unet.config.sample_size * models.vae.factor
    height, width = (size if v is None else v for v in (args.height, args.width))
    check_settings(height, width, args.steps, args.guidance, args.sampler)
    condition = None                            # the text prompts; PhotoVerse: the face, through the adapters
    if args.method == "photoverse":
        condition = photoverse.face_condition(models, face, args.num_words, args.gamma, args.sigma, face_mask)
    # 3. one latent per image, each from its own seed, then batches
    def make_images(batch, latents, seeds):
        return generate(models, batch, args.negative_prompt, seed=seeds, steps=args.steps, guidance=args.guidance,
                        sampler=args.sampler, eta=args.eta, height=height, width=width, latents=latents,
                        condition=condition)
    return write_images(args, prompts, height, width, make_images, meta, models.vae.factor)


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
    A1111's `parameters`), and a grid. A folder that already holds images gets a new numbered set (`next_set`)."""
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
