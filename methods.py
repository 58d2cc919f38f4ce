"""What differs between the methods, in one table (`METHOD_TABLE`, one `Method` record each), and what the SD
fine-tunes need before the loop: their inputs (scenes, masks, objects), their prior images, their frozen encoders,
the object-driven stage 1, what trains, and the result files.

train.py's loop is the same for every method; it reads the record: what trains ("unet", "lora", "tokens",
"adapters"), the loss (losses.py; PhotoVerse's in photoverse_train.py), the default learning rate and the method's
own flags, its priors and frozen encoders, its checks, its inputs, its setup (a `Run`: models, optimizer groups,
batches, validation), and its result writer and reader. Two methods need more than a folder of photos and a prompt:

    ComFusion (arXiv 2402.11849; docs/methods.md section 2): scene phrases, one folder of class-scene prior images per
        scene, frozen DINO and CLIP encoders, and fusion-stream rows in each batch.
    Object-driven one-shot (arXiv 2401.15708; docs/methods.md section 3): one image, a binary mask, a class noun and a
        new token per object, one folder of class images per class, and stage 1 (the prototypical embedding)
        before the loop.

The others need little: DreamBooth its class images (`prior_sets`), Textual Inversion its new token and prompt
templates (`TEMPLATES`). PhotoVerse (photoverse_train.py) pretrains adapters over a face folder.

`cfg` is train.py's TrainConfig (not imported here: train.py is the entry point that imports this file). Comments
mark what is the paper's ([paper]) and what is our reading ([ours]), as the README's method table does.
"""
import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import cli
import photoverse_train
from data import list_images, load_image, png_text
from hub import ModelLoadError, atomic_write, looks_like_path, read_safetensors
from image_encoders import CLIPModel, ViTModel
from lora import (UNET_TARGETS, TEXT_TARGETS, inject_lora, load_lora, mark_only_lora_trainable, save_lora,
                  save_lora_kohya)
from losses import (clip_text_features, comfusion_loss, cosine_distance, dreambooth_loss, objectdriven_loss,
                    prototypical_target)
from pipeline import SDXL_EMBEDDINGS, SDModels, add_token, save_models, save_single_file, write_result_info

# The CLIP a method's loss uses unless --clip_model says otherwise. ComFusion [ours]: the CLIP-T/CLIP-I scorer's
# default in eval.py, so it is trained against the family that scores it. Object-driven: T must be SD1's own text
# encoder plus a CLIP text projection, so the CLIP whose text tower SD1 uses (docs/methods.md section 3).
DEFAULT_CLIP = {"comfusion": "openai/clip-vit-base-patch32", "objectdriven": "openai/clip-vit-large-patch14"}
# ComFusion's scenes when no --scenes file is given [ours]: generic places that do not overlap the DreamBench
# evaluation prompts (docs/methods.md section 2)
DEFAULT_SCENES = ("in a garden", "on a kitchen table", "in a library", "on a wooden dock by a lake", "in the desert",
                  "in a living room", "at night under street lights", "on a balcony", "in a field of lavender",
                  "on a stone bridge")

# Textual Inversion's prompt templates (Gal et al. 2022): diffusers' examples/textual_inversion/textual_inversion.py
# `imagenet_templates_small` (27, for --learnable_property object) and `imagenet_style_templates_small` (19, two of
# them twice, as there, for style), in their order
TI_TEMPLATES = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
                "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
                "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
                "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
                "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}",
                "a photo of the weird {}", "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}"]
TI_STYLE_TEMPLATES = ["a painting in the style of {}", "a rendering in the style of {}",
                      "a cropped painting in the style of {}", "the painting in the style of {}",
                      "a clean painting in the style of {}", "a dirty painting in the style of {}",
                      "a dark painting in the style of {}", "a picture in the style of {}",
                      "a cool painting in the style of {}", "a close-up painting in the style of {}",
                      "a bright painting in the style of {}", "a cropped painting in the style of {}",
                      "a good painting in the style of {}", "a close-up painting in the style of {}",
                      "a rendition in the style of {}", "a nice painting in the style of {}",
                      "a small painting in the style of {}", "a weird painting in the style of {}",
                      "a large painting in the style of {}"]
TEMPLATES = {"object": TI_TEMPLATES, "style": TI_STYLE_TEMPLATES}      # by --learnable_property


# ----------------------------------------------------------------------------- checks and inputs

