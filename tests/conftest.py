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


def save_diffusers_sdxl_pipeline(folder, seed: int = 0):
    """A tiny SDXL pipeline (two text encoders, the second with a projection; text_time UNet; force_upcast VAE;
    SDXL's Euler scheduler file) written by `StableDiffusionXLPipeline.save_pretrained`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from text_encoder import CLIPTokenizer, TextEncoderConfig
    from unet import UNetConfig
    from vae import PRESETS

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNetConfig.tiny_sdxl().to_json())
    vae = AutoencoderKL.from_config(PRESETS["tiny_sdxl"].to_json())
    hf_config = lambda c: CLIPTextConfig(**{k: v for k, v in c.to_json().items() if not k.startswith("_")})
    text_encoder = CLIPTextModel(hf_config(TextEncoderConfig.tiny()))
    text_encoder_2 = CLIPTextModelWithProjection(hf_config(TextEncoderConfig.tiny_sdxl_2()))
    with torch.no_grad():  # random norms and biases too; larger text weights, so prompts give distinct states
        for name, p in list(unet.named_parameters()) + list(vae.named_parameters()):
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        for p in list(text_encoder.parameters()) + list(text_encoder_2.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    tokenizers = []
    for name, pad in (("tokenizer", None), ("tokenizer_2", "!")):  # SDXL: CLIP-L pads with EOS, bigG with '!'
        tok_dir = folder.parent / f"{folder.name}-{name}"
        CLIPTokenizer.from_pretrained(None, pad_token=pad).save_pretrained(tok_dir)
        tokenizers.append(HFCLIPTokenizer.from_pretrained(tok_dir))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL pipeline folder written by diffusers."""
    return save_diffusers_sdxl_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """A tiny SD1-style pipeline folder written by diffusers (conv projections, quick_gelu, pad = EOS)."""
    return save_diffusers_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A tiny SD2-style pipeline folder (linear projections, per-level heads, gelu, pad = '!')."""
    return save_diffusers_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd2", "sd2")
