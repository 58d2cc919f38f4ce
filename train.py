"""Personalize Stable Diffusion: DreamBooth, DreamBooth-LoRA, Textual Inversion, ComFusion, object-driven, PhotoVerse.

    python train.py --method dreambooth --instance_data_dir photos/ --instance_prompt "a photo of sks dog" \
        --with_prior_preservation --class_prompt "a photo of dog" --output_dir runs/dog
    python train.py --method comfusion --instance_data_dir photo/ --instance_prompt "a photo of sks dog" \
        --class_prompt "a photo of dog" --class_data_dir class_scenes/ --output_dir runs/comfusion
    python train.py --method objectdriven --objects assets/demo/dog_object.json --class_data_dir classes/ \
        --output_dir runs/objectdriven
    python train.py --method photoverse --instance_data_dir faces/ --output_dir runs/photoverse   # adapters, once
    python train.py --method pretrain_sd --output_dir runs/toy      # one stage of the toy model (pretrain.py)
    python train.py --demo              # offline, on a CPU: DreamBooth on a toy subject with the shipped toy model

Flags are named as in diffusers' examples/dreambooth/train_dreambooth.py wherever the concept is the
same. The file reads top to bottom as one loop:

    config -> checks -> models -> class images -> what trains -> data -> optimizer -> resume
           -> for step: batch -> loss (losses.py) -> backward -> clip -> step -> log / checkpoint / validate
           -> final output

What differs between methods is one record each in methods.py's METHOD_TABLE: what trains, the loss
(losses.py), the default learning rate and own flags, the priors and frozen encoders, the checks, the data, the
setup and the result files. The SD fine-tunes share `setup_finetune` here; PhotoVerse's pretraining over a face
folder (photoverse_train.py) has its own setup and runs through the same loop. Two methods add a little to the
batch or before the loop: ComFusion's fusion-stream rows (`draw_fusion_rows`), and the object-driven method's
stage 1 (`prototypical_stage`).
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import cli
from checkpoint import LR_SCHEDULES
from data import list_images, load_image, make_grid, prepare, prepare_with_crop, save_png
from hub import ModelLoadError, atomic_write, looks_like_path, read_json
from lora import INITS
from losses import row_generator
from methods import (METHOD_TABLE, TEMPLATES, Inputs, Run, TokenRows, TrainModels, check_against_model,
                     check_class_images, comfusion_targets, draw_fusion_rows, export_result, load_encoders,
                     prototypical_stage, setup_trainable, union_mask)
from pipeline import (DEFAULT_MODEL, RESULT_INFO, SDModels, default_device, generate, load_models, text_conditioning,
                      time_ids, warn_long_prompts)
from single_file import is_single_file

PRETRAIN = ("pretrain_vae", "pretrain_sd", "pretrain_clip", "pretrain_dino", "pretrain_classifier")   # the toy world's model: pretrain.py
METHODS = (*METHOD_TABLE, *PRETRAIN)    # methods.py's table says what differs between them
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
    learning_rate: float | None = None       # peak learning rate (None: the method's default, methods.py)
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
    method = METHOD_TABLE.get(p.parse_known_args(argv)[0].method)
    p.set_defaults(**(method.defaults if method else {}))      # the method's own defaults, unless given
    return TrainConfig(**vars(p.parse_args(argv)))


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
                if name == "learning_rate" and cfg.method in METHOD_TABLE:
                    default = METHOD_TABLE[cfg.method].lr
                    raise ValueError(f"{e} (leave it out for the method's default, {default:g})") from None
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
    stage_1 = ("clip_model",) if METHOD_TABLE[cfg.method].prototypical else ()  # its CLIP serves stage 1, done by then
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


def check_config(cfg: TrainConfig):
    """Every mistake we can see before loading a model: one line saying what to change. Returns the run's
    inputs (each image opened, so a corrupt file fails now, not at step 300): Inputs, PhotoVerse's face folder."""
    check_common(cfg)
    method, defaults = METHOD_TABLE[cfg.method], TrainConfig()
    for name in sorted({n for m in METHOD_TABLE.values() for n in m.options}):
        owners = [n for n, m in METHOD_TABLE.items() if name in m.options]
        if cfg.method not in owners and getattr(cfg, name) != getattr(defaults, name):
            raise ValueError(f"--{name} is an option of --method {' and '.join(owners)}, not of {cfg.method}")
    if cfg.resolution % 8 or cfg.resolution <= 0:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {cfg.resolution}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got '{cfg.mixed_precision}'")
    if cfg.weight_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"--weight_dtype must be auto, float32, float16 or bfloat16, got '{cfg.weight_dtype}'")
    trains_full_weights = not {"lora", "adapters"} & set(method.trains) or cfg.train_text_encoder
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
    if method.templates and cfg.with_prior_preservation:
        raise ValueError("Textual Inversion has no prior-preservation term: drop --with_prior_preservation")
    if cfg.cache_latents and not cfg.center_crop:
        raise ValueError("--cache_latents needs --center_crop (a random crop cannot be cached)")
    if cfg.lr_scheduler not in LR_SCHEDULES:
        raise ValueError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_scheduler}'")
    if cfg.learnable_property not in TEMPLATES:
        raise ValueError(f"--learnable_property must be object or style, got '{cfg.learnable_property}'")
    if cfg.lora_init not in INITS:
        raise ValueError(f"--lora_init must be one of {', '.join(INITS)}, got '{cfg.lora_init}'")
    if method.check:
        method.check(cfg)
    if cfg.export not in ("none", "kohya", "single_file"):
        raise ValueError(f"--export must be none, kohya or single_file, got '{cfg.export}'")
    if cfg.export == "kohya" and "lora" not in method.trains:
        lora = " and ".join(n for n, m in METHOD_TABLE.items() if "lora" in m.trains)
        raise ValueError(f"--export kohya writes a LoRA, and --method {cfg.method} trains none (the LoRA methods are "
                         f"{lora})")
    if cfg.export == "single_file" and "tokens" in method.trains:
        raise ValueError(f"--export single_file cannot hold the new tokens of --method {cfg.method} (a single file has "
                         f"no tokenizer): drop --export and share the output folder, which sample.py loads")
    if method.binds_identifier and cfg.identifier not in cfg.instance_prompt.split():
        warnings.warn(f"--instance_prompt '{cfg.instance_prompt}' does not contain the identifier '{cfg.identifier}': "
                      f"the subject will be bound to the prompt's ordinary words (set --identifier if you use "
                      f"another rare token)", stacklevel=2)
    base = cfg.pretrained_model_name_or_path                           # a Hub id, a folder or one .safetensors/.ckpt
    if is_single_file(base) and not Path(base).expanduser().is_file():
        raise ModelLoadError(f"--pretrained_model_name_or_path file '{base}' does not exist")
    if looks_like_path(base) and not is_single_file(base) and not Path(base).is_dir():
        raise ModelLoadError(f"--pretrained_model_name_or_path folder '{base}' does not exist")
    return method.inputs(cfg)