@dataclass(frozen=True)
class ObjectSpec:
    """One object of the object-driven method: its image, its binary mask, its class noun, its new token."""
    image: Path
    mask: Path
    cls: str
    token: str


@dataclass
class Inputs:
    """The run's data as check_config read it, the same shape for every method."""
    instance: list[tuple[Path, str, tuple[Path, ...]]]  # (image, prompt, the masks of its objects) rows
    priors: list[tuple[str, Path, int]] = field(default_factory=list)  # (prompt, folder, count) of frozen-model images
    tokens: dict[str, str] = field(default_factory=dict)   # new token -> the words whose rows initialise it
    scenes: list[str] = field(default_factory=list)        # ComFusion
    objects: list[ObjectSpec] = field(default_factory=list)  # object-driven


def check_loss_encoders(cfg) -> None:
    """ComFusion's and the object-driven method's shared mistakes: they train no text encoder, their prior images
    need a folder, their loss encoders must exist."""
    method = METHOD_TABLE[cfg.method]
    if cfg.train_text_encoder:
        raise ValueError(f"--method {cfg.method} does not train the text encoder (docs/methods.md): "
                         f"drop --train_text_encoder")
    if not cfg.class_data_dir:
        raise ValueError(f"--method {cfg.method} needs --class_data_dir (its prior images are generated there once)")
    for flag in [f"{name}_model" for name in method.encoders]:
        name = getattr(cfg, flag)
        if name and looks_like_path(name) and not Path(name).expanduser().exists():
            raise ModelLoadError(f"--{flag} '{name}' does not exist")


def check_comfusion(cfg) -> None:
    """ComFusion's own mistakes, seen before any model loads (train.py check_config calls this after its general
    checks)."""
    check_loss_encoders(cfg)
    if not cfg.class_prompt:
        raise ValueError("--method comfusion needs --class_prompt (e.g. 'a photo of dog'; each scene is appended)")
    if not 0 <= cfg.tau_min <= cfg.tau_max:
        raise ValueError(f"--tau_min and --tau_max must satisfy 0 <= tau_min <= tau_max, "
                         f"got {cfg.tau_min}, {cfg.tau_max}")


def check_objectdriven(cfg) -> None:
    """The object-driven method's own mistakes, seen before any model loads."""
    check_loss_encoders(cfg)
    if cfg.class_prompt:
        raise ValueError("--method objectdriven writes its class prompts itself ('a photo of {class}' per object): drop "
                         "--class_prompt and set the class with --initializer_token or in --objects")


def read_inputs(cfg) -> Inputs:
    """The method's data, each image opened (so a corrupt file fails now, not at step 300): the instance rows,
    the prior image sets (their folders checked), the new tokens, ComFusion's scenes."""
    if not cfg.instance_data_dir:
        raise ValueError("--instance_data_dir is required (a folder with 3-5 photos of the subject)")
    paths = list_images(cfg.instance_data_dir, "instance")
    for path in paths:
        load_image(path)
    scenes = read_scenes(cfg) if METHOD_TABLE[cfg.method].priors == "scene" else []
    tokens = {cfg.placeholder_token: cfg.initializer_token} if METHOD_TABLE[cfg.method].trains == ("tokens",) else {}
    return checked_priors(Inputs([(p, cfg.instance_prompt, ()) for p in paths], prior_sets(cfg, scenes, []), tokens,
                                 scenes))


def read_object_inputs(cfg) -> Inputs:
    """The object-driven method's data: its objects (every image and mask opened), their rows, tokens and priors."""
    objects = read_objects(cfg)
    return checked_priors(Inputs(object_rows(objects), prior_sets(cfg, [], objects), {o.token: o.cls for o in objects},
                                 objects=objects))


def checked_priors(inputs: Inputs) -> Inputs:
    """Prior images: the right prompt in each folder, and a folder to write to where images are missing."""
    for prompt, folder, count in inputs.priors:
        if len(check_class_images(folder, prompt)) < count:
            cli.check_out_dir("--class_data_dir", folder)
    return inputs


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


def slug(text: str) -> str:
    """A folder name for a prompt part: 'on a wooden dock' -> 'on-a-wooden-dock'."""
    return re.sub(r"\W+", "-", text.lower()).strip("-")


