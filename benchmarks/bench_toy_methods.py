"""Every personalization method on the toy world, one table.

    python benchmarks/bench_toy_methods.py                        # all methods, the demo subjects, ~15 min on 2 cores
    python benchmarks/bench_toy_methods.py --methods dreambooth,textual_inversion --subjects checkered_star

For each method and subject: train with the shipped toy model (assets/toy/model) on the subject's photos
(assets/toy/subjects/NAME; the object-driven method takes the first photo and its object mask), generate
--num_images images for each prompt "a {token} {class} {scene}" over scenes the photos never show (Textual
Inversion: "a {token} {scene}", its token stands for the whole subject), and score them with eval.py and the toy
world's encoders:
    subject similarity = toy-CLIP image cosine to the subject's photos (DreamBench's CLIP-I),
    prompt alignment   = toy-CLIP image-text cosine with the prompt without the token (CLIP-T),
    scene accuracy     = share of images whose scene the factor classifier reads as the prompt's,
and the training wall time (class/prior images are made once per class by an untimed 1-step warm-up run and not counted; stage 1 of the
object-driven method and ComFusion's fusion stream are counted). The same rows for the base model with the
class prompt ("a {class} {scene}") give the reference a method must beat on subject similarity.
Settings per method are in METHODS (steps and learning rates scaled to the toy model: our choice, not the
papers'). Writes benchmarks/results/toy_methods.json and prints a markdown table; never asserts.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluate  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import world  # noqa: E402

TOY = ROOT / "assets" / "toy"
RESULTS = Path(__file__).resolve().parent / "results"
SCENES = train.DEMO_SCENES

# method -> (token, extra train.py flags); {subject}, {cls}, {mask}, {classes}, {scenes} are filled per run
COMMON = ["--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "300", "--checkpointing_steps", "1000",
          "--sample_steps", "25", "--device", "cpu", "--seed", "0"]
PRIOR = ["--with_prior_preservation", "--class_prompt", "a {cls}", "--class_data_dir", "{classes}",
         "--num_class_images", "50", "--class_sample_steps", "25"]
METHODS = {
    "dreambooth": ("sks", ["--instance_data_dir", "{subject}", "--instance_prompt", "a sks {cls}",
                           "--learning_rate", "5e-5", *PRIOR]),
    "dreambooth_lora": ("sks", ["--instance_data_dir", "{subject}", "--instance_prompt", "a sks {cls}",
                                "--learning_rate", "1e-3", "--rank", "8", *PRIOR]),
    "textual_inversion": ("<sks>", ["--instance_data_dir", "{subject}", "--placeholder_token", "<sks>",
                                    "--initializer_token", "{cls}"]),    # diffusers' recipe: 5e-4 x 2 x 4
    "comfusion": ("sks", ["--instance_data_dir", "{subject}", "--instance_prompt", "a sks {cls}", "--class_prompt",
                          "a {cls}", "--class_data_dir", "{classes}-scenes", "--scenes", "{scenes}",
                          "--num_scene_images", "4", "--class_sample_steps", "25", "--learning_rate", "5e-5",
                          "--fusion_guidance", "4", "--dino_model", str(TOY / "dino"),
                          "--clip_model", str(TOY / "clip")]),
    "objectdriven": ("<o1>", ["--instance_data_dir", "{one}", "--instance_mask", "{mask}", "--placeholder_token",
                              "<o1>", "--initializer_token", "{cls}", "--learning_rate", "1e-3",
                              "--clip_model", str(TOY / "clip"), "--class_data_dir", "{classes}-objectdriven",
                              "--num_class_images", "50", "--class_sample_steps", "25"]),
}


def subject_class(name: str) -> str:
    return world.NOVEL_SUBJECTS[name]["shape"]


def prompts_for(method: str | None, token: str, cls: str) -> list[str]:
    if method is None:                                   # the base model, class prompt
        return [f"a {cls} {s}" for s in SCENES]
    if method == "textual_inversion":
        return [f"a {token} {s}" for s in SCENES]
    return [f"a {token} {cls} {s}" for s in SCENES]


def one_photo_and_mask(name: str, work: Path) -> tuple[Path, Path]:
    """The object-driven method's input: the subject's first photo alone in a folder, and its object mask."""
    image, mask = world.novel_subject(name, 1, with_masks=True)[0]
    folder = work / "inputs" / name
    (folder / "one").mkdir(parents=True, exist_ok=True)
    image.save(folder / "one" / "00.png")
    mask.save(folder / "mask.png")
    return folder / "one", folder / "mask.png"


def score(images_dir: Path, subject: str, token: str, out: Path) -> dict:
    metrics = evaluate.main(["--images", str(images_dir), "--reference", str(TOY / "subjects" / subject),
                             "--clip_model", str(TOY / "clip"), "--dino_model", str(TOY / "dino"),
                             "--classifier", str(TOY / "classifier"), "--identifier", token, "--out", str(out),
                             "--device", "cpu"])
    return {"subject_sim": metrics["clip_i"], "prompt_align": metrics["clip_t"], "scene_acc": metrics.get("scene_acc")}


def run(method: str | None, subject: str, args, work: Path) -> dict:
    cls = subject_class(subject)
    out = work / (method or "base") / subject
    token = METHODS[method][0] if method else ""
    seconds = 0.0
    model = str(TOY / "model")
    if method is not None:
        scenes = work / "scenes.txt"
        scenes.write_text("\n".join(SCENES) + "\n")
        one, mask = one_photo_and_mask(subject, work) if method == "objectdriven" else (None, None)
        fill = dict(subject=str(TOY / "subjects" / subject), cls=cls, classes=str(work / "classes" / cls),
                    scenes=str(scenes), one=str(one), mask=str(mask))
        flags = [f.format(**fill) for f in METHODS[method][1]]
        argv = ["--method", method, "--pretrained_model_name_or_path", model, *COMMON, *flags]
        # a 1-step warm-up run makes the prior images (once per class) and pays first-call costs, untimed
        train.main(argv + ["--output_dir", str(work / "warmup" / method), "--max_train_steps", "1"])
        t0 = time.time()
        train.main(argv + ["--output_dir", str(out / "model"), "--max_train_steps", str(args.steps)])
        seconds = time.time() - t0
        model = str(out / "model")
    sample.main(["--model", model, "--out", str(out / "images"), "--num_images", str(args.num_images), "--steps", "25",
                 "--guidance", str(args.guidance), "--device", "cpu", "--seed", "1"]
                + [x for p in prompts_for(method, token, cls) for x in ("--prompt", p)])
    return {"method": method or "base model (class prompt)", "subject": subject, "train_seconds": round(seconds, 1),
            **score(out / "images", subject, token or "sks", out / "eval")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--subjects", default=",".join(world.NOVEL_SUBJECTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--guidance", type=float, default=train.DEMO_GUIDANCE)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="runs/bench_toy_methods")
    p.add_argument("--name", default="toy_methods")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    subjects = args.subjects.split(",")
    work = Path(args.work)
    rows = [run(m, s, args, work) for s in subjects for m in [None, *methods]]
    summary = []
    for m in [rows[0]["method"], *methods]:
        rs = [r for r in rows if r["method"] == m]
        summary.append({"method": m, **{k: float(np.mean([r[k] for r in rs if r[k] is not None]))
                                        for k in ("subject_sim", "prompt_align", "scene_acc", "train_seconds")}})
    table = ["| method | subject similarity | prompt alignment | scene accuracy | training time (s) |",
             "|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['subject_sim']:.3f} | {r['prompt_align']:.3f} | {r['scene_acc']:.2f} | "
              f"{r['train_seconds']:.0f} |" for r in summary]
    print("\n".join(table))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({
        "command": "python benchmarks/bench_toy_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "subjects": subjects, "scenes": list(SCENES), "guidance": args.guidance, "steps": args.steps,
        "summary": summary, "rows": rows, "table": "\n".join(table)}, indent=2))
    return summary


if __name__ == "__main__":
    main()
