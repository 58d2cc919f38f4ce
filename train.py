"""Personalize Stable Diffusion: DreamBooth, DreamBooth-LoRA, Textual Inversion, ComFusion, object-driven one-shot.

    python train.py --method dreambooth --instance_data_dir photos/ --instance_prompt "a photo of sks dog" \
        --with_prior_preservation --class_prompt "a photo of dog" --output_dir runs/dog
    python train.py --method comfusion --instance_data_dir photo/ --instance_prompt "a photo of sks dog" \
        --class_prompt "a photo of dog" --class_data_dir class_scenes/ --output_dir runs/comfusion
    python train.py --method objectdriven --objects assets/demo/dog_object.json --class_data_dir classes/ \
        --output_dir runs/objectdriven
    python train.py --method pretrain_sd --output_dir runs/toy      # one stage of the toy model (pretrain.py)
    python train.py --demo              # offline, on a CPU: DreamBooth on a toy subject with the shipped toy model

Flags are named as in diffusers' examples/dreambooth/train_dreambooth.py wherever the concept is the
same. The file reads top to bottom as one loop:

    config -> checks -> models -> class images -> what trains -> data -> optimizer -> resume
           -> for step: batch -> loss (losses.py) -> backward -> clip -> step -> log / checkpoint / validate
           -> final output

What differs between methods is the data they read, their frozen encoders and setup before the loop (methods.py),
the trainable set (here) and the loss (losses.py). Two methods add a little to the loop: ComFusion's fusion-stream
rows in each batch (`draw_fusion_rows`), and the object-driven method's stage 1 before it (`prototypical_stage`).
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import cli
from data import list_images, load_image, make_grid, png_text, prepare, prepare_with_crop, save_png
from hub import ModelLoadError, atomic_write, looks_like_path, read_json, read_safetensors
from lora import INITS, inject_lora, load_lora, save_lora, save_lora_kohya
from losses import LOSSES
from methods import (DEFAULT_CLIP, TEMPLATES, Inputs, TrainModels, check_against_model, check_method_options,
                     comfusion_targets, draw_fusion_rows, load_encoders, prototypical_stage, read_inputs, union_mask)
from pipeline import (DEFAULT_MODEL, RESULT_INFO, SDXL_EMBEDDINGS, SDModels, add_token, default_device, generate,
                      load_models, save_models, save_single_file, text_conditioning, time_ids, warn_long_prompts,
                      write_result_info)
from single_file import is_single_file

PRETRAIN = ("pretrain_vae", "pretrain_sd", "pretrain_clip", "pretrain_dino", "pretrain_classifier")   # the toy world's model: pretrain.py
METHODS = ("dreambooth", "dreambooth_lora", "textual_inversion", "comfusion", "objectdriven", "photoverse", *PRETRAIN)
DEFAULT_LR = {"dreambooth": 5e-6, "dreambooth_lora": 1e-4, "textual_inversion": 5e-4,  # docs/methods.md section 1
              "comfusion": 5e-6, "objectdriven": 1e-4}                                # sections 2 and 3
# Defaults that differ by method, applied by parse_args unless the flag is given. Textual Inversion: diffusers' recipe
# (examples/textual_inversion: lr 5e-4 scaled by batch x accumulation x processes, so 2e-3 on one GPU, accumulation 4,
# 3000 steps, random flips, no gradient clipping)
METHOD_DEFAULTS = {"textual_inversion": dict(scale_lr=True, gradient_accumulation_steps=4, max_train_steps=3000,
                                             random_flip=True, max_grad_norm=0.0)}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Every flag of train.py. `python train.py --help` is built from this class: each field's comment is its help
    text, and a comment line of its own starts a group of flags (cli.field_help)."""
    method: str = "dreambooth"               # what to train (pretrain_*: one stage of the toy model, pretrain.py)
    pretrained_model_name_or_path: str = DEFAULT_MODEL   # the base model: Hub id, diffusers folder, or one
                                             # .safetensors / .ckpt file
    revision: str | None = None              # Hub revision of the base model (None: main)
    variant: str | None = None               # weight file variant, such as fp16 (None: the full-precision files)
    instance_data_dir: str | None = None     # folder of the subject's photos (3-5); PhotoVerse: of aligned faces
    instance_prompt: str = "a photo of sks dog"   # the prompt of every instance photo
    output_dir: str = "runs/dreambooth"      # the run's folder: checkpoints, logs.jsonl, validation images, result
    overwrite_output_dir: bool = False       # start a new run in an --output_dir that holds another run's files
                                             # (its checkpoints, logs and validation images are deleted)
    resume_from_checkpoint: str | None = None   # a checkpoint folder, or 'latest' (the newest in --output_dir)
    resolution: int = 512                    # training image size in pixels (a multiple of 8)
    center_crop: bool = False                # crop the centre of each photo (else a random crop per step)
    random_flip: bool = False                # mirror each photo with probability 0.5
    learning_rate: float | None = None       # peak learning rate (None: the method's default, DEFAULT_LR)
    scale_lr: bool = False                   # learning rates x batch x accumulation x processes (diffusers' --scale_lr)
    lr_scheduler: str = "constant"           # constant, constant_with_warmup, linear or cosine
    lr_warmup_steps: int = 0                 # linear warm-up steps of the learning rate
    max_train_steps: int = 800               # optimizer steps
    train_batch_size: int = 1                # instance images per step (plus as many class images)
    gradient_accumulation_steps: int = 1     # micro-batches per optimizer step
    gradient_checkpointing: bool = False     # recompute activations in backward: less memory, slower
    mixed_precision: str = "no"              # no, fp16 or bf16 autocast
    weight_dtype: str = "auto"               # dtype of the frozen parts: auto (the mixed-precision dtype), float32,
                                             # float16 or bfloat16; trainable weights stay float32
    adam_beta1: float = 0.9                  # AdamW beta1, in [0, 1)
    adam_beta2: float = 0.999                # AdamW beta2, in [0, 1)
    adam_weight_decay: float = 1e-2          # AdamW decoupled weight decay, >= 0
    adam_epsilon: float = 1e-8               # AdamW epsilon, > 0
    max_grad_norm: float = 1.0               # clip the gradient's global norm to this (0: no clipping; new token
                                             # rows are clipped alone, the frozen rows' gradients dropped first)
    snr_gamma: float | None = None           # Min-SNR loss weighting gamma, such as 5 (None: off) [ours]
    noise_offset: float = 0.0                # noise offset added to the training noise, >= 0 (0: off) [ours]
    checkpointing_steps: int = 500           # write a checkpoint every N steps (and at the end)
    checkpoints_total_limit: int | None = None   # keep only the newest N checkpoints (None: keep all)
    validation_prompt: str | None = None     # draw validation images of this prompt (None: no validation)
    validation_steps: int = 100              # every N steps (and at the end)
    num_validation_images: int = 4           # validation images per grid
    sample_steps: int = 50                   # DDIM steps for validation images
    seed: int = 0                            # the seed of every random draw (>= 0)
    export: str = "none"                     # the final output also as: kohya (the LoRA for A1111 / ComfyUI) or
                                             # single_file (model.safetensors, one original-layout fp16 file)
    cache_latents: bool = False              # encode each photo once (needs --center_crop)
    device: str = "auto"                     # auto (cuda, mps, cpu), or a torch device such as cuda:1
    demo: bool = False                       # the README's offline demo: DreamBooth on the shipped toy model
    # DreamBooth (--method dreambooth, dreambooth_lora; docs/methods.md section 1)
    identifier: str = "sks"                  # the rare token the instance prompt binds the subject to
    with_prior_preservation: bool = False    # add DreamBooth's class-prior loss on images of --class_prompt
    class_prompt: str | None = None          # the prompt of the class images, such as 'a photo of dog'
    class_data_dir: str | None = None        # folder of class images: generated there once, then reused
    num_class_images: int = 100              # class images to use (made by the frozen model if missing)
    class_sample_steps: int = 50             # DDIM steps for class images (guidance 7.5) [ours]
    prior_loss_weight: float = 1.0           # weight of the prior loss (ComFusion: of the class-scene prior)
    train_text_encoder: bool = False         # also train the text encoder (LoRA: LoRA layers on it)
    text_encoder_lr: float | None = None     # the text encoder's learning rate (None: --learning_rate)
    # LoRA (--method dreambooth_lora, objectdriven, photoverse)
    rank: int = 4                            # LoRA rank r
    lora_alpha: float | None = None          # LoRA alpha; scale = alpha / rank (None: = rank, diffusers' default)
    lora_init: str = "gaussian"              # LoRA A's init: gaussian, N(0, (1/rank)^2) (diffusers' DreamBooth-LoRA),
                                             # or kaiming (nn.Linear's Kaiming-uniform: peft's default, kohya's)
    # Textual Inversion (--method textual_inversion; objectdriven's one-image form)
    placeholder_token: str = "<sks>"         # the new word that is learned
    initializer_token: str = "dog"           # the word its embedding starts from (object-driven: the class noun)
    num_vectors: int = 1                     # embedding vectors of the token (diffusers' --num_vectors)
    learnable_property: str = "object"       # object or style: which prompt templates (diffusers' recipe)
    # ComFusion (--method comfusion, docs/methods.md section 2); its four loss weights are instance_loss_weight,
    # prior_loss_weight (the class-scene prior), visual_loss_weight and textual_loss_weight [ours: 1, 1, 0.1, 0.1]
    scenes: str | None = None                # text file, one scene phrase per line (None: DEFAULT_SCENES)
    num_scene_images: int = 20               # class-scene prior images per scene
    tau_min: int = 200                       # the fusion stream's tau ~ U{tau_min..tau_max}, drawn per step [ours]
    tau_max: int = 600                       # the largest tau (below the schedule's 1000 timesteps)
    fusion_steps: int = 10                   # no-gradient DDIM steps from T down to tau
    fusion_every: int = 1                    # run the fusion stream every N steps
    fusion_guidance: float = 7.5             # classifier-free guidance in those steps [ours]
    instance_loss_weight: float = 1.0        # weight of the instance loss
    visual_loss_weight: float = 0.1          # weight of the visual (DINO) fusion loss
    textual_loss_weight: float = 0.1         # weight of the textual (CLIP) fusion loss
    dino_model: str = "facebook/dino-vits16"   # DINO for ComFusion's loss (PhotoVerse: the face loss's fallback)
    clip_model: str | None = None            # CLIP of the loss (None: the method's DEFAULT_CLIP; PhotoVerse: ViT-L/14)
    # object-driven one-shot (--method objectdriven, docs/methods.md section 3)
    instance_mask: str | None = None         # the object's mask (white = object), the size of the one instance image
    objects: str | None = None               # JSON list of {"image", "mask", "class", "token"}, paths relative to it
    background_weight: float = 0.0           # weight of the pixels outside the mask in L_os, in [0, 1]
    pe_steps: int = 200                      # stage 1: Adam steps on each new token's row [ours]
    pe_lr: float = 1e-3                      # stage 1 learning rate [ours]
    token_lr: float = 1e-4                   # stage 2: the new rows' learning rate (LoRA: --learning_rate) [ours]
    # PhotoVerse (--method photoverse; photoverse.py, photoverse_train.py, docs/methods.md section 4): --instance_data_dir
    # is a folder of aligned faces; --clip_model defaults to CLIP ViT-L/14, --dino_model is the face loss's fallback
    vision_layers: str = "last,4,8,12,16"    # CLIP hidden states the adapters read [ours, ELITE's layers and order]
    adapter_dim: int = 1024                  # adapter width [paper]
    face_encoder: str | None = None          # an ArcFace IResNet checkpoint (None: DINO fallback) [ours]
    face_loss_weight: float = 0.01           # weight of L_face [paper]
    word_reg_weight: float = 0.01            # weight of the pseudo-word regulariser [paper]
    value_reg_weight: float = 0.001          # weight of the cross-attention value regulariser [paper]
    face_loss_max_timestep: int = 600        # L_face only for t below this [ours]
    # toy pretraining (--method pretrain_vae, pretrain_sd, pretrain_clip, pretrain_dino, pretrain_classifier): one
    # stage of the toy world's model (pretrain.py). It reads only --output_dir, --seed, --checkpointing_steps, and
    # --max_train_steps, --train_batch_size, --learning_rate when given (else the stage's own values); any other flag
    # is an error. `python pretrain.py --help` has the rest.