def read_scenes(cfg) -> list[str]:
    """ComFusion's scene phrases: --scenes FILE (one per line, blank lines skipped), or DEFAULT_SCENES."""
    if cfg.scenes is None:
        return list(DEFAULT_SCENES)
    path = Path(cfg.scenes)
    if not path.is_file():
        raise ValueError(f"--scenes file '{path}' does not exist")
    scenes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not scenes:
        raise ValueError(f"--scenes file '{path}' has no scenes: write one phrase per line, such as 'in a garden'")
    folders = [slug(s) for s in scenes]
    clash = next((s for s, f in zip(scenes, folders) if not f or folders.count(f) > 1), None)
    if clash is not None:
        raise ValueError(f"--scenes file '{path}': scene '{clash}' is empty or repeats another as a folder name "
                         f"('{slug(clash)}'): give distinct phrases with letters")
    return scenes


def read_mask(path) -> Image.Image:
    """A binary object mask as PIL 'L', 255 = object: a pixel is the object when its grey value is >= 128 [ours]."""
    if not Path(path).is_file():
        raise ValueError(f"mask '{path}' does not exist")
    return load_image(path).convert("L").point(lambda v: 255 if v >= 128 else 0)


def read_objects(cfg) -> list[ObjectSpec]:
    """The object-driven method's objects: the entries of --objects FILE, or the one image of --instance_data_dir
    with --instance_mask, --initializer_token (the class) and --placeholder_token. Every image and mask is opened
    and checked here."""
    if cfg.objects:
        if cfg.instance_data_dir or cfg.instance_mask:
            raise ValueError("give --objects FILE, or --instance_data_dir with --instance_mask, not both")
        path = Path(cfg.objects)
        if not path.is_file():
            raise ValueError(f"--objects file '{path}' does not exist")
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--objects file '{path}' is not JSON: {e}") from None
        keys = {"image", "mask", "class", "token"}
        well_formed = [isinstance(o, dict) and set(o) == keys and all(isinstance(v, str) for v in o.values())
                       for o in entries] if isinstance(entries, list) else []
        if not (well_formed and all(well_formed)):
            raise ValueError(f"--objects file '{path}' must be a non-empty JSON list of objects with exactly the "
                             f"string fields {sorted(keys)}")
        objects = [ObjectSpec((path.parent / o["image"]).resolve(), (path.parent / o["mask"]).resolve(), o["class"],
                              o["token"]) for o in entries]
    else:
        if not cfg.instance_data_dir or not cfg.instance_mask:
            raise ValueError("--method objectdriven needs --instance_data_dir (one image) with --instance_mask, "
                             "or --objects FILE")
        images = list_images(cfg.instance_data_dir, "instance")
        if len(images) != 1:
            raise ValueError(f"--method objectdriven learns from one image, but --instance_data_dir "
                             f"'{cfg.instance_data_dir}' has {len(images)}: keep one, or list objects in --objects FILE")
        objects = [ObjectSpec(images[0], Path(cfg.instance_mask), cfg.initializer_token, cfg.placeholder_token)]
    first_use = {}
    for i, o in enumerate(objects, start=1):
        if not o.cls.strip():
            raise ValueError(f"object {i} has an empty class: give its class noun, such as 'dog'")
        if not o.token or o.token != o.token.strip() or len(o.token.split()) != 1:
            raise ValueError(f"object {i} has token '{o.token}': a token is one new word, such as '<o{i}>'")
        if o.token in first_use:
            raise ValueError(f"objects {first_use[o.token]} and {i} both use the token '{o.token}': give each object "
                             f"its own token")
        first_use[o.token] = i
    for o in objects:
        image, mask = load_image(o.image), read_mask(o.mask)
        if mask.size != image.size:
            raise ValueError(f"mask '{o.mask}' is {mask.width}x{mask.height} but its image '{o.image}' is "
                             f"{image.width}x{image.height}: the mask must have the image's size")
        if mask.getbbox() is None:
            raise ValueError(f"mask '{o.mask}' is empty (no pixel >= 128): white marks the object")
    return objects


def object_rows(objects: list[ObjectSpec]) -> list[tuple[Path, str, tuple[Path, ...]]]:
    """One training row per distinct image, prompted "a photo of <o1> {class1} and <o2> {class2}" over the objects
    in it [ours], with their masks (L_os uses their union) [paper: one mask per object; ours: the union]."""
    by_image = {}
    for o in objects:
        by_image.setdefault(o.image, []).append(o)
    return [(image, "a photo of " + " and ".join(f"{o.token} {o.cls}" for o in objs), tuple(o.mask for o in objs))
            for image, objs in by_image.items()]


def union_mask(paths) -> Image.Image:
    """The union of an image's object masks, as an RGB image so `prepare` crops and flips it like the image."""
    masks = [np.asarray(read_mask(p)) for p in paths]
    return Image.fromarray(np.maximum.reduce(masks)).convert("RGB")


