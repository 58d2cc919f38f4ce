"""PhotoVerse pretraining: the objective, a folder of aligned faces, and the loop that `train.py --method photoverse`
dispatches to (`pretrain`).

Chen et al. 2023, "PhotoVerse: Tuning-Free Image Customization with Text-to-Image Diffusion Models",
arXiv 2309.05793; its equations are docs/methods.md section 4, whose [paper] / [ours]
marks the comments below repeat. The parts it trains (adapters, the image branch W_k^S, W_v^S, LoRA on the text
branch) and the random fusion are photoverse.py's; here they are trained once, over a face dataset, on

    L = L_ldm + 0.01 L_face + 0.01 mean|p_f| + 0.001 mean|V_S|,   L_face = 1 - cos(F(x_face), F(x_hat_face))

The loss has losses.py's one signature (`photoverse_loss(batch, models, cfg)`) but lives here, beside the loop,
because its models are PhotoVerseModels; the loop is train.py's, on one process.

Shapes: b batch, m pseudo-words, d text width, R resolution; faces (b, 3, R, R) in [-1, 1], face masks
(b, 1, R, R) in [0, 1], pseudo-words (b, m, d), image tokens f (b, p, d_ctx).
"""
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

import checkpoint
from data import IMAGE_SUFFIXES, list_images, load_image, make_grid, prepare, save_png
from face_encoder import IResNet
from hub import ModelLoadError, atomic_write, component_dir, looks_like_path, read_json
from image_encoders import CLIPConfig, CLIPModel, ViTModel
from lora import INITS
from losses import draw_noise, draw_timesteps, latents_of
from photoverse import (CHECKPOINT_NAME, IdentityEncoder, PhotoVerseConfig, PhotoVerseModels, attach, check_base,
                        check_layers, check_prompts, draw_fusion, dual_layers, encode_with_words, generate,
                        image_states, load_trained_parts, read_adapter_meta, reference_faces, save_adapter,
                        set_image_condition, trainable_parameters)
from pipeline import default_device, load_models, write_result_info
from train import (HALF, LR_SCHEDULES, METHOD_OPTIONS, RUN_FILES, TrainConfig, apply_resumed_settings, autocast, check_common,
                   claim_output_dir, row_generator, settings_record, stop_if_diverged, write_log)

TRAIN_PROMPT = "a photo of S*"      # [paper]: the training caption, and the one L_face's estimate is made under
CLIP_MODEL = "openai/clip-vit-large-patch14"    # the image encoder [paper]: the CLIP whose text tower SD1 uses
LEARNING_RATE = 1e-4                            # [paper]

# ----------------------------------------------------------------------------- the loss


def face_regions(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) images, (b, 1, H, W) face masks in [0, 1] -> the face of each: the image times its mask,
    cropped to the mask's bounding box and resized back to H x W [ours]. An all-ones mask (the default: an
    aligned face is the whole image [ours]) returns the image unchanged."""
    out = []
    for xi, mi in zip(x, masks):
        rows, cols = torch.nonzero(mi[0] > 0.5, as_tuple=True)
        crop = (xi * mi.to(xi.dtype))[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        if crop.shape[-2:] != xi.shape[-2:]:
            crop = F.interpolate(crop[None], size=xi.shape[-2:], mode="bilinear", align_corners=False)[0]
        out.append(crop)
    return torch.stack(out)


def face_loss(identity: IdentityEncoder, x: torch.Tensor, x_hat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per row, 1 - cos(F(x_face), F(x_hat_face)) [paper]; the real image's embedding is a constant."""
    with torch.no_grad():
        real = identity(face_regions(x, masks))
    return 1 - F.cosine_similarity(identity(face_regions(x_hat, masks)).float(), real.float(), dim=-1)


def word_regulariser(words: torch.Tensor) -> torch.Tensor:
    """mean |p_f| [paper] over the pseudo-words (b, m, d)."""
    return words.float().abs().mean()


