"""How often the toy world's detector (detector.py) is right, on real renders and on their round trips through
the shipped VAE (what generated images look like at best): the calibration the README quotes.

    python benchmarks/bench_detector.py            # assets/toy/model's VAE -> results/detector.json

Rows: shapes of the asked colour (every shape x colour x scene, valid pairs, both sizes), each novel subject in
every scene at both sizes (found), and the subject detector's false positives on empty scenes, on plain and
striped shapes in the subject's colours, and on the other subjects. Benchmarks never assert.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import common

import detector  # noqa: E402  (common puts the repository root on the path)
import world  # noqa: E402
from vae import VAE  # noqa: E402


def round_trip(vae: VAE, images: list) -> list[np.ndarray]:
    x = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = torch.cat([vae.decode(vae.encode(x[i:i + 64]).mean) for i in range(0, len(x), 64)])
    return list(((y.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="assets/toy/model", help="the model whose VAE makes the round trips")
    p.add_argument("--out", default=str(common.RESULTS / "detector.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vae = VAE.from_pretrained(args.model)
    rng, scenes = np.random.default_rng(5), list(world.SCENES)
    shapes = [(s, c, sc, z) for s in world.SHAPES for c in world.COLOURS for sc in scenes for z in world.SIZES
              if world.valid(c, sc)][::7]
    shape_images = [world.image_of(s, c, sc, rng, size=z) for s, c, sc, z in shapes]
    subjects = {n: [world.image_of(scene=sc, rng=rng, size=z, **spec) for sc in scenes for z in world.SIZES
                    for _ in range(2)] for n, spec in world.NOVEL_SUBJECTS.items()}
    empty = [world.render({"scene": sc, "objects": []}, rng) for sc in scenes for _ in range(3)]
    plain = {n: [world.image_of(spec["shape"], c, sc, rng, texture=t) for c in (spec["colour"], spec["second_colour"])
                 for sc in scenes for t in ("plain", "striped") if world.valid(c, sc)]
             for n, spec in world.NOVEL_SUBJECTS.items()}
    rows = []
    for kind in ("real", "vae"):
        def view(images):
            return images if kind == "real" else round_trip(vae, images)
        found = [detector.detect(im, c) for im, (s, c, _, _) in zip(view(shape_images), shapes)]
        rows.append({"images": kind, "what": "shape of the asked colour named right", "n": len(shapes),
                     "rate": float(np.mean([d["present"] and d["shape"] == s for d, (s, *_) in zip(found, shapes)]))})
        for n in world.NOVEL_SUBJECTS:
            def rate(images):
                return float(np.mean([detector.subject_present(im, n)["present"] for im in view(images)]))
            others = [im for o in world.NOVEL_SUBJECTS if o != n for im in subjects[o]]
            rows += [{"images": kind, "what": f"{n}: found", "n": len(subjects[n]), "rate": rate(subjects[n])},
                     {"images": kind, "what": f"{n}: fires on empty scenes", "n": len(empty), "rate": rate(empty)},
                     {"images": kind, "what": f"{n}: fires on plain/striped shapes in its colours", "n": len(plain[n]),
                      "rate": rate(plain[n])},
                     {"images": kind, "what": f"{n}: fires on the other subjects", "n": len(others), "rate": rate(others)}]
    table = "\n".join(["| images | what | n | rate |", "|---|---|---:|---:|"]
                      + [f"| {r['images']} | {r['what']} | {r['n']} | {100 * r['rate']:.1f}% |" for r in rows])
    print(table)
    result = {"command": "python benchmarks/bench_detector.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "rows": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {args.out}")
    return result


if __name__ == "__main__":
    main()
