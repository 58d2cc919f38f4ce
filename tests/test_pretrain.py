"""pretrain.py: every stage runs tiny end to end and writes files the rest of nanobooth loads; a short run
learns; a run killed after its first checkpoint and rerun is the uninterrupted run; bad arguments fail early."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import pretrain
import world
from helpers import killed_after_first_checkpoint, one_thread  # noqa: F401  (one_thread: an autouse fixture)
from image_encoders import CLIPModel, FactorClassifier, FactorClassifierConfig, ViTConfig, ViTModel
from pipeline import generate, load_models
from vae import VAE, VAEConfig

POOL = ["--pool_size", "300"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """All four stages at 0.1% of their default steps (2, 4, 2 and 1 steps)."""
    root = tmp_path_factory.mktemp("pretrain")
    info = pretrain.main(["--output_dir", str(root / "out"), "--work_dir", str(root / "work"), *POOL,
                          "--steps_scale", "0.001"])
    return root / "out", root / "work", info


def assert_same_weights(a, b):
    """Every safetensors file under folders `a` and `b` holds the same tensors."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors"))
    for name in files:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name

# ----------------------------------------------------------------------------- all stages, tiny


def test_all_stages_write_loadable_results(pretrained):
    out, work, info = pretrained
    assert set(info["stages"]) == set(pretrain.STAGES)
    assert json.loads((out / "pretrain.json").read_text())["stages"] == info["stages"]
    assert [info["stages"][s]["steps"] for s in pretrain.STAGES] == [2, 2, 4, 1, 2]
    assert all((work / s / "DONE").is_file() and not list((work / s).glob("checkpoint-*")) for s in pretrain.STAGES)
    assert (out / "samples.png").is_file()

    models = load_models(out / "model")
    assert models.vae.factor == 4 and models.tokenizer.max_length == 32
    images = generate(models, ["a red star on the beach", "a blue ring"], steps=2, guidance=3.0, height=64, width=64,
                      progress=False)
    assert [im.size for im in images] == [(64, 64)] * 2

    clip = CLIPModel.from_pretrained(out / "clip")      # SD's text encoder is the clip stage's text tower, frozen
    assert all(torch.equal(v, clip.text_model.state_dict()[k]) for k, v in models.text_encoder.text_model.state_dict().items())
    with torch.no_grad():
        text = clip.get_text_features(clip.tokenizer()(["a red star"]))
        image = clip.get_image_features(clip.preprocess([world.sample(1, 0)[0]]))
    assert text.shape == image.shape == (1, clip.config.projection_dim)

    classifier = FactorClassifier.from_pretrained(out / "classifier")
    assert classifier.factors == pretrain.FACTORS
    predicted = classifier.predict([world.sample(1, i)[0] for i in range(3)])
    assert all(len(predicted[k]) == 3 and set(predicted[k]) <= set(labels) for k, labels in pretrain.FACTORS.items())
    vit = ViTModel.from_pretrained(out / "dino")
    assert vit.config == ViTConfig.toy()


def test_vae_scaling_factor_is_measured(pretrained):
    """1 / std of the pool's latent means (LDM's rule), not SD's 0.18215."""
    out, work, _ = pretrained
    vae = VAE.from_pretrained(out / "model", subfolder="vae")
    assert vae.config.scaling_factor != VAEConfig().scaling_factor
    images = np.load(next(work.glob("pool-seed0-n300.npz")))["images"]
    with torch.no_grad():
        std = vae.encode(pretrain.to_tensor(images)).mean.std().item()
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=0.02)

# ----------------------------------------------------------------------------- learning and resuming


def classifier_run(out, work, *extra):
    """The classifier stage alone: 40 steps of 16 images, a checkpoint at step 20."""
    return pretrain.main(["--stage", "classifier", "--output_dir", str(out), "--work_dir", str(work), *POOL,
                          "--max_train_steps", "40", "--train_batch_size", "16", "--checkpointing_steps", "20", *extra])


