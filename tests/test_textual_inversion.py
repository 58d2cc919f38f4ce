"""Textual Inversion against diffusers' recipe (examples/textual_inversion/textual_inversion.py and its README's
command: --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 3000 --learning_rate 5e-4 --scale_lr,
its dataset's flip_p 0.5, its template lists, no gradient clipping), multi-vector tokens, diffusers loading them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from pipeline import generate, load_models, load_trained
from text_encoder import CLIPTokenizer
from helpers import one_thread  # noqa: F401  (an autouse fixture)

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "assets" / "demo" / "dog"

# diffusers' examples/textual_inversion/textual_inversion.py, copied as the reference the code must equal
DIFFUSERS_OBJECT = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}", "a rendition of the {}",
    "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}",
    "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}"]
DIFFUSERS_STYLE = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}"]


def ti_args(model, out, *extra):
    """Only what a user must give: no lr, steps, accumulation, flip or clipping flags (those are the recipe's)."""
    return ["--method", "textual_inversion", "--pretrained_model_name_or_path", str(model), "--instance_data_dir",
            str(DOG), "--placeholder_token", "<sks>", "--initializer_token", "dog", "--resolution", "32",
            "--output_dir", str(out), "--device", "cpu", *map(str, extra)]


def test_the_defaults_are_diffusers_recipe(tiny_sd1, tmp_path):
    cfg = train.parse_args(ti_args(tiny_sd1, tmp_path))
    assert (cfg.learning_rate or train.METHOD_TABLE[cfg.method].lr) == 5e-4 and cfg.scale_lr
    assert (cfg.gradient_accumulation_steps, cfg.max_train_steps, cfg.train_batch_size) == (4, 3000, 1)
    assert cfg.random_flip and cfg.max_grad_norm == 0 and cfg.lr_scheduler == "constant"
    assert train.TEMPLATES["object"] == DIFFUSERS_OBJECT and len(DIFFUSERS_OBJECT) == 27
    assert train.TEMPLATES["style"] == DIFFUSERS_STYLE and len(DIFFUSERS_STYLE) == 19
    other = train.parse_args(ti_args(tiny_sd1, tmp_path)[:2] + ["--method", "dreambooth"] + ti_args(tiny_sd1, tmp_path)[2:])
    assert (other.gradient_accumulation_steps, other.scale_lr, other.random_flip) == (1, False, False)
    given = train.parse_args(ti_args(tiny_sd1, tmp_path, "--gradient_accumulation_steps", "2", "--no-random_flip"))
    assert given.gradient_accumulation_steps == 2 and not given.random_flip        # a given flag wins


@pytest.mark.parametrize("prop, templates", [("object", DIFFUSERS_OBJECT), ("style", DIFFUSERS_STYLE)])
def test_a_run_uses_the_scaled_lr_the_templates_flips_and_no_clipping(prop, templates, tiny_sd1, tmp_path,
                                                                      monkeypatch):
    prompts, flips, clips = [], [], []
    real_call, real_prepare = CLIPTokenizer.__call__, train.prepare_with_crop
    monkeypatch.setattr(CLIPTokenizer, "__call__", lambda self, texts: prompts.extend(
        [texts] if isinstance(texts, str) else texts) or real_call(self, texts))
    monkeypatch.setattr(train, "prepare_with_crop", lambda im, r, c=False, flip=False, g=None: flips.append(flip) or
                        real_prepare(im, r, c, flip, g))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(a))
    run_args = ti_args(tiny_sd1, tmp_path, "--max_train_steps", "10", "--train_batch_size", "2",
                       "--learnable_property", prop)
    train.train(train.parse_args(run_args))
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert all(r["lr"] == pytest.approx(5e-4 * 2 * 4) for r in logs)            # lr x batch x accumulation x 1
    trained = [p for p in prompts if "<sks>" in p]
    assert len(trained) == 10 * 4 * 2 and {p.replace("<sks>", "{}") for p in trained} <= set(templates)
    assert len(set(trained)) >= 10                                              # drawn from the whole list
    assert len(flips) == 80 and 0.3 < sum(flips) / len(flips) < 0.7              # flip_p 0.5
    assert clips == []                                                          # no clipping


def test_clipping_when_asked_measures_only_the_trained_row(tiny_sd1, tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        seen.append([p.grad.clone() for p in params])
        return real(params, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    models = train.train(train.parse_args(ti_args(tiny_sd1, tmp_path, "--max_train_steps", "2", "--max_grad_norm",
                                                  "1e-6")))
    new_row = models.tokenizer.encode("<sks>")[1]
    (table_grad,), _ = seen
    assert table_grad[new_row].abs().sum() > 0
    assert table_grad[:new_row].abs().sum() == 0                                # the frozen rows are not measured


def test_multi_vector_embeddings_train_save_and_load_in_diffusers(tiny_sd1, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    models = train.train(train.parse_args(ti_args(tiny_sd1, tmp_path, "--num_vectors", "3", "--max_train_steps", "3",
                                                  "--learning_rate", "5e-2", "--gradient_accumulation_steps", "1")))
    ids = models.tokenizer.encode("a photo of <sks>")
    assert ids[-4:-1] == [49408, 49409, 49410]                                  # <sks> is written as its 3 tokens
    saved = load_file(tmp_path / "learned_embeds.safetensors")
    assert list(saved) == ["<sks>"] and saved["<sks>"].shape == (3, 32)
    base = load_models(tiny_sd1).text_encoder.text_model.embeddings.token_embedding.weight
    table = models.text_encoder.text_model.embeddings.token_embedding.weight
    assert torch.equal(table[:-3], base) and torch.equal(saved["<sks>"], table[-3:].detach())
    assert all(not torch.equal(row, base[models.tokenizer.encode("dog")[1]]) for row in saved["<sks>"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(tmp_path, weight_name="learned_embeds.safetensors")
    prompt = "a photo of <sks> on the beach"
    ref = pipe([prompt], num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(3),
               output_type="np").images
    loaded = load_trained(tmp_path)
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in generate(
        loaded, [prompt], seed=3, steps=3, height=64, width=64, progress=False)])
    assert np.abs(ours - ref).max() <= 1 / 255
    one = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in generate(
        loaded, ["a photo of <sks>_1 on the beach"], seed=3, steps=3, height=64, width=64, progress=False)])
    assert np.abs(one - ref).max() > 2 / 255                                    # all three vectors matter