def prior_sets(cfg, scenes: list[str], objects: list[ObjectSpec]) -> list[tuple[str, Path, int]]:
    """(prompt, folder, count) of each set of frozen-model prior images the method trains on."""
    priors = METHOD_TABLE[cfg.method].priors
    if priors == "scene":               # ComFusion's class-scene prior [paper]: one folder per scene
        return [(f"{cfg.class_prompt} {s}", Path(cfg.class_data_dir) / slug(s), cfg.num_scene_images) for s in scenes]
    if priors == "object class":        # the class-characterizing prior [paper]: one folder per class
        classes = dict.fromkeys(o.cls for o in objects)
        return [(f"a photo of {c}", Path(cfg.class_data_dir) / slug(c), cfg.num_class_images) for c in classes]
    if priors == "class" and cfg.with_prior_preservation:     # DreamBooth's class images
        return [(cfg.class_prompt, Path(cfg.class_data_dir), cfg.num_class_images)]
    return []


def check_against_model(models: SDModels, cfg, inputs: Inputs) -> None:
    """The checks that need the loaded model, made before any image is generated."""
    if models.text_encoder_2 is not None and not METHOD_TABLE[cfg.method].sdxl:
        sdxl = ", ".join(n for n, m in METHOD_TABLE.items() if m.sdxl)
        raise ValueError(f"--method {cfg.method} is not implemented for SDXL models (two text encoders): use "
                         f"{sdxl}, or an SD 1.x/2.x model")
    for token in inputs.tokens:
        if len(models.tokenizer.encode(token)[1:-1]) == 1:
            raise ValueError(f"token '{token}' is already in the vocabulary: choose a new word, such as '<{token}>'")
    if METHOD_TABLE[cfg.method].fusion and cfg.tau_max >= models.schedule.num_train_timesteps:
        raise ValueError(f"--tau_max must be below the schedule's {models.schedule.num_train_timesteps} timesteps, "
                         f"got {cfg.tau_max}")

# ----------------------------------------------------------------------------- frozen encoders and ComFusion's fusion stream

@dataclass
class TrainModels(SDModels):
    """SDModels plus the frozen encoders a loss reads (ComFusion: {"dino": ViTModel, "clip": CLIPModel})."""
    encoders: dict = field(default_factory=dict)


def load_encoders(cfg, models: SDModels, device, fresh: bool) -> dict:
    """The frozen image/text encoders of a method, loaded before any image is generated so a bad name fails early:
    ComFusion's DINO and CLIP (inside its loss), the object-driven CLIP (stage 1 only, so none when resuming)."""
    method, encoders = METHOD_TABLE[cfg.method], {}
    if "dino" in method.encoders:
        encoders["dino"] = ViTModel.from_pretrained(cfg.dino_model, device=device)
    if "clip" in method.encoders and (fresh or not method.prototypical):
        encoders["clip"] = CLIPModel.from_pretrained(cfg.clip_model or method.clip, device=device)
    if method.prototypical and fresh:
        width, sd_width = encoders["clip"].config.text.hidden_size, models.text_encoder.config.hidden_size
        if width != sd_width:
            raise ValueError(f"--clip_model '{cfg.clip_model or method.clip}' has a {width}-wide text tower "
                             f"but the SD text encoder is {sd_width}-wide: T projects SD's own text features, so give "
                             f"the CLIP whose text tower SD uses (openai/clip-vit-large-patch14 for SD 1.x)")
    for m in encoders.values():
        m.requires_grad_(False)                                        # frozen: only the UNet learns from them
    return encoders


def comfusion_targets(models: SDModels, encoders: dict, inputs: Inputs, cfg) -> dict:
    """ComFusion's fixed fusion-stream data: the instance-scene prompts "a photo of {token} {class} {scene}", the
    normalised DINO embedding of each instance image (L_v's target) and the normalised CLIP text embedding of each
    "a photo of {class} {scene}" (L_t's target), computed once."""
    dino, clip = encoders["dino"], encoders["clip"]
    images = [load_image(p) for p, _, _ in inputs.instance]
    tokenizer = clip.tokenizer()                                        # OpenAI CLIP's vocabulary, as eval.py
    with torch.no_grad():
        image = dino.features(dino.preprocess(images).to(models.device))
        ids = tokenizer([f"{cfg.class_prompt} {s}" for s in inputs.scenes]).to(models.device)
        text = clip.get_text_features(ids)
    return {"prompts": [f"{cfg.instance_prompt} {s}" for s in inputs.scenes],
            "image": torch.nn.functional.normalize(image, dim=-1), "text": torch.nn.functional.normalize(text, dim=-1)}