def value_regulariser(unet: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """mean |V_S| [paper], V_S = W_v^S f in every cross-attention, averaged over them [ours]."""
    return torch.stack([m.to_v_s(tokens).float().abs().mean() for m in dual_layers(unet)]).mean()


def photoverse_loss(batch, models: PhotoVerseModels, cfg):
    """PhotoVerse's objective (Chen et al. 2023, arXiv 2309.05793; docs/methods.md section 4), in losses.py's signature:

        L = L_ldm + lambda_face L_face + lambda_p mean|p_f| + lambda_v mean|V_S|

    with (lambda_face, lambda_p, lambda_v) = (0.01, 0.01, 0.001) [paper] (cfg.face_loss_weight, word_reg_weight,
    value_reg_weight). It lives here, not in losses.py: its models are PhotoVerseModels (CLIP image tower,
    adapters, face encoder), built and trained by this file's own loop.

    batch: pixel_values (b, 3, R, R) in [-1, 1] (the face is both the reference and the target [ours]), masks
    (b, 1, R, R) face regions, generators (one per row: timestep, noise, latent sample), fusion_generator.
      1. random fusion [paper]: (gamma, sigma) drawn once for this forward
      2. the face through the frozen CLIP tower -> pseudo-words p_f (b, m, d) and image tokens f; with a face mask
         or box the tower sees the 1.3x face crop with non-face pixels masked [paper] (`reference_faces`), else the
         whole aligned image [ours]
      3. c = text_encoder("a photo of S*" with S* -> the m pseudo-words) [paper]
      4. L_ldm = || target - unet(z_t, t, c; f, gamma, sigma) ||^2 [paper]
      5. L_face on the one-step estimate x_hat = D(z0_hat / s) [paper], only for rows with t < 600 [ours],
         averaged over the whole batch (a skipped row counts 0) [ours]
      6. the two L1 regularisers [paper]
    """
    x, masks, gens = batch["pixel_values"], batch["masks"], batch["generators"]
    b, schedule = x.shape[0], models.schedule
    gamma, sigma = draw_fusion(batch["fusion_generator"])                                   # 1.
    words, tokens = models.adapters(image_states(models, reference_faces(x, masks)))         # 2.
    context = encode_with_words(models.tokenizer, models.text_encoder, [TRAIN_PROMPT] * b, words)  # 3.
    z0 = latents_of(batch, models)                                                           # 4.
    t = draw_timesteps(gens, schedule, z0.device)
    noise = draw_noise(z0, gens, cfg.noise_offset)
    z_t = schedule.add_noise(z0, noise, t)
    set_image_condition(models.unet, tokens, gamma, sigma)
    pred = models.unet(z_t, t, context)
    loss_ldm = F.mse_loss(pred.float(), schedule.target(z0, noise, t).float())
    keep = t < cfg.face_loss_max_timestep                                                    # 5.
    loss_face = torch.zeros((), device=x.device)
    if cfg.face_loss_weight > 0 and keep.any():
        z0_hat = schedule.pred_x0(z_t[keep], pred[keep], t[keep])
        x_hat = models.vae.decode(z0_hat / models.vae.config.scaling_factor)
        loss_face = face_loss(models.identity, x[keep], x_hat, masks[keep]).sum() / b
    loss_words = word_regulariser(words)                                                     # 6.
    loss_values = value_regulariser(models.unet, tokens)
    loss = (loss_ldm + cfg.face_loss_weight * loss_face + cfg.word_reg_weight * loss_words
            + cfg.value_reg_weight * loss_values)
    logs = {"loss": loss.item(), "loss_ldm": loss_ldm.item(), "loss_face": loss_face.item(),
            "loss_words": loss_words.item(), "loss_values": loss_values.item(), "gamma": gamma, "sigma": sigma}
    return loss, logs

# ----------------------------------------------------------------------------- data: a folder of aligned faces


def verified_size(path, what: str = "face image") -> tuple[int, int]:
    """Open a file's header and check its data (PIL's verify) without decoding it: unreadable files fail now."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read {what} '{path}': {e}") from None
    return size


class FaceFolder:
    """Aligned face images (FFHQ, CelebA-HQ, FairFace, ...) for pretraining. Optional face regions for L_face:
    `masks/NAME.png` (any image suffix, the image's size, white = face) or `boxes.json`
    ({"NAME.jpg": [left, top, right, bottom]} in pixels). An image with neither uses the whole image [ours].
    Every file is checked when the folder is opened; images are decoded one batch at a time."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.paths = list_images(self.folder, "instance")
        sizes = {p.name: verified_size(p) for p in self.paths}
        self.boxes, self.masks = {}, {}
        box_file = self.folder / "boxes.json"
        if box_file.is_file():
            try:
                boxes = json.loads(box_file.read_text())
            except ValueError as e:
                raise ValueError(f"cannot read '{box_file}': {e}") from None
            if not isinstance(boxes, dict):
                raise ValueError(f"'{box_file}' must be a JSON object {{image name: [left, top, right, bottom]}}")
            for name, box in boxes.items():
                if name not in sizes:
                    raise ValueError(f"'{box_file}' must map image names of the folder to boxes; '{name}' is not one")
                w, h = sizes[name]
                numbers = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                if not (numbers and 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
                    raise ValueError(f"'{box_file}': the box of '{name}' must be [left, top, right, bottom] inside its "
                                     f"{w}x{h} pixels, got {box}")
                self.boxes[name] = box
        mask_dir = self.folder / "masks"
        if mask_dir.is_dir():
            by_stem = {m.stem: m for m in sorted(mask_dir.iterdir()) if m.suffix.lower() in IMAGE_SUFFIXES}
            for p in self.paths:
                mask = by_stem.get(p.stem)
                if mask is None:
                    continue
                if p.name in self.boxes:
                    raise ValueError(f"'{p.name}' has both a mask and a box: keep one")
                size = verified_size(mask, "face mask")
                if size != sizes[p.name]:
                    raise ValueError(f"mask '{mask}' is {size[0]}x{size[1]}, its image {sizes[p.name][0]}x"
                                     f"{sizes[p.name][1]}: a mask must have its image's size")
                self.masks[p.name] = mask

    def __len__(self):
        return len(self.paths)

    def load(self, i: int, resolution: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i as (3, R, R) in [-1, 1] and its face mask (1, R, R) in [0, 1], cropped and flipped alike."""
        path = self.paths[i]
        image = load_image(path)
        x = prepare(image, resolution, center_crop=True, flip=flip)        # aligned faces: center crop [ours]
        if path.name in self.masks:
            mask = load_image(self.masks[path.name])
        elif path.name in self.boxes:
            mask = Image.new("RGB", image.size)
            left, top, right, bottom = self.boxes[path.name]
            ImageDraw.Draw(mask).rectangle((left, top, right - 1, bottom - 1), fill=(255, 255, 255))
        else:
            return x, torch.ones(1, resolution, resolution)
        if mask.size != image.size:
            raise ValueError(f"the face region of '{path}' is {mask.size}, the image {image.size}")
        m = (prepare(mask, resolution, center_crop=True, flip=flip).mean(dim=0, keepdim=True) + 1) / 2
        if not (m > 0.5).any():
            raise ValueError(f"the face region of '{path}' is empty after cropping to {resolution} px")
        return x, m

# ----------------------------------------------------------------------------- pretraining


def parse_layers(text: str) -> tuple[int, ...]:
    """'last,4,8,12,16' -> (-1, 4, 8, 12, 16): CLIP hidden-state indices, `last` (or -1) the last layer's output."""
    try:
        return tuple(-1 if s.strip() == "last" else int(s) for s in str(text).split(","))
    except ValueError:
        raise ValueError(f"--vision_layers must be comma-separated layer numbers or 'last', such as last,4,8,12,16; "
                         f"got '{text}'") from None


def photoverse_config(cfg) -> PhotoVerseConfig:
    """The architecture part of the training config. LoRA alpha defaults (None) to the rank, so the update's scale
    alpha / rank is 1: the paper's K = W_k + alpha dW with alpha = 1 [paper] (`sample.py --lora_scale` sets it at
    inference, where the paper tunes it)."""
    return PhotoVerseConfig(vision_layers=parse_layers(cfg.vision_layers), adapter_dim=cfg.adapter_dim, rank=cfg.rank,
                            lora_alpha=cfg.lora_alpha, resolution=cfg.resolution)


def check_pretrain_config(cfg) -> FaceFolder:
    """Every mistake visible before a model loads, one line each; opens (and checks) the face folder."""
    check_common(cfg)                                    # the method, the numbers, the device, the output folder
    defaults = TrainConfig()
    for method, names in METHOD_OPTIONS.items():         # as train.check_config: another method's option is an error
        for name in names:
            if name not in METHOD_OPTIONS["photoverse"] and getattr(cfg, name) != getattr(defaults, name):
                raise ValueError(f"--{name} is an option of --method {method}, not of photoverse")
    if cfg.resolution % 8 or cfg.resolution <= 0:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                         f"got {cfg.resolution}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got '{cfg.mixed_precision}'")
    if cfg.weight_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"--weight_dtype must be auto, float32, float16 or bfloat16, got '{cfg.weight_dtype}'")
    if cfg.lr_scheduler not in LR_SCHEDULES:
        raise ValueError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_scheduler}'")
    if cfg.lora_init not in INITS:
        raise ValueError(f"--lora_init must be one of {', '.join(INITS)}, got '{cfg.lora_init}'")
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps", "rank", "adapter_dim"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("face_loss_weight", "word_reg_weight", "value_reg_weight", "face_loss_max_timestep"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for flag in ("with_prior_preservation", "train_text_encoder", "cache_latents", "snr_gamma"):
        if getattr(cfg, flag):
            raise ValueError(f"--{flag} does not apply to --method photoverse (see docs/methods.md section 4)")
    if cfg.export != "none":
        raise ValueError("--export does not apply to --method photoverse: its output is photoverse.safetensors, which "
                         "sample.py --method photoverse reads")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--method photoverse pretrains on one process: run it without torchrun")
    config = photoverse_config(cfg)
    if cfg.validation_prompt:
        check_prompts([cfg.validation_prompt])
    if cfg.face_encoder and not Path(cfg.face_encoder).expanduser().is_file():
        raise ModelLoadError(f"--face_encoder '{cfg.face_encoder}' does not exist: pass an arcface_torch IResNet "
                             f"checkpoint, or leave it out for the DINO fallback")
    for flag, name in (("pretrained_model_name_or_path", cfg.pretrained_model_name_or_path),
                       ("clip_model", cfg.clip_model or CLIP_MODEL), ("dino_model", cfg.dino_model)):
        if looks_like_path(name) and not Path(name).expanduser().exists():
            raise ModelLoadError(f"--{flag} '{name}' does not exist")
    if not cfg.instance_data_dir:
        raise ValueError("--instance_data_dir is required: a folder of aligned face images (FFHQ, CelebA-HQ, ...)")
    faces = FaceFolder(cfg.instance_data_dir)
    clip = CLIPConfig.from_json(read_json(component_dir(cfg.clip_model or CLIP_MODEL, None, ["config.json"])
                                          / "config.json"))
    check_layers(config.vision_layers, clip.vision.num_hidden_layers)     # only the config is read (or fetched)
    return faces


def load_identity(face_encoder: str | None, dino_model: str, device) -> IdentityEncoder:
    """F for L_face [ours]: the user's ArcFace IResNet checkpoint, else DINO ViT-S/16 (the fallback every
    report names)."""
    if face_encoder:
        model = IResNet.from_file(face_encoder, device=device)
        return IdentityEncoder(model, model.preprocess.tensor, f"ArcFace IResNet ({face_encoder})")
    model = ViTModel.from_pretrained(dino_model, device=device)
    return IdentityEncoder(model, model.preprocess.tensor, f"DINO fallback ({dino_model}; no --face_encoder given)")


def pretrain(cfg) -> PhotoVerseModels:
    """Pretrain the adapters, LoRA and W^S over a folder of aligned faces (cfg: train.py's TrainConfig).

    The loop is train.py's (AdamW, lr schedule, accumulation, clipping, mixed precision, atomic checkpoints
    with resume, logs.jsonl, validation images), on one process. Defaults: lr 1e-4 and CLIP ViT-L/14 [paper];
    the paper's batch 64 and 60k steps are flags (--train_batch_size, --max_train_steps)."""
    faces = check_pretrain_config(cfg)
    config = photoverse_config(cfg)
    out = Path(cfg.output_dir)
    resume_from, resume_state = claim_output_dir(cfg)
    device = torch.device(default_device() if cfg.device == "auto" else cfg.device)
    half = HALF.get(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)                 # adapters' and LoRA's initial weights

    # 1. models: frozen parts in the mixed-precision dtype, trained parts float32 (created after the cast)
    sd = load_models(cfg.pretrained_model_name_or_path, device=device, revision=cfg.revision, variant=cfg.variant)
    clip_model = cfg.clip_model or CLIP_MODEL
    vision = CLIPModel.from_pretrained(clip_model, device=device)
    identity = load_identity(cfg.face_encoder, cfg.dino_model, device) if cfg.face_loss_weight > 0 else None
    face_report = identity.name if identity else "off (--face_loss_weight 0)"
    print(f"face loss: {face_report}")
    frozen_dtype = {"auto": half or torch.float32, "float32": torch.float32, "float16": torch.float16,
                    "bfloat16": torch.bfloat16}[cfg.weight_dtype]
    for m in (sd.unet, sd.vae, sd.text_encoder, vision) + ((identity.model,) if identity else ()):
        m.to(frozen_dtype)
    models = attach(sd, vision, config, identity, cfg.lora_init)
    models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    models.vae.gradient_checkpointing = cfg.gradient_checkpointing   # L_face decodes x_hat with gradients
    models.unet.train()
    trainable = trainable_parameters(models)

    # 2. optimizer and learning-rate schedule (AdamW, as train.py)
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE if cfg.learning_rate is None else cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                  eps=cfg.adam_epsilon)
    shape = LR_SCHEDULES[cfg.lr_scheduler]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                    lambda s: shape(s, cfg.lr_warmup_steps, cfg.max_train_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")

    # 3. resume
    step = 0
    if resume_from is not None:
        check_base(read_adapter_meta(resume_from), models, vision, resume_from)
        load_trained_parts(models, resume_from)
        base_lrs = [g["initial_lr"] for g in optimizer.param_groups]   # this run's, applied after the load
        optimizer.load_state_dict(resume_state["optimizer"])
        lr_schedule.load_state_dict(resume_state["lr_scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        apply_resumed_settings(optimizer, lr_schedule, base_lrs, cfg)
        step = resume_state["step"]
        print(f"resumed from {resume_from} at step {step}")
    checkpoint.start_output_dir(out, step if resume_from is not None else None, RUN_FILES)
    log_path = out / "logs.jsonl"
    if log_path.is_file():                      # keep the log of the steps the trained state contains
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(log_path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
    run_config = {**asdict(cfg), "face_loss": face_report}
    atomic_write(out / "train_config.json", lambda p: p.write_text(json.dumps(run_config, indent=2)))
    base = cfg.pretrained_model_name_or_path
    info = {"base_model": str(Path(base).resolve()) if Path(base).exists() else base,    # a Hub id stays an id
            "clip_model": str(Path(clip_model).resolve()) if Path(clip_model).exists() else clip_model,
            "face_loss": face_report}

    def write_result(folder: Path, step: int) -> None:
        save_adapter(folder / CHECKPOINT_NAME, models, {**info, "step": step})
        write_result_info(folder, {"method": "photoverse", "base_model": info["base_model"], "adapter": CHECKPOINT_NAME,
                                   "face_loss": face_report, "step": step})

    def draw_batch(micro: int) -> dict:
        """B random faces (each row's draws from its own generator, as train.py) and the fusion draw."""
        gens = [row_generator(cfg, step, micro, 0, j) for j in range(cfg.train_batch_size)]
        rows = []
        for g in gens:
            i = int(torch.randint(len(faces), (1,), generator=g))
            rows.append(faces.load(i, cfg.resolution, cfg.random_flip and bool(torch.rand(1, generator=g) < 0.5)))
        return {"pixel_values": torch.stack([x for x, _ in rows]).to(device, frozen_dtype),
                "masks": torch.stack([m for _, m in rows]).to(device), "generators": gens,
                "fusion_generator": row_generator(cfg, step, micro, 2, 0)}

    # 4. the loop
    log_file = open(log_path, "a")
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="photoverse", unit="step")
    t0 = time.time()
    while step < cfg.max_train_steps:
        finite = True
        for micro in range(cfg.gradient_accumulation_steps):
            with autocast(device, half):
                loss, logs = photoverse_loss(draw_batch(micro), models, cfg)
            finite = finite and bool(torch.isfinite(loss.detach()))
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        stop_if_diverged(finite, grad_norm, scaler.is_enabled(), cfg, step + 1, logs, log_file)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        logs = {"step": step, "lr": lr_schedule.get_last_lr()[0], **logs, "grad_norm": grad_norm,
                "time": round(time.time() - t0, 3)}
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.1e}")
        write_log(log_file, logs)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict(),
                     "scaler": scaler.state_dict(), "config": settings_record(cfg)}
            saved = checkpoint.save_checkpoint(out, step, lambda f: write_result(f, step), state,
                                               cfg.checkpoints_total_limit)
            bar.write(f"step {step}: checkpoint {saved}")
        if cfg.validation_prompt and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps):
            models.unet.eval()                  # the first face of the folder, as a user would give one
            prompts = [cfg.validation_prompt] * cfg.num_validation_images
            with autocast(device, half):
                images = generate(models, load_image(faces.paths[0]), prompts, seed=cfg.seed, steps=cfg.sample_steps,
                                  height=cfg.resolution, width=cfg.resolution, progress=False)
            grid = out / "validation" / f"step-{step:06d}.png"
            save_png(make_grid(images), grid,
                     {"prompt": cfg.validation_prompt, "seed": cfg.seed, "step": step, "face": faces.paths[0].name})
            bar.write(f"step {step}: validation grid {grid}")
            models.unet.train()
    bar.close()
    log_file.close()

    # 5. the final output: the same files as a checkpoint, at the top of the output folder
    write_result(out, step)
    print(f"pretrained photoverse for {step} steps in {time.time() - t0:.0f}s; adapter in {out / CHECKPOINT_NAME}; "
          f"face loss: {face_report}")
    return models

