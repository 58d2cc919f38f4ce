"""vae.py against diffusers' AutoencoderKL (the reference), on a tiny config and, on `meta`, at full size."""
import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

import attention
import hub
from vae import PRESETS, VAE, DiagonalGaussian, VAEConfig, rename_legacy_attention

# float32 parity is to 1e-5 relative to the reference's largest value: diffusers' mid-block attention returns a
# channels-last tensor, so the rest of its decoder runs channels-last kernels that round differently from ours
# (contiguous NCHW). In float64 the same comparison holds to 1e-10.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# vae/config.json of stable-diffusion-v1-5/stable-diffusion-v1-5, as on the Hub.
SD15_HUB_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# vae/config.json of the SD 2.1(-base) repos: no scaling_factor, sample_size 768.
SD21_HUB_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 768, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# vae/config.json of stabilityai/stable-diffusion-xl-base-1.0: SD's architecture, its own scale, force_upcast.
SDXL_HUB_CONFIG = {**SD15_HUB_CONFIG, "_diffusers_version": "0.20.0.dev0", "sample_size": 1024,
                   "scaling_factor": 0.13025, "force_upcast": True}


@pytest.fixture(scope="module")
def reference():
    """A tiny diffusers AutoencoderKL with random weights, GroupNorm affines included (they init to 1 and 0)."""
    torch.manual_seed(0)
    ref = AutoencoderKL.from_config(VAEConfig.tiny().to_json()).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def ours(reference):
    model = VAE(VAEConfig.tiny()).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square, in [-1, 1]


def assert_close(a, b, tol=None):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    bound = (tol or TOL[a.dtype]) * max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= bound, ((a - b).abs().max().item(), bound)


def same_outputs(model, reference, images):
    """Our encode mean and decode equal diffusers'."""
    with torch.no_grad():
        ref = reference.encode(images).latent_dist
        dist = model.encode(images)
        assert_close(dist.mean, ref.mean)
        assert_close(model.decode(dist.mean), reference.decode(ref.mean).sample)


# ----------------------------------------------------------------------------- parity on the tiny config

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_parity_with_diffusers(ours, reference, images, dtype):
    ours, reference, images = copy.deepcopy(ours).to(dtype), copy.deepcopy(reference).to(dtype), images.to(dtype)
    with torch.no_grad():
        ref = reference.encode(images).latent_dist
        dist = ours.encode(images)
        assert dist.mean.shape == (2, 4, 6, 8)  # H/8, W/8: four levels, three downsamplers
        for field in ("mean", "logvar", "std", "var"):
            assert_close(getattr(dist, field), getattr(ref, field))
        assert_close(dist.mode(), ref.mode())
        assert_close(dist.kl(), ref.kl())
        assert dist.kl().shape == (2,)
        z = dist.sample(torch.Generator().manual_seed(7))
        assert_close(z, ref.sample(torch.Generator().manual_seed(7)))
        assert (z - dist.mean).abs().max() > 1e-3  # the sample is not the mean
        x = ours.decode(z)
        assert x.shape == images.shape
        assert_close(x, reference.decode(z).sample)
        assert_close(ours(images, torch.Generator().manual_seed(3)),
                     reference(images, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample)


def test_logvar_is_clamped():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), -100.0), torch.full((1, 2, 2, 2), 100.0)], 1)
    dist = DiagonalGaussian(moments)
    assert dist.logvar[:, :2].eq(-30.0).all() and dist.logvar[:, 2:].eq(20.0).all()
    assert torch.isfinite(dist.kl()).all()


def test_manual_and_sdpa_attention_agree(ours, images, monkeypatch):
    with torch.no_grad():
        fast = ours.decode(ours.encode(images).mean)
        monkeypatch.setattr(attention, "SDPA", False)
        manual = ours.decode(ours.encode(images).mean)
    assert_close(fast, manual)


def test_gradient_checkpointing(ours, images):
    """Same decode output and input gradients; the checkpointed blocks really run again in backward."""
    calls = []
    hook = ours.decoder.mid_block.register_forward_pre_hook(lambda *_: calls.append(1))
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    results = []
    try:
        for flag in (False, True):
            ours.gradient_checkpointing = flag
            calls.clear()
            zz = z.clone().requires_grad_(True)
            x = ours.decode(zz)
            (x ** 2).mean().backward()
            results.append((x.detach(), zz.grad, len(calls)))
    finally:
        ours.gradient_checkpointing = False
        hook.remove()
        ours.zero_grad(set_to_none=True)
    (x0, g0, n0), (x1, g1, n1) = results
    assert (n0, n1) == (1, 2)
    assert_close(x0, x1)
    assert_close(g0, g1)
    assert g0.abs().max() > 0