def draw_fusion_rows(cfg, fusion: dict, cached_text: dict, generators: list, tau_generator) -> dict:
    """This rank's fusion-stream rows: each a random scene and instance image, from its own generator (train.py's
    row_generator, kind 2, so its z_T in losses.py is drawn from it too). tau is one per step for all rows (kind 3,
    row 0), so every rank runs the same DDIM timesteps."""
    scenes = [int(torch.randint(len(fusion["prompts"]), (1,), generator=g)) for g in generators]
    images = [int(torch.randint(len(fusion["image"]), (1,), generator=g)) for g in generators]
    tau = int(torch.randint(cfg.tau_min, cfg.tau_max + 1, (1,), generator=tau_generator))
    text = lambda prompt: cached_text[prompt]["encoder_hidden_states"]    # train.py's cache: text_conditioning
    return {"generators": generators, "tau": tau, "uncond": torch.cat([text("")] * len(generators)),
            "encoder_hidden_states": torch.cat([text(fusion["prompts"][k]) for k in scenes]),
            "image_target": fusion["image"][images], "text_target": fusion["text"][scenes]}


# ----------------------------------------------------------------------------- object-driven stage 1

def prototypical_stage(models: SDModels, clip: CLIPModel, objects: list[ObjectSpec], cfg) -> list[dict]:
    """Object-driven stage 1, the prototypical embedding [paper, via a review]: for each object separately, only its
    token's row moves, by Adam on L_pe = 1 - cos(T("a photo of <o>"), g) with
    g = mean(n(I(x)), n(I(x * m)), n(T("a photo of {class}"))): I the CLIP image tower, T SD's text encoder with the
    CLIP text projection, x * m the object on a mid-grey background [ours]. Adam, --pe_lr, --pe_steps [ours].
    Returns the log lines (step 0, one per Adam step)."""
    device, logs = models.device, []
    table = models.text_encoder.text_model.embeddings.token_embedding.weight
    for obj in objects:
        image = load_image(obj.image)
        masked = Image.composite(image, Image.new("RGB", image.size, (128, 128, 128)), read_mask(obj.mask))
        with torch.no_grad():
            image_features = clip.get_image_features(clip.preprocess([image, masked]).to(device))
            class_text = clip_text_features(models, clip, models.tokenizer([f"a photo of {obj.cls}"]).to(device))
        target = prototypical_target(image_features[0], image_features[1], class_text[0])
        token = models.tokenizer.encode(obj.token)[1]                # [bos, token, eos]
        ids = models.tokenizer([f"a photo of {obj.token}"]).to(device)
        row = torch.nn.Parameter(table[token].detach().clone())
        optimizer = torch.optim.Adam([row], lr=cfg.pe_lr)
        for i in range(cfg.pe_steps):
            loss = cosine_distance(clip_text_features(models, clip, ids, {token: row}), target[None])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logs.append({"step": 0, "pe_step": i + 1, "token": obj.token, "loss_pe": loss.item()})
        with torch.no_grad():
            table[token] = row
    return logs

# ----------------------------------------------------------------------------- what trains, and the result files