TOY = Path(__file__).parent / "assets" / "toy"   # the toy world's pretrained model and subjects (pretrain.py)
DEMO = dict(  # the README's offline main job: DreamBooth on a toy subject with the shipped toy model, on a CPU
    pretrained_model_name_or_path=str(TOY / "model"), instance_data_dir=str(TOY / "subjects" / "checkered_star"),
    instance_prompt="a sks star", class_prompt="a star", with_prior_preservation=True,
    class_data_dir="runs/demo/class_images", num_class_images=50, class_sample_steps=25, resolution=64,
    learning_rate=2e-4, max_train_steps=300, train_batch_size=2, checkpointing_steps=100, checkpoints_total_limit=1,
    validation_prompt="a sks star in the snow", validation_steps=100, sample_steps=25, output_dir="runs/demo",
    overwrite_output_dir=True, device="cpu")                  # a second demo replaces the first
DEMO_SCENES = ("in the snow", "at night", "in front of a brick wall")  # the scenes none of the 5 photos shows
DEMO_SUBJECT = "checkered_star"   # world.NOVEL_SUBJECTS: a pattern pretraining never shows
DEMO_GUIDANCE = 7.0          # the toy model's scenes are right in 100% of images at 7, 91% at 4 (bench_toy_world.py);
# lr 2e-4: at 5e-5 and 1e-4 (300 steps) the checkered star was drawn in no image, its purple turned blue and teal


# ----------------------------------------------------------------------------- configuration and checks

