"""What the four command-line scripts (train.py, sample.py, eval.py, export.py) share: an argument parser whose
errors are one line (and train.py's, built from its config dataclass and the comments beside its fields), the
checks of an output path, a device and a number made before any work, and the entry point that turns a user's
mistake into one line naming the file or the fix instead of a traceback.

    if __name__ == "__main__":
        cli.run(main)
"""
import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
import tempfile
import textwrap
import typing
from pathlib import Path

import torch

from hub import ModelLoadError
from pipeline import default_device


class Parser(argparse.ArgumentParser):
    """argparse with every flag's default in its help, and a one-line error (argparse prints the usage too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def field_help(cls) -> list[tuple[str, str, dict[str, str]]]:
    """[(group title, group text, {field: help})] read from the comments in dataclass `cls`'s source: the comment
    after a field is its help, continued on comment lines indented past the fields; a comment line at the fields'
    own indentation starts a group ("ComFusion (details): more" -> title "ComFusion", text the whole line)."""
    groups = [("general", "", {})]
    fields, name, in_doc = None, None, False
    source = inspect.getsource(cls).splitlines()
    for line in source[next(i for i, text in enumerate(source) if text.startswith("class ")) + 1:]:
        if line.count('"""') % 2:                      # the class docstring
            in_doc = not in_doc
            continue
        if in_doc or not line.strip() or line.strip().startswith('"""'):
            continue
        indent = len(line) - len(line.lstrip())
        code, _, comment = ("", "", line.lstrip()[1:]) if line.lstrip().startswith("#") else line.partition("  # ")
        comment = comment.strip()
        if code.strip():                               # "name: type = default  # help"
            fields, name = groups[-1][2], code.split(":")[0].strip()
            fields[name] = comment
        elif indent == 4 and (fields is not None or groups[-1][2]):   # a group heading
            groups.append((re.split(r" \(|: |; ", comment)[0], comment, {}))
            fields = None
        elif fields is None:                           # the heading goes on
            title, text, names = groups[-1]
            groups[-1] = (title, f"{text} {comment}", names)
        else:                                          # the field's help goes on
            fields[name] = f"{fields[name]} {comment}"
    return groups


def config_parser(cls, description: str, epilog: str = "", extra_help: dict | None = None) -> Parser:
    """A parser with one flag per field of dataclass `cls`, its type from the annotation, its help and group from
    the comments (`field_help`), its default shown; a bool is --flag / --no-flag."""
    p = Parser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults, kinds = {f.name: f.default for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    for title, text, names in field_help(cls):
        group = p.add_argument_group(title, textwrap.fill(text, 100) if text else None)
        for name, help_text in names.items():
            kind = next(k for k in typing.get_args(kinds[name]) or (kinds[name],) if k is not type(None))
            help_text = help_text.replace("%", "%%") + (extra_help or {}).get(name, "")
            if kind is bool:
                action = group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                                            default=defaults[name], help=help_text)
            else:
                action = group.add_argument(f"--{name}", type=kind, default=defaults[name], help=help_text,
                                            metavar=kind.__name__.upper())
            if "%(default)" not in action.help:        # (Python 3.10 adds it to BooleanOptionalAction itself)
                action.help += " (default: %(default)s)"
    return p


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
