"""Personalize Stable Diffusion: DreamBooth, DreamBooth-LoRA, Textual Inversion.

    python train.py --method dreambooth --instance_data_dir photos/ --instance_prompt "a photo of sks dog" \
        --with_prior_preservation --class_prompt "a photo of dog" --output_dir runs/dog
    python train.py --demo              # offline: a tiny model and the demo dog in assets/, on a CPU

Flags are named as in diffusers' examples/dreambooth/train_dreambooth.py wherever the concept is the
same. The file reads top to bottom as one loop:

    config -> checks -> models -> class images -> what trains -> data -> optimizer -> resume
           -> for step: batch -> loss (losses.py) -> backward -> clip -> step -> log / checkpoint / validate
           -> final output

What differs between methods is the trainable set (here) and the loss (losses.py).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
from data import list_images, load_image, prepare
from hub import ModelLoadError, atomic_write, looks_like_path
from lora import inject_lora, load_lora, save_lora
from losses import LOSSES
from sample import (DEFAULT_MODEL, SDModels, add_token, default_device, encode_prompts, generate, load_models,
                    make_grid, save_models, save_png, write_result_info)

METHODS = ("dreambooth", "dreambooth_lora", "textual_inversion")
DEFAULT_LR = {"dreambooth": 5e-6, "dreambooth_lora": 1e-4, "textual_inversion": 5e-4}  # methods.md section 1
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Textual Inversion's prompt templates (Gal et al. 2022, the first of `imagenet_templates_small`)
TI_TEMPLATES = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                "a photo of a clean {}", "a photo of my {}", "a close-up photo of a {}", "a bright photo of the {}",
                "a good photo of a {}", "a photo of one {}", "a rendition of the {}", "a photo of the nice {}"]


@dataclass
class TrainConfig:
    method: str = "dreambooth"
    pretrained_model_name_or_path: str = DEFAULT_MODEL
    revision: str | None = None
    variant: str | None = None
    instance_data_dir: str | None = None
    instance_prompt: str = "a photo of sks dog"
    identifier: str = "sks"                  # the rare token the instance prompt binds the subject to
    class_data_dir: str | None = None
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_sample_steps: int = 50             # [ours] DDIM steps for class images (guidance 7.5)
    placeholder_token: str = "<sks>"         # Textual Inversion
    initializer_token: str = "dog"
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    train_text_encoder: bool = False
    learning_rate: float | None = None       # None: the method's default (DEFAULT_LR)
    text_encoder_lr: float | None = None     # None: learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 800
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    weight_dtype: str = "auto"               # auto: fp32 trainable, the mixed-precision dtype for frozen parts
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompt: str | None = None
    validation_steps: int = 100
    num_validation_images: int = 4
    sample_steps: int = 50                   # DDIM steps for validation images
    seed: int = 0
    output_dir: str = "runs/dreambooth"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    rank: int = 4
    lora_alpha: float | None = None          # None: = rank (diffusers' default)
    cache_latents: bool = False
    device: str = "auto"
    demo: bool = False


DEMO = dict(  # the README's offline main job: the tiny model and the dog in assets/demo, ~2 min on 2 CPU cores
    pretrained_model_name_or_path="runs/tiny-model", instance_data_dir=str(Path(__file__).parent / "assets/demo/dog"),
    instance_prompt="a photo of sks dog", class_prompt="a photo of dog", with_prior_preservation=True,
    class_data_dir="runs/demo/class_images", num_class_images=8, class_sample_steps=10, resolution=64,
    center_crop=True, random_flip=True, learning_rate=1e-4, max_train_steps=200, checkpointing_steps=100,
    checkpoints_total_limit=1, validation_prompt="a photo of sks dog", validation_steps=100, sample_steps=20,
    output_dir="runs/demo", device="cpu")


# ----------------------------------------------------------------------------- configuration and checks

def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(TrainConfig()).items():
        kind = type(value) if value is not None else (float if name in ("learning_rate", "text_encoder_lr",
                                                                          "snr_gamma", "lora_alpha") else str)
        if name == "checkpoints_total_limit":
            kind = int
        if kind is bool:
            p.add_argument(f"--{name}", action="store_true")
        else:
            p.add_argument(f"--{name}", type=kind, default=value)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:
        p.set_defaults(**DEMO)
    return TrainConfig(**vars(p.parse_args(argv)))


def check_config(cfg: TrainConfig) -> list[Path]:
    """Every mistake we can see before loading a model: one line saying what to change. Returns the
    instance image paths (each one opened, so a corrupt file fails now, not at step 300)."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got '{cfg.method}'")
    if cfg.resolution % 8 or cfg.resolution <= 0:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {cfg.resolution}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got '{cfg.mixed_precision}'")
    if cfg.weight_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"--weight_dtype must be auto, float32, float16 or bfloat16, got '{cfg.weight_dtype}'")
    trains_full_weights = cfg.method != "dreambooth_lora" or cfg.train_text_encoder
    if cfg.weight_dtype in ("float16", "bfloat16") and trains_full_weights:
        raise ValueError(f"--weight_dtype {cfg.weight_dtype} would make trainable weights half precision, which breaks "
                         f"gradient unscaling and AdamW: keep trainable weights float32 (--weight_dtype auto) and use "
                         f"--mixed_precision fp16/bf16 for speed")
    if cfg.weight_dtype in ("float16", "bfloat16") and cfg.mixed_precision == "no":
        raise ValueError(f"--weight_dtype {cfg.weight_dtype} needs --mixed_precision fp16 or bf16 (LoRA weights stay float32)")
    if cfg.with_prior_preservation and not cfg.class_prompt:
        raise ValueError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')")
    if cfg.with_prior_preservation and not cfg.class_data_dir:
        raise ValueError("--with_prior_preservation needs --class_data_dir (class images are generated there once)")
    if cfg.method == "textual_inversion" and cfg.with_prior_preservation:
        raise ValueError("Textual Inversion has no prior-preservation term: drop --with_prior_preservation")
    if cfg.cache_latents and not cfg.center_crop:
        raise ValueError("--cache_latents needs --center_crop (a random crop cannot be cached)")
    if cfg.lr_scheduler not in LR_SCHEDULES:
        raise ValueError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_scheduler}'")
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps", "rank", "num_class_images"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.method != "textual_inversion" and cfg.identifier not in cfg.instance_prompt.split():
        warnings.warn(f"--instance_prompt '{cfg.instance_prompt}' does not contain the identifier '{cfg.identifier}': "
                      f"the subject will be bound to the prompt's ordinary words (set --identifier if you use "
                      f"another rare token)", stacklevel=2)
    if looks_like_path(cfg.pretrained_model_name_or_path) and not Path(cfg.pretrained_model_name_or_path).is_dir():
        raise ModelLoadError(f"--pretrained_model_name_or_path folder '{cfg.pretrained_model_name_or_path}' does not exist")
    if not cfg.instance_data_dir:
        raise ValueError("--instance_data_dir is required (a folder with 3-5 photos of the subject)")
    paths = list_images(cfg.instance_data_dir, "instance")
    for path in paths:
        load_image(path)
    return paths


