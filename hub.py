"""Loading models from the Hugging Face Hub or a local folder, in the diffusers layout.

An SD repo (or what `StableDiffusionPipeline.save_pretrained` writes) looks like

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/config.json, model.safetensors
    tokenizer/vocab.json, merges.txt (or tokenizer.json)
    unet/config.json, diffusion_pytorch_model.safetensors
    vae/config.json,  diffusion_pytorch_model.safetensors

Our models name their modules exactly as these files name their tensors, so a state dict loads with
`load_state_dict(strict=True)` and no key map. This file only finds files and reads tensors:
- `component_dir` turns a Hub id or a local folder into the local folder of one component, fetching
  only the files that component needs (`huggingface_hub.snapshot_download(allow_patterns=...)`);
- `load_model` builds a model on the `meta` device (no memory, no random init), reads the weights
  (safetensors; a pickle only through `torch.load(weights_only=True)`), names any missing or
  unexpected keys, and loads them `strict=True`.
"""
import json
import os
import pickle
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError, safe_open


class ModelLoadError(RuntimeError):
    """A model could not be found or its weights do not fit: the message says what to do."""


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith((".safetensors", ".ckpt"))


def resolve(name_or_path, allow_patterns: list[str], revision: str | None = None) -> Path:
    """A local folder as it is; a Hub repo id -> its cached snapshot holding just `allow_patterns`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if looks_like_path(name):
        raise ModelLoadError(f"model folder '{name}' does not exist: pass an existing folder in the diffusers "
                             f"layout or a Hub repo id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        why = "it is not in the local cache and the Hub cannot be reached"
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            why = "it is not in the local cache and HF_HUB_OFFLINE is set"
        raise ModelLoadError(f"cannot load '{name}': {why}. Go online (unset HF_HUB_OFFLINE) to download it once, "
                             f"or pass a local folder in the diffusers layout ({type(e).__name__})") from None
    except GatedRepoError:
        raise ModelLoadError(f"cannot load '{name}': the repo is gated. Accept its licence on the Hub, then log in "
                             f"with `hf auth login` (or set HF_TOKEN), or pass a local folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelLoadError(f"cannot load '{name}' (revision {revision or 'main'}): no such repo on the Hub, or it "
                             f"is private (log in with `hf auth login`). Check the id, or pass a local folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"cannot load '{name}': {e}. Check your connection, log in with `hf auth login` "
                             f"if needed, or pass a local folder in the diffusers layout") from None


def component_dir(name_or_path, subfolder: str | None, files: list[str], revision: str | None = None) -> Path:
    """The local folder of one component (`unet/`, `vae/`, ...), fetching only `files` from the Hub.

    A local folder may be the pipeline root (then `subfolder` is used) or the component folder itself.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if subfolder and (local / subfolder).is_dir():
            return local / subfolder
        return local
    patterns = [f"{subfolder}/{f}" if subfolder else f for f in files]
    root = resolve(name_or_path, patterns, revision)
    return root / subfolder if subfolder else root


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is missing: is '{path.parent}' a model folder in the diffusers layout?")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"'{path}' is not valid JSON ({e}): write or download it again") from None


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file; a missing, empty, truncated or foreign file is a ModelLoadError
    naming it (safetensors checks that the header covers the whole file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"'{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read '{path}': not a complete .safetensors file ({' '.join(str(e).split())}); "
                             f"write or download it again") from None


