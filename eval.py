"""DreamBench evaluation: DINO, CLIP-I and CLIP-T of generated images against a subject's real photos.

    python eval.py --images samples/ --reference photos/dog/             # score a folder (prompts from PNG text)
    python eval.py --model runs/dreambooth --dataset dreambench/ --subjects dog --num_images 4   # the protocol

The protocol of DreamBooth (Ruiz et al. 2023, sec. 4.1, "Dataset and Evaluation"): 30 subjects, 25 prompts
each (one list for objects, one for live subjects), 4 images per prompt, and three scores:

    1. DINO   = mean over generated images x and real images r of cos(f(x), f(r)), f = DINO ViT-S/16 CLS token
    2. CLIP-I = the same with f = CLIP's projected image embedding (ViT-B/32 by default)
    3. CLIP-T = mean over generated images x of cos(g(x), h(prompt)), h = CLIP's projected text embedding of the
                prompt with the identifier removed ("a sks dog in the snow" -> "a dog in the snow")

Our reading where the paper is silent: a generated image is compared with every real photo of its subject, its
score is the mean of those cosines, and every row (overall, per subject, per prompt) is the mean over its
images. An optional `face` score (PhotoVerse's face similarity) does the same with an ArcFace IResNet, on the
images as they are: no face detection or alignment is done, so give face crops.

The subjects, classes and prompts are those of the dataset's `prompts_and_classes.txt` (google/dreambooth, CC BY
4.0; a verbatim copy is in assets/dreambench/): read from the dataset folder when it has the file, otherwise
the lists below, which tests/test_eval.py checks against the copy.

Toy runs (the procedural world of world.py, models from pretrain.py) add a fourth score with --classifier:
factor accuracy, whether image_encoders.FactorClassifier sees in each generated image the shape, colour and
scene its prompt names (`prompt_factors`: "a red sks star on the beach" -> red, star, beach). A row gets
`shape_acc`, `colour_acc`, `scene_acc` (1 or 0) for the factors its prompt names, and every mean is over the
images whose prompts name that factor:

    python eval.py --model runs/toy-star --dataset toy_subjects/ --clip_model assets/toy/clip \
        --dino_model assets/toy/dino --classifier assets/toy/classifier --steps 25 --guidance 4

and, with --toy_subject NAME (a world.NOVEL_SUBJECTS key), detector.py's render-and-compare answers that an
empty scene cannot fool: `subject_present` (is the subject drawn?) and, where the prompt names a shape,
`shape_present` (is that shape drawn, in the prompt's colour if it names one?). In toy runs these are the
measures of the subject; the toy CLIP's CLIP-I rated empty scenes above new photos of the subject, so it is
kept for prompt alignment (CLIP-T) only.

Outputs in --out: metrics.json (the scores, per-subject and per-prompt rows, the backbones), metrics.csv (one
row per image) and contact_sheet.png (per subject: its real photos, then some of the generated images).
"""
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

import cli
import detector
import world
from data import IMAGE_SUFFIXES, load_image, make_grid, save_png
from face_encoder import IResNet
from hub import ModelLoadError, atomic_write, looks_like_path, read_json
from image_encoders import CLIPModel, FactorClassifier, ViTModel
from pipeline import check_settings, generate, load_trained

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
FACTORS = ("shape", "colour", "scene")  # the toy world's factors, in the order of their `<factor>_acc` columns
PROMPTS_FILE = "prompts_and_classes.txt"

# ----------------------------------------------------------------------------- DreamBench: subjects, classes, prompts

CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock", "colorful_sneaker": "sneaker",
    "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog",
    "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon", "robot_toy": "toy",
    "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase", "wolf_plushie": "stuffed animal",
}
LIVE_CLASSES = ("cat", "dog")  # the paper's "live subjects" (the file does not mark them): they take LIVE_PROMPTS

# {0} = the identifier ("sks"), {1} = the class noun, as `.format(unique_token, class_token)` in the file
COMMON = ["a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
          "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor",
          "a {0} {1} with a city in the background", "a {0} {1} with a mountain in the background",
          "a {0} {1} with a blue house in the background", "a {0} {1} on top of a purple rug in a forest"]
