"""Bad input to the four scripts (train.py, sample.py, eval.py, export.py): each case ends with exit code 1 (2 for
argparse's own errors), one line on stderr with no traceback, and the output folder (or the existing output file)
unchanged. The cases run in-process through each script's real entry point (`cli.run(main)`); a few run as a
subprocess to show the same at `python script.py`. Then what keeps runs apart: a NaN loss stops, one folder per
run, a resume checked against its checkpoint before any class image, sample sets, and the PNG `parameters` text."""
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import checkpoint
import cli
import eval as evaluate
import export
import sample
import train
from helpers import killed_after_first_checkpoint, one_thread  # noqa: F401  (one torch thread for this module)
from data import save_png
from pipeline import load_trained

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "assets" / "demo" / "dog"
SCRIPTS = {"train": train, "sample": sample, "eval": evaluate, "export": export}
pytestmark = pytest.mark.filterwarnings("ignore:prompt longer than 77 tokens")   # asserted where it matters


def read_only_dir() -> Path | None:
    """A folder this process cannot write into even as root (sysfs), or None."""
    try:
        cli.check_out_dir("probe", "/sys")
    except ValueError:
        return Path("/sys")
    return None


READ_ONLY = read_only_dir()
needs_read_only = pytest.mark.skipif(READ_ONLY is None, reason="no read-only folder here")


