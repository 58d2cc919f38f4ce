"""A tiny Stable Diffusion with random weights, written in the diffusers layout.

It has the real architecture (same blocks, same key names, the real CLIP tokenizer and vocabulary) at a
few hundred thousand parameters, so every pipeline in nanobooth runs offline on a CPU in seconds. Its
weights are random: images from it are noise-like patterns, and training on it shows that the code runs
and that losses fall, not what a real model learns. `python tiny.py OUT` writes one.
"""
import dataclasses
import sys
from pathlib import Path

import torch

from pipeline import SDModels, save_models
from schedulers import NoiseSchedule
from text_encoder import CLIPTextModel, CLIPTokenizer, TextEncoderConfig
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig


def tiny_models(seed: int = 0, family: str = "sd1", sample_size: int | None = None) -> SDModels:
    """Random tiny models; family 'sd1' (conv projections, quick_gelu, pad = EOS) or 'sd2' (linear
    projections, per-level heads, gelu, pad = '!'). `sample_size`: the UNet's native latent size (16, so 128 px,
    by default); it changes no weight."""
    torch.manual_seed(seed)
    sd2 = family == "sd2"
    unet_config = UNetConfig.tiny_sd2() if sd2 else UNetConfig.tiny()
    if sample_size is not None:
        unet_config = dataclasses.replace(unet_config, sample_size=sample_size)
    return SDModels(tokenizer=CLIPTokenizer.from_pretrained(None, pad_token="!" if sd2 else None),
                    text_encoder=CLIPTextModel(TextEncoderConfig.tiny_sd2() if sd2 else TextEncoderConfig.tiny()),
                    unet=UNet(unet_config),
                    vae=VAE(VAEConfig.tiny()),
                    schedule=NoiseSchedule.sd())


def make_tiny_model(folder, seed: int = 0, family: str = "sd1", sample_size: int | None = None) -> Path:
    """Write a random tiny model to `folder` (once: an existing complete folder is reused)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        save_models(tiny_models(seed, family, sample_size), folder)
    return folder


if __name__ == "__main__":
    out = make_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-model")
    print(f"wrote a random tiny SD model to {out}")
