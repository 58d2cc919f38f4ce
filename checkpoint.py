"""Training checkpoints that a crash cannot corrupt, and that can be sampled from directly.

A checkpoint is a folder `OUTPUT/checkpoint-STEP/` holding
- the method's result files, exactly as the final output (a diffusers model folder, a LoRA file or a
  learned-embeddings file, plus `nanobooth.json`), so `sample.py --model OUTPUT/checkpoint-STEP` works;
- `training_state.pt`: step, optimizer, lr scheduler and gradient-scaler states and the run's settings, which
  a resume is checked against (tensors and plain Python values only, read back with
  `torch.load(weights_only=True)`).

It is written into `.checkpoint-STEP.tmp/` and renamed into place when complete (a rename is atomic on
one file system), so the newest `checkpoint-*` folder is always whole; a failed write removes its `.tmp` folder,
and what a killed process leaves (which `latest_checkpoint` never picks) the next run removes (`remove_temp_files`).
"""
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hub import ModelLoadError, read_pickle

STATE_FILE = "training_state.pt"

LR_SCHEDULES = {  # multiplier of the base learning rate at optimizer step s (warmup w, total n); a checkpoint holds
    # the schedule's step, train.py and pretrain.py both read these
    "constant": lambda s, w, n: 1.0,
    "constant_with_warmup": lambda s, w, n: min(1.0, (s + 1) / max(1, w)),
    "linear": lambda s, w, n: min((s + 1) / max(1, w), max(0.0, (n - s) / max(1, n - w))),
    "cosine": lambda s, w, n: min((s + 1) / max(1, w), 0.5 * (1 + math.cos(math.pi * max(0, s - w) / max(1, n - w)))),
    # pretrain.py's: the warmup ramp times one cosine over all n steps (how the shipped toy models were made)
    "warmup_times_cosine": lambda s, w, n: min(1.0, (s + 1) / max(1, w)) * 0.5 * (1 + math.cos(math.pi * min(s, n) / n)),
}


def lr_schedule(optimizer, name: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The optimizer's learning rates times LR_SCHEDULES[name] at each step."""
    shape = LR_SCHEDULES[name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: shape(s, warmup, total))


def checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir, step: int, write_result, state: dict, total_limit: int | None = None) -> Path:
    """Write a checkpoint atomically: `write_result(folder)` writes the method's files, `state` the rest."""
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_result(tmp)
        torch.save({**state, "step": step}, tmp / STATE_FILE)
    except BaseException:                       # a failed write leaves no half checkpoint (a UNet's worth of bytes)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():                          # same step saved again (e.g. after a resume): replace it
        old = output_dir / f".checkpoint-{step}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if total_limit is not None:                 # prune the oldest, never the one just written
        for old in checkpoints(output_dir)[:-max(1, total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(folder) -> dict:
    """The training state, after checking that every file of the checkpoint is whole (a truncated or damaged
    file is named in one line, before any model loads)."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise ValueError(f"'{folder}' is not a complete checkpoint: {STATE_FILE} is missing")
    try:
        for file in sorted(folder.rglob("*.safetensors")):
            read_safetensors_header(file)
        return read_pickle(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"checkpoint '{folder}' is damaged: {e}. Resume from an earlier checkpoint, or start "
                             f"over with --overwrite_output_dir") from None


def read_safetensors_header(path) -> None:
    """Open a .safetensors file without reading its tensors: the header must cover the whole file."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"'{path}' is not a complete .safetensors file ({' '.join(str(e).split())})") from None


TEMP_FILE = re.compile(r"\..+\.tmp\d+|\.checkpoint-\d+\.(tmp|old)")   # hub.atomic_write's and save_checkpoint's


def remove_temp_files(output_dir) -> list[Path]:
    """Remove what a killed process left half-written in an output folder (a crash in Python removes its own)."""
    found = [p for p in Path(output_dir).rglob(".*") if TEMP_FILE.fullmatch(p.name)]
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return found


# ----------------------------------------------------------------------------- the run's folder

def claim_output_dir(output_dir, resume: str | None, overwrite: bool, run_files) -> tuple[Path | None, dict | None]:
    """A run owns its output folder. Returns (checkpoint to resume from, its training state), or (None, None) for a
    fresh run. A fresh run into a folder that holds another run (checkpoints or `run_files`) is refused unless
    `overwrite` (or `resume` is 'latest' and there is no checkpoint); a damaged checkpoint is refused."""
    out = Path(output_dir)
    resume_from = resolve_resume(out, resume)
    if resume_from is not None:
        return resume_from, load_state(resume_from)
    held = [p.name for p in checkpoints(out)][-1:] or [name for name in run_files if (out / name).exists()][:1]
    if held and not overwrite and resume != "latest":
        raise ValueError(f"--output_dir '{out}' holds another run ({held[0]}): resume it with --resume_from_checkpoint "
                         f"latest, replace it with --overwrite_output_dir, or choose another --output_dir")
    return None, None


def start_output_dir(output_dir, resume_step: int | None, run_files) -> None:
    """Make the folder this run's (after claim_output_dir allowed it): remove orphan temp files; a fresh run
    removes an earlier run's checkpoints and `run_files` (only where the folder holds a run: checkpoints or
    `run_files[0]`, so a folder of other files is never emptied); a resumed one the validation grids past its step."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    if resume_step is None and (checkpoints(out) or (out / run_files[0]).exists()):
        for path in checkpoints(out) + [out / name for name in run_files]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if resume_step is None:
        return
    for path in (out / "validation").glob("step-*.png"):
        if (m := re.fullmatch(r"step-(\d+)\.png", path.name)) and int(m.group(1)) > resume_step:
            path.unlink()


def resolve_resume(output_dir, resume: str | None) -> Path | None:
    """--resume_from_checkpoint: a checkpoint folder, or 'latest' (None if the output has none yet)."""
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            print(f"--resume_from_checkpoint latest: '{output_dir}' has no checkpoint yet, so this run starts fresh")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        path = Path(output_dir) / resume
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint '{resume}' is not a checkpoint folder (no {STATE_FILE})")
    return path
