"""Pretrain nanobooth's toy model on the procedural world (world.py), with nanobooth's own models and loop.

    python pretrain.py                       # all five stages -> assets/toy/ (the shipped checkpoint)
    python train.py --method pretrain_sd     # one stage, the same code (see train.py)

Stages, in order (each reads the ones before it):
1. `vae`: SD's autoencoder (vae.py, VAEConfig.toy: 64 px -> 4 x 16 x 16) with LDM's objective minus its
   perceptual and GAN terms: L1 reconstruction + 1e-6 KL (Rombach et al. 2022, the KL-f8 weight), on random
   32 px crops (the autoencoder is convolutional; a quarter of the pixels per sample). 30% of each batch are
   world.pattern_sample images (two-colour checkered and target patterns in random colours), so the codec keeps
   detail the world's captions never mention, such as the demo subjects'. Afterwards the latent scaling factor
   is measured as 1 / std of the latents, as LDM chose 0.18215. `--faces` (vae and sd stages) mixes in world.face
   images captioned "a photo of a face": how assets/toy/face_model was made (Makefile `toy-faces`).
2. `clip`: a CLIP (image_encoders.CLIPConfig.toy) trained contrastively (Radford et al. 2021), the symmetric
   InfoNCE loss with a learned temperature; pairs with the same caption count as matches. It is the toy runs'
   CLIP: CLIP-T in eval.py and the CLIP in ComFusion's and the object-driven method's losses, and its text
   tower is SD's text encoder.
3. `sd`: the UNet (UNetConfig.toy) on the CLIP stage's frozen text tower (as SD 1.x conditions on OpenAI CLIP's
   text tower), the real tokenizer and vocabulary, 32 positions: epsilon prediction on SD's noise schedule,
   min-SNR-5 weights (Hang et al. 2023) to converge faster, 10% empty captions so classifier-free guidance works
   (Ho & Salimans 2022), 20% of captions without their colour words (so "a star", DreamBooth's class prompt,
   means a star of any colour), and an EMA of the weights (decay 0.999) that is what we ship. Every
   --check_steps steps it draws 64 prompts "a {colour} {shape} {scene}" and prints the share whose shape the
   render-and-compare detector (detector.py) finds: the curve to watch.
4. `dino`: a ViT in DINO's layout (image_encoders.ViTModel, ViTConfig.toy) supervised on the shape, colour and
   scene of one-object images through linear heads on its CLS token (the heads are not kept): the toy runs'
   stand-in for DINO (eval.py's DINO score, ComFusion's L_v). Not DINO's self-distillation: our choice.
5. `classifier`: image_encoders.FactorClassifier (a small CNN + three heads), cross-entropy on the same labels:
   the factor-accuracy metric of eval.py (--classifier).

All stages share one loop (`run_stage`): AdamW, linear warmup then cosine decay, gradient clipping at 1,
an optional EMA, atomic checkpoints in the work folder and resume from the newest one, logs.jsonl and a
progress bar. Data is a pool of world images drawn once from the seed (cached in the work folder); each
step's batch is drawn from a generator seeded by (seed, stage, step), so a resumed run is the same run.
"""
import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoint
import detector
import world
from hub import atomic_write
from image_encoders import CLIPConfig, CLIPModel, FactorClassifier, FactorClassifierConfig, ViTConfig, ViTModel
from losses import min_snr_weights, weighted_mse
from data import make_grid
from pipeline import SDModels, generate, load_models, save_models
from schedulers import NoiseSchedule
from text_encoder import CLIPTextModel, CLIPTokenizer, TextEncoderConfig, shipped_vocab
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

STAGES = ("vae", "clip", "sd", "dino", "classifier")
DEFAULTS = {  # steps, batch size, peak learning rate, EMA decay: chosen to fit a 2-core CPU in about an hour
    "vae": (2500, 32, 1e-3, None),
    "sd": (4000, 32, 1e-3, 0.999),
    "clip": (1500, 64, 5e-4, None),
    "dino": (1000, 64, 5e-4, None),
    "classifier": (1500, 64, 1e-3, None),
}
SHIP_DTYPE = torch.float16   # results are stored in half precision (half the size in git); they load as float32
FACTORS = {"shape": list(world.SHAPES), "colour": list(world.COLOURS), "scene": list(world.SCENES)}
CHECK_PROMPTS = [(p, f) for p, f in world.eval_prompts(64, seed=99)]   # the sd stage's in-loop check


