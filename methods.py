"""What each method needs before the loop: its inputs (scenes, masks, objects), its prior images, its frozen
encoders, the object-driven stage 1.

train.py's loop is the same for every method; what differs is read here (check_config -> `read_inputs` ->
Inputs), the trainable set (train.py `setup_trainable`) and the loss (losses.py). Two methods need more than a
folder of photos and a prompt:

    ComFusion (arXiv 2402.11849; docs/methods.md section 2): scene phrases, one folder of class-scene prior images per
        scene, frozen DINO and CLIP encoders, and fusion-stream rows in each batch.
    Object-driven one-shot (arXiv 2401.15708; docs/methods.md section 3): one image, a binary mask, a class noun and a
        new token per object, one folder of class images per class, and stage 1 (the prototypical embedding)
        before the loop.

The others need little: DreamBooth its class images (`prior_sets`), Textual Inversion its new token and prompt
templates (`TEMPLATES`).

`cfg` is train.py's TrainConfig (not imported here, so that train.py can import this file). Comments mark what
is the paper's ([paper]) and what is our reading ([ours]), as the README's method table does.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import list_images, load_image
from hub import ModelLoadError, looks_like_path
from image_encoders import CLIPModel, ViTModel
from losses import clip_text_features, cosine_distance, prototypical_target
from pipeline import SDModels

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


def check_method_options(cfg) -> None:
    """ComFusion's and the object-driven method's own mistakes, seen before any model loads (train.py check_config
    calls this after its general checks)."""
    if cfg.method in ("comfusion", "objectdriven"):
        if cfg.train_text_encoder:
            raise ValueError(f"--method {cfg.method} does not train the text encoder (docs/methods.md): "
                             f"drop --train_text_encoder")
        if not cfg.class_data_dir:
            raise ValueError(f"--method {cfg.method} needs --class_data_dir (its prior images are generated there once)")
        for flag in ("clip_model", "dino_model") if cfg.method == "comfusion" else ("clip_model",):
            name = getattr(cfg, flag)
            if name and looks_like_path(name) and not Path(name).expanduser().exists():
                raise ModelLoadError(f"--{flag} '{name}' does not exist")
    if cfg.method == "comfusion":
        if not cfg.class_prompt:
            raise ValueError("--method comfusion needs --class_prompt (e.g. 'a photo of dog'; each scene is appended)")
        if not 0 <= cfg.tau_min <= cfg.tau_max:
            raise ValueError(f"--tau_min and --tau_max must satisfy 0 <= tau_min <= tau_max, "
                             f"got {cfg.tau_min}, {cfg.tau_max}")
    if cfg.method == "objectdriven" and cfg.class_prompt:
        raise ValueError("--method objectdriven writes its class prompts itself ('a photo of {class}' per object): drop "
                         "--class_prompt and set the class with --initializer_token or in --objects")


def read_inputs(cfg) -> Inputs:
    """The method's data, each image opened (so a corrupt file fails now, not at step 300): the instance rows,
    the prior image sets, the new tokens, ComFusion's scenes, the object-driven objects."""
    if cfg.method == "objectdriven":
        objects = read_objects(cfg)
        return Inputs(object_rows(objects), prior_sets(cfg, [], objects), {o.token: o.cls for o in objects},
                      objects=objects)
    if not cfg.instance_data_dir:
        raise ValueError("--instance_data_dir is required (a folder with 3-5 photos of the subject)")
    paths = list_images(cfg.instance_data_dir, "instance")
    for path in paths:
        load_image(path)
    scenes = read_scenes(cfg) if cfg.method == "comfusion" else []
    tokens = {cfg.placeholder_token: cfg.initializer_token} if cfg.method == "textual_inversion" else {}
    return Inputs([(p, cfg.instance_prompt, ()) for p in paths], prior_sets(cfg, scenes, []), tokens, scenes)


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
    if cfg.method == "comfusion":       # the class-scene prior [paper]: one folder per scene
        return [(f"{cfg.class_prompt} {s}", Path(cfg.class_data_dir) / slug(s), cfg.num_scene_images) for s in scenes]
    if cfg.method == "objectdriven":    # the class-characterizing prior [paper]: one folder per class
        classes = dict.fromkeys(o.cls for o in objects)
        return [(f"a photo of {c}", Path(cfg.class_data_dir) / slug(c), cfg.num_class_images) for c in classes]
    if cfg.with_prior_preservation:     # DreamBooth's class images
        return [(cfg.class_prompt, Path(cfg.class_data_dir), cfg.num_class_images)]
    return []


def check_against_model(models: SDModels, cfg, inputs: Inputs) -> None:
    """The checks that need the loaded model, made before any image is generated."""
    if models.text_encoder_2 is not None and cfg.method not in ("dreambooth", "dreambooth_lora", "textual_inversion"):
        raise ValueError(f"--method {cfg.method} is not implemented for SDXL models (two text encoders): use "
                         f"dreambooth, dreambooth_lora or textual_inversion, or an SD 1.x/2.x model")
    for token in inputs.tokens:
        if len(models.tokenizer.encode(token)[1:-1]) == 1:
            raise ValueError(f"token '{token}' is already in the vocabulary: choose a new word, such as '<{token}>'")
    if cfg.method == "comfusion" and cfg.tau_max >= models.schedule.num_train_timesteps:
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
    encoders = {}
    if cfg.method == "comfusion":
        encoders["dino"] = ViTModel.from_pretrained(cfg.dino_model, device=device)
    if cfg.method == "comfusion" or (cfg.method == "objectdriven" and fresh):
        encoders["clip"] = CLIPModel.from_pretrained(cfg.clip_model or DEFAULT_CLIP[cfg.method], device=device)
    if cfg.method == "objectdriven" and fresh:
        width, sd_width = encoders["clip"].config.text.hidden_size, models.text_encoder.config.hidden_size
        if width != sd_width:
            raise ValueError(f"--clip_model '{cfg.clip_model or DEFAULT_CLIP[cfg.method]}' has a {width}-wide text tower "
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