# ----------------------------------------------------------------------------- pieces of the loop

LR_SCHEDULES = {  # multiplier of the base learning rate at optimizer step s (warmup w, total n)
    "constant": lambda s, w, n: 1.0,
    "constant_with_warmup": lambda s, w, n: min(1.0, (s + 1) / max(1, w)),
    "linear": lambda s, w, n: min((s + 1) / max(1, w), max(0.0, (n - s) / max(1, n - w))),
    "cosine": lambda s, w, n: min((s + 1) / max(1, w), 0.5 * (1 + math.cos(math.pi * max(0, s - w) / max(1, n - w)))),
}


def make_class_images(models: SDModels, cfg: TrainConfig, rank: int = 0, world: int = 1) -> list[Path]:
    """Prior-preservation images: generated once by the frozen model, reused, topped up to num_class_images.
    Image i uses seed cfg.seed + i (so a top-up gives the images one run would have) and is made by rank
    i % world (so N processes share the work)."""
    folder = Path(cfg.class_data_dir)
    have = list_images(folder, "class") if folder.is_dir() and any(folder.iterdir()) else []
    if world > 1:
        dist.barrier()                          # every rank has counted before any rank writes
    todo = [i for i in range(len(have), cfg.num_class_images) if i % world == rank]
    if todo:
        print(f"generating {cfg.num_class_images - len(have)} class images for '{cfg.class_prompt}' into {folder}")
    for i in tqdm(todo, desc="class images", disable=not todo):
        image = generate(models, [cfg.class_prompt], seed=cfg.seed + i, steps=cfg.class_sample_steps,
                         height=cfg.resolution, width=cfg.resolution, progress=False)[0]
        save_png(image, folder / f"class_{i:05d}.png", {"prompt": cfg.class_prompt, "seed": cfg.seed + i})
    if world > 1:
        dist.barrier()
    paths = list_images(folder, "class")[:cfg.num_class_images]
    for path in paths:
        load_image(path)
    return paths