def setup_trainable(models: SDModels, cfg, tokens: dict[str, str] | None = None, frozen_dtype=torch.float32,
                    full_copies: dict | None = None) -> list[dict]:
    """Freeze everything and add the new `tokens` (token -> words) to the vocabulary; cast the frozen parts to
    `frozen_dtype` first (into `full_copies`, float32 CPU copies of them, when given); then make trainable what the
    method trains (LoRA is injected after the cast, so its weights are created float32 on a half base). Trainable
    weights stay float32. Returns optimizer parameter groups."""
    method = METHOD_TABLE[cfg.method]
    for m in (models.unet, models.vae, *models.text_encoders.values()):
        m.requires_grad_(False)
    for token, words in (tokens or {}).items():                        # new rows of the embedding table
        init = models.tokenizer.encode(words)[1:-1]
        if "num_vectors" in method.options and len(init) != 1:
            raise ValueError(f"--initializer_token '{words}' must be a single CLIP token, it is {len(init)}")
        n = cfg.num_vectors if "num_vectors" in method.options else 1
        for name, encoder in models.text_encoders.items():             # SDXL: a row in each encoder
            table = encoder.text_model.embeddings.token_embedding.weight
            vector = table[init].mean(0).detach().clone()              # several words: their mean [ours]
            add_token(models, token, vector.expand(n, -1) if n > 1 else vector, name)  # n vectors: the same row
    full = {"unet"} if "unet" in method.trains else set()              # trained in full: kept float32
    if ("unet" in method.trains and cfg.train_text_encoder) or tokens:
        full |= set(models.text_encoders)                              # (new rows: the whole table stays float32)
    for name, m in {"unet": models.unet, "vae": models.vae, **models.text_encoders}.items():
        if name not in full:
            if full_copies is not None and "unet" in method.trains and frozen_dtype != torch.float32:
                full_copies[name] = copy.deepcopy(m).cpu()
            m.to(frozen_dtype)
    if models.vae.config.force_upcast:          # SDXL's VAE overflows in float16: float32, as diffusers' SDXL script
        models.vae.float()
    lr = method.lr if cfg.learning_rate is None else cfg.learning_rate
    text_lr = lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr
    text_encoders = models.text_encoders.values() if cfg.train_text_encoder else ()   # SDXL: both
    groups = []
    if "unet" in method.trains:                                        # the whole UNet [paper; ComFusion: ours]
        groups.append({"params": list(models.unet.requires_grad_(True).parameters()), "lr": lr})
        groups += [{"params": list(e.requires_grad_(True).parameters()), "lr": text_lr} for e in text_encoders]
    if "lora" in method.trains:                                        # LoRA on the attention projections
        alpha = cfg.rank if cfg.lora_alpha is None else cfg.lora_alpha
        for model, targets, group_lr in [(models.unet, UNET_TARGETS, lr),
                                         *[(e, TEXT_TARGETS, text_lr) for e in text_encoders]]:
            inject_lora(model, targets, rank=cfg.rank, alpha=alpha, init=cfg.lora_init)
            groups.append({"params": mark_only_lora_trainable(model), "lr": group_lr})
    if tokens:
        tables = [e.text_model.embeddings.token_embedding.weight for e in models.text_encoders.values()]
        for table in tables:
            table.requires_grad_(True)
        groups.append({"params": tables, "lr": cfg.token_lr if "token_lr" in method.options else lr})
    return groups


def token_ids(models: SDModels, tokens) -> list[int]:
    """The embedding rows of the new tokens (a multi-vector token has several)."""
    return [i for t in tokens for i in models.tokenizer.encode(t)[1:-1]]


@dataclass
class TokenRows:
    """The embedding tables (SDXL: two) that hold the new tokens: only the new rows may change. The loop drops the
    other rows' gradients before clipping, so the norm measures the trained rows alone, and puts the other rows
    back after each step (AdamW's weight decay would move them)."""
    tables: list[torch.nn.Parameter]
    keep: torch.Tensor                  # True for every row that is not a new token's
    original: list[torch.Tensor]

    @classmethod
    def of(cls, models: SDModels, tokens) -> "TokenRows":
        tables = [e.text_model.embeddings.token_embedding.weight for e in models.text_encoders.values()]
        new_rows = torch.tensor(token_ids(models, tokens), device=tables[0].device)
        keep = ~torch.isin(torch.arange(tables[0].shape[0], device=tables[0].device), new_rows)
        return cls(tables, keep, [table.detach().clone() for table in tables])

    def drop_frozen_grads(self) -> None:
        for table in self.tables:
            if table.grad is not None:
                table.grad[self.keep] = 0

    @torch.no_grad()
    def restore(self) -> None:
        for table, original in zip(self.tables, self.original):
            table[self.keep] = original[self.keep]


@dataclass
class Run:
    """A method set up for train.py's loop: what the loop reads, the same for every method."""
    models: SDModels            # the networks, as the result files are written from them (PhotoVerseModels)
    loss_models: SDModels       # what the loss reads: the same parts, the trained ones DDP-wrapped, the encoders
    groups: list[dict]          # optimizer parameter groups
    inputs: object              # the method's data (Inputs; PhotoVerse: photoverse_train.FaceFolder)
    batch: Callable             # batch(step, micro) -> the loss's batch: a plain function, its data bound (partial)
    validate: Callable          # validate() -> (--validation_prompt's images, their PNG text beyond prompt/seed/step)
    ddp: dict = field(default_factory=dict)      # the DDP-wrapped trained modules (no gradient sync mid-step)
    rows: TokenRows | None = None                # new token rows: only they train
    full_copies: dict = field(default_factory=dict)   # float32 CPU copies of half frozen parts, written instead
    info: dict = field(default_factory=dict)     # what train_config.json records beside the flags
    logs: list[dict] = field(default_factory=list)    # log lines before the loop (object-driven stage 1)


