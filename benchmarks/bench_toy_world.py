"""Does the shipped toy model draw what its prompts ask for?

Target: for 100 prompts "a {colour} {shape} {scene}" the shipped model's images reach shape >= 85%, colour and
scene >= 95%, by two scorers that an empty scene cannot fool:
  - detector:   detector.py's render-and-compare fit among the pixels of the asked colour: the shape is right
                only when an object of the asked colour is present and the asked shape fits it best; the colour is
                right when an object of that colour is present; the scene is the classifier's.
  - classifier: the factor classifier (`<toy>/classifier`, image_encoders.FactorClassifier, scored as eval.py
                does, `eval.factor_hits`) with an object-present check: its shape and colour count only where the
                detector finds an object of the asked colour (the classifier has no "nothing there" answer, and
                called the night sky's dots a star).
Measurements:

    1. real      --n_real one-object images of world stream --world_seed: held out, pretraining draws its
                 pool from stream `seed` of <toy>/pretrain.json (0), images 0..pool_size-1
    2. rendered  the eval prompts' own factors drawn by the world (`world.image_of`): the same 100 factor
                 combinations as 3, as real images, so 3 has a ceiling to read against
    3. generated one image per prompt of `world.eval_prompts(--n, --seed)` ("a red star on the beach") from
                 `<toy>/model`: DDIM, --steps, classifier-free guidance, the same initial noise per prompt
                 for every --guidance of a sweep (`--guidance 2,4,6`)

Columns: per-factor accuracy, `all` = all three right. Benchmarks never assert: the `target` column says
whether the threshold is met. A per-shape table follows (the generated images of the best guidance). Writes --out (JSON: settings, machine, the table, every image's
prompt and predicted factors) and beside it a contact sheet of the first --sheet generated images of the
best guidance (same name, .png; a factor in red is one the classifier sees otherwise).

    python benchmarks/bench_toy_world.py --threads 1                      # assets/toy, 100 prompts, guidance 4
    python benchmarks/bench_toy_world.py --threads 1 --guidance 2,4,6     # pick the guidance
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import common

import detector  # noqa: E402  (common puts the repository root on the path)
import eval  # noqa: E402
import world  # noqa: E402
from image_encoders import FactorClassifier  # noqa: E402
from pipeline import check_settings, generate, initial_latents, load_models  # noqa: E402

FACTORS = eval.FACTORS
TARGETS = {"real": {"shape": 0.95, "colour": 0.95, "scene": 0.95},
           "generated": {"shape": 0.85, "colour": 0.95, "scene": 0.95}}   # thresholds per factor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", default="assets/toy", help="pretrain.py's output folder: model/, classifier/")
    p.add_argument("--n", type=int, default=100, help="eval prompts (one generated image each)")
    p.add_argument("--seed", type=int, default=0, help="eval prompts and initial noise")
    p.add_argument("--n_real", type=int, default=1000, help="held-out real world images for the classifier")
    p.add_argument("--world_seed", type=int, default=12345, help="world stream of the held-out real images")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", default="4.0", help="classifier-free guidance scale, or a comma list to sweep")
    p.add_argument("--batch_size", type=int, default=50, help="images per generate() call")
    p.add_argument("--sheet", type=int, default=50, help="images on the contact sheet (the first prompts')")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the core count)")
    p.add_argument("--out", default=str(common.RESULTS / "toy_world.json"), help="results JSON; the sheet: .png")
    args = p.parse_args(argv)
    try:
        args.guidance = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        sys.exit(f"error: --guidance must be a number or a comma list of numbers, got '{args.guidance}'")
    return args


def check(args) -> dict:
    """Everything that can be wrong before a model loads; returns <toy>/pretrain.json (or {})."""
    toy = Path(args.toy)
    for sub, what in (("model/model_index.json", "the diffusers-layout model"),
                      ("classifier/config.json", "the factor classifier")):
        if not (toy / sub).is_file():
            sys.exit(f"error: '{toy / sub}' is missing: --toy must be pretrain.py's output folder ({what} lives "
                     f"in {sub.split('/')[0]}/)")
    for g in args.guidance:
        check_settings(64, 64, args.steps, g, "ddim")
    if min(args.n, args.n_real, args.batch_size) < 1:
        sys.exit("error: --n, --n_real and --batch_size must be at least 1")
    info = json.loads((toy / "pretrain.json").read_text()) if (toy / "pretrain.json").is_file() else {}
    if args.world_seed == info.get("seed", 0):
        sys.exit(f"error: --world_seed {args.world_seed} is the stream pretraining drew its images from: pick another")
    return info

# ----------------------------------------------------------------------------- images and their factors


def real_images(n: int, seed: int) -> tuple[list[Image.Image], list[dict]]:
    """The first `n` one-object images of world stream `seed` (two-object images have no single label)."""
    images, expected = [], []
    index = 0
    while len(images) < n:
        image, _, f = world.sample(seed, index)
        index += 1
        if len(f["objects"]) == 1:
            images.append(image)
            expected.append({"shape": f["objects"][0].shape, "colour": f["objects"][0].colour, "scene": f["scene"]})
    return images, expected


def rendered_images(factors: list[dict], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng([seed, 31337])
    return [world.image_of(f["shape"], f["colour"], f["scene"], rng) for f in factors]


def generated_images(models, prompts: list[str], seed: int, steps: int, guidance: float,
                     batch_size: int) -> list[Image.Image]:
    """One image per prompt; image i starts from row i of one seeded noise tensor, whatever the batch size."""
    size = models.unet.config.sample_size * models.vae.factor
    latents = initial_latents(len(prompts), size, size, seed, factor=models.vae.factor)
    images = []
    for start in range(0, len(prompts), batch_size):
        images += generate(models, prompts[start:start + batch_size], seed=seed, steps=steps, guidance=guidance,
                           height=size, width=size, latents=latents[start:start + batch_size], progress=False)
    return images


def detector_hits(images: list[Image.Image], expected: list[dict], classifier_hits: list[dict]) -> list[dict]:
    """Per image: shape right when an object of the asked colour is present and fits the asked shape best, colour
    right when one is present; the scene as the classifier sees it."""
    found = [detector.detect(im, e["colour"]) for im, e in zip(images, expected)]
    return [{"shape": float(d["present"] and d["shape"] == e["shape"]), "colour": float(d["present"]),
             "scene": c["scene"], "present": d["present"], "detected": d["shape"] if d["present"] else None}
            for d, e, c in zip(found, expected, classifier_hits)]


def with_presence(classifier_hits: list[dict], found: list[dict]) -> list[dict]:
    """The classifier's shape and colour count only where the detector found an object of the asked colour."""
    return [{"shape": c["shape"] * d["present"], "colour": c["colour"] * d["present"], "scene": c["scene"]}
            for c, d in zip(classifier_hits, found)]


