"""Each seed paper's claim on the toy world: every method, several subjects and seeds, one JSON and one table.

    python benchmarks/bench_toy_claims.py                         # everything: 3 subjects x 3 seeds (hours on 2 cores)
    python benchmarks/bench_toy_claims.py --methods dreambooth --subjects checkered_star --seeds 0 --steps 5 \
        --num_images 1 --num_class_images 2 --sample_steps 2      # a smoke run: does every piece run

Every method is run with train.py's, sample.py's and eval.py's own functions, in this process, on the shipped toy
model (assets/toy/model), for each subject (world.NOVEL_SUBJECTS, photos in assets/toy/subjects/NAME) and seed
(the training seed and the sampling seed), with the prompts of benchmarks/bench_toy_methods.py ("a {token}
{class} {scene}" over the scenes no photo shows) and its settings (METHODS there: train.py --demo's, scaled per
method). The variants, each for one claim:

    dreambooth            DreamBooth with prior preservation on the 5 photos            (DreamBooth, sec. 4.3)
    dreambooth_no_prior   the same without the prior: class-prompt images drift to the subject
    dreambooth_lora       DreamBooth-LoRA, rank 8: fidelity close to full with few parameters
    textual_inversion     one token embedding: lower fidelity than DreamBooth (DreamBooth's Table 1 order)
    dreambooth_one        DreamBooth with prior on the first photo only: ComFusion's baseline
    comfusion             ComFusion on the same one photo: scene fidelity in scenes the photo does not show
    objectdriven          the object-driven method on the first photo and its mask
    objectdriven_two      two subjects learned that way, then "a <o1> {class 1} and a <o2> {class 2} {scene}"
    photoverse            PhotoVerse's adapters pretrained on toy face identities (world.face), then one reference
                          image of a held-out identity and no tuning: face_id.py's identity score
    dreambooth_face       DreamBooth on the same one reference face: PhotoVerse's baseline (score, time)

Measured per run (means and standard deviations over subjects x seeds in the summary):
    subject_present   share of the instance-prompt images where detector.py finds the subject
    scene_acc         share whose scene the factor classifier reads as the prompt's
    prompt_align      toy-CLIP image-text cosine with the prompt without the token (CLIP-T; the toy CLIP is
                      trusted with nothing else: it rated empty scenes above the subject)
    class_drift       share of class-prompt images ("a {class} {scene}") in which the subject appears, for the
                      methods trained with a class word; class_shape: share that still show the class's shape
    class_colours, class_shapes   distinct colours / shapes detector.py finds among the class-prompt images
    both_present      objectdriven_two: share of images showing both subjects
    identity, identity_chance     photoverse / dreambooth_face: face_id.py's score against the reference's
                      identity, and against the other held-out identities (what an unrelated face scores)
    trained_parameters (numbers in the output files), train_seconds (class images, made once by an untimed
    1-step warm-up run, not counted), seconds_per_image (sample.py's wall time, model load included, / images)

Writes benchmarks/results/toy_claims.json (--name) and the images under --work (kept for
benchmarks/toy_claims_figures.py); prints a markdown table. Never asserts.
"""
import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import detector  # noqa: E402
import eval as evaluate  # noqa: E402
import face_id  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import world  # noqa: E402
from bench_toy_methods import COMMON, METHODS as SETTINGS, PRIOR, TOY, one_photo_and_mask  # noqa: E402

RESULTS = HERE / "results"
SCENES = train.DEMO_SCENES
VARIANTS = ("dreambooth", "dreambooth_no_prior", "dreambooth_lora", "textual_inversion", "dreambooth_one", "comfusion",
            "objectdriven", "objectdriven_two", "photoverse", "dreambooth_face")
FACE_IDENTITIES = range(1000, 1003)       # PhotoVerse's held-out identities, one per "subject" slot
FACE_TRAIN_IDENTITIES = range(0, 200)     # its pretraining identities (world.py --faces' default)
PV_FLAGS = ["--clip_model", str(TOY / "clip"), "--dino_model", str(TOY / "dino"), "--vision_layers", "last,1,2,3",
            "--adapter_dim", "64", "--resolution", "64", "--train_batch_size", "8", "--learning_rate", "5e-4",
            "--device", "cpu",
            "--checkpointing_steps", "100000"]
