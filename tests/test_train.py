"""train.py on a tiny model: learning, trainable sets, resume, crash safety, outputs diffusers reads, bad input."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from data import load_image, prepare
from pipeline import encode_prompts, generate, load_models, load_trained
from helpers import killed_after_first_checkpoint

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "assets" / "demo" / "dog"


def argv(model, out, method="dreambooth", steps=10, *extra):
    return ["--method", method, "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(DOG),
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--center_crop", "--max_train_steps",
            str(steps), "--output_dir", str(out), "--device", "cpu", "--learning_rate", "1e-3",
            "--placeholder_token", "<sks>", "--initializer_token", "dog", *map(str, extra)]


def run(args):
    return train.train(train.parse_args(args))


def losses(out):
    return [json.loads(line) for line in (Path(out) / "logs.jsonl").read_text().splitlines()]


def fixed_instance_loss(models, prompt="a photo of sks dog"):
    """Mean L_ldm over the demo images at fixed timesteps and fixed noise."""
    x = torch.stack([prepare(load_image(p), 32) for p in sorted(DOG.glob("*.jpg"))])
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z0 = models.vae.encode(x).mean * models.vae.config.scaling_factor
        c = encode_prompts(models, [prompt] * len(x))
        total = 0.0
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(z0.shape, generator=g)
            tt = torch.full((len(x),), t)
            pred = models.unet(models.schedule.add_noise(z0, noise, tt), tt, c)
            total += torch.mean((pred - noise) ** 2).item()
    return total / 5


def test_dreambooth_lowers_the_instance_loss(tiny_sd1, tmp_path):
    before = fixed_instance_loss(load_models(tiny_sd1))
    models = run(argv(tiny_sd1, tmp_path, "dreambooth", 60))
    models.unet.eval()
    after = fixed_instance_loss(models)
    assert after < 0.9 * before, (before, after)
    assert fixed_instance_loss(load_trained(tmp_path)) == pytest.approx(after, abs=1e-6)  # the saved folder is it


def test_lora_changes_only_lora_parameters(tiny_sd1, tmp_path):
    base = load_models(tiny_sd1)
    models = run(argv(tiny_sd1, tmp_path, "dreambooth_lora", 5, "--train_text_encoder"))
    for part in ("unet", "text_encoder", "vae"):
        trained = dict(getattr(models, part).named_parameters())
        for name, p in getattr(base, part).named_parameters():
            assert torch.equal(trained[name].float(), p), name          # base weights bit-identical
    changed = [n for n, p in models.unet.named_parameters() if ".lora_B" in n and p.abs().max() > 0]
    assert changed and all(".lora_" in n for n, p in models.unet.named_parameters() if p.requires_grad)
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in saved) and any(k.startswith("unet.") for k in saved)


def test_textual_inversion_changes_exactly_one_row(tiny_sd1, tmp_path):
    base = load_models(tiny_sd1)
    models = run(argv(tiny_sd1, tmp_path, "textual_inversion", 5))
    old = base.text_encoder.text_model.embeddings.token_embedding.weight
    new = models.text_encoder.text_model.embeddings.token_embedding.weight
    token = models.tokenizer.encode("<sks>")[1:-1]
    assert token == [old.shape[0]] and new.shape[0] == old.shape[0] + 1
    assert torch.equal(new[:-1], old)                                    # every original row unchanged
    init = base.tokenizer.encode("dog")[1]
    assert not torch.equal(new[-1], old[init])                           # the new row moved from its init
    for a, b in zip(base.unet.parameters(), models.unet.parameters()):
        assert torch.equal(a, b)
    saved = load_file(tmp_path / "learned_embeds.safetensors")
    assert list(saved) == ["<sks>"] and torch.equal(saved["<sks>"], new[-1].detach())


@pytest.mark.parametrize("method, extra", [
    ("dreambooth", ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "2",
                    "--class_sample_steps", "2", "--snr_gamma", "5", "--random_flip"]),
    ("dreambooth_lora", ["--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--gradient_accumulation_steps", "2"]),
    ("textual_inversion", ["--gradient_accumulation_steps", "1"]),
])
def test_resume_equals_a_straight_run(method, extra, tiny_sd1, tmp_path, monkeypatch):
    common = ["--checkpointing_steps", "10", *extra]
    class_dir = ["--class_data_dir", str(tmp_path / "class")] if "--with_prior_preservation" in extra else []
    run(argv(tiny_sd1, tmp_path / "straight", method, 20, *common, *class_dir))

    killed_after_first_checkpoint(monkeypatch,                           # the process is killed after step 10
                                  lambda: run(argv(tiny_sd1, tmp_path / "resumed", method, 20, *common, *class_dir)))
    run(argv(tiny_sd1, tmp_path / "resumed", method, 20, *common, *class_dir, "--resume_from_checkpoint", "latest"))

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6) and ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tiny_sd1, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "checkpoint-20" in str(path):
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(OSError):
        run(argv(tiny_sd1, tmp_path, "dreambooth_lora", 20, "--checkpointing_steps", "10"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert not list(tmp_path.glob(".checkpoint-*"))                              # no half-written folder left
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert checkpoint.load_state(tmp_path / "checkpoint-10")["step"] == 10
    load_trained(tmp_path / "checkpoint-10")                                    # can be sampled from
    run(argv(tiny_sd1, tmp_path, "dreambooth_lora", 20, "--checkpointing_steps", "10", "--resume_from_checkpoint",
             "latest"))
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_checkpoints_are_pruned_to_the_limit(tiny_sd1, tmp_path):
    run(argv(tiny_sd1, tmp_path, "textual_inversion", 6, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"))
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_class_images_are_generated_once_and_topped_up(tiny_sd1, tmp_path):
    cfg = train.parse_args(argv(tiny_sd1, tmp_path, "dreambooth", 1, "--with_prior_preservation", "--class_prompt",
                                "a photo of dog", "--class_data_dir", tmp_path / "cls", "--num_class_images", "2",
                                "--class_sample_steps", "2"))
    models = load_models(tiny_sd1)
    first = train.make_class_images(models, cfg)
    stamps = [p.stat().st_mtime_ns for p in first]
    cfg.num_class_images = 3
    second = train.make_class_images(models, cfg)
    assert len(first) == 2 and len(second) == 3 and second[:2] == first
    assert [p.stat().st_mtime_ns for p in second[:2]] == stamps                    # reused, not regenerated


def images_np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def diffusers_pipe(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def same_images(pipe, models, prompt):
    ref = pipe([prompt], num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    ours = images_np(generate(models, [prompt], seed=3, steps=4, height=64, width=64, progress=False))
    return np.abs(ours - ref).max()


def test_outputs_load_in_diffusers(tiny_sd1, tmp_path):
    base_images = images_np(generate(load_models(tiny_sd1), ["a photo of sks dog"], seed=3, steps=4, height=64,
                                     width=64, progress=False))
    # full fine-tune: a complete diffusers folder
    run(argv(tiny_sd1, tmp_path / "full", "dreambooth", 3))
    assert same_images(diffusers_pipe(tmp_path / "full"), load_trained(tmp_path / "full"), "a photo of sks dog") <= 1 / 255
    # LoRA: pytorch_lora_weights.safetensors, read by load_lora_weights
    run(argv(tiny_sd1, tmp_path / "lora", "dreambooth_lora", 5, "--learning_rate", "5e-2"))
    pipe = diffusers_pipe(tiny_sd1)
    pipe.load_lora_weights(tmp_path / "lora")
    ours = load_trained(tmp_path / "lora")
    assert same_images(pipe, ours, "a photo of sks dog") <= 1 / 255
    lora_images = images_np(generate(ours, ["a photo of sks dog"], seed=3, steps=4, height=64, width=64, progress=False))
    assert np.abs(lora_images - base_images).max() > 2 / 255                 # the LoRA does something
    # Textual Inversion: learned_embeds.safetensors, read by load_textual_inversion
    run(argv(tiny_sd1, tmp_path / "ti", "textual_inversion", 5, "--learning_rate", "5e-2"))
    pipe = diffusers_pipe(tiny_sd1)
    pipe.load_textual_inversion(tmp_path / "ti", weight_name="learned_embeds.safetensors")
    assert same_images(pipe, load_trained(tmp_path / "ti"), "a photo of <sks>") <= 1 / 255


def test_dreambooth_from_a_single_file_has_the_same_first_loss(tiny_sd1, tmp_path):
    from pipeline import save_single_file
    file = save_single_file(load_models(tiny_sd1), tmp_path / "tiny.safetensors")
    firsts = []
    for model, out in ((tiny_sd1, "folder"), (file, "file")):
        run(argv(model, tmp_path / out, "dreambooth", 1))
        firsts.append(losses(tmp_path / out)[0]["loss"])
    assert firsts[0] == firsts[1]


def test_lora_from_a_single_file_samples_from_its_output(tiny_sd1, tmp_path, monkeypatch):
    from pipeline import save_single_file
    file = save_single_file(load_models(tiny_sd1), tmp_path / "tiny.safetensors")
    monkeypatch.chdir(tmp_path)                                        # a relative path is stored absolute
    models = run(argv("tiny.safetensors", tmp_path / "out", "dreambooth_lora", 3, "--learning_rate", "5e-2"))
    assert json.loads((tmp_path / "out" / "nanobooth.json").read_text())["base_model"] == str(file.resolve())
    monkeypatch.chdir(REPO)
    models.unet.eval()
    trained, loaded = (images_np(generate(m, ["a photo of sks dog"], seed=3, steps=4, height=64, width=64,
                                          progress=False)) for m in (models, load_trained(tmp_path / "out")))
    assert np.abs(trained - loaded).max() <= 1 / 255


def test_export_writes_a_kohya_lora_and_a_single_file_at_the_end(tiny_sd1, tmp_path):
    run(argv(tiny_sd1, tmp_path / "lora", "dreambooth_lora", 2, "--export", "kohya", "--checkpointing_steps", "1"))
    kohya = load_file(tmp_path / "lora" / "lora_kohya.safetensors")
    assert len(kohya) > 0 and any(k.endswith(".alpha") for k in kohya)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "lora" / "checkpoint-1" / "lora_kohya.safetensors").exists()   # the final output only
    trained = run(argv(tiny_sd1, tmp_path / "full", "dreambooth", 2, "--export", "single_file"))
    from_file = load_models(tmp_path / "full" / "model.safetensors")
    for name, p in from_file.unet.state_dict().items():
        assert torch.equal(p, trained.unet.state_dict()[name].half().float()), name


def test_validation_images_and_config_are_written(tiny_sd1, tmp_path):
    run(argv(tiny_sd1, tmp_path, "textual_inversion", 2, "--validation_prompt", "a photo of <sks>",
             "--validation_steps", "1", "--num_validation_images", "2", "--sample_steps", "2"))
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == ["step-000001.png", "step-000002.png"]
    assert json.loads((tmp_path / "train_config.json").read_text())["method"] == "textual_inversion"
    assert [r["step"] for r in losses(tmp_path)] == [1, 2]


@pytest.mark.parametrize("change, message", [
    (lambda a, d: a + ["--instance_data_dir", str(d / "missing")], "does not exist"),
    (lambda a, d: a + ["--instance_data_dir", str(d / "empty")], "has no images"),
    (lambda a, d: a + ["--instance_data_dir", str(d / "corrupt")], "cannot read image .*bad.jpg"),
    (lambda a, d: a + ["--resolution", "36"], "multiple of 8"),
    (lambda a, d: a + ["--with_prior_preservation", "--class_data_dir", str(d / "cls")], "needs --class_prompt"),
    (lambda a, d: a + ["--weight_dtype", "float16", "--mixed_precision", "fp16"], "half precision"),
    (lambda a, d: a + ["--pretrained_model_name_or_path", str(d / "no-model")], "does not exist"),
    (lambda a, d: a + ["--pretrained_model_name_or_path", str(d / "no.safetensors")], "file .*no.safetensors' does not"),
    (lambda a, d: a + ["--export", "kohya"], "writes a LoRA, and --method dreambooth trains none"),
    (lambda a, d: a + ["--method", "textual_inversion", "--export", "single_file"], "cannot hold the new tokens"),
])
def test_bad_input_fails_before_training_and_leaves_the_output_alone(change, message, tiny_sd1, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    shutil.copy(DOG / "00.jpg", tmp_path / "corrupt" / "00.jpg")
    (tmp_path / "corrupt" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "training_state.pt").write_bytes(b"old")
    (out / "train_config.json").write_text("old")
    monkeypatch.setattr(train, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(Exception, match=message) as e:
        run(change(argv(tiny_sd1, out, "dreambooth", 2), tmp_path))
    assert "\n" not in str(e.value)
    assert (out / "train_config.json").read_text() == "old" and sorted(p.name for p in out.iterdir()) == \
        ["checkpoint-5", "train_config.json"]


def test_instance_prompt_without_identifier_warns(tiny_sd1, tmp_path):
    args = argv(tiny_sd1, tmp_path, "dreambooth", 1) + ["--instance_prompt", "a photo of dog"]
    with pytest.warns(UserWarning, match="does not contain the identifier 'sks'"):
        train.check_config(train.parse_args(args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.check_config(train.parse_args(argv(tiny_sd1, tmp_path, "dreambooth", 1)))


def test_demo_runs_offline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train.main(["--demo", "--max_train_steps", "4", "--num_class_images", "2", "--validation_steps", "2",
                "--sample_steps", "2"])
    assert (tmp_path / "runs/demo/samples/grid.png").is_file()
    assert (tmp_path / "runs/demo/unet/diffusion_pytorch_model.safetensors").is_file()
    assert len(list((tmp_path / "runs/demo/validation").iterdir())) == 2
    metrics = json.loads((tmp_path / "runs/demo/eval/metrics.json").read_text())   # the demo's table, scored
    assert len(metrics["prompts"]) == 2 * len(train.DEMO_SCENES) - 1
    assert all(0.0 <= row["scene_acc"] <= 1.0 for row in metrics["prompts"])


# ----------------------------------------------------------------------------- SDXL

def test_sdxl_dreambooth_lora_loads_in_diffusers_with_the_same_image(tiny_sdxl, tmp_path):
    """LoRA on the UNet and both text encoders; StableDiffusionXLPipeline.load_lora_weights reads our file."""
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    run(argv(tiny_sdxl, tmp_path, "dreambooth_lora", 4, "--train_text_encoder", "--learning_rate", "5e-2"))
    tensors = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) and ".lora_B" in k and v.abs().max() > 0 for k, v in tensors.items()), prefix
    prompt, kw = "a photo of sks dog", dict(seed=5, steps=4, guidance=5.0, height=64, width=96, progress=False)
    ours = np.asarray(generate(load_trained(tmp_path), [prompt], "blurry", **kw)[0], dtype=np.float32) / 255
    base = np.asarray(generate(load_models(tiny_sdxl), [prompt], "blurry", **kw)[0], dtype=np.float32) / 255
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path))
    ref = pipe(prompt, negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=64, width=96,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert np.abs(ours - base).max() > 0.05                             # the LoRA changes the image
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-6


def test_sdxl_rows_get_their_time_ids_and_cached_prompts(tiny_sdxl, tmp_path, monkeypatch):
    """time_ids per row from the photo's size and its crop (diffusers' SDXL DreamBooth script); with frozen text
    encoders each prompt is encoded once, before the loop."""
    import unet as unet_module
    seen, calls = [], []
    real_forward, real_text = unet_module.UNet.forward, train.text_conditioning
    monkeypatch.setattr(unet_module.UNet, "forward", lambda self, *a, **k: seen.append(k["time_ids"].clone()) or
                        real_forward(self, *a, **k))
    monkeypatch.setattr(train, "text_conditioning", lambda m, p: calls.append(list(p)) or real_text(m, p))
    from PIL import Image
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(48, 40), (40, 72), (64, 36)]):   # not square: the crop corners vary
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    args = [a for a in argv(tiny_sdxl, tmp_path / "out", "dreambooth_lora", 3, "--random_flip", "--train_batch_size",
                            "2", "--instance_data_dir", photos) if a != "--center_crop"]
    run(args)
    assert calls == [["a photo of sks dog"]]
    sizes = {(40, 48), (72, 40), (36, 64)}
    assert len(seen) == 3 and all(ids.shape == (2, 6) for ids in seen)
    for ids in torch.cat(seen).tolist():
        h, w, top, left, th, tw = map(int, ids)
        assert (h, w) in sizes and (th, tw) == (32, 32)
        short = min(h, w)
        assert 0 <= top <= round(h * 32 / short) - 32 and 0 <= left <= round(w * 32 / short) - 32
    assert len({tuple(ids) for ids in torch.cat(seen).tolist()}) > 1    # random crops: the corners differ


def test_prepare_with_crop_reports_the_mirrored_corner():
    from data import prepare_with_crop
    from PIL import Image
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    x, (top, left) = prepare_with_crop(im, 40, False, False, torch.Generator().manual_seed(1))
    xf, (top_f, left_f) = prepare_with_crop(im, 40, False, True, torch.Generator().manual_seed(1))
    assert torch.equal(xf, x.flip(-1)) and top_f == top == 0 and left_f == 60 - 40 - left
    a = np.asarray(im, dtype=np.float32)[:, left:left + 40] / 127.5 - 1
    torch.testing.assert_close(x, torch.from_numpy(a).permute(2, 0, 1))


def sdxl_pipe(folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_image(pipe, prompt):
    return pipe(prompt, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(4), output_type="np").images[0]


def our_image(models, prompt):
    im = generate(models, [prompt], "blurry", seed=4, steps=3, guidance=5.0, height=64, width=64, progress=False)[0]
    return np.asarray(im, dtype=np.float32) / 255


def test_sdxl_dreambooth_folder_loads_in_diffusers(tiny_sdxl, tmp_path):
    models = run(argv(tiny_sdxl, tmp_path, "dreambooth", 2, "--train_text_encoder"))
    base = load_models(tiny_sdxl)
    for name in ("unet", "text_encoder", "text_encoder_2"):   # the UNet and both text encoders trained
        assert any(not torch.equal(a, b) for a, b in zip(getattr(models, name).state_dict().values(),
                                                         getattr(base, name).state_dict().values())), name
    ref = pipe_image(sdxl_pipe(tmp_path), "a photo of sks dog")
    assert np.abs(our_image(load_trained(tmp_path), "a photo of sks dog") - ref).max() <= 1 / 255 + 1e-6
    assert np.abs(our_image(base, "a photo of sks dog") - ref).max() > 0.01


def test_sdxl_textual_inversion_file_loads_in_diffusers(tiny_sdxl, tmp_path):
    """One file with clip_l (n, 768-like) and clip_g rows, as A1111 writes SDXL embeddings; diffusers'
    load_textual_inversion reads each half into its encoder."""
    run(argv(tiny_sdxl, tmp_path, "textual_inversion", 3, "--learning_rate", "5e-2"))
    rows = load_file(tmp_path / "learned_embeds.safetensors")
    assert set(rows) == {"clip_l", "clip_g"} and rows["clip_l"].shape == (1, 32) and rows["clip_g"].shape == (1, 48)
    base = load_models(tiny_sdxl)
    dog = base.tokenizer.encode("dog")[1]
    for key, encoder in (("clip_l", base.text_encoder), ("clip_g", base.text_encoder_2)):   # moved from the init
        assert (rows[key][0] - encoder.text_model.embeddings.token_embedding.weight[dog]).abs().max() > 1e-3, key
    pipe = sdxl_pipe(tiny_sdxl)
    pipe.load_textual_inversion(rows["clip_l"], token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(rows["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of <sks> on the beach"
    ref = pipe_image(pipe, prompt)
    ours = load_trained(tmp_path)
    assert ours.tokenizer_2.encode("<sks>")[1] == ours.tokenizer.encode("<sks>")[1] == 49408
    assert np.abs(our_image(ours, prompt) - ref).max() <= 1 / 255 + 1e-6


def test_class_images_are_drawn_at_the_native_size_not_the_resolution(tmp_path):
    from tiny import make_tiny_model
    model = make_tiny_model(tmp_path / "tiny", sample_size=4)                  # native 4 x 8 = 32 px
    cfg = train.parse_args(argv(model, tmp_path / "out", "dreambooth", 1, "--with_prior_preservation", "--class_prompt",
                                "a photo of dog", "--class_data_dir", tmp_path / "cls", "--num_class_images", "1",
                                "--class_sample_steps", "2", "--resolution", "16"))
    paths = train.make_class_images(load_models(model), cfg)
    assert load_image(paths[0]).size == (32, 32)                                 # not --resolution's 16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_full_model_outputs_keep_the_frozen_parts_float32_as_loaded(precision, tiny_sd1, tmp_path):
    run(argv(tiny_sd1, tmp_path, "dreambooth", 2, "--mixed_precision", precision, "--checkpointing_steps", "1"))
    base = load_models(tiny_sd1)
    for folder in (tmp_path, tmp_path / "checkpoint-1"):
        for part, file in (("vae", "vae/diffusion_pytorch_model.safetensors"), ("text_encoder", "text_encoder/model.safetensors")):
            saved = load_file(folder / file)
            for name, p in getattr(base, part).state_dict().items():
                assert saved[name].dtype == torch.float32 and torch.equal(saved[name], p), (part, name)


def test_a_lora_trained_in_bf16_loads_in_diffusers_with_the_same_image(tiny_sd1, tmp_path):
    """UNet and text-encoder LoRA, the default (gaussian) init, bf16 mixed precision: pipe.load_lora_weights gives
    our image, and sample.py --lora_scale 0 the base model's."""
    out = tmp_path / "lora"
    run(argv(tiny_sd1, out, "dreambooth_lora", 3, "--learning_rate", "5e-2", "--train_text_encoder",
             "--mixed_precision", "bf16"))
    pipe = diffusers_pipe(tiny_sd1)
    base = same_images(pipe, load_models(tiny_sd1), "a photo of sks dog")
    pipe.load_lora_weights(out)
    ours = load_trained(out)
    assert same_images(pipe, ours, "a photo of sks dog") <= 1 / 255
    assert base <= 1 / 255                                                     # before loading: the base model
    lora_images = images_np(generate(ours, ["a photo of sks dog"], seed=3, steps=4, height=64, width=64, progress=False))
    base_images = images_np(generate(load_models(tiny_sd1), ["a photo of sks dog"], seed=3, steps=4, height=64,
                                     width=64, progress=False))
    assert np.abs(lora_images - base_images).max() > 2 / 255                  # the LoRA does something
    from sample import main as sample_main
    paths = sample_main(["--model", str(out), "--prompt", "a photo of sks dog", "--seed", "3", "--steps", "4",
                         "--height", "64", "--width", "64", "--lora_scale", "0", "--out", str(tmp_path / "s"),
                         "--device", "cpu"])
    assert np.abs(images_np([load_image(paths[0])]) - base_images).max() <= 1 / 255   # scale 0: the base model