def parse_args(argv=None) -> TrainConfig:
    """The flags of TrainConfig, grouped and explained by its comments (cli.config_parser)."""
    p = cli.config_parser(TrainConfig, description=__doc__.split("\n\n")[0],
                          epilog="Every flag's text is the comment beside its field in TrainConfig (train.py).",
                          extra_help={"method": f": {', '.join(METHODS)}"})
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:
        p.set_defaults(**DEMO)
    p.set_defaults(**METHOD_DEFAULTS.get(p.parse_known_args(argv)[0].method, {}))
    return TrainConfig(**vars(p.parse_args(argv)))


METHOD_OPTIONS = {  # options only some methods read: giving one to another method is a mistake, not a no-op
    "textual_inversion": ("num_vectors", "learnable_property"),
    "comfusion": ("scenes", "num_scene_images", "tau_min", "tau_max", "fusion_steps", "fusion_every",
                  "fusion_guidance", "instance_loss_weight", "visual_loss_weight", "textual_loss_weight",
                  "dino_model", "clip_model"),
    "objectdriven": ("instance_mask", "objects", "background_weight", "pe_steps", "pe_lr", "token_lr", "clip_model"),
    "photoverse": ("vision_layers", "adapter_dim", "face_encoder", "face_loss_weight", "word_reg_weight",
                   "value_reg_weight", "face_loss_max_timestep", "dino_model", "clip_model"),
}


RANGES = {  # every number of TrainConfig and the values it may take (None, where it is the default, means "off" or
    # "the method's default"); cli.check_number also refuses NaN and infinity
    ">= 1": ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
             "checkpoints_total_limit", "validation_steps", "num_validation_images", "sample_steps", "resolution",
             "rank", "num_class_images", "class_sample_steps", "num_scene_images", "fusion_steps", "fusion_every",
             "pe_steps", "adapter_dim", "num_vectors"),
    "> 0": ("learning_rate", "text_encoder_lr", "adam_epsilon", "snr_gamma", "lora_alpha", "pe_lr", "token_lr"),
    ">= 0": ("max_grad_norm", "prior_loss_weight", "lr_warmup_steps", "adam_weight_decay", "noise_offset", "seed", "tau_min", "tau_max",
             "fusion_guidance", "instance_loss_weight", "visual_loss_weight", "textual_loss_weight",
             "face_loss_weight", "word_reg_weight", "value_reg_weight", "face_loss_max_timestep"),
    "[0, 1)": ("adam_beta1", "adam_beta2"),
    "[0, 1]": ("background_weight",),
}
# what --method pretrain_* reads (pretrain.from_train_config); any other flag changed from its default is an error
PRETRAIN_FLAGS = ("method", "output_dir", "seed", "checkpointing_steps", "max_train_steps", "train_batch_size",
                  "learning_rate")


def check_numbers(cfg: TrainConfig) -> None:
    """Each number in its range: a negative learning rate trains by gradient ascent, a negative clipping norm flips
    the gradient, a negative limit deletes every checkpoint. 0 is never read as "the default"."""
    for rule, names in RANGES.items():
        for name in names:
            try:
                cli.check_number(f"--{name}", getattr(cfg, name), rule)
            except ValueError as e:
                if name == "learning_rate" and cfg.method in DEFAULT_LR:
                    raise ValueError(f"{e} (leave it out for the method's default, {DEFAULT_LR[cfg.method]:g})") from None
                raise


def check_common(cfg: TrainConfig) -> None:
    """The checks every method shares, made first: the method, the numbers, the device, the output folder."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got '{cfg.method}'")
    check_numbers(cfg)
    if cfg.method in PRETRAIN:
        defaults = TrainConfig()
        extra = [f"--{f.name}" for f in dataclasses.fields(cfg)
                 if f.name not in PRETRAIN_FLAGS and getattr(cfg, f.name) != getattr(defaults, f.name)]
        if extra:
            raise ValueError(f"--method {cfg.method} reads only {', '.join('--' + n for n in PRETRAIN_FLAGS[1:])}; "
                             f"{', '.join(extra)} would be ignored: drop it (pretrain.py has the stage's other flags)")
    else:
        cli.check_device(cfg.device)
    cli.check_out_dir("--output_dir", cfg.output_dir)
    base = Path(cfg.pretrained_model_name_or_path).expanduser()
    if base.exists() and base.resolve() == Path(cfg.output_dir).expanduser().resolve():
        raise ValueError(f"--output_dir '{cfg.output_dir}' is the base model's folder: the run would overwrite it; "
                         f"choose another --output_dir")
    if cfg.class_data_dir and Path(cfg.class_data_dir).exists() and not Path(cfg.class_data_dir).is_dir():
        raise ValueError(f"--class_data_dir '{cfg.class_data_dir}' is a file, not a folder")
    if cfg.resume_from_checkpoint and cfg.overwrite_output_dir:
        raise ValueError("--resume_from_checkpoint continues the run in --output_dir, --overwrite_output_dir replaces "
                         "it: give one of them")


# What a checkpoint fixes: a resumed run must use the same values (the weights' shapes, the vocabulary, the
# object-driven stage 1, the gradient scaler). Every other setting is read again from the command line and applied:
# the loop reads them from cfg at each step, and `apply_resumed_settings` puts the new learning rates and AdamW
# settings into the optimizer state a checkpoint brings back.
FIXED_ON_RESUME = ("method", "pretrained_model_name_or_path", "revision", "variant", "train_text_encoder", "rank",
                   "lora_alpha", "placeholder_token", "initializer_token", "objects", "instance_mask", "pe_steps",
                   "pe_lr", "mixed_precision", "vision_layers", "adapter_dim")
# A run's files besides its checkpoints: a fresh run into the folder removes them. The result files are those
# write_result, export_result and photoverse_train write at the top of --output_dir.
RUN_FILES = ("train_config.json", "logs.jsonl", "validation", "model_index.json", "unet", "vae", "text_encoder",
             "tokenizer", "scheduler", RESULT_INFO, "pytorch_lora_weights.safetensors", "learned_embeds.safetensors",
             "lora_kohya.safetensors", "model.safetensors", "photoverse.safetensors")


PATH_FIELDS = ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "output_dir", "scenes", "objects",
               "instance_mask", "face_encoder", "clip_model", "dino_model")


def settings_record(cfg: TrainConfig) -> dict:
    """The run's settings as a checkpoint records them: existing paths made absolute, so a resume from another
    working folder compares equal (a Hub id stays an id)."""
    record = asdict(cfg)
    for name in PATH_FIELDS:
        path = record[name] and Path(record[name]).expanduser()
        if path and path.exists():
            record[name] = str(path.resolve())
    return record


def claim_output_dir(cfg: TrainConfig) -> tuple[Path | None, dict | None]:
    """checkpoint.claim_output_dir (a run owns its folder; a checkpoint is whole), then the checkpoint's recorded
    settings against this run's: FIXED_ON_RESUME must match. Before any model loads. Returns (checkpoint, state)."""
    resume_from, state = checkpoint.claim_output_dir(cfg.output_dir, cfg.resume_from_checkpoint,
                                                     cfg.overwrite_output_dir, RUN_FILES)
    if resume_from is None:
        return None, None
    info = read_json(resume_from / RESULT_INFO) if (resume_from / RESULT_INFO).is_file() else {}
    then = dict(state.get("config") or {})     # older checkpoints: only what nanobooth.json records
    for name, key in (("method", "method"), ("pretrained_model_name_or_path", "base_model")):
        if name not in then and key in info:
            then[name] = info[key]
    now = settings_record(cfg)
    stage_1 = ("clip_model",) if cfg.method == "objectdriven" else ()   # its CLIP serves stage 1 only, done by then
    for name in FIXED_ON_RESUME + stage_1:
        if name in then and then[name] != now[name]:
            raise ValueError(f"cannot resume from '{resume_from}': it was made with --{name} {then[name]}, this run has "
                             f"--{name} {now[name]}. Use the same value, or start a new run (another --output_dir, "
                             f"or --overwrite_output_dir)")
    return resume_from, state