# face_id.py reads a face on the world's pale face background, so PhotoVerse's prompts vary the wording, not the scene
PV_PROMPTS = ["a photo of S*", "a portrait of S*", "a picture of S*"]


# Our changes to bench_toy_methods' settings, from a sweep on the demo subject (lr x steps x guidance, 300 steps,
# 12 images; runs/sweep): full fine-tuning at 5e-5 or 1e-4 did not draw the checkered star in any image (the
# colours came out blue and teal), 2e-4 drew it in half of the snow and night images. Textual Inversion without
# its 4 accumulation steps, so that every method costs about the same per step (its lr is still scaled by batch).
OVERRIDES = {"dreambooth": ["--learning_rate", "2e-4"], "comfusion": ["--learning_rate", "2e-4"],
             "textual_inversion": ["--gradient_accumulation_steps", "1"]}


def subject_class(name: str) -> str:
    return world.NOVEL_SUBJECTS[name]["shape"]


def flags_of(variant: str) -> tuple[str, str, list[str]]:
    """(train.py method, token, flags with {placeholders}) of a variant, from bench_toy_methods.METHODS."""
    if variant == "dreambooth_no_prior":        # DreamBooth's flags without the prior-preservation ones
        token, flags = SETTINGS["dreambooth"]
        start = flags.index(PRIOR[0])
        return "dreambooth", token, flags[:start] + flags[start + len(PRIOR):]
    if variant == "dreambooth_one":
        return "dreambooth", *SETTINGS["dreambooth"]
    return variant, *SETTINGS[variant]


def trained_parameters(folder: Path, method: str) -> int:
    """The number of trained values a run's output holds: a full UNet, adapters, or the LoRA and embedding files
    its nanobooth.json names."""
    if method in ("dreambooth", "comfusion"):
        files = ["unet/diffusion_pytorch_model.safetensors"]
    elif method == "photoverse":
        files = ["photoverse.safetensors"]
    else:
        info = json.loads((folder / "nanobooth.json").read_text())
        embeddings = info.get("embeddings", [])
        files = [info[k] for k in ("lora",) if k in info] + ([embeddings] if isinstance(embeddings, str) else embeddings)
    total = 0
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return total


def timed_train(argv: list[str], out: Path, warmup: Path) -> float:
    """A 1-step warm-up run (makes the prior images once, pays first-call costs), then the timed run."""
    train.main(argv + ["--output_dir", str(warmup), "--max_train_steps", "1"])
    shutil.rmtree(warmup, ignore_errors=True)
    t0 = time.time()
    train.main(argv + ["--output_dir", str(out)])
    return time.time() - t0


def timed_sample(argv: list[str], n_images: int) -> float:
    t0 = time.time()
    sample.main(argv)
    return (time.time() - t0) / n_images


def toy_scores(images: Path, subject: str, token: str, out: Path) -> dict:
    """eval.py's toy scores of a folder: subject_present, shape_present, scene_acc, clip_t."""
    m = evaluate.main(["--images", str(images), "--reference", str(TOY / "subjects" / subject), "--clip_model",
                       str(TOY / "clip"), "--dino_model", str(TOY / "dino"), "--classifier", str(TOY / "classifier"),
                       "--toy_subject", subject, "--identifier", token, "--out", str(out), "--device", "cpu"])
    return {"subject_present": m["subject_present"], "shape_present": m.get("shape_present"),
            "scene_acc": m.get("scene_acc"), "prompt_align": m["clip_t"]}


def diversity(images: Path, found: list[dict] | None = None) -> dict:
    """Distinct colours and shapes detector.py finds among a folder's images (None: no object found)."""
    found = found or [detector.detect_any(sample_image) for sample_image in image_list(images)]
    present = [d for d in found if d["present"]]
    return {"class_colours": len({d["colour"] for d in present}), "class_shapes": len({d["shape"] for d in present}),
            "class_objects": len(present) / max(len(found), 1)}


def image_list(folder: Path) -> list:
    from PIL import Image
    return [Image.open(p).convert("RGB") for p in evaluate.generated_images(folder)]