def accuracy_row(name: str, hits: list[dict], target: dict | None, seconds: float | None = None) -> dict:
    row = {"name": name, "images": len(hits), **{f: float(np.mean([h[f] for h in hits])) for f in FACTORS}}
    row["all"] = float(np.mean([all(h[f] for f in FACTORS) for h in hits]))
    row["target"] = None if target is None else ("met" if all(row[f] >= target[f] for f in FACTORS) else "not met")
    row["s_per_image"] = None if seconds is None else seconds / len(hits)
    return row

# ----------------------------------------------------------------------------- output


def markdown_table(rows: list[dict]) -> str:
    head = ["images", "shape", "colour", "scene", "all three", "target", "s/image"]
    lines = ["| " + " | ".join(["scorer, images", *head]) + " |", "|---" + "|---:" * len(head) + "|"]
    for r in rows:
        cells = [str(r["images"]), *(f"{100 * r[k]:.1f}%" for k in (*FACTORS, "all")), r["target"] or "-",
                 "-" if r["s_per_image"] is None else f"{r['s_per_image']:.3f}"]
        lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    return "\n".join(lines)


def per_shape_table(factors: list[dict], by: dict[str, list[dict]]) -> tuple[str, dict]:
    """Shape accuracy per asked shape, for each scorer in `by` ({name: hits})."""
    table = {shape: {name: float(np.mean([h["shape"] for h, f in zip(hits, factors) if f["shape"] == shape]))
                     for name, hits in by.items()} | {"prompts": sum(f["shape"] == shape for f in factors)}
             for shape in world.SHAPES}
    lines = ["| shape | prompts | " + " | ".join(by) + " |", "|---|---:" + "|---:" * len(by) + "|"]
    lines += [f"| {shape} | {row['prompts']} | " + " | ".join(f"{100 * row[n]:.0f}%" for n in by) + " |"
              for shape, row in table.items()]
    return "\n".join(lines), table