def apply_resumed_settings(optimizer, lr_schedule, base_lrs: list[float], cfg: TrainConfig) -> None:
    """After loading a checkpoint's optimizer and schedule: this run's learning rates and AdamW settings, not the
    checkpoint's (load_state_dict restores those), at the schedule's current step."""
    lr_schedule.base_lrs = list(base_lrs)
    for group, base, shape in zip(optimizer.param_groups, base_lrs, lr_schedule.lr_lambdas):
        group.update(initial_lr=base, lr=base * shape(lr_schedule.last_epoch), betas=(cfg.adam_beta1, cfg.adam_beta2),
                     eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)


def check_config(cfg: TrainConfig) -> Inputs:
    """Every mistake we can see before loading a model: one line saying what to change. Returns the run's
    Inputs (each image opened, so a corrupt file fails now, not at step 300)."""
    check_common(cfg)
    defaults = TrainConfig()
    for name in sorted({n for names in METHOD_OPTIONS.values() for n in names}):
        owners = [m for m, names in METHOD_OPTIONS.items() if name in names]
        if cfg.method not in owners and getattr(cfg, name) != getattr(defaults, name):
            raise ValueError(f"--{name} is an option of --method {' and '.join(owners)}, not of {cfg.method}")
    if cfg.resolution % 8 or cfg.resolution <= 0:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {cfg.resolution}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got '{cfg.mixed_precision}'")
    if cfg.weight_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"--weight_dtype must be auto, float32, float16 or bfloat16, got '{cfg.weight_dtype}'")
    trains_full_weights = cfg.method not in ("dreambooth_lora", "objectdriven") or cfg.train_text_encoder
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
    if cfg.learnable_property not in TEMPLATES:
        raise ValueError(f"--learnable_property must be object or style, got '{cfg.learnable_property}'")
    if cfg.lora_init not in INITS:
        raise ValueError(f"--lora_init must be one of {', '.join(INITS)}, got '{cfg.lora_init}'")
    check_method_options(cfg)
    if cfg.export not in ("none", "kohya", "single_file"):
        raise ValueError(f"--export must be none, kohya or single_file, got '{cfg.export}'")
    if cfg.export == "kohya" and cfg.method not in ("dreambooth_lora", "objectdriven"):
        raise ValueError(f"--export kohya writes a LoRA, and --method {cfg.method} trains none (the LoRA methods are "
                         f"dreambooth_lora and objectdriven)")
    if cfg.export == "single_file" and cfg.method in ("textual_inversion", "objectdriven"):
        raise ValueError(f"--export single_file cannot hold the new tokens of --method {cfg.method} (a single file has "
                         f"no tokenizer): drop --export and share the output folder, which sample.py loads")
    if cfg.method not in ("textual_inversion", "objectdriven") and cfg.identifier not in cfg.instance_prompt.split():
        warnings.warn(f"--instance_prompt '{cfg.instance_prompt}' does not contain the identifier '{cfg.identifier}': "
                      f"the subject will be bound to the prompt's ordinary words (set --identifier if you use "
                      f"another rare token)", stacklevel=2)
    base = cfg.pretrained_model_name_or_path                           # a Hub id, a folder or one .safetensors/.ckpt
    if is_single_file(base) and not Path(base).expanduser().is_file():
        raise ModelLoadError(f"--pretrained_model_name_or_path file '{base}' does not exist")
    if looks_like_path(base) and not is_single_file(base) and not Path(base).is_dir():
        raise ModelLoadError(f"--pretrained_model_name_or_path folder '{base}' does not exist")
    inputs = read_inputs(cfg)
    for prompt, folder, count in inputs.priors:             # class images: the right prompt, a folder to write to
        if len(check_class_images(folder, prompt)) < count:
            cli.check_out_dir("--class_data_dir", folder)
    return inputs


# ----------------------------------------------------------------------------- pieces of the loop

LR_SCHEDULES = {  # multiplier of the base learning rate at optimizer step s (warmup w, total n)
    "constant": lambda s, w, n: 1.0,
    "constant_with_warmup": lambda s, w, n: min(1.0, (s + 1) / max(1, w)),
    "linear": lambda s, w, n: min((s + 1) / max(1, w), max(0.0, (n - s) / max(1, n - w))),
    "cosine": lambda s, w, n: min((s + 1) / max(1, w), 0.5 * (1 + math.cos(math.pi * max(0, s - w) / max(1, n - w)))),
}


def autocast(device, half: torch.dtype | None):
    """Mixed precision (--mixed_precision fp16 / bf16): the training step and every image made during a run (validation,
    class images) run under torch.autocast in that dtype, so parts held in different dtypes (what trains float32, the
    frozen parts half) meet in one precision. A no-op without mixed precision."""
    return torch.autocast(torch.device(device).type, dtype=half or torch.float32, enabled=half is not None)


def make_class_images(models: SDModels, cfg: TrainConfig, rank: int = 0, world: int = 1, prompt: str | None = None,
                      folder=None, count: int | None = None) -> list[Path]:
    """Prior images of `prompt` (default --class_prompt) in `folder` (--class_data_dir), `count` of them
    (--num_class_images): generated once by the frozen model, reused, topped up. DreamBooth's class images,
    ComFusion's class-scene images, the object-driven class images. Image i uses seed cfg.seed + i (so a top-up
    gives the images one run would have) and is made by rank i % world (so N processes share the work). They are
    drawn at the model's native size (UNet sample_size x the VAE factor, as diffusers' pipeline draws them), not at
    --resolution: the data pipeline resizes them as it resizes the instance photos."""
    prompt = cfg.class_prompt if prompt is None else prompt
    count = cfg.num_class_images if count is None else count
    folder = Path(cfg.class_data_dir if folder is None else folder)
    have = check_class_images(folder, prompt)
    if world > 1:
        dist.barrier()                          # every rank has counted before any rank writes
    todo = [i for i in range(len(have), count) if i % world == rank]
    if todo:
        print(f"generating {count - len(have)} class images for '{prompt}' into {folder}")
    native = models.unet.config.sample_size
    size = native * models.vae.factor if native else cfg.resolution    # a config without sample_size: --resolution
    for i in tqdm(todo, desc="class images", disable=not todo):
        with autocast(models.device, HALF.get(cfg.mixed_precision)):
            image = generate(models, [prompt], seed=cfg.seed + i, steps=cfg.class_sample_steps, height=size,
                             width=size, progress=False)[0]
        save_png(image, folder / f"class_{i:05d}.png", {"prompt": prompt, "seed": cfg.seed + i})
    if world > 1:
        dist.barrier()
    paths = list_images(folder, "class")[:count]
    for path in paths:
        load_image(path)
    return paths