# ----------------------------------------------------------------------------- pieces of the loop


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


def check_prompts(models: SDModels, cfg: TrainConfig, inputs: Inputs) -> None:
    """Prompts over CLIP's 77 tokens are cut: warn as sample.py does; an identifier in the part cut off would never
    be seen, which is an error."""
    prompts = [p for _, p, _ in inputs.instance] + [p for p, _, _ in inputs.priors]
    warn_long_prompts(models.tokenizer, prompts + ([cfg.validation_prompt] if cfg.validation_prompt else []))
    if not METHOD_TABLE[cfg.method].binds_identifier:
        return
    for p in dict.fromkeys(prompts[:len(inputs.instance)]):
        kept = models.tokenizer.decode(models.tokenizer.encode(p)[1:models.tokenizer.max_length - 1])
        if cfg.identifier in p.split() and cfg.identifier.lower() not in kept.split():
            raise ValueError(f"--instance_prompt '{p[:60]}...' puts the identifier '{cfg.identifier}' past CLIP's "
                             f"{models.tokenizer.max_length} tokens, where it is cut off: move it to the front")


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


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """--weight_dtype: the dtype of the frozen parts (auto: the mixed-precision dtype)."""
    return {"auto": HALF.get(cfg.mixed_precision, torch.float32), "float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[cfg.weight_dtype]


@dataclass
class Pools:
    """What draw_batch reads: the images (resized once) with their prompts and object masks, and what is encoded
    once (prompts unless the text encoder trains, latents with --cache_latents, ComFusion's fusion targets)."""
    rows: list[list[tuple]]     # [instance rows, class rows]: (image, prompt, its object mask or None)
    text: dict                  # {prompt: text_conditioning} (SDXL: with the pooled text); {} when the text trains
    latents: dict               # {(kind, index, flip): (z0 mean, z0 std, crop)} with --cache_latents, else {}
    fusion: dict | None         # ComFusion's comfusion_targets
    models: TrainModels         # the text encoder(s), when they train
    device: torch.device
    vae_dtype: torch.dtype
    sdxl: bool                  # time ids per row: original size and crop


def draw_batch(pools: Pools, cfg: TrainConfig, step: int, micro: int, rank: int = 0) -> dict:
    """This rank's B instance rows, then B class rows: each row a random image, crop, flip (TI: template),
    and the object mask cropped and flipped with its image (object-driven). ComFusion: its fusion rows."""
    B, method = cfg.train_batch_size, METHOD_TABLE[cfg.method]
    ids = [(kind, rank * B + j) for kind in range(2 if pools.rows[1] else 1) for j in range(B)]
    gens = [row_generator(cfg, step, micro, kind, row) for kind, row in ids]
    pixels, moments, prompts, mask_rows, sizes = [], [], [], [], []
    for (kind, _), g in zip(ids, gens):
        index = int(torch.randint(len(pools.rows[kind]), (1,), generator=g))
        im, prompt, mask = pools.rows[kind][index]
        flip = cfg.random_flip and bool(torch.rand(1, generator=g) < 0.5)
        if method.templates:                                    # a random template of --learnable_property
            templates = TEMPLATES[cfg.learnable_property]
            prompt = templates[int(torch.randint(len(templates), (1,), generator=g))].format(cfg.placeholder_token)
        prompts.append(prompt)
        if mask is not None:                    # replays the image's crop draws: the same crop of the same size
            replay = torch.Generator().set_state(g.get_state())
            mask_rows.append(prepare(mask, cfg.resolution, cfg.center_crop, flip, replay)[:1] / 2 + 0.5)
        if pools.latents:
            moments.append(pools.latents[(kind, index, flip)])
            crop = moments[-1][2]
        else:
            x, crop = prepare_with_crop(im, cfg.resolution, cfg.center_crop, flip, g)
            pixels.append(x)
        if pools.sdxl:                          # (h, w) before resizing, the crop's corner, the training size
            sizes.append(time_ids(im.size[::-1], crop, (cfg.resolution, cfg.resolution)))
    batch = {"generators": gens, "n_prior": B if pools.rows[1] else 0}
    if mask_rows:
        batch["mask"] = torch.stack(mask_rows).to(pools.device)             # (B, 1, R, R) in [0, 1]
    if pools.fusion is not None and step % cfg.fusion_every == 0:   # ComFusion: kind 2 its rows, kind 3 the step's tau
        fusion_gens = [row_generator(cfg, step, micro, 2, rank * B + j) for j in range(B)]
        tau_gen = row_generator(cfg, step, micro, 3, 0)
        batch["fusion"] = draw_fusion_rows(cfg, pools.fusion, pools.text, fusion_gens, tau_gen)
    if not pools.text:
        batch |= text_conditioning(pools.models, prompts)
    else:
        batch |= {k: torch.cat([pools.text[p][k] for p in prompts]) for k in pools.text[prompts[0]]}
    if sizes:
        batch["time_ids"] = torch.cat(sizes).to(pools.device)
    if pools.latents:
        batch["latent_mean"] = torch.cat([m[0] for m in moments])
        batch["latent_std"] = torch.cat([m[1] for m in moments])
    else:
        batch["pixel_values"] = torch.stack(pixels).to(pools.device, pools.vae_dtype)
    return batch


def make_pools(models: SDModels, loss_models: TrainModels, cfg: TrainConfig, inputs: Inputs, class_rows) -> Pools:
    """Images resized once, crops and flips per step; prompts encoded once unless the text encoder trains."""
    rows = [[(load_image(p), prompt, union_mask(paths) if paths else None) for p, prompt, paths in inputs.instance],
            [(load_image(p), prompt, None) for p, prompt in class_rows]]
    fusion = comfusion_targets(models, loss_models.encoders, inputs, cfg) if METHOD_TABLE[cfg.method].fusion else None
    prompts = {p for pool in rows for _, p, _ in pool} | ({"", *fusion["prompts"]} if fusion else set())
    with torch.no_grad():
        text = {} if cfg.train_text_encoder or inputs.tokens else {p: text_conditioning(models, [p]) for p in prompts}
    vae_dtype, latents = next(models.vae.parameters()).dtype, {}
    if cfg.cache_latents:                       # z0 moments of each image (and its mirror), scaled by s
        with torch.no_grad():
            for kind, pool in enumerate(rows):
                for index, (im, _, _) in enumerate(pool):
                    for flip in (False, True) if cfg.random_flip else (False,):
                        x, crop = prepare_with_crop(im, cfg.resolution, True, flip)
                        dist_ = models.vae.encode(x[None].to(models.device, vae_dtype))
                        s = models.vae.config.scaling_factor
                        latents[(kind, index, flip)] = (dist_.mean * s, dist_.std * s, crop)
    return Pools(rows, text, latents, fusion, loss_models, models.device, vae_dtype,
                 models.unet.config.addition_embed_type == "text_time")


def validation_images(models: SDModels, cfg: TrainConfig) -> tuple[list, dict]:
    """--validation_prompt's images (the grid's PNG text adds nothing to prompt, seed and step)."""
    return generate(models, [cfg.validation_prompt] * cfg.num_validation_images, seed=cfg.seed, steps=cfg.sample_steps,
                    height=cfg.resolution, width=cfg.resolution, progress=False), {}


def setup_finetune(cfg: TrainConfig, inputs: Inputs, device, frozen, rank: int, world: int, fresh: bool) -> Run:
    """The set-up every SD fine-tune shares: models, frozen encoders, class images, what trains (frozen parts cast
    to `frozen` first, as diffusers' scripts; trainable parts float32), object-driven stage 1, the data."""
    models = load_models(cfg.pretrained_model_name_or_path, device=device, revision=cfg.revision, variant=cfg.variant)
    check_against_model(models, cfg, inputs)
    check_prompts(models, cfg, inputs)
    encoders = load_encoders(cfg, models, device, fresh=fresh)
    class_rows = [(path, prompt) for prompt, folder, count in inputs.priors
                  for path in make_class_images(models, cfg, rank, world, prompt, folder, count)]
    full_copies = {} if rank == 0 else None     # full-model outputs write the frozen parts float32, as loaded
    groups = setup_trainable(models, cfg, inputs.tokens, frozen, full_copies)
    pe_logs = []
    if METHOD_TABLE[cfg.method].prototypical and fresh:   # stage 1, once: a checkpoint holds its result
        pe_logs = prototypical_stage(models, encoders.pop("clip"), inputs.objects, cfg)
    models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    for encoder in models.text_encoders.values():
        encoder.gradient_checkpointing = cfg.gradient_checkpointing and cfg.train_text_encoder
    models.vae.gradient_checkpointing = cfg.gradient_checkpointing and METHOD_TABLE[cfg.method].fusion
    trained = {name: m for name, m in {"unet": models.unet, **models.text_encoders}.items()
               if any(p.requires_grad for p in m.parameters())}
    if world > 1:                               # DDP averages the gradients of the trained models across ranks
        trained = {name: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
                   for name, m in trained.items()}
    parts = {f.name: getattr(models, f.name) for f in dataclasses.fields(models)}
    loss_models = TrainModels(**{**parts, **trained}, encoders=encoders)
    pools = make_pools(models, loss_models, cfg, inputs, class_rows)
    return Run(models, loss_models, groups, inputs, partial(draw_batch, pools, cfg, rank=rank),
               partial(validation_images, models, cfg), ddp=trained if world > 1 else {},
               rows=TokenRows.of(models, inputs.tokens) if inputs.tokens else None, full_copies=full_copies or {},
               logs=pe_logs)


def make_optimizer(groups: list[dict], cfg: TrainConfig, world: int, device):
    """AdamW (Loshchilov & Hutter 2019; settings from docs/methods.md section 1), its learning-rate schedule, the fp16
    scaler."""
    if cfg.scale_lr:                            # diffusers' --scale_lr: the rate of the whole (global) batch
        for g in groups:
            g["lr"] *= cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    optimizer = torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                  eps=cfg.adam_epsilon)
    schedule = checkpoint.lr_schedule(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps)
    return optimizer, schedule, torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")


