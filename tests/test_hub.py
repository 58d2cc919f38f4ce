"""hub.py: the Hub code path on a diffusers-written folder, offline errors, weight files, key errors."""
import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hub
from pipeline import load_models

REPO = Path(__file__).resolve().parents[1]


def fake_snapshot_download(source: Path, calls: list):
    """Stands in for huggingface_hub.snapshot_download: copies only the files matching allow_patterns
    from `source` into a fresh snapshot folder, as the Hub would, and records what was asked for."""
    def download(repo_id, allow_patterns=None, revision=None, **kw):
        calls.append((repo_id, list(allow_patterns)))
        snap = source.parent / f"snapshot-{len(calls)}"
        for f in source.rglob("*"):
            rel = f.relative_to(source).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snap / rel)
        return str(snap)
    return download


def outputs(models):
    torch.manual_seed(0)
    ids = models.tokenizer(["a photo of a cat", "a dog"])
    c = models.text_encoder(ids)[0]
    z = torch.randn(2, 4, 8, 8)
    return c, models.unet(z, torch.tensor([10, 500]), c), models.vae.decode(z)


def test_hub_id_takes_the_download_path_and_fetches_only_needed_files(tiny_sd1, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download(tiny_sd1, calls))
    from_hub = load_models("someone/tiny-sd")
    assert {c[0] for c in calls} == {"someone/tiny-sd"}
    asked = [p for _, patterns in calls for p in patterns]
    assert "unet/config.json" in asked and "unet/diffusion_pytorch_model.safetensors" in asked
    assert not any(p.startswith("unet/") and p.endswith(".bin") for p in asked)    # safetensors found: no pickle
    local = load_models(str(tiny_sd1))
    for a, b in zip(outputs(from_hub), outputs(local)):
        assert torch.equal(a, b)


def test_sdxl_hub_id_loads_both_text_encoders(tiny_sdxl, monkeypatch):
    from pipeline import generate
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download(tiny_sdxl, calls))
    from_hub = load_models("stabilityai/stable-diffusion-xl-base-1.0")
    asked = [p for _, patterns in calls for p in patterns]
    assert "model_index.json" in asked and "text_encoder_2/model.safetensors" in asked and "tokenizer_2/vocab.json" in asked
    assert from_hub.text_encoder_2.config.projection_dim == 24 and from_hub.tokenizer_2.pad_token == "!"
    kw = dict(seed=1, steps=2, height=32, width=48, progress=False, output="pt")
    assert torch.equal(generate(from_hub, ["a cat"], **kw), generate(load_models(tiny_sdxl), ["a cat"], **kw))


def test_hub_form_folder_loads_the_same(tiny_sd1, tmp_path):
    """The Hub's files differ from what transformers 5 writes: text_model. prefix + position_ids in the
    text encoder, vocab.json + merges.txt instead of tokenizer.json. Both must load to the same model."""
    hub_form = tmp_path / "hub-form"
    shutil.copytree(tiny_sd1, hub_form)
    te = hub_form / "text_encoder" / "model.safetensors"
    sd = load_file(te)
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(te))
    tok = hub_form / "tokenizer"
    from text_encoder import CLIPTokenizer
    CLIPTokenizer.from_pretrained(tiny_sd1).save_pretrained(tok)
    (tok / "tokenizer.json").unlink(missing_ok=True)
    assert (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    for a, b in zip(outputs(load_models(str(hub_form))), outputs(load_models(str(tiny_sd1)))):
        assert torch.equal(a, b)


def test_offline_uncached_repo_fails_at_once_with_a_fix(tmp_path):
    code = "from unet import UNet; UNet.from_pretrained('nobody-here/not-cached-model')"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "ModelLoadError" in last and "nobody-here/not-cached-model" in last
    assert "HF_HUB_OFFLINE" in last and "local folder" in last


def test_missing_local_folder_is_named():
    with pytest.raises(hub.ModelLoadError, match="does-not-exist"):
        hub.resolve("./does-not-exist", ["*"])


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    sd = {"0.weight": torch.zeros(2, 2), "0.bias_typo": torch.zeros(2)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(hub.ModelLoadError, match=r"missing keys: \[0\.bias\].*unexpected keys: \[0\.bias_typo\]"):
        hub.load_model(lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path, ["model"])
    del model


def test_pickle_is_read_with_weights_only(tmp_path):
    lin = torch.nn.Linear(3, 2)
    torch.save(lin.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = hub.load_model(lambda: torch.nn.Linear(3, 2), tmp_path, ["model", "pytorch_model"])
    assert torch.equal(loaded.weight, lin.weight)
    # a pickle that would run code / build arbitrary objects is refused by weights_only=True
    torch.save({"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "evil": Path("x")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        hub.read_state_dict(tmp_path, ["pytorch_model"])


def test_sharded_safetensors_are_joined(tmp_path):
    a, b = {"x": torch.ones(2)}, {"y": torch.zeros(3)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sd = hub.read_state_dict(tmp_path, ["model"])
    assert set(sd) == {"x", "y"} and torch.equal(sd["y"], b["y"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("good")

    def broken(p):
        p.write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        hub.atomic_write(target, broken)
    assert target.read_text() == "good" and list(tmp_path.iterdir()) == [target]