RECOLOR = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
OBJECT_PROMPTS = COMMON + [
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug"] + RECOLOR
LIVE_PROMPTS = COMMON + [
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit"] + RECOLOR


def parse_prompts_file(path) -> tuple[dict[str, str], list[str], list[str]]:
    """prompts_and_classes.txt -> (subject -> class, object prompts, live-subject prompts)."""
    classes, lists, section = {}, {"Object Prompts": [], "Live Subject Prompts": []}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line in ("Classes", "Prompts") or line in lists:
            section = line
        elif section == "Classes" and "," in line and line != "subject_name,class":
            subject, cls = line.split(",", 1)
            classes[subject] = cls
        elif section in lists and (m := re.fullmatch(r"'(.*)'\.format\(unique_token, class_token\),?", line)):
            lists[section].append(m.group(1))
    if not classes or not all(lists.values()):
        raise ValueError(f"'{path}' is not DreamBench's {PROMPTS_FILE}: no classes or prompt lists found in it")
    return classes, lists["Object Prompts"], lists["Live Subject Prompts"]


def dreambench(dataset=None) -> tuple[dict[str, str], list[str], list[str]]:
    """The dataset folder's own file when it has one, else the lists above."""
    path = Path(dataset) / PROMPTS_FILE if dataset else None
    return parse_prompts_file(path) if path and path.is_file() else (dict(CLASSES), OBJECT_PROMPTS, LIVE_PROMPTS)


def remove_identifier(prompt: str, identifier: str) -> str:
    """Drop the identifier where it stands as a whole word, then tidy the spaces."""
    text = re.sub(rf"(?<!\S){re.escape(identifier)}(?!\S)", " ", prompt)
    return " ".join(text.split())

# ----------------------------------------------------------------------------- images and their prompts


@dataclass
class Group:
    """The generated images of one subject, their prompts, and the subject's real photos."""
    subject: str
    images: list[Path]
    prompts: list[str]
    references: list[Path]


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def png_text(path: Path) -> dict:
    """The text chunks that sample.py and this file write into PNGs."""
    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image '{path}': {e}") from None


def png_prompt(path: Path) -> str | None:
    return png_text(path).get("prompt")


def generated_images(folder: Path, set_id: int | None = None) -> list[Path]:
    """The images of a folder to score: all but sample.py's grids (their text has `prompts`, not `prompt`), of one
    sample.py run: a folder that holds several sets (sample.py's `set` text) is scored for the newest, or --set."""
    texts = {p: png_text(p) for p in image_files(folder)}
    images = {p: t for p, t in texts.items() if not ("prompts" in t and "prompt" not in t)}
    sets = {p: int(t.get("set", 1)) for p, t in images.items()}
    if len(set(sets.values())) <= 1 and set_id is None:
        return list(images)
    chosen = max(sets.values()) if set_id is None else set_id
    if chosen not in sets.values():
        raise ValueError(f"--set {chosen}: '{folder}' has sample.py sets {sorted(set(sets.values()))}")
    if set_id is None:
        print(f"'{folder}' holds {len(set(sets.values()))} sets of sample.py images: scoring the newest, set {chosen} "
              f"(--set N scores another)")
    return [p for p, k in sets.items() if k == chosen]


def reference_images(reference: Path, subject: str, single: bool) -> list[Path]:
    """A subject's real photos: the --reference folder itself, or its subfolder named after the subject."""
    folder = reference if single and image_files(reference) else reference / subject
    if not folder.is_dir() or not image_files(folder):
        raise ValueError(f"no reference images for subject '{subject}' in '{folder}': give --reference a folder of "
                         f"the subject's photos, or a DreamBench folder with one subfolder per subject")
    return image_files(folder)


def collect_groups(args) -> list[Group]:
    """Scoring mode: --images holds images (one subject) or one subfolder of images per subject."""
    images, reference = Path(args.images), Path(args.reference) if args.reference else None
    if not images.is_dir():
        raise ValueError(f"--images folder '{images}' does not exist")
    if reference is None or not reference.is_dir():
        raise ValueError(f"--reference folder '{reference}' does not exist: give the subject's real photos")
    if image_files(images):
        if args.subjects and len(args.subjects) > 1:
            raise ValueError(f"--images '{images}' holds one subject's images, but --subjects names "
                             f"{len(args.subjects)}: give a folder with one subfolder per subject")
        subject = args.subjects[0] if args.subjects else reference.name
        folders = {subject: images}
    else:
        folders = {d.name: d for d in sorted(images.iterdir()) if d.is_dir() and image_files(d)}
        if not folders:
            raise ValueError(f"--images folder '{images}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no "
                             f"subfolders of images")
        for s in args.subjects or []:
            if s not in folders:
                raise ValueError(f"subject '{s}' has no images in '{images}' (subfolders: {', '.join(folders)})")
        folders = {s: d for s, d in folders.items() if not args.subjects or s in args.subjects}
    groups = []
    for subject, folder in folders.items():
        paths = generated_images(folder, args.set)
        prompts = [args.prompt] * len(paths) if args.prompt else [png_prompt(p) for p in paths]
        missing = [p.name for p, q in zip(paths, prompts) if not q]
        if missing:
            raise ValueError(f"{len(missing)} image(s) in '{folder}' have no prompt in their PNG text (e.g. "
                             f"{missing[0]}): pass --prompt TEXT, or generate them with sample.py")
        groups.append(Group(subject, paths, prompts, reference_images(reference, subject, len(folders) == 1)))
    return groups

# ----------------------------------------------------------------------------- metrics


def mean_cosine(x: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """(n, e), (m, e) -> (n,): each row's mean cosine similarity to all rows of `refs`."""
    return (F.normalize(x, dim=-1) @ F.normalize(refs, dim=-1).T).mean(dim=1)


def row_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, e), (n, e) -> (n,): cosine of matching rows (CLIP-T: image i with its own prompt)."""
    return F.cosine_similarity(x, y, dim=-1)


def prompt_factors(prompt: str) -> dict[str, str]:
    """The toy world's factors a prompt names: {"shape", "colour", "scene"}, each only where it is named.

    A scene is named by its phrase in world.SCENES ("on the beach" -> "beach"; where several appear the
    longest wins), a shape by its word, a colour by its word standing before the shape's: the object's
    adjective ("a red sks star"), not a colour after it ("a sks star on top of pink fabric" is the fabric's),
    so no shape word, no colour. Whole words only, case-insensitive."""
    text = " ".join(prompt.lower().split())
    factors = {}
    for scene, phrase in sorted(world.SCENES.items(), key=lambda kv: -len(kv[1])):
        if m := re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text):
            factors["scene"] = scene
            text = text[:m.start()] + " , " + text[m.end():]  # its words name nothing else
            break
    words = re.findall(r"\w+", text)
    shape = next((i for i, w in enumerate(words) if w in world.SHAPES), None)
    if shape is not None:
        factors["shape"] = words[shape]
        if colours := [w for w in words[:shape] if w in world.COLOURS]:
            factors["colour"] = colours[-1]
    return factors


def factor_hits(classifier: FactorClassifier, images: list[Image.Image], expected: list[dict]) -> list[dict]:
    """Per image, {factor: 1.0 if the classifier predicts the expected label else 0.0} for the factors its
    `expected` dict names (any of shape / colour / scene, labels as in `classifier.factors`)."""
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expected factor dicts")
    for e in expected:
        for factor, label in e.items():
            if factor not in classifier.factors:
                raise ValueError(f"the classifier has no '{factor}' head (it predicts {', '.join(classifier.factors)})")
            if label not in classifier.factors[factor]:
                raise ValueError(f"the classifier cannot predict {factor} '{label}': its labels are "
                                 f"{', '.join(classifier.factors[factor])}")
    named = [i for i, e in enumerate(expected) if e]
    predicted = classifier.predict([images[i] for i in named]) if named else {}
    hits = [{} for _ in expected]
    for j, i in enumerate(named):
        hits[i] = {factor: float(predicted[factor][j] == label) for factor, label in expected[i].items()}
    return hits


def factor_accuracy(classifier: FactorClassifier, images: list[Image.Image], expected: list[dict]) -> dict[str, float]:
    """{factor: the fraction of the images naming it in `expected` that the classifier gets right}; factors
    no image names are left out."""
    hits = factor_hits(classifier, images, expected)
    return {f: float(np.mean([h[f] for h in hits if f in h])) for f in classifier.factors if any(f in h for h in hits)}


@torch.no_grad()
def embed(encode, preprocess, paths: list[Path], device, batch_size: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(paths), batch_size):  # load_image applies EXIF rotation: photos are scored as seen
        pixels = preprocess([load_image(p) for p in paths[i:i + batch_size]])
        out.append(encode(pixels.to(device)).float().cpu())
    return torch.cat(out)


def score(groups: list[Group], encoders: dict, identifier: str, keep_identifier: bool, device) -> list[dict]:
    """One row per generated image: subject, prompt, file, and its dino / clip_i / clip_t (/ face) scores; with a
    classifier, also `<factor>_acc` (1 or 0) for each factor its prompt names."""
    clip = encoders["clip"]
    tokenizer = clip.tokenizer()
    image_encoders = {"dino": (encoders["dino"].features, encoders["dino"].preprocess),
                      "clip_i": (clip.get_image_features, clip.preprocess)}
    if "face" in encoders:
        image_encoders["face"] = (encoders["face"], encoders["face"].preprocess)
    rows = []
    for g in groups:
        scores, generated = {}, {}
        for name, (encode, preprocess) in image_encoders.items():
            generated[name] = embed(encode, preprocess, g.images, device)
            scores[name] = mean_cosine(generated[name], embed(encode, preprocess, g.references, device))
        texts = [p if keep_identifier else remove_identifier(p, identifier) for p in g.prompts]
        with torch.no_grad():
            text = clip.get_text_features(tokenizer(texts).to(device)).float().cpu()
        scores["clip_t"] = row_cosine(generated["clip_i"], text)
        hits = [{}] * len(g.images)
        if classifier := encoders.get("classifier"):
            expected = [{k: v for k, v in prompt_factors(p).items() if k in classifier.factors} for p in g.prompts]
            hits = factor_hits(classifier, [load_image(p) for p in g.images], expected)
        present = [{}] * len(g.images)
        if subject := encoders.get("toy_subject"):
            present = [toy_presence(load_image(path), subject, prompt) for path, prompt in zip(g.images, g.prompts)]
        for i, (path, prompt) in enumerate(zip(g.images, g.prompts)):
            rows.append({"subject": g.subject, "prompt": prompt, "image": str(path),
                         **{k: float(v[i]) for k, v in scores.items()}, **{f"{k}_acc": v for k, v in hits[i].items()},
                         **present[i]})
    return rows


def toy_presence(image: Image.Image, subject: str, prompt: str) -> dict:
    """Toy runs (--toy_subject): `subject_present`, 1 where detector.py finds the novel subject, and where the
    prompt names a shape, `shape_present`, 1 where an object of that shape (in the prompt's colour, if it names
    one) is drawn. Render-and-compare: an empty scene scores 0, as the toy CLIP's cosines could not."""
    factors, spec = prompt_factors(prompt), world.NOVEL_SUBJECTS[subject]
    found = detector.subject_present(image, subject)["present"]
    out = {"subject_present": float(found)}
    if "shape" in factors:          # the subject is an object of its shape too
        out["shape_present"] = float((found and spec["shape"] == factors["shape"])
                                     or detector.shape_present(image, factors["shape"], factors.get("colour")))
    return out


def summarize(rows: list[dict], keys: list[str]) -> dict:
    """Means over all images, per subject, and per (subject, prompt); a key some rows lack (a factor accuracy
    whose factor their prompt does not name) is the mean over the rows that have it, None where none do."""
    def mean(rs):
        return {k: float(np.mean(v)) if (v := [r[k] for r in rs if k in r]) else None for k in keys}
    by_subject, by_prompt = {}, {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
        by_prompt.setdefault((r["subject"], r["prompt"]), []).append(r)
    return {**mean(rows), "num_images": len(rows),
            "subjects": [{"subject": s, "num_images": len(rs), **mean(rs)} for s, rs in by_subject.items()],
            "prompts": [{"subject": s, "prompt": p, "num_images": len(rs), **mean(rs)}
                        for (s, p), rs in by_prompt.items()]}


def thumbnail(path: Path, size: int) -> Image.Image:
    return ImageOps.fit(load_image(path), (size, size), Image.BICUBIC)


def contact_sheet(groups: list[Group], size: int = 128, max_generated: int = 8) -> Image.Image:
    """One row per subject: its real photos, its name, then up to `max_generated` generated images spread over
    its prompts."""
    n_ref = max(len(g.references) for g in groups)
    rows = []
    for g in groups:
        picks = np.unique(np.linspace(0, len(g.images) - 1, min(max_generated, len(g.images))).round().astype(int))
        blank = [Image.new("RGB", (size, size), "white") for _ in range(n_ref - len(g.references) + 1)]
        ImageDraw.Draw(blank[-1]).text((4, size // 2), g.subject, fill="black")
        cells = [thumbnail(p, size) for p in g.references] + blank + [thumbnail(g.images[i], size) for i in picks]
        rows.append(make_grid(cells, cols=len(cells)))
    sheet = Image.new("RGB", (max(r.width for r in rows), size * len(rows)), "white")
    for i, r in enumerate(rows):
        sheet.paste(r, (0, i * size))
    return sheet


def write_outputs(out: Path, rows: list[dict], groups: list[Group], meta: dict, keys: list[str]) -> dict:
    summary = summarize(rows, keys)
    metrics = {k: summary[k] for k in [*keys, "num_images"]} | meta | {k: summary[k] for k in ("subjects", "prompts")}
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["subject", "prompt", "image", *keys])
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(out / "metrics.csv", write_csv)
    save_png(contact_sheet(groups), out / "contact_sheet.png", {"subjects": json.dumps([g.subject for g in groups])})
    return metrics

# ----------------------------------------------------------------------------- the protocol: generate, then score


def protocol_jobs(args) -> list[tuple[str, str, list[str]]]:
    """(subject, class, prompts) for each chosen subject, checked before any model loads."""
    classes, object_prompts, live_prompts = dreambench(args.reference)
    subjects = args.subjects or list(classes)
    unknown = [s for s in subjects if s not in classes]
    if unknown:
        raise ValueError(f"unknown subject(s) {', '.join(unknown)}: DreamBench's are {', '.join(classes)}")
    jobs = []
    for s in subjects:
        templates = live_prompts if classes[s] in LIVE_CLASSES else object_prompts
        ids = args.prompt_ids if args.prompt_ids is not None else range(len(templates))
        if any(not 0 <= i < len(templates) for i in ids):
            raise ValueError(f"--prompt_ids must be in 0..{len(templates) - 1}, got {list(ids)}")
        jobs.append((s, classes[s], [templates[i].format(args.identifier, classes[s]) for i in ids]))
    return jobs


def generate_groups(args, jobs, references: dict[str, list[Path]], device) -> list[Group]:
    """Generate --num_images per prompt into out/images/<subject>/, the same seed for every prompt."""
    models = load_trained(args.model, device=device)
    size = models.unet.config.sample_size * models.vae.factor
    groups = []
    for subject, cls, prompts in jobs:
        paths, texts = [], []
        for j, prompt in enumerate(prompts):
            seeds = [args.seed + k for k in range(args.num_images)]   # image k alone: sample.py --seed SEED+k
            images = generate(models, [prompt] * args.num_images, seed=seeds, steps=args.steps,
                              guidance=args.guidance, sampler=args.sampler, height=size, width=size, progress=False)
            for k, im in enumerate(images):
                path = Path(args.out) / "images" / subject / f"{j:02d}_{k}.png"
                save_png(im, path, dict(prompt=prompt, subject=subject, class_name=cls, seed=seeds[k], index=k,
                                        steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                                        model=args.model))
                paths.append(path)
                texts.append(prompt)
        groups.append(Group(subject, paths, texts, references[subject]))
    return groups

# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = cli.Parser(description="DreamBench metrics (DINO, CLIP-I, CLIP-T) of generated images.")
    p.add_argument("--images", help="generated images: one folder, or one subfolder per subject (scoring mode)")
    p.add_argument("--reference", "--dataset", dest="reference",
                   help="real photos: one subject's folder, or a DreamBench folder with a subfolder per subject")
    p.add_argument("--prompt", help="the prompt of every image (default: each PNG's `prompt` text)")
    p.add_argument("--model", help="protocol mode: the trained model to generate with (train.py output, folder or "
                   "Hub id)")
    p.add_argument("--subjects", nargs="+", help="subjects to evaluate (default: all)")
    p.add_argument("--prompt_ids", nargs="+", type=int, help="protocol: which of the 25 prompts (default: all)")
    p.add_argument("--num_images", type=int, default=4, help="protocol: images per prompt (paper: 4)")
    p.add_argument("--identifier", default="sks", help="the subject's rare token: fills {0} in the prompts and is "
                   "removed from CLIP-T's text")
    p.add_argument("--keep_identifier", action="store_true", help="keep the identifier in CLIP-T's text")
    p.add_argument("--set", type=int, help="scoring: which sample.py set of a folder holding several (None: the "
                   "newest)")
    p.add_argument("--dino_model", default=DEFAULT_DINO, help="DINO ViT for the DINO score")
    p.add_argument("--clip_model", default=DEFAULT_CLIP, help="openai/clip-vit-base-patch32 or -large-patch14")
    p.add_argument("--face_model", help="optional: an arcface_torch IResNet checkpoint file, adds a `face` score")
    p.add_argument("--classifier", help="optional, toy runs: a FactorClassifier folder (pretrain.py's classifier/), "
                   "adds shape_acc / colour_acc / scene_acc for the factors each prompt names")
    p.add_argument("--toy_subject", choices=list(world.NOVEL_SUBJECTS), help="optional, toy runs: the novel subject "
                   "the images should show; adds subject_present and shape_present (detector.py)")
    p.add_argument("--steps", type=int, default=50, help="protocol: sampler steps")
    p.add_argument("--guidance", type=float, default=7.5, help="protocol: classifier-free guidance scale")
    p.add_argument("--sampler", default="ddim", help="protocol: ddim, ddpm, dpmpp or euler")
    p.add_argument("--seed", type=int, default=0, help="protocol: the seed of every prompt's images")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    p.add_argument("--out", default="eval", help="output folder")
    return p.parse_args(argv)


def check_model_arg(flag: str, name) -> None:
    if name and looks_like_path(str(name)) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"--{flag} '{name}' does not exist")


def check_classifier_arg(folder) -> None:
    config = Path(folder or "").expanduser() / "config.json"
    if folder and not (config.is_file() and "factors" in read_json(config)):
        raise ModelLoadError(f"--classifier '{folder}' is not a factor classifier folder (config.json with its factors, "
                             f"as pretrain.py writes assets/toy/classifier)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    # 1. everything that can be checked without loading a model
    if (args.model is None) == (args.images is None):
        raise ValueError("give --images DIR to score generated images, or --model MODEL to generate and score")
    if args.model and args.prompt:
        raise ValueError("--prompt is for scoring --images; the protocol uses DreamBench's prompts (see --prompt_ids)")
    cli.check_number("--num_images", args.num_images, ">= 1")
    cli.check_number("--seed", args.seed, ">= 0")
    cli.check_number("--set", args.set, ">= 1")
    if args.model and args.set is not None:
        raise ValueError("--set picks the images of --images to score; the protocol generates its own")
    for flag in ("model", "dino_model", "clip_model", "face_model"):
        check_model_arg(flag, getattr(args, flag))
    check_classifier_arg(args.classifier)
    cli.check_out_dir("--out", args.out)
    device = cli.check_device(args.device)
    if args.model:
        if not (args.reference and Path(args.reference).is_dir()):
            raise ValueError(f"--dataset folder '{args.reference}' does not exist: the protocol needs the subjects' "
                             f"photos")
        check_settings(8, 8, args.steps, args.guidance, args.sampler)
        jobs = protocol_jobs(args)
        references = {s: reference_images(Path(args.reference), s, len(jobs) == 1) for s, _, _ in jobs}
    else:
        groups = collect_groups(args)
    # 2. load the encoders (a download that fails should fail before hours of sampling), generate, score
    encoders = {"dino": ViTModel.from_pretrained(args.dino_model, device=device),
                "clip": CLIPModel.from_pretrained(args.clip_model, device=device)}
    if args.face_model:
        encoders["face"] = IResNet.from_file(args.face_model, device=device)
    if args.classifier:
        encoders["classifier"] = FactorClassifier.from_pretrained(Path(args.classifier).expanduser(), device=device)
    if args.toy_subject:
        encoders["toy_subject"] = args.toy_subject
    if args.model:
        groups = generate_groups(args, jobs, references, device)
    rows = score(groups, encoders, args.identifier, args.keep_identifier, device)
    keys = ["dino", "clip_i", "clip_t"] + (["face"] if args.face_model else [])
    keys += [f"{f}_acc" for f in FACTORS if any(f"{f}_acc" in r for r in rows)]  # those some prompt names
    keys += [k for k in ("subject_present", "shape_present") if any(k in r for r in rows)]
    meta = {"backbones": {"dino": str(args.dino_model), "clip": str(args.clip_model),
                          **({"face": str(args.face_model)} if args.face_model else {}),
                          **({"classifier": str(args.classifier)} if args.classifier else {}),
                          **({"detector": f"detector.py, subject {args.toy_subject}"} if args.toy_subject else {})},
            "identifier": args.identifier, "keep_identifier": args.keep_identifier, "model": args.model}
    metrics = write_outputs(Path(args.out), rows, groups, meta, keys)
    print(" ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" ({len(rows)} images) -> {args.out}/metrics.json")
    return metrics


if __name__ == "__main__":
    cli.run(main)