def snapshot(path: Path) -> dict | None:
    """Every file under `path` (or `path` itself) with its bytes' hash: equal snapshots = nothing changed."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in files}


def fail(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run `script`'s main(argv) through its entry point; return (exit code, the one line it printed)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: SCRIPTS[script].main([str(a) for a in argv]))
    code = e.value.code
    if isinstance(code, str):                   # sys.exit("error: ...") prints it and exits with 1
        status, message = 1, code
    else:                                       # argparse: printed to stderr, exit 2
        status, message = code, capsys.readouterr().err.strip()
    assert status in (1, 2), (status, message)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return status, message


# ----------------------------------------------------------------------------- files a user may give by mistake

@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_sd1):
    """Bad files and folders: garbage, empty, truncated and renamed weight files, a plain file, a checkpoint
    folder of each kind of damage, a class folder made for another prompt."""
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    (d / "empty.safetensors").write_bytes(b"")
    (d / "empty.ckpt").write_bytes(b"")
    save_file({"a": torch.randn(64, 64)}, str(d / "whole.safetensors"))
    whole = (d / "whole.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(whole[:len(whole) // 2])
    Image.new("RGB", (8, 8)).save(d / "photo.png")
    (d / "renamed.safetensors").write_bytes((d / "photo.png").read_bytes())   # a PNG renamed
    torch.save({"a": torch.zeros(3)}, d / "whole.ckpt")
    raw = (d / "whole.ckpt").read_bytes()
    (d / "truncated.ckpt").write_bytes(raw[:len(raw) // 2])
    (d / "a_file").write_text("not a folder")
    (d / "notamodel").mkdir()
    (d / "notamodel" / "readme.txt").write_text("hi")
    (d / "prompts_missing").mkdir()
    (d / "cat_class").mkdir()
    save_png(Image.new("RGB", (32, 32), "gray"), d / "cat_class" / "class_00000.png", {"prompt": "a photo of cat"})
    (d / "eval_images").mkdir()
    save_png(Image.new("RGB", (32, 32), "gray"), d / "eval_images" / "0000.png", {"prompt": "a sks dog"})
    d.joinpath("existing.safetensors").write_bytes(whole)
    return d


def lora_args(model, out, steps=2, *extra):
    return ["--method", "dreambooth_lora", "--pretrained_model_name_or_path", model, "--instance_data_dir", DOG,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--center_crop", "--max_train_steps",
            steps, "--output_dir", out, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_sd1):
    """A LoRA run with a checkpoint at step 1, and copies of it damaged in each way."""
    d = tmp_path_factory.mktemp("ckpt")
    train.main([str(a) for a in lora_args(tiny_sd1, d / "run", 1, "--learning_rate", "1e-3")])
    good = d / "run" / "checkpoint-1"
    assert (good / checkpoint.STATE_FILE).is_file()
    import shutil
    for name in ("state", "lora"):
        shutil.copytree(d / "run", d / f"bad_{name}")
    state = d / "bad_state" / "checkpoint-1" / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    lora = d / "bad_lora" / "checkpoint-1" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:200])
    return d


# (script, argv given the fixtures' paths, the message) ; `M` is the tiny model, `B` the bad files, `O` the output
TRAIN_NUMBERS = [
    (["--learning_rate=-1e-4"], r"--learning_rate must be > 0, got -0.0001"),
    (["--learning_rate", "0"], r"--learning_rate must be > 0, got 0.0 \(leave it out for the method's default, 0.0001\)"),
    (["--learning_rate", "nan"], r"--learning_rate must be > 0, got nan"),
    (["--learning_rate", "inf"], r"--learning_rate must be > 0, got inf"),
    (["--max_grad_norm=-1"], r"--max_grad_norm must be >= 0"),        # 0 is valid: no clipping (Textual Inversion)
    (["--max_grad_norm", "nan"], r"--max_grad_norm"),
    (["--snr_gamma=-5"], r"--snr_gamma must be > 0"),
    (["--checkpoints_total_limit=-1"], r"--checkpoints_total_limit must be at least 1"),
    (["--checkpoints_total_limit", "0"], r"--checkpoints_total_limit must be at least 1"),
    (["--num_validation_images", "0", "--validation_prompt", "a sks dog"], r"--num_validation_images must be at least 1"),
    (["--max_train_steps", "0"], r"--max_train_steps must be at least 1"),
    (["--train_batch_size", "0"], r"--train_batch_size must be at least 1"),
    (["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps must be at least 1"),
    (["--lr_warmup_steps=-1"], r"--lr_warmup_steps must be >= 0"),
    (["--adam_beta1", "1"], r"--adam_beta1 must be in \[0, 1\)"),
    (["--adam_beta2=-0.1"], r"--adam_beta2 must be in \[0, 1\)"),
    (["--adam_epsilon", "0"], r"--adam_epsilon must be > 0"),
    (["--adam_weight_decay=-0.01"], r"--adam_weight_decay must be >= 0"),
    (["--prior_loss_weight=-1"], r"--prior_loss_weight must be >= 0"),
    (["--noise_offset=-0.1"], r"--noise_offset must be >= 0"),
    (["--seed=-1"], r"--seed must be >= 0"),
    (["--rank", "0"], r"--rank must be at least 1"),
    (["--lora_alpha", "0"], r"--lora_alpha must be > 0"),
    (["--text_encoder_lr", "0"], r"--text_encoder_lr must be > 0"),
    (["--sample_steps", "0"], r"--sample_steps must be at least 1"),
    (["--class_sample_steps", "0"], r"--class_sample_steps must be at least 1"),
    (["--checkpointing_steps", "0"], r"--checkpointing_steps must be at least 1"),
    (["--validation_steps", "0"], r"--validation_steps must be at least 1"),
    (["--resolution", "0"], r"--resolution must be at least 1"),
    (["--resolution", "36"], r"--resolution must be a positive multiple of 8"),
    (["--background_weight", "2"], r"--background_weight must be in \[0, 1\]"),
    (["--learning_rate", "abc"], r"argument --learning_rate: invalid float value: 'abc'"),
    (["--method", "dreambooth_xl"], r"--method must be one of dreambooth, dreambooth_lora, .*pretrain_classifier"),
    (["--method", "pretrain_sd", "--max_train_steps", "0"], r"--max_train_steps must be at least 1"),
    (["--method", "pretrain_sd"], r"--method pretrain_sd reads only --output_dir, .*; --pretrained_model_name_or_path"),
    (["--tau_min", "500", "--tau_max", "100"], r"--tau_max is an option of --method comfusion, not of dreambooth_lora"),
]


@pytest.mark.parametrize("extra, message", TRAIN_NUMBERS, ids=[" ".join(c[0])[:40] for c in TRAIN_NUMBERS])
def test_train_numbers_and_flags_fail_before_any_model_loads(extra, message, tiny_sd1, tmp_path, capsys,
                                                             monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    monkeypatch.setattr(train, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    args = lora_args(tiny_sd1, out) + extra
    if extra[:2] == ["--method", "pretrain_sd"]:
        args = ["--method", "pretrain_sd", "--output_dir", out] + extra[2:] + (
            ["--pretrained_model_name_or_path", tiny_sd1] if len(extra) == 2 else [])
    status, text = fail("train", args, capsys)
    assert re.search(message, text), text
    assert status == (2 if "invalid float" in message else 1)
    assert snapshot(out) == before


PATH_CASES = {  # name: (script, argv, message)
    "train --output_dir is a file": ("train", lambda M, B, O: lora_args(M, B / "a_file"), r"--output_dir .* is a file"),
    "train --output_dir inside a file": ("train", lambda M, B, O: lora_args(M, B / "a_file" / "run"),
                                         r"cannot be made: .*a_file' is a file"),
    "train --class_data_dir is a file": ("train", lambda M, B, O: lora_args(M, O) + [
        "--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", B / "a_file"],
        r"--class_data_dir .*a_file' is a file"),
    "train class images of another prompt": ("train", lambda M, B, O: lora_args(M, O) + [
        "--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", B / "cat_class"],
        r"class_00000.png' was made for the prompt 'a photo of cat', not 'a photo of dog'"),
    "train --output_dir is the base model": ("train", lambda M, B, O: lora_args(M, M) + ["--overwrite_output_dir"],
                                             r"is the base model's folder: the run would overwrite it"),
    "train --device cuda without CUDA": ("train", lambda M, B, O: lora_args(M, O) + ["--device", "cuda"],
                                         r"--device cuda: this PyTorch sees no CUDA GPU"),
    "train --device nonsense": ("train", lambda M, B, O: lora_args(M, O) + ["--device", "gpu0"],
                                r"--device 'gpu0' is not a torch device"),
    "train missing base model": ("train", lambda M, B, O: lora_args(B / "no_model", O), r"folder .*no_model' does not exist"),
    "train garbage .safetensors base": ("train", lambda M, B, O: lora_args(B / "garbage.safetensors", O),
                                        r"cannot read .*garbage.safetensors': not a complete .safetensors file"),
    "train empty .safetensors base": ("train", lambda M, B, O: lora_args(B / "empty.safetensors", O),
                                      r"cannot read .*empty.safetensors'"),
    "train truncated .safetensors base": ("train", lambda M, B, O: lora_args(B / "truncated.safetensors", O),
                                          r"cannot read .*truncated.safetensors'.*not fully covered"),
    "train renamed .safetensors base": ("train", lambda M, B, O: lora_args(B / "renamed.safetensors", O),
                                        r"cannot read .*renamed.safetensors'"),
    "train empty .ckpt base": ("train", lambda M, B, O: lora_args(B / "empty.ckpt", O),
                               r"cannot read .*empty.ckpt': empty, truncated or not a PyTorch file"),
    "train truncated .ckpt base": ("train", lambda M, B, O: lora_args(B / "truncated.ckpt", O),
                                   r"cannot read .*truncated.ckpt'"),
    "train a folder that is no model": ("train", lambda M, B, O: lora_args(B / "notamodel", O),
                                        r"no tokenizer in .*notamodel': expected vocab.json"),
    "train --resume_from_checkpoint missing": ("train", lambda M, B, O: lora_args(M, O) + [
        "--resume_from_checkpoint", B / "nope"], r"is not a checkpoint folder"),
    "train --resume_from_checkpoint and --overwrite_output_dir": ("train", lambda M, B, O: lora_args(M, O) + [
        "--resume_from_checkpoint", "latest", "--overwrite_output_dir"], r"give one of them"),
    "train identifier past 77 tokens": ("train", lambda M, B, O: lora_args(M, O) + [
        "--instance_prompt", "a photo of " + "very " * 80 + "sks dog"], r"identifier 'sks' past CLIP's 77 tokens"),
    "train --scenes missing": ("train", lambda M, B, O: lora_args(M, O) + ["--method", "comfusion", "--class_prompt",
                               "a dog", "--class_data_dir", O / "c", "--scenes", B / "nope.txt"], r"--scenes file .* does not exist"),
    "sample --height 0": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a cat", "--height", "0", "--out", O],
                          r"--height must be a positive multiple of 8"),
    "sample --width 0": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a cat", "--width", "0", "--out", O],
                         r"--width must be a positive multiple of 8"),
    "sample --height -8": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--height=-8", "--out", O],
                           r"--height must be a positive multiple of 8"),
    "sample --num_images 0": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--num_images", "0", "--out", O],
                              r"--num_images must be at least 1"),
    "sample --batch_size 0": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--batch_size", "0", "--out", O],
                              r"--batch_size must be at least 1"),
    "sample --steps 0": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--steps", "0", "--out", O],
                         r"--steps must be at least 1"),
    "sample --guidance -1": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--guidance=-1", "--out", O],
                             r"--guidance must be >= 0"),
    "sample --seed -1": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--seed=-1", "--out", O],
                         r"--seed must be >= 0"),
    "sample --eta 2": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--eta", "2", "--out", O],
                       r"--eta must be in \[0, 1\]"),
    "sample --sampler heun": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--sampler", "heun", "--out", O],
                              r"--sampler must be one of ddim, ddpm, dpmpp"),
    "sample --face without photoverse": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--face",
                                         B / "photo.png", "--out", O], r"--face is an option of --method photoverse"),
    "sample --adapter without photoverse": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--adapter",
                                            B / "whole.safetensors", "--out", O], r"--adapter is an option of"),
    "sample photoverse without --adapter": ("sample", lambda M, B, O: ["--method", "photoverse", "--prompt", "S*",
                                            "--out", O], r"needs --adapter"),
    "sample no prompt": ("sample", lambda M, B, O: ["--model", M, "--out", O], r"give at least one --prompt"),
    "sample --prompts missing": ("sample", lambda M, B, O: ["--model", M, "--prompts", B / "nope.txt", "--out", O],
                                 r"--prompts file .* does not exist"),
    "sample --out is a file": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--out", B / "a_file"],
                               r"--out .*a_file' is a file, not a folder"),
    "sample --device cuda without CUDA": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--device", "cuda",
                                          "--out", O], r"--device cuda: this PyTorch sees no CUDA GPU"),
    "sample missing model": ("sample", lambda M, B, O: ["--model", B / "nope", "--prompt", "a", "--out", O],
                             r"--model folder or file .*nope' does not exist"),
    "sample garbage .safetensors model": ("sample", lambda M, B, O: ["--model", B / "garbage.safetensors", "--prompt",
                                          "a", "--out", O], r"cannot read .*garbage.safetensors'"),
    "sample truncated .safetensors model": ("sample", lambda M, B, O: ["--model", B / "truncated.safetensors",
                                            "--prompt", "a", "--out", O], r"cannot read .*truncated.safetensors'"),
    "sample empty .ckpt model": ("sample", lambda M, B, O: ["--model", B / "empty.ckpt", "--prompt", "a", "--out", O],
                                 r"cannot read .*empty.ckpt'"),
    "sample missing --lora": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--lora", B / "no.safetensors",
                              "--out", O], r"--lora: no LoRA file at .*no.safetensors'"),
    "sample garbage --lora": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--lora",
                              B / "garbage.safetensors", "--out", O], r"cannot read .*garbage.safetensors'"),
    "sample truncated --lora": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--lora",
                                B / "truncated.safetensors", "--out", O], r"cannot read .*truncated.safetensors'"),
    "sample --dtype int8": ("sample", lambda M, B, O: ["--model", M, "--prompt", "a", "--dtype", "int8", "--out", O],
                            r"argument --dtype: invalid choice"),
    "eval --out is a file": ("eval", lambda M, B, O: ["--images", B / "eval_images", "--reference", DOG, "--out",
                             B / "a_file"], r"--out .*a_file' is a file"),
    "eval --images missing": ("eval", lambda M, B, O: ["--images", B / "nope", "--reference", DOG, "--out", O],
                              r"--images folder .*nope' does not exist"),
    "eval --num_images 0": ("eval", lambda M, B, O: ["--model", M, "--dataset", DOG, "--num_images", "0", "--out", O],
                            r"--num_images must be at least 1"),
    "eval --seed -1": ("eval", lambda M, B, O: ["--model", M, "--dataset", DOG, "--seed=-1", "--out", O],
                       r"--seed must be >= 0"),
    "eval --set 0": ("eval", lambda M, B, O: ["--images", B / "eval_images", "--reference", DOG, "--set", "0", "--out", O],
                     r"--set must be at least 1"),
    "eval --set that is not there": ("eval", lambda M, B, O: ["--images", B / "eval_images", "--reference", DOG,
                                     "--set", "3", "--out", O], r"--set 3: .* has sample.py sets \[1\]"),
    "eval --device cuda without CUDA": ("eval", lambda M, B, O: ["--images", B / "eval_images", "--reference", DOG,
                                        "--device", "cuda", "--out", O], r"--device cuda: this PyTorch sees no CUDA"),
    "eval --images and --model": ("eval", lambda M, B, O: ["--images", B, "--model", M, "--out", O],
                                  r"give --images DIR to score generated images, or --model"),
    "eval --dino_model missing": ("eval", lambda M, B, O: ["--images", B / "eval_images", "--reference", DOG,
                                  "--dino_model", B / "nope", "--out", O], r"--dino_model .*nope' does not exist"),
    "eval --classifier not one": ("eval", lambda M, B, O: ["--images", B / "eval_images", "--reference", DOG,
                                  "--classifier", B / "notamodel", "--out", O], r"is not a factor classifier folder"),
    "eval --steps 0": ("eval", lambda M, B, O: ["--model", M, "--dataset", DOG, "--steps", "0", "--out", O],
                       r"--steps must be at least 1"),
    "export --out not .safetensors": ("export", lambda M, B, O: ["--model", M, "--out", O / "x.ckpt"],
                                      r"--out must end in .safetensors"),
    "export --out is a folder": ("export", lambda M, B, O: ["--model", M, "--out", B / "notamodel.safetensors"],
                                 r"--out .* is a folder"),
    "export --out inside a file": ("export", lambda M, B, O: ["--model", M, "--out", B / "a_file" / "x.safetensors"],
                                   r"the folder of --out .*a_file' is a file"),
    "export missing --model": ("export", lambda M, B, O: ["--model", B / "nope", "--out", O / "x.safetensors"],
                               r"--model .*nope' does not exist"),
    "export --model folder that is no model": ("export", lambda M, B, O: ["--model", B / "notamodel", "--out",
                                               O / "x.safetensors"], r"is a folder but not a model"),
    "export garbage .safetensors model": ("export", lambda M, B, O: ["--model", B / "garbage.safetensors", "--out",
                                          O / "x.safetensors"], r"cannot read .*garbage.safetensors'"),
    "export empty .ckpt model": ("export", lambda M, B, O: ["--model", B / "empty.ckpt", "--out", O / "x.safetensors"],
                                 r"cannot read .*empty.ckpt'"),
    "export missing --lora": ("export", lambda M, B, O: ["--lora", B / "no.safetensors", "--out", O / "x.safetensors"],
                              r"no LoRA file at .*no.safetensors'"),
    "export garbage --lora": ("export", lambda M, B, O: ["--lora", B / "garbage.safetensors", "--out",
                              O / "x.safetensors"], r"cannot read .*garbage.safetensors'"),
    "export truncated --lora": ("export", lambda M, B, O: ["--lora", B / "truncated.safetensors", "--out",
                                O / "x.safetensors"], r"cannot read .*truncated.safetensors'"),
    "export --lora of a non-LoRA result": ("export", lambda M, B, O: ["--lora", B / "ti_result", "--out",
                                           O / "x.safetensors"], r"is a textual_inversion result with no LoRA file"),
    "export neither --model nor --lora": ("export", lambda M, B, O: ["--out", O / "x.safetensors"],
                                          r"one of the arguments --model --lora is required"),
    "export --dtype fp8": ("export", lambda M, B, O: ["--model", M, "--out", O / "x.safetensors", "--dtype", "fp8"],
                           r"argument --dtype: invalid choice"),
}


@pytest.mark.parametrize("name", list(PATH_CASES))
def test_bad_files_paths_and_flags(name, bad, tiny_sd1, tmp_path, capsys):
    if "without CUDA" in name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    script, make_argv, message = PATH_CASES[name]
    (bad / "notamodel.safetensors").mkdir(exist_ok=True)
    (bad / "ti_result").mkdir(exist_ok=True)
    (bad / "ti_result" / "nanobooth.json").write_text(json.dumps({"method": "textual_inversion", "base_model": "x"}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    watched = {p: snapshot(p) for p in (out, bad, tiny_sd1)}
    status, text = fail(script, make_argv(tiny_sd1, bad, out), capsys)
    assert re.search(message, text), text
    assert status == (2 if "argument" in message else 1)
    assert {p: snapshot(p) for p in watched} == watched                 # nothing written, nothing removed


@needs_read_only
@pytest.mark.parametrize("script, make_argv", [
    ("train", lambda M, O: lora_args(M, O / "run")),
    ("sample", lambda M, O: ["--model", M, "--prompt", "a cat", "--out", O / "samples"]),
    ("eval", lambda M, O: ["--images", O, "--reference", DOG, "--out", O / "eval"]),
    ("export", lambda M, O: ["--model", M, "--out", O / "x.safetensors"]),
], ids=["train", "sample", "eval", "export"])
def test_a_read_only_output_fails_before_any_work(script, make_argv, tiny_sd1, capsys, monkeypatch):
    for module in (train, sample, export):
        monkeypatch.setattr(module, "load_models" if module is train else "load_trained",
                            lambda *a, **k: pytest.fail("a model was loaded"))
    status, text = fail(script, make_argv(tiny_sd1, READ_ONLY), capsys)
    assert status == 1 and "is not writable" in text and "choose a folder you can write to" in text, text


def test_a_failing_export_leaves_the_existing_file_alone(bad, capsys):
    before = snapshot(bad / "existing.safetensors")
    fail("export", ["--model", bad / "garbage.safetensors", "--out", bad / "existing.safetensors"], capsys)
    fail("export", ["--lora", bad / "truncated.safetensors", "--out", bad / "existing.safetensors"], capsys)
    assert snapshot(bad / "existing.safetensors") == before


# ----------------------------------------------------------------------------- resume and the output folder

RESUME_CASES = {
    "damaged training state": ("bad_state", [], r"checkpoint .*checkpoint-1' is damaged: cannot read .*training_state"),
    "truncated LoRA in the checkpoint": ("bad_lora", [], r"is damaged: .*pytorch_lora_weights.safetensors' is not a "
                                                         r"complete .safetensors file"),
    "another method": ("run", ["--method", "dreambooth"], r"it was made with --method dreambooth_lora, this run has "
                                                         r"--method dreambooth"),
    "another rank": ("run", ["--rank", "8"], r"made with --rank 4, this run has --rank 8"),
    "another base model": ("run", ["--pretrained_model_name_or_path", "{sd2}"],
                           r"made with --pretrained_model_name_or_path .*tiny-sd1.*this run has .*tiny-sd2"),
    "text encoder added": ("run", ["--train_text_encoder"], r"--train_text_encoder False, this run has "
                                                            r"--train_text_encoder True"),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resume_is_refused_before_any_model_loads_or_class_image(name, checkpoints, tiny_sd1, tiny_sd2, tmp_path,
                                                                 capsys, monkeypatch):
    folder, extra, message = RESUME_CASES[name]
    out = checkpoints / folder
    before = snapshot(out)
    monkeypatch.setattr(train, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(train, "generate", lambda *a, **k: pytest.fail("a class image was drawn"))
    extra = [str(tiny_sd2) if a == "{sd2}" else a for a in extra]
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", tmp_path / "cls"]
    status, text = fail("train", lora_args(tiny_sd1, out, 3, "--learning_rate", "1e-3", "--resume_from_checkpoint",
                                           "latest", *prior, *extra), capsys)
    assert status == 1 and re.search(message, text), text
    assert snapshot(out) == before and not (tmp_path / "cls").exists()


def test_a_second_run_into_a_used_folder_is_refused(checkpoints, tiny_sd1, capsys, monkeypatch):
    out = checkpoints / "run"
    before = snapshot(out)
    monkeypatch.setattr(train, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    status, text = fail("train", lora_args(tiny_sd1, out, 3, "--learning_rate", "1e-3"), capsys)
    assert status == 1 and re.search(r"holds another run \(checkpoint-1\): resume it with --resume_from_checkpoint "
                                     r"latest, replace it with --overwrite_output_dir", text), text
    assert snapshot(out) == before
    # a folder whose run crashed before its first checkpoint is another run too
    (out.parent / "crashed").mkdir()
    (out.parent / "crashed" / "logs.jsonl").write_text('{"step": 1}\n')
    status, text = fail("train", lora_args(tiny_sd1, out.parent / "crashed", 3), capsys)
    assert "holds another run (logs.jsonl)" in text


def test_overwrite_replaces_the_earlier_run_and_removes_orphan_temp_files(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    train.main([str(a) for a in lora_args(tiny_sd1, out, 2, "--checkpointing_steps", "1", "--validation_prompt",
                                          "a sks dog", "--validation_steps", "1", "--sample_steps", "1",
                                          "--learning_rate", "1e-3")])
    (out / ".pytorch_lora_weights.safetensors.tmp999").write_bytes(b"x" * 1000)   # left by a killed process
    (out / ".checkpoint-9.tmp").mkdir()
    (out / "notes.txt").write_text("mine")
    train.main([str(a) for a in lora_args(tiny_sd1, out, 1, "--overwrite_output_dir", "--learning_rate", "1e-3")])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "logs.jsonl", "nanobooth.json", "notes.txt",
                                                     "pytorch_lora_weights.safetensors", "train_config.json"]
    assert [json.loads(line)["step"] for line in (out / "logs.jsonl").read_text().splitlines()] == [1]


def test_a_crash_in_the_final_write_leaves_no_temp_file(tiny_sd1, tmp_path, capsys, monkeypatch):
    import lora

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"x" * 4096)                             # half a file, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(lora, "save_file", disk_full)
    out = tmp_path / "out"
    status, text = fail("train", lora_args(tiny_sd1, out, 1, "--export", "kohya"), capsys)
    assert status == 1 and "No space left on device" in text, text
    assert not [p for p in out.rglob(".*") if checkpoint.TEMP_FILE.fullmatch(p.name)]
    assert not checkpoint.checkpoints(out) and not list(out.glob(".checkpoint-*"))


def test_latest_without_a_checkpoint_says_it_starts_fresh(tiny_sd1, tmp_path, capsys):
    train.main([str(a) for a in lora_args(tiny_sd1, tmp_path / "out", 1, "--resume_from_checkpoint", "latest")])
    assert "has no checkpoint yet, so this run starts fresh" in capsys.readouterr().out


def test_a_new_learning_rate_on_resume_is_applied(tiny_sd1, tmp_path, monkeypatch):
    args = lora_args(tiny_sd1, tmp_path, 4, "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_scheduler",
                     "linear")
    killed_after_first_checkpoint(monkeypatch, lambda: train.main([str(a) for a in args]))
    train.main([str(a) for a in args + ["--learning_rate", "4e-3", "--adam_weight_decay", "0.5",
                                        "--resume_from_checkpoint", "latest"]])
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    # linear decay over 4 steps: the log's lr after step s is base * (4 - s) / 4; steps 3 and 4 use the new base
    assert lrs == pytest.approx([1e-3 * 3 / 4, 1e-3 * 2 / 4, 4e-3 * 1 / 4, 0.0])
    assert json.loads((tmp_path / "train_config.json").read_text())["learning_rate"] == 4e-3
    state = checkpoint.load_state(tmp_path / "checkpoint-4")
    assert all(g["weight_decay"] == 0.5 for g in state["optimizer"]["param_groups"])


# ----------------------------------------------------------------------------- NaN, logs, console

def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_sd1, tmp_path, capsys, monkeypatch):
    real, calls = train.METHOD_TABLE["dreambooth_lora"].loss, []

    def nan_at_step_3(batch, models, cfg):
        loss, logs = real(batch, models, cfg)
        calls.append(1)
        if len(calls) == 3:
            loss = loss * float("nan")
            logs = {**logs, "loss": float("nan")}
        return loss, logs
    monkeypatch.setitem(train.METHOD_TABLE, "dreambooth_lora",
                        dataclasses.replace(train.METHOD_TABLE["dreambooth_lora"], loss=nan_at_step_3))
    out = tmp_path / "out"
    status, text = fail("train", lora_args(tiny_sd1, out, 6, "--checkpointing_steps", "2", "--learning_rate", "1e-3"),
                        capsys)
    assert status == 1 and "the loss is nan at step 3" in text and "stopped without writing a model" in text, text
    assert "the last good checkpoint is" in text and "checkpoint-2" in text
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()                # no model written
    load_trained(out / "checkpoint-2")                                           # the kept one loads
    rows = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]   # strict JSON
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] is None


def test_a_huge_learning_rate_stops_instead_of_writing_a_nan_model(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "out"
    status, text = fail("train", lora_args(tiny_sd1, out, 30, "--learning_rate", "1e6", "--method", "dreambooth",
                                           "--checkpointing_steps", "1000"), capsys)
    assert status == 1 and "training diverged" in text and "no checkpoint had been written yet" in text, text
    assert not (out / "unet").exists() and not checkpoint.checkpoints(out)


def test_logs_are_json_with_time_and_gradient_norm_and_the_console_names_what_is_written(tiny_sd1, tmp_path, capsys):
    train.main([str(a) for a in lora_args(tiny_sd1, tmp_path, 2, "--checkpointing_steps", "1", "--validation_prompt",
                                          "a sks dog", "--validation_steps", "2", "--sample_steps", "1")])
    printed = capsys.readouterr().out

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    rows = [strict(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) and r["time"] >= 0 for r in rows)
    assert rows[1]["time"] >= rows[0]["time"]
    assert "step 1: checkpoint " in printed and "checkpoint-1" in printed and "step 2: checkpoint " in printed
    assert "step 2: validation grid " in printed and "step-000002.png" in printed
    import io
    f = io.StringIO()
    train.write_log(f, {"loss": float("nan"), "grad_norm": float("inf")})
    assert json.loads(f.getvalue()) == {"loss": None, "grad_norm": None}


# ----------------------------------------------------------------------------- prompts

def test_train_warns_on_a_prompt_over_77_tokens(tiny_sd1, tmp_path):
    prompt = "a photo of sks dog " + "very " * 80 + "sharp detailed zebra"
    with pytest.warns(UserWarning, match="drops: .*sharp detailed zebra"):
        train.main([str(a) for a in lora_args(tiny_sd1, tmp_path, 1) + ["--instance_prompt", prompt]])


def test_class_images_record_their_prompt_and_are_reused_only_for_it(tiny_sd1, tmp_path):
    cls = tmp_path / "cls"
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", cls,
             "--num_class_images", "2", "--class_sample_steps", "1"]
    train.main([str(a) for a in lora_args(tiny_sd1, tmp_path / "a", 1, *prior)])
    assert [Image.open(p).text["prompt"] for p in sorted(cls.glob("*.png"))] == ["a photo of dog"] * 2
    stamps = [p.stat().st_mtime_ns for p in sorted(cls.glob("*.png"))]
    train.main([str(a) for a in lora_args(tiny_sd1, tmp_path / "b", 1, *prior)])          # same prompt: reused
    assert [p.stat().st_mtime_ns for p in sorted(cls.glob("*.png"))] == stamps
    with pytest.raises(ValueError, match="was made for the prompt 'a photo of dog', not 'a photo of cat'"):
        train.main([str(a) for a in lora_args(tiny_sd1, tmp_path / "c", 1, *prior[:2], "a photo of cat", *prior[3:])])


# ----------------------------------------------------------------------------- sample sets, PNG text, seeds

def read_a1111(text: str) -> tuple[str, str, dict]:
    """A1111's `parse_generation_parameters` (modules/infotext_utils.py), written out: the last line holds the
    `key: value` pairs (a value may be JSON-quoted); the lines before it are the prompt, until a line starting
    with `Negative prompt:`, which starts the negative prompt."""
    *lines, last = text.strip().split("\n")
    pairs = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last))
    pairs = {k: json.loads(v) if v.startswith('"') else v for k, v in pairs.items()}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), pairs


def test_pngs_carry_a1111_parameters_and_each_seed_redraws_its_image_alone(tiny_sd1, tmp_path):
    base = ["--model", str(tiny_sd1), "--prompt", "a red car", "--negative_prompt", "blurry, dark", "--steps", "3",
            "--height", "32", "--width", "48", "--guidance", "5", "--device", "cpu"]
    paths = sample.main(base + ["--num_images", "3", "--seed", "11", "--batch_size", "3", "--out", str(tmp_path / "a")])
    for i, path in enumerate(paths):
        prompt, negative, pairs = read_a1111(Image.open(path).text["parameters"])
        assert prompt == "a red car" and negative == "blurry, dark"
        assert list(pairs)[:5] == ["Steps", "Sampler", "CFG scale", "Seed", "Size"]
        assert pairs["Steps"] == "3" and pairs["Sampler"] == "DDIM" and pairs["CFG scale"] == "5.0"
        assert pairs["Seed"] == str(11 + i) == Image.open(path).text["seed"] and pairs["Size"] == "48x32"
        assert pairs["Model"] == str(tiny_sd1)
    seed = int(read_a1111(Image.open(paths[2]).text["parameters"])[2]["Seed"])
    again = sample.main(base + ["--num_images", "1", "--seed", str(seed), "--out", str(tmp_path / "b")])[0]
    diff = np.abs(np.asarray(Image.open(paths[2]), dtype=np.int16) - np.asarray(Image.open(again), dtype=np.int16))
    assert diff.max() <= 1                                             # within 1/255
    assert np.abs(np.asarray(Image.open(paths[1]), np.int16) - np.asarray(Image.open(again), np.int16)).max() > 2


def test_a_used_sample_folder_gets_a_new_set_and_eval_scores_one_set(tiny_sd1, tmp_path, capsys):
    args = ["--model", str(tiny_sd1), "--prompt", "a sks dog", "--steps", "1", "--num_images", "2", "--device", "cpu",
            "--out", str(tmp_path)]
    first = sample.main(args)
    second = sample.main(args + ["--seed", "5"])
    assert [p.name for p in first + second] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid-2.png").is_file()
    assert [Image.open(p).text["set"] for p in first + second] == ["1", "1", "2", "2"]
    capsys.readouterr()
    assert evaluate.generated_images(tmp_path) == second
    assert "scoring the newest, set 2" in capsys.readouterr().out
    assert evaluate.generated_images(tmp_path, 1) == first


# ----------------------------------------------------------------------------- --help

def test_train_help_shows_every_flag_with_help_and_default_in_groups(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for group in ("general", "DreamBooth", "LoRA", "Textual Inversion", "ComFusion", "object-driven one-shot",
                  "PhotoVerse", "toy pretraining"):
        assert f"\n{group}:\n" in text, group
    method_help = " ".join(text.split("\n  --method STR")[1].split("\n  --pretrained")[0].split())
    assert all(f"{m}," in method_help or f"{m} (default" in method_help for m in train.METHODS), method_help
    body = text.split("\ngeneral:\n")[1]
    starts = [m.start() for m in re.finditer(r"^  --\w+(?: (?:STR|INT|FLOAT)|, --no-)", body, re.M)] + [len(body)]
    flags = [body[a:b] for a, b in zip(starts, starts[1:])]
    names = {re.match(r"\s*--(\w+)", f).group(1) for f in flags}
    import dataclasses
    assert names == {f.name for f in dataclasses.fields(train.TrainConfig)}
    for flag in flags:
        assert "(default:" in flag and len(" ".join(flag.split()[2:])) > 20, flag


@pytest.mark.parametrize("script", ["sample", "eval", "export"])
def test_other_scripts_show_defaults(script, capsys):
    with pytest.raises(SystemExit):
        SCRIPTS[script].parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default:" in text


def test_every_number_of_the_config_has_a_range():
    import dataclasses
    import typing
    hints = typing.get_type_hints(train.TrainConfig)
    numbers = {f.name for f in dataclasses.fields(train.TrainConfig)
               if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))}
    ranged = {n for names in train.RANGES.values() for n in names}
    assert numbers == ranged


# ----------------------------------------------------------------------------- at the real entry points

@pytest.mark.parametrize("argv, message", [
    (["train.py", "--learning_rate=-1e-4", "--output_dir", "{tmp}/run"], "--learning_rate must be > 0"),
    (["sample.py", "--model", "{bad}/empty.ckpt", "--prompt", "a cat", "--out", "{tmp}/s"], "cannot read"),
    (["export.py", "--lora", "{bad}/garbage.safetensors", "--out", "{tmp}/x.safetensors"], "cannot read"),
    (["eval.py", "--images", "{bad}/eval_images", "--reference", str(DOG), "--out", "{bad}/a_file"], "is a file"),
    (["sample.py", "--prompt", "a cat", "--device", "cuda", "--out", "{tmp}/s"], "sees no CUDA GPU"),
], ids=["train", "sample", "export", "eval", "sample-cuda"])
def test_the_scripts_print_one_line_and_no_traceback(argv, message, bad, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{bad}", str(bad)) for a in argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []
