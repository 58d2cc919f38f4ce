"""One picture per paper claim, from benchmarks/bench_toy_claims.py's JSON and the images it kept.

    python benchmarks/toy_claims_figures.py                     # reads benchmarks/results/toy_claims.json
    python benchmarks/toy_claims_figures.py --json benchmarks/results/toy_claims.json --out docs/toy_claims

Each figure is a grid, one labelled row per method (or identity), the images of one subject and seed, each row's
number from the JSON in its label:

    dreambooth_prior.png    "a {class} {scene}" after DreamBooth with and without the prior (class drift)
    fidelity.png            "a sks {class} {scene}" after DreamBooth, DreamBooth-LoRA and Textual Inversion
    comfusion.png           one photo, DreamBooth vs ComFusion in scenes the photo does not show
    objectdriven_two.png    two objects learned from one image each, in one prompt
    photoverse.png          per held-out identity: its reference face, then PhotoVerse's and DreamBooth's images

A figure whose runs are not in the JSON is skipped (and said so).
"""
import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import world  # noqa: E402
LABEL_WIDTH = 230
CELL = 96


def images_in(folder: Path, n: int) -> list[Image.Image]:
    paths = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")[:n]
    return [Image.open(p).convert("RGB").resize((CELL, CELL), Image.NEAREST) for p in paths]


def grid(rows: list[tuple[str, list[Image.Image]]], title: str) -> Image.Image:
    """Labelled rows of images under a title."""
    cols = max(len(ims) for _, ims in rows)
    sheet = Image.new("RGB", (LABEL_WIDTH + cols * CELL, 24 + len(rows) * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title, fill="black")
    for r, (label, ims) in enumerate(rows):
        y = 24 + r * CELL
        for k, line in enumerate(label.split("\n")):
            draw.text((6, y + 8 + 14 * k), line, fill="black")
        for c, im in enumerate(ims):
            sheet.paste(im, (LABEL_WIDTH + c * CELL, y))
    return sheet


def row_of(rows: list[dict], variant: str, subject: str, seed: int) -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["subject"] == subject and r["seed"] == seed), None)


def number(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def figures(result: dict, out: Path) -> list[Path]:
    work, rows = Path(result["settings"]["work"]), result["rows"]
    n = 6
    subjects, seed = result["settings"]["subjects"], result["settings"]["seeds"][0]
    subject = subjects[0]
    cls = world.NOVEL_SUBJECTS[subject]["shape"]
    made = []

    def save(name: str, fig_rows, title: str):
        fig_rows = [(label, ims) for label, ims in fig_rows if ims]
        if not fig_rows:
            print(f"{name}: no images for it in {work}, skipped")
            return
        out.mkdir(parents=True, exist_ok=True)
        grid(fig_rows, title).save(out / name)
        made.append(out / name)

    def run_dir(variant, subj=subject):
        return work / variant / subj / f"seed{seed}"

    prior = []
    for variant, label in (("dreambooth", "with the prior"), ("dreambooth_no_prior", "without the prior")):
        if r := row_of(rows, variant, subject, seed):
            prior.append((f"DreamBooth {label}\nsubject in class images: {number(r, 'class_drift')}\n"
                          f"colours: {number(r, 'class_colours', '{:.0f}')}",
                          images_in(run_dir(variant) / "class_images", n)))
    save("dreambooth_prior.png", prior, f"DreamBooth: 'a {cls} {{scene}}' after fine-tuning on {subject}, seed {seed}")

    fidelity = []
    for variant in ("dreambooth", "dreambooth_lora", "textual_inversion"):
        if r := row_of(rows, variant, subject, seed):
            fidelity.append((f"{variant}\nsubject present {number(r, 'subject_present')}\n"
                             f"{r['trained_parameters']:,} trained values", images_in(run_dir(variant) / "images", n)))
    save("fidelity.png", fidelity, f"'a sks {cls} {{scene}}' ('a <sks> {{scene}}' for TI), {subject}, seed {seed}")

    comfusion = []
    for variant in ("dreambooth_one", "comfusion"):
        if r := row_of(rows, variant, subject, seed):
            comfusion.append((f"{variant} (one photo)\nscene acc. {number(r, 'scene_acc')}\n"
                              f"subject present {number(r, 'subject_present')}", images_in(run_dir(variant) / "images", n)))
    save("comfusion.png", comfusion, f"one photo of {subject}: scenes it does not show, seed {seed}")

    two = [r for r in rows if r["variant"] == "objectdriven_two" and r["seed"] == seed]
    save("objectdriven_two.png", [(r["subject"].replace("+", " +\n") + f"\nboth present {number(r, 'both_present')}",
                                   images_in(work / "objectdriven_two" / r["subject"].split("+")[0] / f"seed{seed}"
                                             / "images", n)) for r in two],
         f"object-driven: two objects, one image each, in one prompt, seed {seed}")

    faces = []
    for r in rows:
        if r["variant"] in ("photoverse", "dreambooth_face") and r["seed"] == seed:
            folder = work / r["variant"] / r["subject"].replace("face ", "identity") / f"seed{seed}"
            faces.append((f"{r['variant']}, {r['subject']}\nidentity {number(r, 'identity')} "
                          f"(chance {number(r, 'identity_chance')})\nfirst image after "
                          f"{number(r, 'seconds_to_first_image', '{:.0f}')} s",
                          images_in(folder / "reference", 1) + images_in(folder / "images", n - 1)))
    save("photoverse.png", faces, f"held-out identities: the reference, then generated images, seed {seed}")
    return made


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(HERE / "results" / "toy_claims.json"))
    p.add_argument("--out", default=str(HERE.parent / "docs" / "toy_claims"))
    args = p.parse_args(argv)
    path = Path(args.json)
    if not path.is_file():
        raise SystemExit(f"error: '{path}' does not exist: run benchmarks/bench_toy_claims.py first")
    made = figures(json.loads(path.read_text()), Path(args.out))
    print("\n".join(f"wrote {p}" for p in made))
    return made


if __name__ == "__main__":
    main()
