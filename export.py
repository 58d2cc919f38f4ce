"""Export a trained model or LoRA in the formats web UIs (A1111, ComfyUI) and kohya's scripts read.

    python export.py --model runs/dreambooth --out dreambooth.safetensors            # one original-layout file
    python export.py --model runs/lora --out merged.safetensors --dtype fp32         # base + LoRA, merged
    python export.py --lora runs/lora --format kohya --out sks_dog.safetensors        # kohya / A1111 LoRA

`--model` takes anything `sample.py --model` takes (a Hub id, a diffusers folder, a single file, a train.py
output or checkpoint folder); a LoRA result is merged into its base model first. The layout is written by
single_file.py; the LoRA renaming lives in lora.py. Textual Inversion results are refused: a single file has
no tokenizer, so their embeddings file is what to share.
"""
from pathlib import Path

import torch

import cli
from hub import ModelLoadError, looks_like_path, read_json
from lora import lora_file, lora_to_kohya
from pipeline import RESULT_INFO, load_trained, save_single_file

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def check_out(out) -> None:
    if not str(out).endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors (we never write pickles), got '{out}'")
    cli.check_out_file("--out", out)


def check_model(model) -> None:
    """--model: a path must exist (a Hub id is checked when it is fetched); a folder must hold a model."""
    path = Path(model).expanduser()
    if looks_like_path(str(model)) and not path.exists():
        raise ModelLoadError(f"--model '{model}' does not exist")
    if path.is_dir() and not any((path / f).is_file() for f in ("model_index.json", RESULT_INFO)):
        raise ModelLoadError(f"--model '{model}' is a folder but not a model (no model_index.json or {RESULT_INFO}): "
                             f"give a diffusers model folder or a train.py output or checkpoint folder")


def export_model(model, out, dtype: str = "fp16") -> Path:
    """A model (any `load_trained` input) -> one original-layout .safetensors."""
    check_out(out)
    check_model(model)
    models = load_trained(model)
    return save_single_file(models, out, dtype=DTYPES[dtype], title=Path(out).stem)


def export_lora(lora, out, dtype: str = "fp16") -> Path:
    """A LoRA file, or a train.py result / checkpoint folder holding one, -> a kohya-layout .safetensors."""
    check_out(out)
    path = Path(lora)
    if path.is_dir() and (path / RESULT_INFO).is_file():
        info = read_json(path / RESULT_INFO)
        if "lora" not in info:
            raise ValueError(f"'{path}' is a {info.get('method', 'non-LoRA')} result with no LoRA file: "
                             f"export it with --model instead")
        path = path / info["lora"]
    if not lora_file(path).is_file():
        raise FileNotFoundError(f"--lora: no LoRA file at '{lora_file(path)}'")
    return lora_to_kohya(path, out, dtype=DTYPES[dtype])


def parse_args(argv=None):
    p = cli.Parser(description="Write a model as one original-layout .safetensors, or a LoRA in the "
                               "kohya / A1111 / ComfyUI layout.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="Hub id, model folder, single file, or a train.py output/checkpoint folder")
    what.add_argument("--lora", help="a LoRA .safetensors, or a train.py LoRA output/checkpoint folder")
    p.add_argument("--format", default="kohya", choices=["kohya"],
                   help="LoRA layout to write (train.py already writes the diffusers one)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="tensor precision of the file")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = export_model(args.model, args.out, args.dtype) if args.model else export_lora(args.lora, args.out, args.dtype)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