def embedding_files(tokens) -> dict[str, str]:
    """token -> the file its learned embedding is written to: learned_embeds.safetensors for one token, one file per
    token for several (diffusers' load_textual_inversion reads one token per file)."""
    tokens = list(tokens)
    if len(tokens) == 1:
        return {tokens[0]: "learned_embeds.safetensors"}
    return {t: f"learned_embeds-{i}.safetensors" for i, t in enumerate(tokens, start=1)}


def write_result(folder: Path, run: Run, cfg, step: int) -> None:
    """The method's output, the same for checkpoints and the final folder, so both can be sampled from.
    `run.full_copies`: float32 CPU copies of frozen parts the run holds in half precision, written in their place (a
    full model keeps its VAE and text encoder as loaded; diffusers' script re-reads them from the base model)."""
    method, models, inputs, files = METHOD_TABLE[cfg.method], run.models, run.inputs, {}
    if "unet" in method.trains:                                        # a complete diffusers model folder
        save_models(dataclasses.replace(models, **run.full_copies), folder)
    if "lora" in method.trains:
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
    if method.encoders:                                                # what the loss was trained against
        files["loss_encoders"] = {"clip": method.clip if cfg.clip_model is None else cfg.clip_model,
                                  **({"dino": cfg.dino_model} if "dino" in method.encoders else {})}
    base = cfg.pretrained_model_name_or_path
    base = str(Path(base).resolve()) if Path(base).exists() else base   # a folder or file; a Hub id stays an id
    write_result_info(folder, {"method": cfg.method, "base_model": base,
                               "instance_prompt": inputs.instance[0][1], "step": step, **files})


def export_result(folder: Path, run: Run, cfg) -> None:
    """--export, for the final output only: kohya writes the LoRA in the kohya / A1111 / ComfyUI layout
    beside the diffusers one; single_file writes the trained model, LoRA merged, as one original-layout file.
    Both fp16, export.py's default."""
    models = dataclasses.replace(run.models, **run.full_copies)
    if cfg.export == "kohya":
        parts = {"unet": models.unet, **(models.text_encoders if cfg.train_text_encoder else {})}
        save_lora_kohya(folder / "lora_kohya.safetensors", parts, dtype=torch.float16)
    if cfg.export == "single_file":
        save_single_file(models, folder / "model.safetensors", dtype=torch.float16)