def check_class_images(folder: Path, prompt: str) -> list[Path]:
    """The class images already in `folder`: a folder of images made for another prompt (their PNG text records
    it) is refused rather than reused. Images without a recorded prompt (your own photos) are used as they are."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"class image folder '{folder}' is a file, not a folder")
    have = list_images(folder, "class") if folder.is_dir() and any(folder.iterdir()) else []
    for path in have:
        made_for = png_text(path).get("prompt")
        if made_for is not None and made_for != prompt:
            raise ValueError(f"class image '{path}' was made for the prompt '{made_for}', not '{prompt}': give another "
                             f"--class_data_dir (or empty this one) so the prior matches the prompt")
    return have


def check_prompts(models: SDModels, cfg: TrainConfig, inputs: Inputs) -> None:
    """Prompts over CLIP's 77 tokens are cut: warn as sample.py does; an identifier in the part cut off would never
    be seen, which is an error."""
    prompts = [p for _, p, _ in inputs.instance] + [p for p, _, _ in inputs.priors]
    warn_long_prompts(models.tokenizer, prompts + ([cfg.validation_prompt] if cfg.validation_prompt else []))
    if cfg.method in ("textual_inversion", "objectdriven"):
        return
    for p in dict.fromkeys(prompts[:len(inputs.instance)]):
        kept = models.tokenizer.decode(models.tokenizer.encode(p)[1:models.tokenizer.max_length - 1])
        if cfg.identifier in p.split() and cfg.identifier.lower() not in kept.split():
            raise ValueError(f"--instance_prompt '{p[:60]}...' puts the identifier '{cfg.identifier}' past CLIP's "
                             f"{models.tokenizer.max_length} tokens, where it is cut off: move it to the front")


def setup_trainable(models: SDModels, cfg: TrainConfig, tokens: dict[str, str] | None = None) -> list[dict]:
    """Freeze everything, then unfreeze what the method trains; add the new `tokens` (token -> words) to the
    vocabulary. Returns optimizer parameter groups."""
    for m in (models.unet, models.vae, *models.text_encoders.values()):
        m.requires_grad_(False)
    lr = DEFAULT_LR[cfg.method] if cfg.learning_rate is None else cfg.learning_rate
    text_lr = lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr
    groups = []
    if cfg.method in ("dreambooth", "comfusion"):                      # the whole UNet [paper; ComFusion: ours]
        models.unet.requires_grad_(True)
        groups.append({"params": list(models.unet.parameters()), "lr": lr})
        for encoder in models.text_encoders.values() if cfg.train_text_encoder else ():   # SDXL: both
            encoder.requires_grad_(True)
            groups.append({"params": list(encoder.parameters()), "lr": text_lr})
    if cfg.method in ("dreambooth_lora", "objectdriven"):              # LoRA on the attention projections
        alpha = cfg.rank if cfg.lora_alpha is None else cfg.lora_alpha
        inject_lora(models.unet, ("to_q", "to_k", "to_v", "to_out.0"), rank=cfg.rank, alpha=alpha, init=cfg.lora_init)
        groups.append({"params": lora_params(models.unet), "lr": lr})
        for encoder in models.text_encoders.values() if cfg.train_text_encoder else ():   # SDXL: both
            inject_lora(encoder, ("q_proj", "k_proj", "v_proj", "out_proj"), rank=cfg.rank, alpha=alpha,
                        init=cfg.lora_init)
            groups.append({"params": lora_params(encoder), "lr": text_lr})
    if tokens:                                                         # new rows of the embedding table
        for token, words in tokens.items():
            init = models.tokenizer.encode(words)[1:-1]
            if cfg.method == "textual_inversion" and len(init) != 1:
                raise ValueError(f"--initializer_token '{words}' must be a single CLIP token, it is {len(init)}")
            n = cfg.num_vectors if cfg.method == "textual_inversion" else 1
            for name, encoder in models.text_encoders.items():         # SDXL: a row in each encoder
                table = encoder.text_model.embeddings.token_embedding.weight
                vector = table[init].mean(0).detach().clone()          # several words: their mean [ours]
                add_token(models, token, vector.expand(n, -1) if n > 1 else vector, name)  # n vectors: the same row
        tables = [e.text_model.embeddings.token_embedding.weight for e in models.text_encoders.values()]
        for table in tables:
            table.requires_grad_(True)
        groups.append({"params": tables, "lr": cfg.token_lr if cfg.method == "objectdriven" else lr})
    return groups


def lora_params(model) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.data = p.data.float()                                        # trainable weights stay float32
        p.requires_grad_(True)
    return params


def token_ids(models: SDModels, tokens) -> list[int]:
    """The embedding rows of the new tokens (a multi-vector token has several)."""
    return [i for t in tokens for i in models.tokenizer.encode(t)[1:-1]]


def embedding_files(tokens) -> dict[str, str]:
    """token -> the file its learned embedding is written to: learned_embeds.safetensors for one token, one file per
    token for several (diffusers' load_textual_inversion reads one token per file)."""
    tokens = list(tokens)
    if len(tokens) == 1:
        return {tokens[0]: "learned_embeds.safetensors"}
    return {t: f"learned_embeds-{i}.safetensors" for i, t in enumerate(tokens, start=1)}


def write_result(folder: Path, models: SDModels, cfg: TrainConfig, step: int, inputs: Inputs,
                 full_copies: dict | None = None) -> None:
    """The method's output, the same for checkpoints and the final folder, so both can be sampled from.
    `full_copies`: float32 CPU copies of frozen parts the run holds in half precision, written in their place (a
    full model keeps its VAE and text encoder as loaded; diffusers' script re-reads them from the base model)."""
    files = {}
    if cfg.method in ("dreambooth", "comfusion"):                      # a complete diffusers model folder
        save_models(dataclasses.replace(models, **(full_copies or {})), folder)
    if cfg.method in ("dreambooth_lora", "objectdriven"):
        parts = {"unet": models.unet, **(models.text_encoders if cfg.train_text_encoder else {})}
        save_lora(folder / "pytorch_lora_weights.safetensors", parts)
        files["lora"] = "pytorch_lora_weights.safetensors"
    if inputs.tokens:                                                  # diffusers' load_textual_inversion format
        tables = {name: e.text_model.embeddings.token_embedding.weight for name, e in models.text_encoders.items()}
        if models.text_encoder_2 is None:                              # {token: (d,) or (n, d)}, a file per token
            for token, file in embedding_files(inputs.tokens).items():
                rows = tables["text_encoder"][token_ids(models, [token])].detach().float().cpu().clone()
                embeds = {token: rows[0] if len(rows) == 1 else rows}
                atomic_write(folder / file, lambda p: save_file(embeds, str(p)))
            names = list(embedding_files(inputs.tokens).values())
            files["embeddings"] = names[0] if len(names) == 1 else names
        else:                                                          # SDXL: A1111's clip_l / clip_g, (n, d) each
            ids = token_ids(models, inputs.tokens)
            embeds = {key: tables[name][ids].detach().float().cpu().clone() for key, name in SDXL_EMBEDDINGS.items()}
            atomic_write(folder / "learned_embeds.safetensors", lambda p: save_file(embeds, str(p)))
            files["embeddings"] = "learned_embeds.safetensors"
        files["tokens"] = list(inputs.tokens)
    if cfg.method in ("comfusion", "objectdriven"):                    # what the loss was trained against
        files["loss_encoders"] = {"clip": DEFAULT_CLIP[cfg.method] if cfg.clip_model is None else cfg.clip_model,
                                  **({"dino": cfg.dino_model} if cfg.method == "comfusion" else {})}
    base = cfg.pretrained_model_name_or_path
    base = str(Path(base).resolve()) if Path(base).exists() else base   # a folder or file; a Hub id stays an id
    write_result_info(folder, {"method": cfg.method, "base_model": base,
                               "instance_prompt": inputs.instance[0][1], "step": step, **files})


def export_result(folder: Path, models: SDModels, cfg: TrainConfig) -> None:
    """--export, for the final output only: kohya writes the LoRA in the kohya / A1111 / ComfyUI layout
    beside the diffusers one; single_file writes the trained model, LoRA merged, as one original-layout file.
    Both fp16, export.py's default."""
    if cfg.export == "kohya":
        parts = {"unet": models.unet, **(models.text_encoders if cfg.train_text_encoder else {})}
        save_lora_kohya(folder / "lora_kohya.safetensors", parts, dtype=torch.float16)
    if cfg.export == "single_file":
        save_single_file(models, folder / "model.safetensors", dtype=torch.float16)


def load_result(folder: Path, models: SDModels, cfg: TrainConfig, inputs: Inputs) -> None:
    """Put a checkpoint's trained weights back into the (already set up) models, for --resume_from_checkpoint."""
    try:
        if cfg.method in ("dreambooth", "comfusion"):
            models.unet.load_state_dict(read_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")[0])
            for name, encoder in models.text_encoders.items() if cfg.train_text_encoder else ():
                encoder.load_state_dict(read_safetensors(folder / name / "model.safetensors")[0])
        if cfg.method in ("dreambooth_lora", "objectdriven"):
            load_lora(folder / "pytorch_lora_weights.safetensors", {"unet": models.unet, **models.text_encoders})
        if inputs.tokens:
            with torch.no_grad():
                if models.text_encoder_2 is None:
                    for token, file in embedding_files(inputs.tokens).items():
                        rows = read_safetensors(folder / file)[0][token]
                        models.text_encoder.text_model.embeddings.token_embedding.weight[token_ids(models, [token])] = rows
                else:
                    rows, ids = read_safetensors(folder / "learned_embeds.safetensors")[0], token_ids(models, inputs.tokens)
                    for key, name in SDXL_EMBEDDINGS.items():
                        models.text_encoders[name].text_model.embeddings.token_embedding.weight[ids] = rows[key]
    except (RuntimeError, KeyError) as e:       # load_state_dict lists every mismatched tensor: keep the first
        first = next(iter(str(e).replace("\n\t", " ").splitlines()[1:2] or [str(e)]), "")[:300]
        raise ModelLoadError(f"checkpoint '{folder}' does not fit this base model ({first.strip()}): resume with the "
                             f"base model it was trained from") from None


# ----------------------------------------------------------------------------- main

def write_log(file, logs: dict) -> None:
    """One JSON line of logs.jsonl; a NaN or infinite value is written as null (JSON has no NaN)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in logs.items()}
    file.write(json.dumps(clean, allow_nan=False) + "\n")
    file.flush()


def stop_if_diverged(finite: bool, grad_norm: float, scaler_on: bool, cfg: TrainConfig, step: int, logs: dict,
                     log_file, world: int = 1, device=None) -> None:
    """A NaN or infinite loss (or gradient, outside fp16's scaler, which skips those steps itself) ends the run
    before the optimizer step, so the weights stay those of the last good step; no model is written, the last
    checkpoint stays the result. All processes stop together."""
    finite = finite and (scaler_on or math.isfinite(grad_norm))
    if world > 1:
        flag = torch.tensor(float(finite), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag)
    if finite:
        return
    if log_file is not None:
        write_log(log_file, {"step": step, **logs, "grad_norm": grad_norm})
        log_file.close()
    last = checkpoint.latest_checkpoint(cfg.output_dir)
    kept = (f"the last good checkpoint is '{last}' (continue with --resume_from_checkpoint latest and a lower "
            f"--learning_rate)") if last else "no checkpoint had been written yet"
    hint = ", or use --mixed_precision bf16 (fp16 overflows)" if cfg.mixed_precision == "fp16" else ""
    raise ValueError(f"the loss is {logs.get('loss', float('nan'))} at step {step} (gradient norm {grad_norm:g}): "
                     f"training diverged, so it stopped without writing a model. Lower --learning_rate{hint}; {kept}")


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
    check_common(cfg)
    if cfg.method == "photoverse":              # adapters pretrained over a face dataset: its own loop
        import photoverse_train
        return photoverse_train.pretrain(cfg)
    if cfg.method in PRETRAIN:                  # the toy world's model, one stage: pretrain.py's loop
        import pretrain
        return pretrain.from_train_config(cfg)
    inputs = check_config(cfg)
    out = Path(cfg.output_dir)
    resume_from, resume_state = claim_output_dir(cfg)
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0                         # only rank 0 writes logs, checkpoints, images, the output
    half = HALF.get(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)                 # LoRA's random A matrices (every other draw uses row_generator)

    # 1. models, frozen parts in the mixed-precision dtype (as diffusers' scripts), trainable parts float32
    models = load_models(cfg.pretrained_model_name_or_path, device=device, revision=cfg.revision, variant=cfg.variant)
    check_against_model(models, cfg, inputs)
    check_prompts(models, cfg, inputs)
    encoders = load_encoders(cfg, models, device, fresh=resume_from is None)
    class_rows = [(path, prompt) for prompt, folder, count in inputs.priors
                  for path in make_class_images(models, cfg, rank, world, prompt, folder, count)]
    groups = setup_trainable(models, cfg, inputs.tokens)
    pe_logs = []
    if cfg.method == "objectdriven" and resume_from is None:   # stage 1, once: a checkpoint holds its result
        pe_logs = prototypical_stage(models, encoders.pop("clip"), inputs.objects, cfg)
    frozen_dtype = {"auto": half or torch.float32, "float32": torch.float32, "float16": torch.float16,
                    "bfloat16": torch.bfloat16}[cfg.weight_dtype]
    full_copies = {}                            # full-model outputs write the frozen parts float32, as loaded
    for name, m in {"unet": models.unet, "vae": models.vae, **models.text_encoders}.items():
        if not any(p.requires_grad for p in m.parameters()):
            if is_main and cfg.method in ("dreambooth", "comfusion") and frozen_dtype != torch.float32:
                full_copies[name] = copy.deepcopy(m).cpu()
            m.to(frozen_dtype)
    if models.vae.config.force_upcast:          # SDXL's VAE overflows in float16: float32, as diffusers' SDXL script
        models.vae.float()
    if cfg.method in ("dreambooth_lora", "objectdriven"):
        models.unet.to(frozen_dtype)
        lora_params(models.unet)
    models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    for encoder in models.text_encoders.values():
        encoder.gradient_checkpointing = cfg.gradient_checkpointing and cfg.train_text_encoder
    models.vae.gradient_checkpointing = cfg.gradient_checkpointing and cfg.method == "comfusion"  # the fusion stream
    trained = {name: m for name, m in {"unet": models.unet, **models.text_encoders}.items()
               if any(p.requires_grad for p in m.parameters())}
    if world > 1:                               # DDP averages the gradients of the trained models across ranks
        trained = {name: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
                   for name, m in trained.items()}
    parts = {f.name: getattr(models, f.name) for f in dataclasses.fields(models)}
    train_models = TrainModels(**{**parts, **trained}, encoders=encoders)

    # 2. data: images resized once; crops and flips per step. Prompts encoded once unless the text encoder trains.
    pools = [[(load_image(p), prompt) for p, prompt, _ in inputs.instance],
             [(load_image(p), prompt) for p, prompt in class_rows]]
    masks = {id(im): union_mask(paths) for (im, _), (_, _, paths) in zip(pools[0], inputs.instance) if paths}
    fusion = comfusion_targets(models, encoders, inputs, cfg) if cfg.method == "comfusion" else None
    prompts = {p for pool in pools for _, p in pool} | ({"", *fusion["prompts"]} if fusion else set())
    text_trains = cfg.train_text_encoder or bool(inputs.tokens)
    with torch.no_grad():                       # {prompt: text_conditioning} (SDXL: with the pooled text)
        cached_text = {} if text_trains else {p: text_conditioning(models, [p]) for p in prompts}
    sdxl = models.unet.config.addition_embed_type == "text_time"   # time ids per row: original size and crop
    vae_dtype = next(models.vae.parameters()).dtype
    latent_cache = {}
    if cfg.cache_latents:                       # z0 moments of each image (and its mirror), scaled by s
        with torch.no_grad():
            for im, _ in pools[0] + pools[1]:
                for flip in (False, True) if cfg.random_flip else (False,):
                    x, crop = prepare_with_crop(im, cfg.resolution, True, flip)
                    dist_ = models.vae.encode(x[None].to(device, vae_dtype))
                    s = models.vae.config.scaling_factor
                    latent_cache[(id(im), flip)] = (dist_.mean * s, dist_.std * s, crop)

    # 3. optimizer and learning-rate schedule (AdamW, Loshchilov & Hutter 2019; settings from docs/methods.md section 1)
    if cfg.scale_lr:                            # diffusers' --scale_lr: the rate of the whole (global) batch
        for g in groups:
            g["lr"] *= cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    optimizer = torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                  eps=cfg.adam_epsilon)
    shape = LR_SCHEDULES[cfg.lr_scheduler]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: shape(s, cfg.lr_warmup_steps, cfg.max_train_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    trainable = [p for g in groups for p in g["params"]]
    if inputs.tokens:                           # only the new rows of the embedding table(s: SDXL) may change
        tables = [e.text_model.embeddings.token_embedding.weight for e in models.text_encoders.values()]
        new_rows = torch.tensor(token_ids(models, inputs.tokens), device=tables[0].device)
        keep = ~torch.isin(torch.arange(tables[0].shape[0], device=tables[0].device), new_rows)
        original_rows = [table.detach().clone() for table in tables]

    # 4. resume (every rank reads the checkpoint; the random draws need no state: see row_generator)
    step = 0
    if resume_from is not None:
        load_result(resume_from, models, cfg, inputs)
        base_lrs = [g["initial_lr"] for g in optimizer.param_groups]   # this run's, applied after the load
        optimizer.load_state_dict(resume_state["optimizer"])
        lr_schedule.load_state_dict(resume_state["lr_scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        apply_resumed_settings(optimizer, lr_schedule, base_lrs, cfg)
        step = resume_state["step"]
        del resume_state
        print(f"resumed from {resume_from} at step {step}")
    log_path = out / "logs.jsonl"
    if is_main:
        checkpoint.start_output_dir(out, step if resume_from is not None else None, RUN_FILES)
        if log_path.is_file():                  # keep the log of the steps the model state contains
            kept = [line for line in log_path.read_text().splitlines()
                    if line and resume_from is not None and json.loads(line)["step"] <= step]
            atomic_write(log_path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        atomic_write(out / "train_config.json", lambda p: p.write_text(json.dumps(asdict(cfg), indent=2)))
        with open(log_path, "a") as f:          # the object-driven stage 1 (step 0), one line per Adam step
            for line in pe_logs:
                write_log(f, line)

    def draw_batch(micro: int):
        """This rank's B instance rows, then B class rows: each row a random image, crop, flip (TI: template),
        and the object mask cropped and flipped with its image (object-driven). ComFusion: its fusion rows."""
        B = cfg.train_batch_size
        ids = [(kind, rank * B + j) for kind in range(2 if pools[1] else 1) for j in range(B)]
        gens = [row_generator(cfg, step, micro, kind, row) for kind, row in ids]
        pixels, moments, prompts, mask_rows, sizes = [], [], [], [], []
        for (kind, _), g in zip(ids, gens):
            im, prompt = pools[kind][int(torch.randint(len(pools[kind]), (1,), generator=g))]
            flip = cfg.random_flip and bool(torch.rand(1, generator=g) < 0.5)
            if cfg.method == "textual_inversion":               # a random template of --learnable_property
                templates = TEMPLATES[cfg.learnable_property]
                prompt = templates[int(torch.randint(len(templates), (1,), generator=g))].format(cfg.placeholder_token)
            prompts.append(prompt)
            if id(im) in masks:                 # replays the image's crop draws: the same crop of the same size
                replay = torch.Generator().set_state(g.get_state())
                mask_rows.append(prepare(masks[id(im)], cfg.resolution, cfg.center_crop, flip, replay)[:1] / 2 + 0.5)
            if latent_cache:
                moments.append(latent_cache[(id(im), flip)])
                crop = moments[-1][2]
            else:
                x, crop = prepare_with_crop(im, cfg.resolution, cfg.center_crop, flip, g)
                pixels.append(x)
            if sdxl:                            # (h, w) before resizing, the crop's corner, the training size
                sizes.append(time_ids(im.size[::-1], crop, (cfg.resolution, cfg.resolution)))
        batch = {"generators": gens, "n_prior": B if pools[1] else 0}
        if mask_rows:
            batch["mask"] = torch.stack(mask_rows).to(device)                  # (B, 1, R, R) in [0, 1]
        if fusion is not None and step % cfg.fusion_every == 0:   # ComFusion: kind 2 its rows, kind 3 the step's tau
            fusion_gens = [row_generator(cfg, step, micro, 2, rank * B + j) for j in range(B)]
            tau_gen = row_generator(cfg, step, micro, 3, 0)
            batch["fusion"] = draw_fusion_rows(cfg, fusion, cached_text, fusion_gens, tau_gen)
        if text_trains:
            batch |= text_conditioning(train_models, prompts)
        else:
            batch |= {k: torch.cat([cached_text[p][k] for p in prompts]) for k in cached_text[prompts[0]]}
        if sizes:
            batch["time_ids"] = torch.cat(sizes).to(device)
        if latent_cache:
            batch["latent_mean"] = torch.cat([m[0] for m in moments])
            batch["latent_std"] = torch.cat([m[1] for m in moments])
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
        finite = True
        for micro in range(cfg.gradient_accumulation_steps):
            with contextlib.ExitStack() as no_sync:
                if world > 1 and micro < cfg.gradient_accumulation_steps - 1:   # all-reduce once per step
                    for m in trained.values():
                        no_sync.enter_context(m.no_sync())
                with autocast(device, half):
                    loss, logs = loss_fn(draw_batch(micro), train_models, cfg)
                finite = finite and bool(torch.isfinite(loss.detach()))
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        for table in tables if inputs.tokens else ():                  # only the new rows train: drop the rest,
            if table.grad is not None:                                 # so clipping measures the trained rows alone
                table.grad[keep] = 0
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        else:                                                          # 0: no clipping, the norm is only logged
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None]))
        stop_if_diverged(finite, grad_norm, scaler.is_enabled(), cfg, step + 1, logs, log_file, world, device)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if inputs.tokens:                                              # only the new rows may change
            with torch.no_grad():
                for table, original in zip(tables, original_rows):
                    table[keep] = original[keep]
        step += 1
        if world > 1:                                                  # log the mean over ranks
            values = torch.tensor(list(logs.values()), dtype=torch.float64, device=device)
            dist.all_reduce(values)
            logs = dict(zip(logs, (values / world).tolist()))
        logs = {"step": step, "lr": lr_schedule.get_last_lr()[0], **logs, "grad_norm": grad_norm,
                "time": round(time.time() - t0, 3)}
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.1e}")
        if not is_main:
            continue
        write_log(log_file, logs)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict(),
                     "scaler": scaler.state_dict(), "config": settings_record(cfg)}
            saved = checkpoint.save_checkpoint(out, step, lambda f: write_result(f, models, cfg, step, inputs, full_copies),
                                               state,
                                               cfg.checkpoints_total_limit)
            bar.write(f"step {step}: checkpoint {saved}")
        if cfg.validation_prompt and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps):
            models.unet.eval()
            with autocast(device, half):
                images = generate(models, [cfg.validation_prompt] * cfg.num_validation_images, seed=cfg.seed,
                                  steps=cfg.sample_steps, height=cfg.resolution, width=cfg.resolution, progress=False)
            grid = out / "validation" / f"step-{step:06d}.png"
            save_png(make_grid(images), grid, {"prompt": cfg.validation_prompt, "seed": cfg.seed, "step": step})
            bar.write(f"step {step}: validation grid {grid}")
            models.unet.train()
    bar.close()

    # 6. the final output: the same files as a checkpoint, at the top of the output folder
    if is_main:
        log_file.close()
        write_result(out, models, cfg, step, inputs, full_copies)
        export_result(out, dataclasses.replace(models, **full_copies), cfg)
        print(f"trained {cfg.method} for {step} steps in {time.time() - t0:.0f}s; result in {out}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return models


def main(argv=None) -> Path:
    cfg = parse_args(argv)
    train(cfg)
    out = Path(cfg.output_dir)
    if cfg.demo:
        demo_report(cfg, out)
    return out


def demo_report(cfg: TrainConfig, out: Path) -> dict:
    """The demo's images and metrics: the subject in scenes its photos never show, and the class prompt. Whether
    the subject and a star are drawn is detector.py's render-and-compare answer; the scene is the factor
    classifier's; prompt alignment the toy CLIP's image-text cosine (the only thing the toy CLIP is trusted with)."""
    import eval as evaluate
    from sample import main as sample_main
    shutil.rmtree(out / "samples", ignore_errors=True)       # this run's images only (sample.py adds a new set)
    prompts = [f"{cfg.instance_prompt} {s}" for s in DEMO_SCENES] + [f"{cfg.class_prompt} {s}" for s in DEMO_SCENES[:2]]
    sample_main(["--model", str(out), "--out", str(out / "samples"), "--num_images", "4", "--steps", "25",
                 "--guidance", str(DEMO_GUIDANCE), "--device", cfg.device] + [x for p in prompts for x in ("--prompt", p)])
    metrics = evaluate.main(["--images", str(out / "samples"), "--reference", cfg.instance_data_dir,
                             "--clip_model", str(TOY / "clip"), "--dino_model", str(TOY / "dino"),
                             "--classifier", str(TOY / "classifier"), "--toy_subject", DEMO_SUBJECT,
                             "--identifier", cfg.identifier, "--out", str(out / "eval"), "--device", cfg.device])
    print(f"\n{'prompt':<40} {'subject drawn':>13} {'star drawn':>10} {'scene right':>11} {'prompt align':>12}")
    for row in metrics["prompts"]:
        print(f"{row['prompt']:<40} {row['subject_present']:>13.0%} {row.get('shape_present', float('nan')):>10.0%} "
              f"{row.get('scene_acc', float('nan')):>11.0%} {row['clip_t']:>12.3f}")
    print(f"\nsubject drawn: share of the 4 images where detector.py finds the {DEMO_SUBJECT.replace('_', ' ')} (its "
          f"shape fitted to the pixels of its two colours, both colours present); star drawn: a star of any colour "
          f"is there;\nscene right: the factor classifier sees the prompt's scene; prompt align: toy-CLIP cosine of "
          f"the image and the prompt without '{cfg.identifier}' (higher is closer).\nFine-tuning worked if '"
          f"{cfg.instance_prompt} ...' draws the subject in scenes its photos never show, and '{cfg.class_prompt} "
          f"...' still draws ordinary stars, not the subject.\nimages: {out / 'samples' / 'grid.png'} (a row per "
          f"prompt), metrics: {out / 'eval' / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    cli.run(main)