# ----------------------------------------------------------------------------- full size, configs

def test_full_size_matches_diffusers_on_meta():
    with torch.device("meta"):
        ours = VAE(VAEConfig.from_json(SD15_HUB_CONFIG))
        ref = AutoencoderKL.from_config(SD15_HUB_CONFIG)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # docs/sd-reference.md section 3
    assert not list(ours.buffers())


def test_configs():
    assert VAEConfig.from_json(SD15_HUB_CONFIG) == VAEConfig.sd() == VAEConfig.sd15() == PRESETS["sd15"]
    sd21 = VAEConfig.from_json(SD21_HUB_CONFIG)
    assert sd21 == VAEConfig.sd21() and sd21.scaling_factor == 0.18215 and not sd21.force_upcast
    assert VAEConfig.from_json(SDXL_HUB_CONFIG) == PRESETS["sdxl"]
    assert PRESETS["sdxl"].scaling_factor == 0.13025 and PRESETS["sdxl"].force_upcast
    for cfg in PRESETS.values():
        assert VAEConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    tiny = AutoencoderKL.from_config(VAEConfig.tiny().to_json())  # diffusers reads our config.json as we meant it
    assert VAEConfig.from_json(dict(tiny.config)) == VAEConfig.tiny()
    assert list(tiny.config.block_out_channels) == [16, 32, 32, 32] and tiny.config.norm_num_groups == 8
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_json({**SD15_HUB_CONFIG, "act_fn": "relu"})
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_json({**SD15_HUB_CONFIG, "use_quant_conv": False})


# ----------------------------------------------------------------------------- loading and saving

def test_diffusers_folder_round_trips(ours, reference, images, tmp_path):
    reference.save_pretrained(tmp_path / "component")
    same_outputs(VAE.from_pretrained(tmp_path / "component"), reference, images)
    reference.save_pretrained(tmp_path / "pipeline" / "vae")
    loaded = VAE.from_pretrained(tmp_path / "pipeline")
    assert loaded.config == VAEConfig.tiny()
    same_outputs(loaded, reference, images)

    ours.save_pretrained(tmp_path / "ours")
    back, info = AutoencoderKL.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    same_outputs(ours, back.eval(), images)


def test_save_and_load_dtypes(ours, tmp_path):
    ours.save_pretrained(tmp_path, dtype=torch.float16)
    half = VAE.from_pretrained(tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert_close(half.decoder.conv_out.weight, ours.decoder.conv_out.weight.half(), tol=1e-7)
    # force_upcast (SDXL): a float16 load asked to `upcast` keeps this VAE float32; without the flag it is float16
    assert VAE.from_pretrained(tmp_path, dtype=torch.float16, upcast=True).decoder.conv_out.weight.dtype == torch.float16
    xl = VAE(PRESETS["tiny_sdxl"])
    xl.load_state_dict(ours.state_dict())
    xl.save_pretrained(tmp_path / "xl")
    assert AutoencoderKL.from_pretrained(tmp_path / "xl").config.force_upcast is True
    assert VAE.from_pretrained(tmp_path / "xl", dtype=torch.float16, upcast=True).decoder.conv_out.weight.dtype == torch.float32
    assert VAE.from_pretrained(tmp_path / "xl", dtype=torch.float16).decoder.conv_out.weight.dtype == torch.float16


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_legacy_attention_names(reference, images, tmp_path, conv_shaped):
    legacy = {}
    for name, tensor in reference.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in name:
                name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                if conv_shaped and tensor.ndim == 2:  # LDM stores these as 1x1 convs
                    tensor = tensor[:, :, None, None]
        legacy[name] = tensor.contiguous()
    assert sum("proj_attn" in k for k in legacy) == 4  # encoder and decoder, weight and bias
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(VAEConfig.tiny().to_json()))
    same_outputs(VAE.from_pretrained(tmp_path), reference, images)
    assert set(rename_legacy_attention(legacy)) == set(reference.state_dict())


def test_missing_weights_are_named(reference, tmp_path):
    sd = {k: v for k, v in reference.state_dict().items() if "post_quant_conv" not in k}
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(VAEConfig.tiny().to_json()))
    with pytest.raises(hub.ModelLoadError, match="post_quant_conv.weight"):
        VAE.from_pretrained(tmp_path)
