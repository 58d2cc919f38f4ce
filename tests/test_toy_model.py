"""The shipped toy model (assets/toy/model): it loads strict in nanobooth, diffusers samples it with the plain
call the README shows, and it draws the shapes it is asked for (a small sample of benchmarks/bench_toy_world.py,
scored by the render-and-compare detector, with a margin below the benchmark's figure)."""
from pathlib import Path

import numpy as np
import torch

import detector
import world
from pipeline import generate, load_models

TOY = Path(__file__).parent.parent / "assets" / "toy"


def test_diffusers_samples_the_shipped_model_with_the_plain_call():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(TOY / "model", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe("a red star on the beach", num_inference_steps=4, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 5       # an image, not a flat field


def test_shipped_model_draws_the_asked_shape():
    models = load_models(TOY / "model")                                  # strict loading of every part
    prompts = world.eval_prompts(24, seed=7)
    images = generate(models, [p for p, _ in prompts], seed=0, steps=12, guidance=4.0, height=64, width=64,
                      progress=False)
    found = [detector.detect(im, f["colour"]) for im, (_, f) in zip(images, prompts)]
    shape = np.mean([d["present"] and d["shape"] == f["shape"] for d, (_, f) in zip(found, prompts)])
    present = np.mean([d["present"] for d in found])
    assert present >= 0.85 and shape >= 0.65, f"object of the asked colour in {present:.0%}, asked shape in {shape:.0%}"