@dataclass
class PretrainConfig:
    stage: str = "all"                      # one of STAGES, or "all" (in order)
    output_dir: str = "assets/toy"          # results: model/ (diffusers layout), clip/, classifier/, pretrain.json
    work_dir: str = "runs/pretrain"         # the image pool, checkpoints and logs of each stage
    seed: int = 0
    pool_size: int = 30000                  # world images drawn once and shared by the stages
    max_train_steps: int | None = None      # None: the stage's default (DEFAULTS); with --stage all, see steps_scale
    train_batch_size: int | None = None
    learning_rate: float | None = None
    steps_scale: float = 1.0                # multiplies every default step count (tests run the stages tiny)
    warmup_steps: int = 200
    checkpointing_steps: int = 500
    check_steps: int = 500                  # sd: every this many steps, draw CHECK_PROMPTS and score them (detector.py)
    text_encoder: str | None = None         # sd: a model folder whose text_encoder/ conditions the UNet, frozen, instead
                                            # of the clip stage's text tower
    patterns: float = 0.3                   # vae: share of each batch from world.pattern_sample (two-colour patterns)
    faces: float = 0.0                      # vae, sd: share of each batch from world.face images of FACE_IDENTITIES,
                                            # captioned FACE_CAPTION: the faces PhotoVerse personalizes
    threads: int | None = None              # torch CPU threads (None: torch's default)
    init_from: str | None = None            # a second round from this result: vae (decoder only), sd, classifier
    colour_dropout: float = 0.2             # sd: share of captions with their colour words left out, so that a shape
                                            # word alone ("a star", DreamBooth's class prompt) means any colour


