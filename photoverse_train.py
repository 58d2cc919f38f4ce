"""PhotoVerse pretraining: the objective, a folder of aligned faces, and the models, batches, validation images and
result files that `train.py --method photoverse` trains with (methods.py's table names them; the loop is train.py's).

Chen et al. 2023, "PhotoVerse: Tuning-Free Image Customization with Text-to-Image Diffusion Models",
arXiv 2309.05793; its equations are docs/methods.md section 4, whose [paper] / [ours]
marks the comments below repeat. The parts it trains (adapters, the image branch W_k^S, W_v^S, LoRA on the text
branch) and the random fusion are photoverse.py's; here they are trained once, over a face dataset, on

    L = L_ldm + 0.01 L_face + 0.01 mean|p_f| + 0.001 mean|V_S|,   L_face = 1 - cos(F(x_face), F(x_hat_face))

The loss has losses.py's one signature (`photoverse_loss(batch, models, cfg)`) but lives here, beside its data,
because its models are PhotoVerseModels; the loop is train.py's, on one process.

Shapes: b batch, m pseudo-words, d text width, R resolution; faces (b, 3, R, R) in [-1, 1], face masks
(b, 1, R, R) in [0, 1], pseudo-words (b, m, d), image tokens f (b, p, d_ctx).
"""
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError

from data import IMAGE_SUFFIXES, list_images, load_image, prepare
from face_encoder import IResNet
from hub import ModelLoadError, component_dir, looks_like_path, read_json
from image_encoders import CLIPConfig, CLIPModel, ViTModel
from losses import draw_noise, draw_timesteps, latents_of, row_generator
from photoverse import (CHECKPOINT_NAME, IdentityEncoder, PhotoVerseConfig, PhotoVerseModels, attach, check_base,
                        check_layers, check_prompts, draw_fusion, dual_layers, encode_with_words, generate,
                        image_states, load_trained_parts, read_adapter_meta, reference_faces, save_adapter,
                        set_image_condition, trainable_parameters)
from pipeline import load_models, write_result_info

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
    adapters, face encoder), built here and trained by train.py's loop.

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


def check_options(cfg) -> None:
    """PhotoVerse's own mistakes, visible before a model loads, one line each (train.py check_config calls this
    after the checks every method shares)."""
    for flag in ("with_prior_preservation", "train_text_encoder", "cache_latents", "snr_gamma"):
        if getattr(cfg, flag):
            raise ValueError(f"--{flag} does not apply to --method photoverse (see docs/methods.md section 4)")
    if cfg.export != "none":
        raise ValueError("--export does not apply to --method photoverse: its output is photoverse.safetensors, which "
                         "sample.py --method photoverse reads")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--method photoverse pretrains on one process: run it without torchrun")
    photoverse_config(cfg)
    if cfg.validation_prompt:
        check_prompts([cfg.validation_prompt])
    if cfg.face_encoder and not Path(cfg.face_encoder).expanduser().is_file():
        raise ModelLoadError(f"--face_encoder '{cfg.face_encoder}' does not exist: pass an arcface_torch IResNet "
                             f"checkpoint, or leave it out for the DINO fallback")
    for flag, name in (("clip_model", cfg.clip_model or CLIP_MODEL), ("dino_model", cfg.dino_model)):
        if looks_like_path(name) and not Path(name).expanduser().exists():
            raise ModelLoadError(f"--{flag} '{name}' does not exist")


def read_faces(cfg) -> FaceFolder:
    """The run's data: the face folder, every file checked; and the CLIP layers against the image tower's config."""
    if not cfg.instance_data_dir:
        raise ValueError("--instance_data_dir is required: a folder of aligned face images (FFHQ, CelebA-HQ, ...)")
    faces = FaceFolder(cfg.instance_data_dir)
    clip = CLIPConfig.from_json(read_json(component_dir(cfg.clip_model or CLIP_MODEL, None, ["config.json"])
                                          / "config.json"))
    check_layers(photoverse_config(cfg).vision_layers, clip.vision.num_hidden_layers)  # only the config is read
    return faces