def held_out_loss(classifier, n=64):
    """Cross-entropy summed over the factors, on single-object images of a stream the pool is not drawn from."""
    rows = [r for r in (world.sample(1, i) for i in range(n + 20)) if len(r[2]["objects"]) == 1][:n]
    labels = torch.tensor([[pretrain.FACTORS["shape"].index(f["objects"][0].shape),
                            pretrain.FACTORS["colour"].index(f["objects"][0].colour),
                            pretrain.FACTORS["scene"].index(f["scene"])] for _, _, f in rows])
    with torch.no_grad():
        logits = classifier(classifier.preprocess([im for im, _, _ in rows]))
    return sum(F.cross_entropy(logits[k], labels[:, i]).item() for i, k in enumerate(pretrain.FACTORS))


@pytest.fixture(scope="module")
def classifier_uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    info = classifier_run(root / "out", root / "work")
    return root / "out", root / "work", info


def test_short_run_learns(classifier_uninterrupted):
    out, work, info = classifier_uninterrupted
    torch.manual_seed(0)                                   # run_stage's initial weights
    initial = FactorClassifier(FactorClassifierConfig(pretrain.FACTORS)).eval()
    trained = FactorClassifier.from_pretrained(out / "classifier")
    assert held_out_loss(trained) < 0.8 * held_out_loss(initial)
    logs = [json.loads(line) for line in (work / "classifier" / "logs.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 40 and logs[-1]["acc_scene"] > 0.5         # chance: 1/8
    assert info["stages"]["classifier"]["final"] == {k: round(v, 4) for k, v in logs[-1].items() if k != "step" and k != "lr"}


def test_killed_and_resumed_run_equals_uninterrupted(classifier_uninterrupted, tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    pool = next(classifier_uninterrupted[1].glob("pool-*.npz"))
    shutil.copy(pool, work / pool.name)                                      # the same pool, not drawn again
    killed_after_first_checkpoint(monkeypatch, lambda: classifier_run(out, work))
    assert [p.name for p in (work / "classifier").glob("checkpoint-*")] == ["checkpoint-20"]
    assert not (out / "classifier").exists()
    capsys.readouterr()
    info = classifier_run(out, work)
    assert "classifier: resuming from" in capsys.readouterr().out           # not a fresh run that happens to agree
    assert_same_weights(out / "classifier", classifier_uninterrupted[0] / "classifier")
    expected = classifier_uninterrupted[2]["stages"]["classifier"]
    assert info["stages"]["classifier"]["final"] == expected["final"]


def test_sd_stage_resumes_with_its_ema(pretrained, tmp_path, monkeypatch, capsys):
    """The stage with an EMA (what it ships): 4 steps of 4 captions, a checkpoint at step 2, on the tiny run's VAE."""
    monkeypatch.setattr(pretrain, "write_samples", lambda out, seed=0: None)     # not what this test is about

    def run(name):
        out, work = tmp_path / name / "out", tmp_path / name / "work"
        if not work.exists():
            shutil.copytree(pretrained[0] / "model" / "vae", out / "model" / "vae")
            shutil.copytree(pretrained[0] / "clip", out / "clip")
            work.mkdir()
            shutil.copy(pretrained[1] / "pool-seed0-n300.npz", work)
        pretrain.main(["--stage", "sd", "--output_dir", str(out), "--work_dir", str(work), *POOL,
                       "--max_train_steps", "4", "--train_batch_size", "4", "--checkpointing_steps", "2"])
    run("uninterrupted")
    killed_after_first_checkpoint(monkeypatch, lambda: run("resumed"))
    capsys.readouterr()
    run("resumed")
    assert "sd: resuming from" in capsys.readouterr().out
    assert_same_weights(tmp_path / "resumed" / "out" / "model", tmp_path / "uninterrupted" / "out" / "model")

# ----------------------------------------------------------------------------- arguments


def test_bad_arguments_fail_early():
    with pytest.raises(SystemExit, match="--stage must be one of vae, clip, sd, dino, classifier or all"):
        pretrain.parse_args(["--stage", "unet"])
    with pytest.raises(SystemExit, match="give --stage too"):
        pretrain.parse_args(["--max_train_steps", "5"])
    with pytest.raises(SystemExit, match="give --stage too"):
        pretrain.parse_args(["--stage", "all", "--train_batch_size", "8"])
    with pytest.raises(SystemExit, match="--faces is a share of each batch, from 0 to 1, got 1.5"):
        pretrain.parse_args(["--faces", "1.5"])
    with pytest.raises(SystemExit, match="must leave room for the world's images"):
        pretrain.parse_args(["--patterns", "0.6", "--faces", "0.5"])
    assert pretrain.parse_args(["--stage", "vae", "--faces", "0.3", "--patterns", "0.2"]).faces == 0.3
    assert pretrain.parse_args(["--stage", "sd", "--max_train_steps", "5"]).max_train_steps == 5


def test_a_finished_stage_is_kept_only_with_the_same_settings(pretrained, capsys):
    out, work, _ = pretrained
    cfg = pretrain.parse_args(["--output_dir", str(out), "--work_dir", str(work), *POOL, "--steps_scale", "0.001"])
    assert all(json.loads((work / s / "DONE").read_text()) == pretrain.settings_of(cfg, s) for s in pretrain.STAGES)
    other = pretrain.parse_args(["--output_dir", str(out), "--work_dir", str(work), *POOL, "--steps_scale", "0.002"])
    assert pretrain.settings_of(other, "sd") != pretrain.settings_of(cfg, "sd")
    pretrain.main(["--output_dir", str(out), "--work_dir", str(work), *POOL, "--steps_scale", "0.001"])
    assert capsys.readouterr().out.count("kept") == len(pretrain.STAGES)


def test_second_rounds(pretrained, tmp_path):
    """--init_from: the vae round trains only the decoder (encoder, quant conv and scale kept, so latents and the
    UNet stay valid); the sd round starts from the given UNet; colour dropout reaches the sd stage's settings."""
    out, work, _ = pretrained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = load_file(copy / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    pretrain.main(["--stage", "vae", "--init_from", str(copy / "model"), "--output_dir", str(copy), "--work_dir",
                   str(tmp_path / "work"), *POOL, "--max_train_steps", "3", "--train_batch_size", "2"])
    after = load_file(copy / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert VAE.from_pretrained(copy / "model").config.scaling_factor == VAE.from_pretrained(out / "model").config.scaling_factor

    info = pretrain.main(["--stage", "sd", "--init_from", str(copy / "model"), "--output_dir", str(copy), "--work_dir",
                          str(tmp_path / "work"), *POOL, "--max_train_steps", "2", "--colour_dropout", "0.5"])
    round2 = info["stages"][f"sd from {copy / 'model'}"]
    assert round2["steps"] == 2 and "sd" in info["stages"]                  # the first round's record is kept
    cfg = pretrain.parse_args(["--stage", "sd", "--init_from", str(copy / "model"), "--colour_dropout", "0.5"])
    assert pretrain.settings_of(cfg, "sd")["colour_dropout"] == 0.5
    with pytest.raises(SystemExit, match="--init_from"):
        pretrain.parse_args(["--stage", "clip", "--init_from", str(copy / "model")])


def test_train_py_passes_its_values_to_the_stage(tmp_path, monkeypatch):
    """`train.py --method pretrain_<stage>` hands pretrain.py a PretrainConfig of its values (no argv round trip):
    the given ones set, the others the stage's own (None)."""
    import train
    seen = []
    monkeypatch.setattr(pretrain, "run", lambda cfg, command=None: seen.append(cfg) or {})
    train.train(train.parse_args(["--method", "pretrain_sd", "--output_dir", str(tmp_path), "--seed", "3",
                                  "--max_train_steps", "7", "--checkpointing_steps", "5"]))
    assert seen == [pretrain.PretrainConfig(stage="sd", output_dir=str(tmp_path), seed=3, max_train_steps=7,
                                            work_dir=str(tmp_path / "pretrain-work"), checkpointing_steps=5)]
    train.train(train.parse_args(["--method", "pretrain_vae", "--output_dir", str(tmp_path), "--learning_rate", "0.01",
                                  "--train_batch_size", "4"]))
    assert (seen[1].stage, seen[1].learning_rate, seen[1].train_batch_size, seen[1].max_train_steps) == ("vae", 0.01, 4,
                                                                                                          None)