def parse_args(argv=None) -> PretrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(PretrainConfig()).items():
        kind = {"max_train_steps": int, "train_batch_size": int, "learning_rate": float, "threads": int,
                "init_from": str, "colour_dropout": float, "patterns": float, "faces": float,
                "text_encoder": str}.get(name, type(value))
        p.add_argument(f"--{name}", type=kind, default=value)
    cfg = PretrainConfig(**vars(p.parse_args(argv)))
    if cfg.stage not in (*STAGES, "all"):
        raise SystemExit(f"--stage must be one of {', '.join(STAGES)} or all, got '{cfg.stage}'")
    for name, least in (("max_train_steps", 1), ("train_batch_size", 1), ("learning_rate", 0)):
        value = getattr(cfg, name)
        if value is not None and not (value >= least if least else 0 < value < float("inf")):
            raise SystemExit(f"--{name} must be {'at least 1' if least else '> 0'}, got {value}")
    for name in ("patterns", "faces", "colour_dropout"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise SystemExit(f"--{name} is a share of each batch, from 0 to 1, got {getattr(cfg, name)}")
    if cfg.patterns + cfg.faces >= 1:
        raise SystemExit(f"--patterns + --faces must leave room for the world's images (below 1), got "
                         f"{cfg.patterns} + {cfg.faces}")
    if cfg.stage == "all" and (cfg.max_train_steps, cfg.train_batch_size, cfg.learning_rate) != (None, None, None):
        raise SystemExit("--max_train_steps/--train_batch_size/--learning_rate set one stage: give --stage too "
                         "(--steps_scale shortens all of them)")
    if cfg.init_from and cfg.stage not in ("vae", "sd", "classifier"):
        raise SystemExit("--init_from starts a second round of the vae (decoder only), sd or classifier stage: give "
                         "--stage vae, sd or classifier")
    need = "config.json" if cfg.stage == "classifier" else f"{'unet' if cfg.stage == 'sd' else 'vae'}/config.json"
    if cfg.init_from and not (Path(cfg.init_from) / need).is_file():
        raise SystemExit(f"--init_from '{cfg.init_from}' has no {need}: give a {cfg.stage} result folder")
    return cfg

# ----------------------------------------------------------------------------- the world image pool


def _pool_chunk(args):
    seed, start, n = args
    images, captions, factors = world.batch(seed, start, n)
    labels = [[FACTORS[k].index(f["objects"][0].shape if k == "shape" else f["objects"][0].colour if k == "colour"
                                else f["scene"]) if len(f["objects"]) == 1 else -1 for k in FACTORS] for f in factors]
    return images, captions, labels


def world_pool(seed: int, n: int, work_dir: Path) -> dict:
    """Images 0..n-1 of the world stream `seed`: uint8 (n, 64, 64, 3), captions, and (n, 3) labels of shape,
    colour, scene (-1 for two-object images). Drawn on every core once, then read from the work folder."""
    path = work_dir / f"pool-seed{seed}-n{n}.npz"
    if path.is_file():
        data = np.load(path)
        return {"images": data["images"], "captions": list(data["captions"]), "labels": data["labels"]}
    chunks = [(seed, s, min(1000, n - s)) for s in range(0, n, 1000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        parts = list(tqdm(ex.map(_pool_chunk, chunks), total=len(chunks), desc="world pool", unit="k images"))
    pool = {"images": np.concatenate([p[0] for p in parts]), "captions": [c for p in parts for c in p[1]],
            "labels": np.array([lab for p in parts for lab in p[2]], dtype=np.int64)}
    def save(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, images=pool["images"], captions=np.array(pool["captions"]), labels=pool["labels"])
    atomic_write(path, save)
    return pool


def _pattern_chunk(args):
    seed, start, n = args
    return np.stack([world.pattern_sample(seed, i) for i in range(start, start + n)])


def pattern_pool(seed: int, n: int, work_dir: Path) -> np.ndarray:
    """world.pattern_sample images 0..n-1 of stream `seed`, uint8 (n, 64, 64, 3): the VAE's extra images."""
    path = work_dir / f"patterns-seed{seed}-n{n}.npy"
    if path.is_file():
        return np.load(path)
    chunks = [(seed, s, min(1000, n - s)) for s in range(0, n, 1000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        images = np.concatenate(list(tqdm(ex.map(_pattern_chunk, chunks), total=len(chunks), desc="pattern pool",
                                          unit="k images")))
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), images))
    return images


FACE_IDENTITIES = range(0, 1000)   # the base model's faces; PhotoVerse's held-out identities are 1000 and up
FACE_CAPTION = "a photo of a face"


def _face_chunk(identities):
    return np.stack([np.asarray(world.face(i, k)) for i in identities for k in range(4)])


def face_pool(work_dir: Path) -> np.ndarray:
    """world.face images 0..3 of every FACE_IDENTITIES identity, uint8 (n, 64, 64, 3): the toy model's faces."""
    path = work_dir / f"faces-{FACE_IDENTITIES.start}-{FACE_IDENTITIES.stop}.npy"
    if path.is_file():
        return np.load(path)
    chunks = [FACE_IDENTITIES[s:s + 100] for s in range(0, len(FACE_IDENTITIES), 100)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        images = np.concatenate(list(tqdm(ex.map(_face_chunk, chunks), total=len(chunks), desc="face pool",
                                          unit="100 faces")))
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), images))
    return images


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (b, h, w, 3) -> float32 (b, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

# ----------------------------------------------------------------------------- the stages


@dataclass
class Stage:
    model: torch.nn.Module      # everything this stage trains
    batch: object               # batch(generator, size) -> dict
    loss: object                # loss(batch) -> (loss, {name: float})
    write: object               # write(model, folder): the stage's result files
    check: object = None        # check(model) -> {name: float}: a quick look at what the model can do, every
                                # --check_steps steps (the shipped weights: the EMA ones where there is an EMA)


def vae_stage(cfg: PretrainConfig, pool: dict, out: Path) -> Stage:
    # --init_from: a second round that trains only the decoder, on whole 64 px images, so the latents (and the UNet
    # trained on them) stay valid; the same idea as SD's "ft-MSE" VAE, a decoder fine-tuned after the fact
    vae = VAE.from_pretrained(cfg.init_from) if cfg.init_from else VAE(VAEConfig.toy())
    side = 64 if cfg.init_from else 32
    vae.encoder.requires_grad_(not cfg.init_from)
    vae.quant_conv.requires_grad_(not cfg.init_from)
    patterns = pattern_pool(cfg.seed, 6000, Path(cfg.work_dir)) if cfg.patterns else None
    faces = face_pool(Path(cfg.work_dir)) if cfg.faces else None

    def batch(g, b):
        n, n_faces = round(b * cfg.patterns), round(b * cfg.faces)
        idx = torch.randint(len(pool["images"]), (b - n - n_faces,), generator=g).numpy()
        images = pool["images"][idx]
        for extra, k in ((patterns, n), (faces, n_faces)):
            if k:
                images = np.concatenate([images, extra[torch.randint(len(extra), (k,), generator=g).numpy()]])
        top, left = torch.randint(0, 65 - side, (2,), generator=g).tolist()  # one crop position per batch
        return {"x": to_tensor(images[:, top:top + side, left:left + side]), "g": g}

    def loss(b):
        posterior = vae.encode(b["x"])
        x_hat = vae.decode(posterior.sample(b["g"]))
        rec, kl = (x_hat - b["x"]).abs().mean(), posterior.kl().mean()
        return rec + 1e-6 * kl, {"l1": rec.item(), "kl": kl.item()}

    def write(model, folder):
        with torch.no_grad():   # LDM's scale factor: 1 / std of the latents, over 1024 pool images
            z = torch.cat([model.encode(to_tensor(pool["images"][i:i + 256])).mean for i in range(0, 1024, 256)])
        s = model.config.scaling_factor if cfg.init_from else round(1 / z.std().item(), 5)   # decoder round: as it was
        scaled = VAE(VAEConfig(**{**asdict(model.config), "scaling_factor": s}))
        scaled.load_state_dict(model.state_dict())
        scaled.save_pretrained(folder / "model" / "vae", SHIP_DTYPE)
    return Stage(vae, batch, loss, write)


def clip_text_encoder(folder: Path) -> CLIPTextModel:
    """The text tower of a CLIP folder (the clip stage's result) as SD's text encoder: the same layout and keys."""
    clip = CLIPModel.from_pretrained(folder)
    text_encoder = CLIPTextModel(clip.config.text)
    text_encoder.text_model.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval().requires_grad_(False)


def sd_stage(cfg: PretrainConfig, pool: dict, out: Path) -> Stage:
    for need, stage in (("model/vae", "vae"), ("clip", "clip")):
        if not (out / need / "config.json").is_file():
            raise ValueError(f"the sd stage needs the result of the {stage} stage, and '{out / need}' has none: run "
                             f"--stage {stage} (train.py: --method pretrain_{stage}) into the same output folder first")
    vae = VAE.from_pretrained(out / "model", subfolder="vae")
    tokenizer = CLIPTokenizer(*shipped_vocab(), max_length=TextEncoderConfig.toy().max_position_embeddings)
    schedule = NoiseSchedule.sd()
    # The text encoder is the toy CLIP's text tower, trained contrastively first and frozen here, as SD 1.x
    # conditions on OpenAI CLIP's frozen text tower (Rombach et al. 2022). Trained jointly with the UNet from
    # scratch, it gave shape words that the UNet barely used. Only the UNet trains.
    if cfg.init_from or cfg.text_encoder:
        text_encoder = CLIPTextModel.from_pretrained(cfg.init_from or cfg.text_encoder)
    else:
        text_encoder = clip_text_encoder(out / "clip")
    text_encoder.requires_grad_(False)
    model = torch.nn.ModuleDict({"unet": UNet.from_pretrained(cfg.init_from) if cfg.init_from else UNet(UNetConfig.toy())})
    s = vae.config.scaling_factor
    faces = face_pool(Path(cfg.work_dir)) if cfg.faces else np.zeros((0, 64, 64, 3), np.uint8)
    images = np.concatenate([pool["images"], faces])     # --faces: the face pool after the world's images
    with torch.no_grad():      # every pool image encoded once: the posterior's mean and std, scaled
        moments = [vae.encode(to_tensor(images[i:i + 500])) for i in tqdm(range(0, len(images), 500),
                                                                         desc="encoding the pool", unit="batch")]
        mean, std = torch.cat([m.mean for m in moments]) * s, torch.cat([m.std for m in moments]) * s
    captions, n_world = pool["captions"] + [FACE_CAPTION] * len(faces), len(pool["images"])
    colours = re.compile(r"\b(" + "|".join(world.COLOURS) + r") ")

    def encode(captions):      # the frozen text encoder's states of every caption, computed once
        with torch.no_grad():
            return torch.cat([text_encoder(tokenizer(captions[i:i + 1000]))[0] for i in range(0, len(captions), 1000)])
    states, empty = encode(captions), encode([""])[0]
    no_colour = encode([colours.sub("", c) for c in captions]) if cfg.colour_dropout else states

    def batch(g, b):
        n_faces = round(b * cfg.faces)
        idx = torch.randint(n_world, (b - n_faces,), generator=g)
        if n_faces:
            idx = torch.cat([idx, n_world + torch.randint(len(faces), (n_faces,), generator=g)])
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        text = states[idx]
        if cfg.colour_dropout:     # (drawn only when asked: runs without it keep their random stream)
            text = torch.where((torch.rand(b, generator=g) < cfg.colour_dropout)[:, None, None], no_colour[idx], text)
        text = torch.where((torch.rand(b, generator=g) < 0.1)[:, None, None], empty, text)   # CFG dropout
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g)
        return {"z0": z0, "text": text, "t": t, "noise": torch.randn(z0.shape, generator=g)}

    def loss(b):
        x_t = schedule.add_noise(b["z0"], b["noise"], b["t"])
        pred = model["unet"](x_t, b["t"], b["text"])
        mse = weighted_mse(pred, b["noise"], min_snr_weights(schedule, b["t"], 5.0))
        return mse, {"mse": mse.item()}

    def models_of(m):
        return SDModels(tokenizer, text_encoder, m["unet"], vae, schedule)

    def write(m, folder):
        save_models(models_of(m), folder / "model", SHIP_DTYPE)

    def check(m):              # CHECK_PROMPTS, DDIM 12, guidance 4.5, scored by the render-and-compare detector
        images = generate(models_of(m.eval()), [p for p, _ in CHECK_PROMPTS], seed=cfg.seed, steps=12, guidance=4.5,
                          height=64, width=64, progress=False)
        m.train()
        hits = [detector.detect(im, f["colour"]) for im, (_, f) in zip(images, CHECK_PROMPTS)]
        return {"check_shape": float(np.mean([h["present"] and h["shape"] == f["shape"] for h, (_, f) in
                                              zip(hits, CHECK_PROMPTS)])),
                "check_present": float(np.mean([h["present"] for h in hits]))}
    return Stage(model, batch, loss, write, check)