def sample_flags(args, seed: int) -> list[str]:
    return ["--num_images", str(args.num_images), "--steps", str(args.sample_steps), "--guidance", str(args.guidance),
            "--device", "cpu", "--seed", str(seed)]


def prompts_flags(prompts: list[str]) -> list[str]:
    return [x for p in prompts for x in ("--prompt", p)]


# ----------------------------------------------------------------------------- one run per variant


def run_subject(variant: str, subject: str, seed: int, args, work: Path) -> dict:
    """DreamBooth (all forms), LoRA, Textual Inversion, ComFusion, the object-driven method: train on `subject`,
    then sample its prompts and the class prompts, and score both."""
    cls = subject_class(subject)
    method, token, flags = flags_of(variant)
    run = work / variant / subject / f"seed{seed}"
    shutil.rmtree(run, ignore_errors=True)     # a rerun starts clean (sample.py adds a new set to a used folder)
    one, mask = one_photo_and_mask(subject, work)
    scenes = work / "scenes.txt"
    scenes.write_text("\n".join(SCENES) + "\n")
    fill = dict(subject=str(one if variant in ("dreambooth_one", "comfusion") else TOY / "subjects" / subject),
                cls=cls, classes=str(work / "classes" / cls), scenes=str(scenes), one=str(one), mask=str(mask))
    argv = ["--method", method, "--pretrained_model_name_or_path", str(TOY / "model"), *COMMON,
            *[f.format(**fill) for f in flags], *OVERRIDES.get(method, []), "--seed", str(seed),
            "--max_train_steps", str(args.steps)]
    if "--num_class_images" in flags:
        argv += ["--num_class_images", str(args.num_class_images), "--class_sample_steps", str(args.sample_steps)]
    if "--num_scene_images" in flags:          # ComFusion: a tenth of them per scene
        argv += ["--num_scene_images", str(max(1, args.num_class_images // 10)), "--class_sample_steps",
                 str(args.sample_steps)]
    seconds = timed_train(argv, run / "model", work / "warmup" / variant)
    prompts = ([f"a {token} {s}" for s in SCENES] if method == "textual_inversion"
               else [f"a {token} {cls} {s}" for s in SCENES])
    n = args.num_images * len(prompts)
    per_image = timed_sample(["--model", str(run / "model"), "--out", str(run / "images"), *sample_flags(args, seed),
                              *prompts_flags(prompts)], n)
    if method != "textual_inversion":           # a class word was trained with: does its prompt drift?
        sample.main(["--model", str(run / "model"), "--out", str(run / "class_images"), *sample_flags(args, seed),
                     *prompts_flags([f"a {cls} {s}" for s in SCENES])])
    return {"variant": variant, "subject": subject, "seed": seed, "train_seconds": round(seconds, 2),
            "seconds_per_image": round(per_image, 3), "trained_parameters": trained_parameters(run / "model", method),
            **subject_scores(run, subject, token, method)}


def subject_scores(run: Path, subject: str, token: str, method: str) -> dict:
    """The scores of one run_subject run, from the images it wrote (instance prompts, and class prompts)."""
    row = toy_scores(run / "images", subject, token, run / "eval")
    if (run / "class_images").is_dir():
        drift = toy_scores(run / "class_images", subject, token, run / "class_eval")
        row |= {"class_drift": drift["subject_present"], "class_shape": drift["shape_present"],
                **diversity(run / "class_images")}
    return row


def run_two_objects(subject: str, seed: int, args, work: Path) -> dict:
    """The object-driven method on two subjects at once (their first photos and masks), prompted together."""
    names = list(world.NOVEL_SUBJECTS)
    other = names[(names.index(subject) + 1) % len(names)]
    run = work / "objectdriven_two" / subject / f"seed{seed}"
    shutil.rmtree(run, ignore_errors=True)     # a rerun starts clean (sample.py adds a new set to a used folder)
    objects = []
    for k, name in enumerate((subject, other), start=1):
        one, mask = one_photo_and_mask(name, work)
        objects.append({"image": str(next(one.iterdir()).resolve()), "mask": str(mask.resolve()), "class": subject_class(name),
                        "token": f"<o{k}>"})
    spec = run / "objects.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(objects))
    _, flags = SETTINGS["objectdriven"]
    per_object = ("--instance_data_dir", "--instance_mask", "--placeholder_token", "--initializer_token")
    keep = [f for i, f in enumerate(flags) if f not in per_object and (i == 0 or flags[i - 1] not in per_object)]
    argv = ["--method", "objectdriven", "--pretrained_model_name_or_path", str(TOY / "model"), *COMMON,
            *[f.format(classes=str(work / "classes" / "two")) for f in keep], "--objects", str(spec),
            "--seed", str(seed), "--max_train_steps", str(args.steps), "--num_class_images", str(args.num_class_images),
            "--class_sample_steps", str(args.sample_steps)]
    seconds = timed_train(argv, run / "model", work / "warmup" / "objectdriven_two")
    a, b = subject_class(subject), subject_class(other)
    prompts = [f"a <o1> {a} and a <o2> {b} {s}" for s in SCENES]
    per_image = timed_sample(["--model", str(run / "model"), "--out", str(run / "images"), *sample_flags(args, seed),
                              *prompts_flags(prompts)], args.num_images * len(prompts))
    return {"variant": "objectdriven_two", "subject": f"{subject}+{other}", "seed": seed,
            "train_seconds": round(seconds, 2), "seconds_per_image": round(per_image, 3),
            "trained_parameters": trained_parameters(run / "model", "objectdriven"),
            **two_object_scores(run, subject, other)}


def two_object_scores(run: Path, subject: str, other: str) -> dict:
    """The scores of one run_two_objects run, from the images it wrote."""
    images = image_list(run / "images")
    first = [detector.subject_present(im, subject)["present"] for im in images]
    second = [detector.subject_present(im, other)["present"] for im in images]
    scores = toy_scores(run / "images", subject, "<o1>", run / "eval")
    return {"subject_present": float(np.mean(first)), "second_present": float(np.mean(second)),
            "both_present": float(np.mean([x and y for x, y in zip(first, second)])),
            "scene_acc": scores["scene_acc"], "prompt_align": scores["prompt_align"]}


def rescore(row: dict, work: Path) -> dict:
    """A kept row with its detector-only class-prompt scores computed again from its run's images (class_shape and
    the colours and shapes among them, after a change to detector.detect_any); every other number is kept."""
    run = work / row["variant"] / row["subject"] / f"seed{row['seed']}"
    if row["variant"] in ("photoverse", "dreambooth_face", "objectdriven_two") or not (run / "class_images").is_dir():
        return row
    found = [detector.detect_any(im) for im in image_list(run / "class_images")]
    cls = subject_class(row["subject"])
    return row | {"class_shape": float(np.mean([d["shape"] == cls for d in found])),
                  **diversity(run / "class_images", found)}


# ----------------------------------------------------------------------------- summary


METRICS = ("subject_present", "second_present", "scene_acc", "prompt_align", "class_drift", "class_shape", "class_colours",
           "class_shapes", "both_present", "identity", "identity_chance", "trained_parameters", "train_seconds",
           "seconds_per_image", "seconds_to_first_image")


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant: the mean and standard deviation over its runs of every metric it has."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "runs": len(rs)}
        for k in METRICS:
            values = [r[k] for r in rs if r.get(k) is not None]
            if values:
                entry[k] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
        out.append(entry)
    return out


def table(summary: list[dict]) -> str:
    columns = [("subject present", "subject_present", 2), ("scene acc.", "scene_acc", 2),
               ("prompt align", "prompt_align", 3), ("class drift", "class_drift", 2),
               ("class colours", "class_colours", 1), ("both present", "both_present", 2),
               ("identity (chance)", "identity", 2), ("trained params", "trained_parameters", 0),
               ("train s", "train_seconds", 0), ("s / image", "seconds_per_image", 2)]

    def cell(entry, key, digits):
        if key not in entry:
            return "-"
        m, s = entry[key]["mean"], entry[key]["std"]
        text = f"{m:,.0f}" if digits == 0 and key == "trained_parameters" else f"{m:.{digits}f} ± {s:.{digits}f}"
        if key == "identity" and "identity_chance" in entry:
            text += f" ({entry['identity_chance']['mean']:.2f})"
        return text
    lines = ["| method | runs | " + " | ".join(c[0] for c in columns) + " |", "|---|---|" + "---|" * len(columns)]
    lines += [f"| {e['variant']} | {e['runs']} | " + " | ".join(cell(e, k, d) for _, k, d in columns) + " |"
              for e in summary]
    return "\n".join(lines)


RUN_SETTINGS = ("steps", "num_images", "num_class_images", "sample_steps", "guidance")   # what a kept row must match
FACE_SETTINGS = ("photoverse_steps", "adapter", "face_model")                           # and a face variant's too


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--subjects", default=",".join(world.NOVEL_SUBJECTS), help="world.NOVEL_SUBJECTS keys; the face "
                   "variants use as many held-out identities")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every per-subject method")
    p.add_argument("--photoverse_steps", type=int, default=1500, help="PhotoVerse's pretraining steps, when no "
                   "--adapter is given (once, seed 0; the seeds vary the sampling)")
    p.add_argument("--adapter", default=str(TOY / "photoverse") if (TOY / "photoverse").is_dir() else None,
                   help="a pretrained PhotoVerse adapter folder (default: the shipped assets/toy/photoverse)")
    p.add_argument("--face_model", default=str(TOY / "face_model"), help="the base model of the face variants: "
                   "the toy model with faces in its training (pretrain.py --faces)")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--num_class_images", type=int, default=50, help="prior images (ComFusion: a tenth per scene)")
    p.add_argument("--sample_steps", type=int, default=25, help="DDIM steps of every image, prior images included")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance of every image (7: the "
                   "toy model's scenes are right in 100%% of images there, 91%% at 4; benchmarks/bench_toy_world.py)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="runs/bench_toy_claims")
    p.add_argument("--name", default="toy_claims")
    p.add_argument("--rescore", action="store_true", help="kept runs: compute their class-prompt detector scores "
                   "again (after a change to detector.detect_any) instead of reusing them")
    p.add_argument("--fresh", action="store_true", help="run everything again (default: reuse the rows of runs "
                   "already made with the same settings, kept under --work/rows)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.subjects = [s for s in args.subjects.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if unknown := [m for m in args.methods if m not in VARIANTS]:
        p.error(f"unknown method(s) {unknown}: choose from {', '.join(VARIANTS)}")
    if unknown := [s for s in args.subjects if s not in world.NOVEL_SUBJECTS]:
        p.error(f"unknown subject(s) {unknown}: choose from {', '.join(world.NOVEL_SUBJECTS)}")
    if len(args.subjects) > len(FACE_IDENTITIES) and {"photoverse", "dreambooth_face"} & set(args.methods):
        p.error(f"the face variants have {len(FACE_IDENTITIES)} held-out identities; give at most that many subjects")
    for name in ("steps", "photoverse_steps", "num_images", "num_class_images", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    rows = []
    for variant in args.methods:
        for slot, subject in enumerate(args.subjects):
            for seed in args.seeds:
                # each run's row is kept beside its images: a rerun (or a stopped run, started again) reuses the
                # rows of runs with the same settings; --fresh runs everything again
                done = work / "rows" / f"{variant}-{subject}-seed{seed}.json"
                face = variant in ("photoverse", "dreambooth_face")
                key = {k: getattr(args, k) for k in RUN_SETTINGS + (FACE_SETTINGS if face else ())}
                kept_key = json.loads(done.read_text())["settings"] if done.is_file() else None
                if not args.fresh and kept_key and {k: kept_key.get(k) for k in key} == key:
                    kept = json.loads(done.read_text())["row"]
                    rows.append(rescore(kept, work) if args.rescore else kept)
                elif face:
                    rows.append(run_face(variant, slot, seed, args, work))
                elif variant == "objectdriven_two":
                    rows.append(run_two_objects(subject, seed, args, work))
                else:
                    rows.append(run_subject(variant, subject, seed, args, work))
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps({"settings": key, "row": rows[-1]}))
                print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows)
    text = table(summary)
    print(text)
    result = {"command": "python benchmarks/bench_toy_claims.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "model": str(TOY / "model"), "settings": {k: v for k, v in vars(args).items() if k != "threads"},
              "scenes": list(SCENES), "summary": summary, "rows": rows, "table": text}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)                           # atomic: a crash never leaves half a file
    return result


if __name__ == "__main__":
    main()