def setup_trainable(models: SDModels, cfg: TrainConfig) -> list[dict]:
    """Freeze everything, then unfreeze what the method trains. Returns optimizer parameter groups."""
    for m in (models.unet, models.vae, models.text_encoder):
        m.requires_grad_(False)
    lr = cfg.learning_rate or DEFAULT_LR[cfg.method]
    groups = []
    if cfg.method == "dreambooth":                                     # the whole UNet [paper]
        models.unet.requires_grad_(True)
        groups.append({"params": list(models.unet.parameters()), "lr": lr})
        if cfg.train_text_encoder:
            models.text_encoder.requires_grad_(True)
            groups.append({"params": list(models.text_encoder.parameters()), "lr": cfg.text_encoder_lr or lr})
    elif cfg.method == "dreambooth_lora":                              # LoRA on the attention projections
        alpha = cfg.lora_alpha or cfg.rank
        inject_lora(models.unet, ("to_q", "to_k", "to_v", "to_out.0"), rank=cfg.rank, alpha=alpha)
        groups.append({"params": lora_params(models.unet), "lr": lr})
        if cfg.train_text_encoder:
            inject_lora(models.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"), rank=cfg.rank, alpha=alpha)
            groups.append({"params": lora_params(models.text_encoder), "lr": cfg.text_encoder_lr or lr})
    else:                                                              # one new row of the embedding table
        init = models.tokenizer.encode(cfg.initializer_token)[1:-1]
        if len(init) != 1:
            raise ValueError(f"--initializer_token '{cfg.initializer_token}' must be a single CLIP token, it is {len(init)}")
        table = models.text_encoder.text_model.embeddings.token_embedding.weight
        add_token(models, cfg.placeholder_token, table[init[0]].detach().clone())
        table = models.text_encoder.text_model.embeddings.token_embedding.weight
        table.requires_grad_(True)
        groups.append({"params": [table], "lr": lr})
    return groups


def lora_params(model) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.data = p.data.float()                                        # trainable weights stay float32
        p.requires_grad_(True)
    return params


def token_id(models: SDModels, cfg: TrainConfig) -> int:
    return models.tokenizer.encode(cfg.placeholder_token)[1]


def write_result(folder: Path, models: SDModels, cfg: TrainConfig, step: int) -> None:
    """The method's output, the same for checkpoints and the final folder, so both can be sampled from."""
    if cfg.method == "dreambooth":
        save_models(models, folder)                                    # a complete diffusers model folder
        files = {}
    elif cfg.method == "dreambooth_lora":
        parts = {"unet": models.unet, **({"text_encoder": models.text_encoder} if cfg.train_text_encoder else {})}
        save_lora(folder / "pytorch_lora_weights.safetensors", parts)
        files = {"lora": "pytorch_lora_weights.safetensors"}
    else:
        row = models.text_encoder.text_model.embeddings.token_embedding.weight[token_id(models, cfg)]
        embeds = {cfg.placeholder_token: row.detach().float().cpu().clone()}  # diffusers' load_textual_inversion format
        atomic_write(folder / "learned_embeds.safetensors", lambda p: save_file(embeds, str(p)))
        files = {"embeddings": "learned_embeds.safetensors"}
    base = cfg.pretrained_model_name_or_path
    base = str(Path(base).resolve()) if Path(base).is_dir() else base   # a Hub id stays an id
    write_result_info(folder, {"method": cfg.method, "base_model": base,
                               "instance_prompt": cfg.instance_prompt, "step": step, **files})


def load_result(folder: Path, models: SDModels, cfg: TrainConfig) -> None:
    """Put a checkpoint's trained weights back into the (already set up) models, for --resume_from_checkpoint."""
    if cfg.method == "dreambooth":
        models.unet.load_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        if cfg.train_text_encoder:
            models.text_encoder.load_state_dict(load_file(folder / "text_encoder" / "model.safetensors"))
    elif cfg.method == "dreambooth_lora":
        load_lora(folder / "pytorch_lora_weights.safetensors", {"unet": models.unet, "text_encoder": models.text_encoder})
    else:
        row = load_file(folder / "learned_embeds.safetensors")[cfg.placeholder_token]
        with torch.no_grad():
            models.text_encoder.text_model.embeddings.token_embedding.weight[token_id(models, cfg)] = row


# ----------------------------------------------------------------------------- main

def setup_distributed(cfg: TrainConfig):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then join the process group (NCCL on GPUs, gloo on CPUs).
    Returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(default_device() if cfg.device == "auto" else cfg.device)
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def row_generator(cfg: TrainConfig, step: int, micro: int, kind: int, row: int) -> torch.Generator:
    """The generator of one row of the *global* batch (kind 0 instance, 1 class) at one micro-step. Every
    random choice for that row comes from it (image, crop, flip, template, latent sample, timestep, noise),
    so a resumed run draws the same numbers, and N processes x batch B draw what 1 process x batch N*B does."""
    seed = np.random.SeedSequence([cfg.seed, step, micro, kind, row]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def train(cfg: TrainConfig) -> SDModels:
    """Run the whole training described by `cfg`; returns the trained models (the files are in output_dir)."""
    instance_paths = check_config(cfg)
    out = Path(cfg.output_dir)
    resume_from = checkpoint.resolve_resume(out, cfg.resume_from_checkpoint)
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0                         # only rank 0 writes logs, checkpoints, images, the output
    half = HALF.get(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)                 # LoRA's random A matrices (every other draw uses row_generator)

    # 1. models, frozen parts in the mixed-precision dtype (as diffusers' scripts), trainable parts float32
    models = load_models(cfg.pretrained_model_name_or_path, device=device, revision=cfg.revision, variant=cfg.variant)
    class_paths = make_class_images(models, cfg, rank, world) if cfg.with_prior_preservation else []
    groups = setup_trainable(models, cfg)
    frozen_dtype = {"auto": half or torch.float32, "float32": torch.float32, "float16": torch.float16,
                    "bfloat16": torch.bfloat16}[cfg.weight_dtype]
    for m in (models.unet, models.vae, models.text_encoder):
        if not any(p.requires_grad for p in m.parameters()):
            m.to(frozen_dtype)
    if cfg.method == "dreambooth_lora":
        models.unet.to(frozen_dtype)
        lora_params(models.unet)
    models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    models.text_encoder.gradient_checkpointing = cfg.gradient_checkpointing and cfg.train_text_encoder
    trained = {name: getattr(models, name) for name in ("unet", "text_encoder")
               if any(p.requires_grad for p in getattr(models, name).parameters())}
    if world > 1:                               # DDP averages the gradients of the trained models across ranks
        trained = {name: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
                   for name, m in trained.items()}
    train_models = dataclasses.replace(models, **trained)

    # 2. data: images resized once; crops and flips per step. Prompts encoded once unless the text encoder trains.
    pools = [[(load_image(p), cfg.instance_prompt) for p in instance_paths],
             [(load_image(p), cfg.class_prompt) for p in class_paths]]
    text_trains = cfg.train_text_encoder or cfg.method == "textual_inversion"
    cached_text = {} if text_trains else {p: encode_prompts(models, [p]) for p in {cfg.instance_prompt, cfg.class_prompt} if p}
    vae_dtype = next(models.vae.parameters()).dtype
    latent_cache = {}
    if cfg.cache_latents:                       # z0 moments of each image (and its mirror), scaled by s
        with torch.no_grad():
            for im, _ in pools[0] + pools[1]:
                for flip in (False, True) if cfg.random_flip else (False,):
                    dist_ = models.vae.encode(prepare(im, cfg.resolution, True, flip)[None].to(device, vae_dtype))
                    s = models.vae.config.scaling_factor
                    latent_cache[(id(im), flip)] = (dist_.mean * s, dist_.std * s)

    # 3. optimizer and learning-rate schedule (AdamW, Loshchilov & Hutter 2019; settings from methods.md)
    optimizer = torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                  eps=cfg.adam_epsilon)
    shape = LR_SCHEDULES[cfg.lr_scheduler]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: shape(s, cfg.lr_warmup_steps, cfg.max_train_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    trainable = [p for g in groups for p in g["params"]]
    if cfg.method == "textual_inversion":
        table = trainable[0]
        keep = torch.arange(table.shape[0], device=table.device) != token_id(models, cfg)
        original_rows = table.detach().clone()

    # 4. resume (every rank reads the checkpoint; the random draws need no state: see row_generator)
    step = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        load_result(resume_from, models, cfg)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        print(f"resumed from {resume_from} at step {step}")
    log_path = out / "logs.jsonl"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if log_path.is_file():                  # keep the log of the steps the model state contains
            kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            atomic_write(log_path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        atomic_write(out / "train_config.json", lambda p: p.write_text(json.dumps(asdict(cfg), indent=2)))

    def draw_batch(micro: int):
        """This rank's B instance rows, then B class rows: each row a random image, crop, flip (TI: template)."""
        B = cfg.train_batch_size
        ids = [(kind, rank * B + j) for kind in range(2 if pools[1] else 1) for j in range(B)]
        gens = [row_generator(cfg, step, micro, kind, row) for kind, row in ids]
        picks, pixels, moments, prompts = [], [], [], []
        for (kind, _), g in zip(ids, gens):
            im, prompt = pools[kind][int(torch.randint(len(pools[kind]), (1,), generator=g))]
            flip = cfg.random_flip and bool(torch.rand(1, generator=g) < 0.5)
            if cfg.method == "textual_inversion":
                prompt = TI_TEMPLATES[int(torch.randint(len(TI_TEMPLATES), (1,), generator=g))].format(cfg.placeholder_token)
            prompts.append(prompt)
            if latent_cache:
                moments.append(latent_cache[(id(im), flip)])
            else:
                pixels.append(prepare(im, cfg.resolution, cfg.center_crop, flip, g))
        batch = {"generators": gens, "n_prior": B if pools[1] else 0}
        if text_trains:
            batch["encoder_hidden_states"] = train_models.text_encoder(models.tokenizer(prompts).to(device))[0]
        else:
            batch["encoder_hidden_states"] = torch.cat([cached_text[p] for p in prompts])
        if latent_cache:
            batch["latent_mean"] = torch.cat([m for m, _ in moments])
            batch["latent_std"] = torch.cat([s for _, s in moments])
        else:
            batch["pixel_values"] = torch.stack(pixels).to(device, vae_dtype)
        return batch

    # 5. the loop
    loss_fn = LOSSES[cfg.method]
    models.unet.train()
    log_file = open(log_path, "a") if is_main else None
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc=cfg.method, unit="step", disable=not is_main)
    t0 = time.time()
    while step < cfg.max_train_steps:
        for micro in range(cfg.gradient_accumulation_steps):
            with contextlib.ExitStack() as no_sync:
                if world > 1 and micro < cfg.gradient_accumulation_steps - 1:   # all-reduce once per step
                    for m in trained.values():
                        no_sync.enter_context(m.no_sync())
                with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                    loss, logs = loss_fn(draw_batch(micro), train_models, cfg)
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.method == "textual_inversion":                          # only the new row may change
            with torch.no_grad():
                table[keep] = original_rows[keep]
        step += 1
        if world > 1:                                                  # log the mean over ranks
            values = torch.tensor(list(logs.values()), dtype=torch.float64, device=device)
            dist.all_reduce(values)
            logs = dict(zip(logs, (values / world).tolist()))
        logs = {"step": step, "lr": lr_schedule.get_last_lr()[0], **logs}
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.1e}")
        if not is_main:
            continue
        log_file.write(json.dumps(logs) + "\n")
        log_file.flush()
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict(),
                     "scaler": scaler.state_dict()}
            checkpoint.save_checkpoint(out, step, lambda f: write_result(f, models, cfg, step), state,
                                       cfg.checkpoints_total_limit)
        if cfg.validation_prompt and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps):
            models.unet.eval()
            images = generate(models, [cfg.validation_prompt] * cfg.num_validation_images, seed=cfg.seed,
                              steps=cfg.sample_steps, height=cfg.resolution, width=cfg.resolution, progress=False)
            save_png(make_grid(images), out / "validation" / f"step-{step:06d}.png",
                     {"prompt": cfg.validation_prompt, "seed": cfg.seed, "step": step})
            models.unet.train()
    bar.close()

    # 6. the final output: the same files as a checkpoint, at the top of the output folder
    if is_main:
        log_file.close()
        write_result(out, models, cfg, step)
        print(f"trained {cfg.method} for {step} steps in {time.time() - t0:.0f}s; result in {out}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return models


def main(argv=None) -> Path:
    cfg = parse_args(argv)
    if cfg.demo:
        from tiny import make_tiny_model
        make_tiny_model(cfg.pretrained_model_name_or_path)
        print("demo: a tiny model with RANDOM weights (it shows the pipeline runs and the loss falls, not a real "
              "subject; see README)")
    train(cfg)
    out = Path(cfg.output_dir)
    if cfg.demo:
        from sample import main as sample_main
        prompts = ["a photo of sks dog", "a photo of sks dog on the beach", "a photo of dog"]
        sample_main(["--model", str(out), "--out", str(out / "samples"), "--num_images", "4", "--steps", "20",
                     "--device", "cpu"] + [x for p in prompts for x in ("--prompt", p)])
        print(f"demo images: {out / 'samples' / 'grid.png'} (rows: {'; '.join(prompts)}), "
              f"validation grids in {out / 'validation'}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ModelLoadError) as e:
        sys.exit(f"error: {e}")