def clip_stage(cfg: PretrainConfig, pool: dict, out: Path) -> Stage:
    clip = CLIPModel(CLIPConfig.toy())
    tokenizer = clip.tokenizer()
    ids = tokenizer(pool["captions"])

    def batch(g, b):
        idx = torch.randint(len(ids), (b,), generator=g)
        return {"x": to_tensor(pool["images"][idx.numpy()]), "ids": ids[idx]}

    def loss(b):
        image = F.normalize(clip.get_image_features(clip.preprocess.tensor(b["x"])), dim=-1)
        text = F.normalize(clip.get_text_features(b["ids"]), dim=-1)
        logits = image @ text.T * clip.logit_scale.clamp(max=math.log(100)).exp()   # CLIP caps the scale at 100
        same = (b["ids"][:, None] == b["ids"][None]).all(-1).float()                # equal captions are matches
        target = same / same.sum(-1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        accuracy = (logits.argmax(-1) == torch.arange(len(logits))).float().mean()
        return loss, {"infonce": loss.item(), "top1": accuracy.item()}

    def write(m, folder):
        m.save_pretrained(folder / "clip", SHIP_DTYPE)
    return Stage(clip, batch, loss, write)


def factor_stage(pool: dict, logits_of) -> tuple:
    """batch and loss of a supervised stage: one-object pool images, cross-entropy summed over the factors."""
    single = np.flatnonzero(pool["labels"][:, 0] >= 0)

    def batch(g, b):
        idx = single[torch.randint(len(single), (b,), generator=g).numpy()]
        return {"x": to_tensor(pool["images"][idx]), "labels": torch.from_numpy(pool["labels"][idx])}

    def loss(b):
        logits = logits_of(b["x"])
        losses = {k: F.cross_entropy(logits[k], b["labels"][:, i]) for i, k in enumerate(FACTORS)}
        logs = {f"acc_{k}": (logits[k].argmax(-1) == b["labels"][:, i]).float().mean().item() for i, k in enumerate(FACTORS)}
        return sum(losses.values()), logs
    return batch, loss


def dino_stage(cfg: PretrainConfig, pool: dict, out: Path) -> Stage:
    """A ViT (DINO's layout, ViTConfig.toy) supervised on the factors through linear heads on its CLS token: the
    toy runs' stand-in for DINO (eval.py's DINO score, ComFusion's L_v). Only the ViT is written."""
    model = torch.nn.ModuleDict({"vit": ViTModel(ViTConfig.toy())})
    model["heads"] = torch.nn.ModuleDict({k: torch.nn.Linear(ViTConfig.toy().hidden_size, len(v)) for k, v in FACTORS.items()})

    def logits_of(x):
        feature = model["vit"].features(model["vit"].preprocess.tensor(x))
        return {k: head(feature) for k, head in model["heads"].items()}

    def write(m, folder):
        m["vit"].save_pretrained(folder / "dino", SHIP_DTYPE)
    return Stage(model, *factor_stage(pool, logits_of), write)


def classifier_stage(cfg: PretrainConfig, pool: dict, out: Path) -> Stage:
    # --init_from: a second round from an earlier classifier (a longer schedule in two runs)
    classifier = FactorClassifier.from_pretrained(cfg.init_from) if cfg.init_from else FactorClassifier(FactorClassifierConfig(FACTORS))

    def write(m, folder):
        m.save_pretrained(folder / "classifier", SHIP_DTYPE)
    return Stage(classifier, *factor_stage(pool, lambda x: classifier(classifier.preprocess.tensor(x))), write)


BUILD = {"vae": vae_stage, "sd": sd_stage, "clip": clip_stage, "dino": dino_stage, "classifier": classifier_stage}

# ----------------------------------------------------------------------------- the loop


def stage_settings(cfg: PretrainConfig, name: str) -> tuple[int, int, float, float | None]:
    steps, batch, lr, ema = DEFAULTS[name]
    given = (cfg.max_train_steps, cfg.train_batch_size, cfg.learning_rate)   # None: the stage's own value
    return tuple(own if value is None else value
                 for value, own in zip(given, (max(1, round(steps * cfg.steps_scale)), batch, lr))) + (ema,)


def settings_of(cfg: PretrainConfig, name: str) -> dict:
    """What makes a stage's result: a checkpoint or a finished stage made with other settings is not reused."""
    steps, batch_size, lr, ema = stage_settings(cfg, name)
    return {"steps": steps, "batch_size": batch_size, "learning_rate": lr, "ema": ema, "seed": cfg.seed,
            "pool_size": cfg.pool_size, "warmup_steps": cfg.warmup_steps, "init_from": cfg.init_from,
            **({"colour_dropout": cfg.colour_dropout} if cfg.colour_dropout and name == "sd" else {}),
            **({"patterns": cfg.patterns} if cfg.patterns and name == "vae" else {}),
            **({"faces": cfg.faces} if cfg.faces and name in ("vae", "sd") else {}),
            **({"text_encoder": cfg.text_encoder} if cfg.text_encoder and name == "sd" else {})}


def run_stage(name: str, cfg: PretrainConfig, pool: dict) -> dict:
    """Train one stage (resuming from its newest checkpoint) and write its result into cfg.output_dir."""
    out, work = Path(cfg.output_dir), Path(cfg.work_dir) / name
    steps, batch_size, lr, ema_decay = stage_settings(cfg, name)
    settings = settings_of(cfg, name)
    torch.manual_seed(cfg.seed)                                   # initial weights
    stage = BUILD[name](cfg, pool, out)
    model = stage.model.train()
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(cfg.warmup_steps, steps // 10)
    schedule = checkpoint.lr_schedule(optimizer, "warmup_times_cosine", warmup, steps)
    step, seconds = 0, 0.0
    if (latest := checkpoint.latest_checkpoint(work)) is not None:
        state = checkpoint.load_state(latest)
        if state["settings"] != settings:
            raise ValueError(f"{latest} was made with {state['settings']}, this run asks for {settings}: resume with "
                             f"the same settings, or give another --work_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, seconds = state["step"], state["seconds"]
        print(f"{name}: resuming from {latest}")

    work.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=steps, initial=step, desc=f"pretrain {name}", unit="step")
    t0, logs = time.time() - seconds, {}
    while step < steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + STAGES.index(name) * 100_003 + step)
        loss, logs = stage.loss(stage.batch(g, batch_size))
        logs = {"loss": loss.item(), **logs}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:                                       # EMA with a warmup, as diffusers' EMAModel
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if step % 50 == 0 or step == steps:
            with open(work / "logs.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "lr": schedule.get_last_lr()[0], **logs}) + "\n")
        if stage.check is not None and cfg.check_steps and step % cfg.check_steps == 0:
            with torch.no_grad():
                checked = stage.check(ema or model)
            tqdm.write(f"{name} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in checked.items()))
            with open(work / "logs.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **checked}) + "\n")
        if step % cfg.checkpointing_steps == 0 and step < steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "seconds": time.time() - t0, "settings": settings, **({"ema": ema.state_dict()} if ema is not None else {})}
            checkpoint.save_checkpoint(work, step, lambda folder: stage.write(ema or model, folder), state, total_limit=1)
    bar.close()
    seconds = time.time() - t0
    stage.write((ema or model).eval(), out)
    return {"steps": steps, "batch_size": batch_size, "learning_rate": lr, "ema": ema_decay, "seconds": round(seconds),
            "final": {k: round(v, 4) for k, v in logs.items()}}


def write_subjects(out: Path, n: int = 5) -> None:
    """The demo subjects (world.NOVEL_SUBJECTS, patterns pretraining never shows): n images each, for DreamBooth."""
    for name in world.NOVEL_SUBJECTS:
        for i, image in enumerate(world.novel_subject(name, n)):
            atomic_write(out / "subjects" / name / f"{i:02d}.png", lambda p, im=image: im.save(p, format="png"))


def write_samples(out: Path, seed: int = 0) -> None:
    """A grid of the model's images for 16 of the factor-accuracy prompts, to look at."""
    models = load_models(out / "model")
    prompts = [p for p, _ in world.eval_prompts(16, seed)]
    images = generate(models, prompts, seed=seed, steps=25, guidance=4.0, height=64, width=64, progress=False)
    make_grid(images, cols=8).resize((8 * 128, 2 * 128), Image.NEAREST).save(out / "samples.png")
    atomic_write(out / "samples.txt", lambda p: p.write_text("\n".join(prompts) + "\n"))


def from_train_config(cfg) -> dict:
    """`train.py --method pretrain_<stage>`: that stage into --output_dir (work files in OUTPUT/pretrain-work);
    --seed and --checkpointing_steps apply, and --max_train_steps, --train_batch_size, --learning_rate when given
    (train.py's check_common has checked them)."""
    defaults = type(cfg)()
    given = {name: getattr(cfg, name) for name in ("max_train_steps", "train_batch_size", "learning_rate")
             if getattr(cfg, name) != getattr(defaults, name)}
    return run(PretrainConfig(stage=cfg.method.removeprefix("pretrain_"), output_dir=cfg.output_dir,
                              work_dir=str(Path(cfg.output_dir) / "pretrain-work"), seed=cfg.seed,
                              checkpointing_steps=cfg.checkpointing_steps, **given))


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parse_args(argv), "python " + " ".join([Path(sys.argv[0]).name, *argv]))


def run(cfg: PretrainConfig, command: str | None = None) -> dict:
    """The stages of `cfg` (each resumed from its newest checkpoint, a finished one kept), then pretrain.json, which
    records `command` (None: the command line of this process)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, work = Path(cfg.output_dir), Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pool = world_pool(cfg.seed, cfg.pool_size, work)
    info_path = out / "pretrain.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    command = command or "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    hardware = (f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads")
    info.update({"seed": cfg.seed, "pool_size": cfg.pool_size})
    info.setdefault("stages", {})
    write_subjects(out)
    for name in STAGES if cfg.stage == "all" else (cfg.stage,):
        done = work / name / "DONE"
        if cfg.stage == "all" and done.is_file() and json.loads(done.read_text() or "{}") == settings_of(cfg, name):
            print(f"{name}: done with these settings in an earlier run of this work folder, kept")
            continue
        key = f"{name} from {cfg.init_from}" if cfg.init_from else name    # a second round is recorded beside the first
        info["stages"][key] = {"command": command, "hardware": hardware, **run_stage(name, cfg, pool)}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(info_path, lambda p: p.write_text(json.dumps(info, indent=2)))
        for old in checkpoint.checkpoints(work / name):           # the stage is done: its checkpoints are not needed
            shutil.rmtree(old)
        atomic_write(done, lambda p: p.write_text(json.dumps(settings_of(cfg, name))))
        if name == "sd":
            write_samples(out, cfg.seed)
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