def load_identity(face_encoder: str | None, dino_model: str, device) -> IdentityEncoder:
    """F for L_face [ours]: the user's ArcFace IResNet checkpoint, else DINO ViT-S/16 (the fallback every
    report names)."""
    if face_encoder:
        model = IResNet.from_file(face_encoder, device=device)
        return IdentityEncoder(model, model.preprocess.tensor, f"ArcFace IResNet ({face_encoder})")
    model = ViTModel.from_pretrained(dino_model, device=device)
    return IdentityEncoder(model, model.preprocess.tensor, f"DINO fallback ({dino_model}; no --face_encoder given)")


def load_parts(cfg, device, frozen_dtype) -> tuple[PhotoVerseModels, str]:
    """The models: the frozen parts (SD, the CLIP image tower, the face encoder) in `frozen_dtype`, then the trained
    parts attached float32 (adapters, W^S, LoRA on the text branch). Returns (models, the face loss's name).
    Defaults: lr 1e-4 and CLIP ViT-L/14 [paper]; the paper's batch 64 and 60k steps are flags (--train_batch_size,
    --max_train_steps)."""
    sd = load_models(cfg.pretrained_model_name_or_path, device=device, revision=cfg.revision, variant=cfg.variant)
    vision = CLIPModel.from_pretrained(cfg.clip_model or CLIP_MODEL, device=device)
    identity = load_identity(cfg.face_encoder, cfg.dino_model, device) if cfg.face_loss_weight > 0 else None
    for m in (sd.unet, sd.vae, sd.text_encoder, vision) + ((identity.model,) if identity else ()):
        m.to(frozen_dtype)
    models = attach(sd, vision, photoverse_config(cfg), identity, cfg.lora_init)
    models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    models.vae.gradient_checkpointing = cfg.gradient_checkpointing   # L_face decodes x_hat with gradients
    return models, identity.name if identity else "off (--face_loss_weight 0)"


def draw_faces(faces: FaceFolder, cfg, step: int, micro: int, device, dtype) -> dict:
    """B random faces (each row's draws from its own generator, as every method's rows) and the fusion draw."""
    gens = [row_generator(cfg, step, micro, 0, j) for j in range(cfg.train_batch_size)]
    rows = []
    for g in gens:
        i = int(torch.randint(len(faces), (1,), generator=g))
        rows.append(faces.load(i, cfg.resolution, cfg.random_flip and bool(torch.rand(1, generator=g) < 0.5)))
    return {"pixel_values": torch.stack([x for x, _ in rows]).to(device, dtype),
            "masks": torch.stack([m for _, m in rows]).to(device), "generators": gens,
            "fusion_generator": row_generator(cfg, step, micro, 2, 0)}


def validation_images(models: PhotoVerseModels, faces: FaceFolder, cfg) -> tuple[list, dict]:
    """--validation_prompt's images of the folder's first face, as a user would give one; their PNG text."""
    prompts = [cfg.validation_prompt] * cfg.num_validation_images
    images = generate(models, load_image(faces.paths[0]), prompts, seed=cfg.seed, steps=cfg.sample_steps,
                      height=cfg.resolution, width=cfg.resolution, progress=False)
    return images, {"face": faces.paths[0].name}


def write_adapter(folder: Path, run, cfg, step: int) -> None:
    """The result of a run (methods.Run), the same for checkpoints and the final folder: the trained parts and
    nanobooth.json."""
    base, clip_model, face_report = cfg.pretrained_model_name_or_path, cfg.clip_model or CLIP_MODEL, run.info["face_loss"]
    info = {"base_model": str(Path(base).resolve()) if Path(base).exists() else base,    # a Hub id stays an id
            "clip_model": str(Path(clip_model).resolve()) if Path(clip_model).exists() else clip_model,
            "face_loss": face_report}
    save_adapter(folder / CHECKPOINT_NAME, run.models, {**info, "step": step})
    write_result_info(folder, {"method": "photoverse", "base_model": info["base_model"], "adapter": CHECKPOINT_NAME,
                               "face_loss": face_report, "step": step})


def read_adapter(folder: Path, run, cfg) -> None:
    """A checkpoint's trained parts back into the run's models, for --resume_from_checkpoint."""
    check_base(read_adapter_meta(folder), run.models, run.models.vision, folder)
    load_trained_parts(run.models, folder)
