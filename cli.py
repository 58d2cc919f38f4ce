"""What the four command-line scripts (train.py, sample.py, eval.py, export.py) share: an argument parser whose
errors are one line, the checks of an output path and a device made before any work, and the entry point that
turns a user's mistake into one line naming the file or the fix instead of a traceback.

    if __name__ == "__main__":
        cli.run(main)
"""
import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from hub import ModelLoadError


class Parser(argparse.ArgumentParser):
    """argparse with every flag's default in its help, and a one-line error (argparse prints the usage too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run(main) -> None:
    """The entry point: a bad input (ValueError, ModelLoadError, a file that cannot be read or written) ends the
    process with `error: <one line>` and exit code 1. Anything else is a bug and keeps its traceback."""
    try:
        main()
    except (ValueError, ModelLoadError, OSError) as e:
        sys.exit(f"error: {one_line(e)}")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if not isinstance(e, OSError) or isinstance(e, ModelLoadError) else f"{text} ({type(e).__name__})"


# ----------------------------------------------------------------------------- checks made before any work

def check_out_dir(flag: str, path) -> Path:
    """An output folder: absent (then its nearest existing parent must be a writable folder) or a writable folder.
    Writability is tried with a probe file, which also catches read-only mounts (os.access does not for root)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} '{path}' is a file, not a folder: give a folder path")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} '{path}' cannot be made: '{parent}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} '{path}' is not writable ('{parent}': {e.strerror}): choose a folder you can "
                         f"write to") from None
    return path


def check_out_file(flag: str, path, suffix: str | None = None) -> Path:
    """An output file: not a folder, its folder writable (or makeable), the right suffix."""
    path = Path(path).expanduser()
    if suffix and path.suffix != suffix:
        raise ValueError(f"{flag} must end in {suffix}, got '{path}'")
    if path.is_dir():
        raise ValueError(f"{flag} '{path}' is a folder: give a file path such as '{path / ('out' + (suffix or ''))}'")
    check_out_dir(f"the folder of {flag}", path.parent)
    return path


def check_device(name: str) -> str:
    """'auto' -> the best device here; otherwise the name must be a torch device this machine has."""
    from sample import default_device
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device '{name}' is not a torch device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False): "
                             f"use --device cpu, or install a CUDA build of PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here: use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device '{name}': only cpu, cuda and mps are supported")
    return name


def check_number(flag: str, value, rule: str) -> None:
    """`rule`: '>= 0', '> 0', '>= 1' or '[0, 1)' / '[0, 1]'; NaN and infinity always fail."""
    if value is None:
        return
    ok = math.isfinite(value) and {">= 0": value >= 0, "> 0": value > 0, ">= 1": value >= 1,
                                   "[0, 1)": 0 <= value < 1, "[0, 1]": 0 <= value <= 1}[rule]
    if not ok:
        what = {">= 1": "at least 1", "[0, 1)": "in [0, 1)", "[0, 1]": "in [0, 1]"}.get(rule, rule)
        raise ValueError(f"{flag} must be {what}, got {value}")
