"""sample.py: image-for-image parity with diffusers' StableDiffusionPipeline, the CLI, bad input."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
import sample
from pipeline import generate, load_models

PROMPTS = ["a photo of a cat", "a red car on the beach at night"]
NEGATIVE = "blurry, low quality"


def diffusers_images(folder, scheduler_cls, height, width, steps=10, guidance=7.5, output_type="np", seeds=7):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=steps, guidance_scale=guidance, height=height,
                width=width, generator=pipeline.generators(seeds), output_type=output_type).images


@pytest.mark.parametrize("family", ["tiny_sd1", "tiny_sd2"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_generate_matches_diffusers_pipeline(family, sampler, request):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    folder = request.getfixturevalue(family)
    height, width = 64, 96                                            # non-square
    ref = diffusers_images(folder, {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler}[sampler], height, width)
    ours = generate(load_models(folder), PROMPTS, NEGATIVE, seed=7, steps=10, guidance=7.5, sampler=sampler,
                    height=height, width=width, progress=False)
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in ours])
    assert ours.shape == ref.shape == (2, height, width, 3)
    assert ref.std() > 0.01                                           # a real image, not a constant
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-6


def test_cli_writes_the_same_pngs_with_metadata_and_a_grid(tiny_sd1, tmp_path):
    from diffusers import DDIMScheduler
    ref = diffusers_images(tiny_sd1, DDIMScheduler, 64, 96, output_type="pil", seeds=[7, 8])  # image i: seed 7 + i
    args = ["--model", str(tiny_sd1), "--negative_prompt", NEGATIVE, "--seed", "7", "--steps", "10", "--height",
            "64", "--width", "96", "--out", str(tmp_path), "--device", "cpu"]
    paths = sample.main(args + [x for p in PROMPTS for x in ("--prompt", p)])
    assert [p.name for p in paths] == ["0000.png", "0001.png"] and (tmp_path / "grid.png").is_file()
    for path, r in zip(paths, ref):
        im = Image.open(path)
        diff = np.abs(np.asarray(im, dtype=np.int16) - np.asarray(r, dtype=np.int16))
        assert diff.max() <= 1
        assert im.text["steps"] == "10" and im.text["sampler"] == "ddim"
        assert im.text["guidance"] == "7.5" and im.text["prompt"] in PROMPTS
    assert [Image.open(p).text["seed"] for p in paths] == ["7", "8"]


def test_batches_do_not_change_the_images(tiny_sd1, tmp_path):
    base = ["--model", str(tiny_sd1), "--prompt", "a cat", "--num_images", "3", "--steps", "3", "--device", "cpu"]
    one = sample.main(base + ["--batch_size", "3", "--out", str(tmp_path / "a")])
    many = sample.main(base + ["--batch_size", "1", "--out", str(tmp_path / "b")])
    for a, b in zip(one, many):
        diff = np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16))
        assert diff.max() <= 1


@pytest.mark.parametrize("flags, message", [
    (["--height", "60"], "multiple of 8"),
    (["--width", "100"], "multiple of 8"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--guidance", "-1"], "--guidance must be >= 0"),
    (["--sampler", "heun"], "--sampler must be one of ddim, ddpm, dpmpp, euler"),
])
def test_bad_settings_fail_before_any_model_loads(flags, message, tiny_sd1, monkeypatch):
    monkeypatch.setattr(sample, "load_trained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=message) as e:
        sample.main(["--model", str(tiny_sd1), "--prompt", "a cat"] + flags)
    assert "\n" not in str(e.value)


def test_missing_model_folder_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "load_trained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(sample.ModelLoadError, match="does not exist"):
        sample.main(["--model", str(tmp_path / "nope"), "--prompt", "a cat"])


def test_long_prompt_warns_and_names_the_dropped_words(tiny_sd1, tmp_path):
    prompt = "a photo of a cat " + "very " * 80 + "sharp detailed zebra"
    with pytest.warns(UserWarning, match="drops: .*sharp detailed zebra"):
        sample.main(["--model", str(tiny_sd1), "--prompt", prompt, "--steps", "1", "--out", str(tmp_path)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample.main(["--model", str(tiny_sd1), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- SDXL

def sdxl_pipeline(folder, scheduler_cls=None):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_conditioning_matches_the_pipeline(tiny_sdxl):
    pipe, models = sdxl_pipeline(tiny_sdxl), load_models(tiny_sdxl)
    assert models.text_encoder_2.config.projection_dim == 24 and models.tokenizer_2.pad_token == "!"
    assert models.force_zeros_for_empty_prompt and models.vae.config.force_upcast
    with torch.no_grad():
        c, c_neg, pooled, pooled_neg = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=[NEGATIVE] * 2)
        ours, ours_neg = pipeline.text_conditioning(models, PROMPTS), pipeline.text_conditioning(models, [NEGATIVE] * 2)
        zeros = pipe.encode_prompt(PROMPTS, device="cpu")[1]   # no negative prompt: force_zeros_for_empty_prompt
    assert c.shape == (2, 77, 32 + 48) and pooled.shape == (2, 24)
    for a, b in [(ours["encoder_hidden_states"], c), (ours_neg["encoder_hidden_states"], c_neg),
                 (ours["text_embeds"], pooled), (ours_neg["text_embeds"], pooled_neg)]:
        assert b.abs().max() > 0.1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not (c[0] - c[1]).abs().max() < 1e-3                        # the prompts differ in the states
    assert zeros.abs().max() == 0
    ref_ids = pipe._get_add_time_ids((64, 96), (8, 16), (32, 48), torch.float32, text_encoder_projection_dim=24)
    assert torch.equal(pipeline.time_ids((64, 96), (8, 16), (32, 48)), ref_ids)


@pytest.mark.parametrize("sampler, negative", [("ddim", NEGATIVE), ("euler", NEGATIVE), ("euler", None),
                                               ("dpmpp", NEGATIVE)])
def test_sdxl_generate_matches_the_pipeline(tiny_sdxl, sampler, negative):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp": DPMSolverMultistepScheduler}[sampler]
    pipe = sdxl_pipeline(tiny_sdxl, cls)
    height, width = 64, 96                                            # non-square
    ref = pipe(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, num_inference_steps=10,
               guidance_scale=5.0, height=height, width=width, generator=torch.Generator("cpu").manual_seed(7),
               output_type="np").images
    ours = generate(load_models(tiny_sdxl), PROMPTS, negative or "", seed=7, steps=10, guidance=5.0, sampler=sampler,
                    height=height, width=width, progress=False)
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in ours])
    assert ours.shape == ref.shape == (2, height, width, 3)
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-6


def test_sdxl_save_models_round_trips_into_the_pipeline(tiny_sdxl, tmp_path):
    models = load_models(tiny_sdxl)
    pipeline.save_models(models, tmp_path / "ours")
    again = load_models(tmp_path / "ours")
    assert again.text_encoder_2 is not None and again.force_zeros_for_empty_prompt
    pipe = sdxl_pipeline(tmp_path / "ours")
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_sdxl_cli_in_float16_keeps_the_force_upcast_vae_float32(tiny_sdxl, tmp_path):
    half = load_models(tiny_sdxl, dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == next(half.text_encoder_2.parameters()).dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32          # force_upcast: SDXL's VAE overflows in fp16
    kw = dict(seed=1, steps=4, guidance=5.0, height=32, width=48, sampler="euler", progress=False)
    a = np.asarray(generate(half, ["a cat"], **kw)[0], dtype=np.float32)
    b = np.asarray(generate(load_models(tiny_sdxl), ["a cat"], **kw)[0], dtype=np.float32)
    assert b.std() > 3 and np.abs(a - b).max() <= 4                    # float16 rounding, not a different image
    paths = sample.main(["--model", str(tiny_sdxl), "--prompt", "a cat", "--sampler", "euler", "--dtype", "float16",
                         "--steps", "2", "--height", "32", "--width", "48", "--device", "cpu", "--out", str(tmp_path)])
    assert Image.open(paths[0]).size == (48, 32) and Image.open(paths[0]).text["sampler"] == "euler"


def test_generate_runs_with_parts_in_different_dtypes(tiny_sd1):
    """train.py holds trained parts float32 and frozen ones half: generate casts each input to its reader's dtype."""
    models = load_models(tiny_sd1)
    ref = generate(models, ["a photo of a cat"], seed=1, steps=3, height=32, width=32, output="tensor", progress=False)
    models.unet.to(torch.bfloat16)                                             # text encoder and VAE stay float32
    mixed = generate(models, ["a photo of a cat"], seed=1, steps=3, height=32, width=32, output="tensor", progress=False)
    models.unet.float()
    models.vae.to(torch.bfloat16)
    mixed_vae = generate(models, ["a photo of a cat"], seed=1, steps=3, height=32, width=32, output="tensor",
                         progress=False)
    for out in (mixed, mixed_vae):
        assert out.float().sub(ref).abs().max() < 0.1