def read_pickle(path):
    """torch.load(weights_only=True): never runs code from the file; an unreadable file is a ModelLoadError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"'{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:         # anything but tensors and plain containers
        first = next(iter(str(e).splitlines()), "")
        raise ModelLoadError(f"'{path}' is not a plain state-dict pickle, so it is refused (torch.load with "
                             f"weights_only=True: {first}); convert it to .safetensors with a tool you trust") from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:   # empty, truncated, not a pickle at all
        first = next(iter(str(e).splitlines()), "") or "the file is empty"
        raise ModelLoadError(f"cannot read '{path}': empty, truncated or not a PyTorch file ({first[:200]}); "
                             f"write or download it again") from None


def weight_files(stems: list[str], variant: str | None = None) -> list[str]:
    """File names to look for, best first: safetensors (single or sharded), then pickles."""
    v = f".{variant}" if variant else ""
    names = []
    for ext in ("safetensors", "bin"):
        for stem in stems:
            names += [f"{stem}{v}.{ext}", f"{stem}{v}.{ext}.index.json"]
    return names


def read_state_dict(folder: Path, stems: list[str], variant: str | None = None) -> dict:
    """Read the first weight file found in `folder` into a {name: tensor} dict on the CPU."""
    for name in weight_files(stems, variant):
        path = folder / name
        if not path.is_file():
            continue
        shards = [path]
        if name.endswith(".index.json"):  # sharded: the index maps tensor names to shard files
            shards = [folder / f for f in sorted(set(read_json(path)["weight_map"].values()))]
        sd = {}
        for shard in shards:
            if shard.suffix == ".safetensors":
                sd.update(read_safetensors(shard)[0])
            else:  # a pickle: never execute code from it
                sd.update(read_pickle(shard))
        return sd
    raise ModelLoadError(f"no weights in '{folder}': expected one of {weight_files(stems, variant)}")


def check_keys(model: torch.nn.Module, sd: dict, where) -> None:
    """Raise an error that names the missing and unexpected keys (strict loading would only count them)."""
    expected, got = set(model.state_dict().keys()), set(sd.keys())
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    def show(keys):
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    if missing or unexpected:
        raise ModelLoadError(f"weights in '{where}' do not fit {type(model).__name__}: "
                             f"missing keys: [{show(missing)}]; unexpected keys: [{show(unexpected)}]")
    shapes = model.state_dict()
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in shapes.items() if sd[k].shape != v.shape]
    if wrong:
        raise ModelLoadError(f"weights in '{where}' do not fit {type(model).__name__} (file shape vs model shape): "
                             f"{show(wrong)}: is it another model's file, or its config.json another model's?")


def load_model(build, folder: Path, stems: list[str], variant=None, dtype=torch.float32, device="cpu", fix_keys=None):
    """Build `build()` on the meta device, then load the folder's weights into it with strict=True."""
    sd = read_state_dict(folder, stems, variant)
    if fix_keys is not None:
        sd = fix_keys(sd)
    with torch.device("meta"):
        model = build()
    check_keys(model, sd, folder)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def fetch_component(name_or_path, subfolder, stems, variant=None, revision=None, extra_files=("config.json",)):
    """component_dir for a model with weights: safetensors first; pickles only if a repo has no safetensors."""
    files = list(extra_files)
    v = f".{variant}" if variant else ""
    safetensors = [f"{s}{v}.safetensors" for s in stems] + [f"{s}{v}.safetensors.index.json" for s in stems] \
        + [f"{s}{v}-*.safetensors" for s in stems]
    folder = component_dir(name_or_path, subfolder, files + safetensors, revision)
    if any((folder / f).is_file() for f in weight_files(stems, variant)):
        return folder
    pickles = [f"{s}{v}.bin" for s in stems] + [f"{s}{v}.bin.index.json" for s in stems] + [f"{s}{v}-*.bin" for s in stems]
    return component_dir(name_or_path, subfolder, files + pickles, revision)


# ----------------------------------------------------------------------------- saving

def atomic_write(path, write) -> None:
    """Write a file through `write(tmp_path)` then rename it into place: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: torch.nn.Module, folder, config: dict, weights_name: str, dtype=None) -> None:
    """Write `config.json` and the weights as safetensors into `folder` (diffusers/transformers layout)."""
    from safetensors.torch import save_file
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    folder = Path(folder)
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    atomic_write(folder / weights_name, lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