def load_result(folder: Path, run: Run, cfg) -> None:
    """Put a checkpoint's trained weights back into the (already set up) models, for --resume_from_checkpoint."""
    method, models, inputs = METHOD_TABLE[cfg.method], run.models, run.inputs
    try:
        if "unet" in method.trains:
            models.unet.load_state_dict(read_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")[0])
            for name, encoder in models.text_encoders.items() if cfg.train_text_encoder else ():
                encoder.load_state_dict(read_safetensors(folder / name / "model.safetensors")[0])
        if "lora" in method.trains:
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

# ----------------------------------------------------------------------------- PhotoVerse (photoverse_train.py)


def setup_photoverse(cfg, faces, device, frozen_dtype, rank: int = 0, world: int = 1, fresh: bool = True) -> Run:
    """PhotoVerse's run: frozen SD, CLIP image tower and face encoder, the trained parts float32, batches of faces
    (one process: its check refuses torchrun)."""
    models, face_report = photoverse_train.load_parts(cfg, device, frozen_dtype)
    print(f"face loss: {face_report}")
    lr = METHOD_TABLE["photoverse"].lr if cfg.learning_rate is None else cfg.learning_rate
    return Run(models, models, [{"params": photoverse_train.trainable_parameters(models), "lr": lr}], faces,
               partial(photoverse_train.draw_faces, faces, cfg, device=device, dtype=frozen_dtype),
               partial(photoverse_train.validation_images, models, faces, cfg), info={"face_loss": face_report})


# ----------------------------------------------------------------------------- the method table


@dataclass(frozen=True)
class Method:
    """One method as train.py reads it: train.py's loop is the same for every method, and what differs is here
    (pretrain.py's `Stage` is the same idea for the toy model's stages)."""
    trains: tuple[str, ...]     # what the optimizer moves: "unet" (every UNet weight; with --train_text_encoder the
                                # text encoder's too), "lora" (LoRA on the attention projections), "tokens" (new rows
                                # of the embedding table), "adapters" (PhotoVerse's adapters, W^S and LoRA)
    loss: Callable              # loss(batch, models, cfg) -> (loss, {name: float}) (losses.py)
    lr: float                   # the default --learning_rate
    options: tuple[str, ...] = ()   # flags only this method reads (giving one to another method is an error)
    defaults: dict = field(default_factory=dict)   # other flags' defaults for this method (unless given)
    priors: str | None = None   # frozen-model prior images: "class" (with --with_prior_preservation), "scene" (one
                                # folder per scene), "object class" (one folder per object's class), or none
    encoders: tuple[str, ...] = ()   # frozen encoders the loss or the setup reads: "dino", "clip", "face"
    clip: str | None = None     # the CLIP those use unless --clip_model says otherwise
    sdxl: bool = False          # implemented for SDXL (two text encoders)
    fusion: bool = False        # ComFusion's fusion-stream rows in each batch
    prototypical: bool = False  # the object-driven stage 1 before the loop (its CLIP serves that alone)
    templates: bool = False     # each row's prompt is a random template of --learnable_property (TEMPLATES)
    check: Callable | None = None    # check(cfg): the method's own mistakes, before any model loads
    inputs: Callable = read_inputs   # inputs(cfg) -> the method's data, each file opened
    setup: Callable | None = None    # setup(cfg, inputs, device, frozen dtype, rank, world, fresh) -> Run (None: the
                                     # fine-tune of SD's parts every other method shares, train.py's setup_finetune)
    write: Callable = write_result   # write(folder, run, cfg, step): the result files (checkpoints and the final)
    read: Callable = load_result     # read(folder, run, cfg): a checkpoint's trained weights back, to resume

    @property
    def binds_identifier(self) -> bool:
        """The instance prompt binds the subject to --identifier (methods with new tokens name it with those)."""
        return not {"tokens", "adapters"} & set(self.trains)


# docs/methods.md's settings: learning rates of section 1 (DreamBooth, LoRA, Textual Inversion), 2 and 3. Textual
# Inversion's other defaults are diffusers' recipe (examples/textual_inversion: lr 5e-4 scaled by batch x accumulation
# x processes, so 2e-3 on one GPU, accumulation 4, 3000 steps, random flips, no gradient clipping).
METHOD_TABLE = {
    "dreambooth": Method(("unet",), dreambooth_loss, 5e-6, priors="class", sdxl=True),
    "dreambooth_lora": Method(("lora",), dreambooth_loss, 1e-4, priors="class", sdxl=True),
    "textual_inversion": Method(("tokens",), dreambooth_loss, 5e-4, ("num_vectors", "learnable_property"),
                                dict(scale_lr=True, gradient_accumulation_steps=4, max_train_steps=3000,
                                     random_flip=True, max_grad_norm=0.0), sdxl=True, templates=True),
    "comfusion": Method(("unet",), comfusion_loss, 5e-6,
                        ("scenes", "num_scene_images", "tau_min", "tau_max", "fusion_steps", "fusion_every",
                         "fusion_guidance", "instance_loss_weight", "visual_loss_weight", "textual_loss_weight",
                         "dino_model", "clip_model"),
                        priors="scene", encoders=("dino", "clip"), clip=DEFAULT_CLIP["comfusion"], fusion=True,
                        check=check_comfusion),
    "objectdriven": Method(("lora", "tokens"), objectdriven_loss, 1e-4,
                           ("instance_mask", "objects", "background_weight", "pe_steps", "pe_lr", "token_lr",
                            "clip_model"),
                           priors="object class", encoders=("clip",), clip=DEFAULT_CLIP["objectdriven"],
                           prototypical=True, check=check_objectdriven, inputs=read_object_inputs),
    "photoverse": Method(("adapters",), photoverse_train.photoverse_loss, photoverse_train.LEARNING_RATE,
                         ("vision_layers", "adapter_dim", "face_encoder", "face_loss_weight", "word_reg_weight",
                          "value_reg_weight", "face_loss_max_timestep", "dino_model", "clip_model"),
                         encoders=("clip", "face"), clip=photoverse_train.CLIP_MODEL,
                         check=photoverse_train.check_options, inputs=photoverse_train.read_faces,
                         setup=setup_photoverse, write=photoverse_train.write_adapter,
                         read=photoverse_train.read_adapter),
}
