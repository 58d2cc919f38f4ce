"""Shared fixtures: tiny SD pipelines saved by diffusers itself, the way a Hub repo is made.

The reference models (diffusers' UNet2DConditionModel / AutoencoderKL, transformers' CLIPTextModel and
CLIPTokenizer) are built from our tiny presets' `to_json()`, given random weights, and written with
`StableDiffusionPipeline.save_pretrained`: the folder our loaders must read.
"""
import pytest
import torch


def save_diffusers_pipeline(folder, family: str = "sd1", seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from schedulers import NoiseSchedule
    from text_encoder import CLIPTokenizer, TextEncoderConfig
    from unet import UNetConfig
    from vae import VAEConfig

    sd2 = family == "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config((UNetConfig.tiny_sd2() if sd2 else UNetConfig.tiny()).to_json())
    vae = AutoencoderKL.from_config(VAEConfig.tiny().to_json())
    text_config = (TextEncoderConfig.tiny_sd2() if sd2 else TextEncoderConfig.tiny()).to_json()
    text_encoder = HFCLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_config.items() if not k.startswith("_")}))
    with torch.no_grad():  # random norms and biases too, so a swapped or missing one shows in the outputs
        for name, p in list(unet.named_parameters()) + list(vae.named_parameters()):
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    CLIPTokenizer.from_pretrained(None, pad_token="!" if sd2 else None).save_pretrained(tok_dir)
    tokenizer = HFCLIPTokenizer.from_pretrained(tok_dir)
    scheduler = DDIMScheduler.from_config(NoiseSchedule.sd().to_config())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """A tiny SD1-style pipeline folder written by diffusers (conv projections, quick_gelu, pad = EOS)."""
    return save_diffusers_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A tiny SD2-style pipeline folder (linear projections, per-level heads, gelu, pad = '!')."""
    return save_diffusers_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd2", "sd2")
