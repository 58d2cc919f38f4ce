"""ComFusion: every loss term by hand, the fusion stream's gradient path, CLI runs (scene images, resume), sampling
from the result, bad input."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
import train
from methods import TrainModels
from image_encoders import CLIPConfig, CLIPModel, ViTConfig, ViTModel
from losses import comfusion_loss
from tiny import tiny_models
from helpers import killed_after_first_checkpoint, randomize

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "assets" / "demo" / "dog"


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    randomize(CLIPModel(CLIPConfig.tiny()), 0).save_pretrained(root / "clip")
    randomize(ViTModel(ViTConfig.tiny()), 1).save_pretrained(root / "dino")
    return root

# ----------------------------------------------------------------------------- one loss call on tiny models


def comfusion_setup(**weights):
    """Tiny SD, frozen tiny DINO/CLIP, and one batch: 1 instance row, 1 class-scene row, 1 fusion row at tau 400."""
    models = tiny_models()
    cfg = train.TrainConfig(method="comfusion", fusion_steps=3, **weights)
    train.setup_trainable(models, cfg)
    encoders = {"dino": randomize(ViTModel(ViTConfig.tiny()), 1).requires_grad_(False),
                "clip": randomize(CLIPModel(CLIPConfig.tiny()), 0).requires_grad_(False)}
    parts = {f.name: getattr(models, f.name) for f in dataclasses.fields(models)}
    tm = TrainModels(**parts, encoders=encoders)
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 77, 32, generator=g)
    batch = {"latent_mean": torch.randn(2, 4, 4, 4, generator=g), "latent_std": torch.zeros(2, 4, 4, 4),
             "generators": [torch.Generator().manual_seed(i) for i in (1, 2)], "n_prior": 1,
             "encoder_hidden_states": c[:2],
             "fusion": {"generators": [torch.Generator().manual_seed(3)], "tau": 400, "encoder_hidden_states": c[2:],
                        "uncond": torch.randn(1, 77, 32, generator=g), "image_target": torch.randn(1, 32, generator=g),
                        "text_target": torch.randn(1, 16, generator=g)}}
    calls = []
    tm.unet.register_forward_hook(lambda m, args, out: calls.append(
        {"grad": torch.is_grad_enabled(), "graph": out.requires_grad, "x": args[0].detach(), "t": args[1],
         "out": out.detach()}))
    return tm, cfg, batch, calls


def cos_distance(a, b):
    return 1 - (a * b).sum() / (a.norm() * b.norm())


def test_each_term_equals_a_hand_computation():
    weights = dict(instance_loss_weight=0.5, prior_loss_weight=2.0, visual_loss_weight=0.3, textual_loss_weight=0.7)
    models, cfg, batch, calls = comfusion_setup(**weights)
    loss, logs = comfusion_loss(batch, models, cfg)
    last = calls[-1]
    x, t, out = last["x"], last["t"], last["out"]
    abar = models.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    z0 = batch["latent_mean"]
    eps = (x[:2] - abar[:2].sqrt() * z0) / (1 - abar[:2]).sqrt()            # the noise each composite row got
    assert abs(logs["loss_instance"] - ((out[0] - eps[0]) ** 2).mean().item()) < 1e-5
    assert abs(logs["loss_class_scene"] - ((out[1] - eps[1]) ** 2).mean().item()) < 1e-5
    # fusion row: z0_hat = (z_tau - sqrt(1 - abar) eps_hat) / sqrt(abar), x_hat = D(z0_hat / s)
    assert t[2].item() == 400 == logs["tau"]
    z0_hat = (x[2:] - (1 - abar[2:]).sqrt() * out[2:]) / abar[2:].sqrt()
    with torch.no_grad():
        x_hat = models.vae.decode(z0_hat / models.vae.config.scaling_factor)
        dino, clip = models.encoders["dino"], models.encoders["clip"]
        f_v = dino.features(dino.preprocess.tensor(x_hat))[0]
        f_t = clip.get_image_features(clip.preprocess.tensor(x_hat))[0]
    assert abs(logs["loss_visual"] - cos_distance(f_v, batch["fusion"]["image_target"][0]).item()) < 1e-5
    assert abs(logs["loss_textual"] - cos_distance(f_t, batch["fusion"]["text_target"][0]).item()) < 1e-5
    total = 0.5 * logs["loss_instance"] + 2.0 * logs["loss_class_scene"] + 0.3 * logs["loss_visual"] \
        + 0.7 * logs["loss_textual"]
    assert abs(loss.item() - total) < 1e-5 and abs(logs["loss"] - total) < 1e-5
    # without a fusion row (a step between --fusion_every), only the composite terms
    del batch["fusion"]
    _, logs2 = comfusion_loss(batch, models, cfg)
    assert set(logs2) == {"loss_instance", "loss_class_scene", "loss"}


def test_only_the_last_unet_call_builds_a_graph_and_gradients_reach_it_through_decoder_and_encoders():
    for term in ("visual_loss_weight", "textual_loss_weight"):
        weights = dict(instance_loss_weight=0.0, prior_loss_weight=0.0, visual_loss_weight=0.0, textual_loss_weight=0.0)
        models, cfg, batch, calls = comfusion_setup(**{**weights, term: 1.0})
        frozen = {name: {k: v.clone() for k, v in m.state_dict().items()}
                  for name, m in (("vae", models.vae), *models.encoders.items())}
        loss, _ = comfusion_loss(batch, models, cfg)
        # 3 DDIM steps without gradients (CFG: [uncond, cond] in one batch) at 999 -> 400 evenly, then one call with
        assert [(c["grad"], c["graph"], c["x"].shape[0]) for c in calls] == [(False, False, 2)] * 3 + [(True, True, 3)]
        assert [c["t"] for c in calls[:3]] == [999, 799, 600] and calls[3]["t"].tolist()[2] == 400
        loss.backward()
        unet_grads = [p.grad for p in models.unet.parameters()]
        assert any(g is not None and g.abs().max() > 0 for g in unet_grads), term   # only this term feeds them
        for m in (models.vae, *models.encoders.values()):
            assert all(not p.requires_grad and p.grad is None for p in m.parameters())
        torch.optim.SGD(models.unet.parameters(), lr=1.0).step()
        for name, m in (("vae", models.vae), *models.encoders.items()):
            assert all(torch.equal(v, frozen[name][k]) for k, v in m.state_dict().items()), name

# ----------------------------------------------------------------------------- end to end


def argv(model, out, encoders, *extra):
    return ["--method", "comfusion", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(DOG),
            "--instance_prompt", "a photo of sks dog", "--class_prompt", "a photo of dog", "--class_data_dir",
            str(Path(out).parent / "class_scenes"), "--num_scene_images", "1", "--class_sample_steps", "2",
            "--resolution", "32", "--center_crop", "--output_dir", str(out), "--device", "cpu", "--learning_rate",
            "1e-4", "--clip_model", str(encoders / "clip"), "--dino_model", str(encoders / "dino"), "--fusion_steps",
            "2", "--tau_min", "300", "--tau_max", "500", *map(str, extra)]


def logs(out):
    return [json.loads(line) for line in (Path(out) / "logs.jsonl").read_text().splitlines()]


def test_cli_run_scene_images_resume_and_sampling(tiny_sd1, encoder_dirs, tmp_path, monkeypatch):
    (tmp_path / "scenes.txt").write_text("in a garden\n\n  on a stone bridge  \n")
    run = ["--scenes", tmp_path / "scenes.txt", "--fusion_every", "2", "--max_train_steps", "3",
           "--checkpointing_steps", "2"]
    train.main(argv(tiny_sd1, tmp_path / "straight", encoder_dirs, *run))
    for folder, scene in (("in-a-garden", "in a garden"), ("on-a-stone-bridge", "on a stone bridge")):
        pngs = list((tmp_path / "class_scenes" / folder).glob("*.png"))
        assert len(pngs) == 1 and Image.open(pngs[0]).text["prompt"] == f"a photo of dog {scene}"
    rows = logs(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        fusion = r["step"] % 2 == 1                                  # steps 0 and 2 of the loop: every 2nd
        assert ("loss_visual" in r) == ("loss_textual" in r) == fusion
        expected = r["loss_instance"] + r["loss_class_scene"] + 0.1 * r.get("loss_visual", 0) \
            + 0.1 * r.get("loss_textual", 0)
        assert abs(r["loss"] - expected) < 1e-5
        assert not fusion or 300 <= r["tau"] <= 500
    info = json.loads((tmp_path / "straight" / "nanobooth.json").read_text())
    assert info["loss_encoders"] == {"clip": str(encoder_dirs / "clip"), "dino": str(encoder_dirs / "dino")}
    assert (tmp_path / "straight" / "model_index.json").is_file()

    # killed after the checkpoint of step 2, then resumed: the same fusion draws and losses as the straight run
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(argv(tiny_sd1, tmp_path / "resumed", encoder_dirs, *run)))
    train.main(argv(tiny_sd1, tmp_path / "resumed", encoder_dirs, *run, "--resume_from_checkpoint", "latest"))
    for a, b in zip(rows, logs(tmp_path / "resumed"), strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a if k != "time")

    paths = sample.main(["--model", str(tmp_path / "straight"), "--prompt", "a photo of sks dog on a stone bridge",
                         "--steps", "2", "--out", str(tmp_path / "samples"), "--device", "cpu"])
    assert len(paths) == 1 and Image.open(paths[0]).size == (128, 128)


def test_gradient_checkpointing_reaches_the_vae_decoder_of_the_fusion_stream(tiny_sd1, encoder_dirs, tmp_path,
                                                                             monkeypatch):
    """The fusion stream backpropagates through the frozen VAE decoder: --gradient_checkpointing recomputes its blocks
    too (and only where a graph is built: the encoder runs under no_grad)."""
    import vae
    calls = []
    real = vae.checkpoint
    monkeypatch.setattr(vae, "checkpoint", lambda block, *a, **k: calls.append(type(block).__name__) or real(block, *a, **k))
    (tmp_path / "scenes.txt").write_text("in a garden\n")
    run = ["--scenes", tmp_path / "scenes.txt", "--max_train_steps", "1"]
    train.main(argv(tiny_sd1, tmp_path / "plain", encoder_dirs, *run))
    assert calls == []
    train.main(argv(tiny_sd1, tmp_path / "ckpt", encoder_dirs, *run, "--gradient_checkpointing"))
    assert "UpDecoderBlock" in calls and "DownEncoderBlock" not in calls, calls
    plain, ckpt = logs(tmp_path / "plain")[0], logs(tmp_path / "ckpt")[0]
    assert plain["loss"] == pytest.approx(ckpt["loss"], abs=1e-6)                  # the same step, recomputed

# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    (lambda a, d: a + ["--scenes", str(d / "missing.txt")], r"--scenes file '.*missing.txt' does not exist"),
    (lambda a, d: a + ["--scenes", str(d / "blank.txt")], r"--scenes file '.*blank.txt' has no scenes"),
    (lambda a, d: a + ["--scenes", str(d / "twice.txt")], r"scene 'in a garden' is empty or repeats another"),
    (lambda a, d: [x for x in a if x != "--class_prompt" and x != "a photo of dog"], r"comfusion needs --class_prompt"),
    (lambda a, d: a + ["--tau_min", "600", "--tau_max", "200"], r"0 <= tau_min <= tau_max"),
    (lambda a, d: a + ["--train_text_encoder"], r"does not train the text encoder"),
    (lambda a, d: a + ["--dino_model", str(d / "no-dino")], r"--dino_model '.*no-dino' does not exist"),
    (lambda a, d: [x if x != "comfusion" else "dreambooth" for x in a], r"--clip_model is an option of --method comfusion"),
])
def test_bad_input_fails_before_a_model_loads(change, message, encoder_dirs, tmp_path, monkeypatch):
    (tmp_path / "blank.txt").write_text("\n   \n")
    (tmp_path / "twice.txt").write_text("in a garden\nin a garden!\n")
    monkeypatch.setattr(train, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(Exception, match=message) as e:
        train.main(change(argv(tmp_path, tmp_path / "out", encoder_dirs), tmp_path))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