def start_logs(out: Path, cfg: TrainConfig, run: Run, step: int | None) -> Path:
    """The run's folder (step: the resumed step, None for a fresh run), logs.jsonl cut to the steps the model state
    contains, train_config.json, and the log lines of before the loop."""
    checkpoint.start_output_dir(out, step, RUN_FILES)
    log_path = out / "logs.jsonl"
    if log_path.is_file():                      # keep the log of the steps the model state contains
        kept = [line for line in log_path.read_text().splitlines()
                if line and step is not None and json.loads(line)["step"] <= step]
        atomic_write(log_path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
    atomic_write(out / "train_config.json", lambda p: p.write_text(json.dumps({**asdict(cfg), **run.info}, indent=2)))
    with open(log_path, "a") as f:              # the object-driven stage 1 (step 0), one line per Adam step
        for line in run.logs:
            write_log(f, line)
    return log_path


def train(cfg: TrainConfig) -> SDModels:
    """Run the whole training described by `cfg`; returns the trained models (the files are in output_dir)."""
    check_common(cfg)
    if cfg.method in PRETRAIN:                  # the toy world's model, one stage: pretrain.py's loop
        import pretrain
        return pretrain.from_train_config(cfg)
    method = METHOD_TABLE[cfg.method]
    inputs = check_config(cfg)
    out = Path(cfg.output_dir)
    resume_from, resume_state = claim_output_dir(cfg)
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0                         # only rank 0 writes logs, checkpoints, images, the output
    half = HALF.get(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)                 # LoRA's and adapters' initial weights (other draws: row_generator)

    # 1. models, what trains, data: the method's setup (PhotoVerse's own; every other method's setup_finetune)
    run = (method.setup or setup_finetune)(cfg, inputs, device, frozen_dtype(cfg), rank, world, resume_from is None)

    # 2. optimizer and learning-rate schedule
    optimizer, lr_schedule, scaler = make_optimizer(run.groups, cfg, world, device)
    trainable = [p for g in run.groups for p in g["params"]]

    # 3. resume (every rank reads the checkpoint; the random draws need no state: see row_generator)
    step = 0
    if resume_from is not None:
        method.read(resume_from, run, cfg)
        base_lrs = [g["initial_lr"] for g in optimizer.param_groups]   # this run's, applied after the load
        optimizer.load_state_dict(resume_state["optimizer"])
        lr_schedule.load_state_dict(resume_state["lr_scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        apply_resumed_settings(optimizer, lr_schedule, base_lrs, cfg)
        step = resume_state["step"]
        del resume_state
        print(f"resumed from {resume_from} at step {step}")
    log_path = start_logs(out, cfg, run, step if resume_from is not None else None) if is_main else None

    # 4. the loop
    run.models.unet.train()
    log_file = open(log_path, "a") if is_main else None
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc=cfg.method, unit="step", disable=not is_main)
    t0 = time.time()
    while step < cfg.max_train_steps:
        finite = True
        for micro in range(cfg.gradient_accumulation_steps):
            with contextlib.ExitStack() as no_sync:
                if micro < cfg.gradient_accumulation_steps - 1:        # DDP: all-reduce once per step
                    for m in run.ddp.values():
                        no_sync.enter_context(m.no_sync())
                with autocast(device, half):
                    loss, logs = method.loss(run.batch(step, micro), run.loss_models, cfg)
                finite = finite and bool(torch.isfinite(loss.detach()))
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        if run.rows:                                                   # only the new rows train: drop the rest,
            run.rows.drop_frozen_grads()                               # so clipping measures the trained rows alone
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        else:                                                          # 0: no clipping, the norm is only logged
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None]))
        stop_if_diverged(finite, grad_norm, scaler.is_enabled(), cfg, step + 1, logs, log_file, world, device)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if run.rows:                                                   # only the new rows may change
            run.rows.restore()
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
            saved = checkpoint.save_checkpoint(out, step, lambda f: method.write(f, run, cfg, step), state,
                                               cfg.checkpoints_total_limit)
            bar.write(f"step {step}: checkpoint {saved}")
        if cfg.validation_prompt and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps):
            run.models.unet.eval()
            with autocast(device, half):
                images, text = run.validate()
            grid = out / "validation" / f"step-{step:06d}.png"
            save_png(make_grid(images), grid, {"prompt": cfg.validation_prompt, "seed": cfg.seed, "step": step, **text})
            bar.write(f"step {step}: validation grid {grid}")
            run.models.unet.train()
    bar.close()

    # 5. the final output: the same files as a checkpoint, at the top of the output folder
    if is_main:
        log_file.close()
        method.write(out, run, cfg, step)
        export_result(out, run, cfg)
        print(f"trained {cfg.method} for {step} steps in {time.time() - t0:.0f}s; result in {out}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.models


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