def contact_sheet(images: list[Image.Image], expected: list[dict], hits: list[dict], title: str,
                  cols: int = 10) -> Image.Image:
    """Each image over its prompt's factors: "colour shape" and "scene", a factor in red where the scorer
    (the detector; the scene: the classifier) sees otherwise."""
    cw, ch, top = 80, 64 + 26, 16
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cw, top + rows * ch), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill="black")
    for i, (image, e, h) in enumerate(zip(images, expected, hits)):
        x, y = (i % cols) * cw, top + (i // cols) * ch
        sheet.paste(image, (x + (cw - image.width) // 2, y))
        for line, factors in ((0, ("colour", "shape")), (1, ("scene",))):
            words = [(e[f], "black" if h[f] else "red") for f in factors]
            width = sum(draw.textlength(w + " ") for w, _ in words) - draw.textlength(" ")
            tx = x + (cw - width) / 2
            for word, colour in words:
                draw.text((tx, y + 65 + 12 * line), word, fill=colour)
                tx += draw.textlength(word + " ")
    return sheet

# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    pretrain_info = check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    machine = {"device": args.device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "cpu": common.cpu_name(), "torch": torch.__version__, "load_before": round(os.getloadavg()[0], 2)}
    toy = Path(args.toy)
    classifier = FactorClassifier.from_pretrained(toy / "classifier", device=args.device)
    prompts, factors = zip(*world.eval_prompts(args.n, args.seed))
    prompts, factors = list(prompts), list(factors)

    images, expected = real_images(args.n_real, args.world_seed)
    real_hits = eval.factor_hits(classifier, images, expected)
    rows = [accuracy_row(f"classifier, real: world stream {args.world_seed}", real_hits, TARGETS["real"]),
            accuracy_row(f"detector, real: world stream {args.world_seed}", detector_hits(images, expected, real_hits),
                         TARGETS["real"])]
    rendered = rendered_images(factors, args.seed)
    rendered_hits = eval.factor_hits(classifier, rendered, factors)
    rows.append(accuracy_row("detector, rendered: the prompts' factors", detector_hits(rendered, factors, rendered_hits),
                             None))
    print(f"scorers: {rows[0]['images']} real images, {rows[2]['images']} renders of the prompts' factors",
          flush=True)

    models = load_models(toy / "model", device=args.device)
    generated = {}
    for g in args.guidance:
        start = time.time()
        images = generated_images(models, prompts, args.seed, args.steps, g, args.batch_size)
        seconds = time.time() - start
        classifier_hits = eval.factor_hits(classifier, images, factors)
        hits = detector_hits(images, factors, classifier_hits)
        checked = with_presence(classifier_hits, hits)
        predicted = classifier.predict(images)
        rows.append(accuracy_row(f"detector, generated: guidance {g:g}", hits, TARGETS["generated"], seconds))
        rows.append(accuracy_row(f"classifier + object present, generated: guidance {g:g}", checked,
                                 TARGETS["generated"], seconds))
        generated[g] = {"images": images, "hits": hits, "checked": checked, "predicted": predicted,
                        "rows": rows[-2:]}
        print(f"guidance {g:g}: {len(images)} images in {seconds:.0f} s, detector "
              + ", ".join(f"{f} {100 * rows[-2][f]:.1f}%" for f in FACTORS), flush=True)
    machine["load_after"] = round(os.getloadavg()[0], 2)

    # the best guidance: the highest worst factor, then the highest mean
    gen_rows = {g: generated[g]["rows"][0] for g in args.guidance}
    best = max(args.guidance, key=lambda g: (min(gen_rows[g][f] for f in FACTORS),
                                             np.mean([gen_rows[g][f] for f in FACTORS])))
    table = markdown_table(rows)
    shapes, shape_rows = per_shape_table(factors, {"detector": generated[best]["hits"],
                                                   "classifier + present": generated[best]["checked"]})
    print(f"\ntoy world, {args.toy}: {args.n} prompts (seed {args.seed}), DDIM {args.steps} steps; classifier on "
          f"{args.n_real} held-out real images; {machine['threads']} threads, {machine['cpu']}\n")
    print(table)
    print(f"\nshape accuracy per asked shape, guidance {best:g}:\n\n{shapes}")
    print(f"\ntargets (generated): shape >= {TARGETS['generated']['shape']:.0%}, colour and scene >= "
          f"{TARGETS['generated']['colour']:.0%}; best guidance {best:g}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = generated[best]
    sheet = contact_sheet(chosen["images"][:args.sheet], factors, chosen["hits"],
                          f"{args.toy}: guidance {best:g}, {args.steps} DDIM steps, seed {args.seed}; red = the "
                          f"detector (scene: the classifier) sees otherwise")
    # a 256-colour palette keeps the committed PNG small (~3x); the world's flat colours come through unchanged
    sheet.quantize(256).save(out.with_suffix(".png"), optimize=True)
    result = {"command": "python benchmarks/bench_toy_world.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "toy": args.toy, "pretrain_seed": pretrain_info.get("seed"), "n": args.n, "seed": args.seed,
              "n_real": args.n_real, "world_seed": args.world_seed, "steps": args.steps, "sampler": "ddim",
              "guidance": args.guidance, "best_guidance": best, "targets": TARGETS, "machine": machine,
              "wall_s": time.time() - t0, "rows": rows, "table": table, "per_shape": shape_rows, "shape_table": shapes,
              "generated": {f"{g:g}": [{"prompt": p, "expected": f, "detected": r["hits"][i]["detected"],
                                       "predicted": {k: v[i] for k, v in r["predicted"].items()}}
                                      for i, (p, f) in enumerate(zip(prompts, factors))]
                            for g, r in generated.items()}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
