"""lora.py: B = 0 is the identity, merge equals the unmerged forward, base keys unchanged, only A/B train,
and our LoRA files round-trip and load in diffusers (peft) with the same outputs.

Reference models are diffusers' tiny UNet2DConditionModel (same module names as ours) and a tiny
transformers CLIPTextModel."""
import copy
import math
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lora import (LoRAConv2d, LoRALinear, base_state_dict, inject_lora, load_lora, lora_layers, lora_parameters,
                  lora_state_dict, mark_only_lora_trainable, merge_lora, save_lora, unmerge_lora)

diffusers = pytest.importorskip("diffusers")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def tiny_unet():
    """SD1-like: cross-attention blocks, 1x1-conv proj_in/proj_out (use_linear_projection=False)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2).eval()


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def randomize_lora(model, seed=1):
    """Random A and B, so the update is not zero and a wrong scale or transpose would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 8, generator=g)


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


# ----------------------------------------------------------------------------- layers

def test_lora_linear_is_the_formula():
    base = nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), rank=3, alpha=6)
    randomize_lora(layer)
    x = torch.randn(4, 6)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert layer.scale == 2.0 and A.shape == (3, 6) and B.shape == (5, 3)
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ A.T @ B.T)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_lora_weights_stay_fp32_on_a_half_precision_base():
    layer = LoRALinear(nn.Linear(6, 5).to(torch.bfloat16), rank=2)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    assert layer(torch.randn(3, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_b_zero_is_identity_and_merge_is_exact(inputs):
    unet = tiny_unet()
    before = run(unet, inputs)
    originals = {k: v.clone() for k, v in unet.state_dict().items()}
    names = inject_lora(unet, rank=4, alpha=8)
    assert len(names) == 4 * 2 * 4  # (to_q, to_k, to_v, to_out.0) x (attn1, attn2) x 4 transformer blocks
    assert all(isinstance(m, LoRALinear) for m in lora_layers(unet).values())
    assert all((m.lora_B.weight == 0).all() for m in lora_layers(unet).values())
    assert torch.equal(run(unet, inputs), before)

    randomize_lora(unet)
    unmerged = run(unet, inputs)
    assert (unmerged - before).abs().max() > 0.1
    merge_lora(unet)
    assert all(m.merged for m in lora_layers(unet).values())
    torch.testing.assert_close(run(unet, inputs), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(unet)
    for k, v in base_state_dict(unet).items():
        torch.testing.assert_close(v, originals[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(unet, inputs), unmerged, atol=1e-5, rtol=0)


def test_base_state_dict_keeps_base_names(inputs):
    unet = tiny_unet()
    original = unet.state_dict()
    inject_lora(unet)
    sd = unet.state_dict()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in sd
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in sd
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in sd
    base = base_state_dict(unet)
    assert list(base) == list(original)
    torch.manual_seed(123)
    fresh = diffusers.UNet2DConditionModel.from_config(unet.config).eval()  # other random weights
    assert not torch.equal(run(fresh, inputs), run(unet, inputs))
    fresh.load_state_dict(base, strict=True)
    assert torch.equal(run(fresh, inputs), run(unet, inputs))


def test_training_step_changes_only_lora(inputs):
    unet = tiny_unet()
    inject_lora(unet, rank=4)
    params = mark_only_lora_trainable(unet)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert len(params) == 2 * len(lora_layers(unet))
    frozen = {k: v.clone() for k, v in base_state_dict(unet).items()}
    A0 = [m.lora_A.weight.clone() for m in lora_layers(unet).values()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(2):
        loss = unet(*inputs).sample.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        A = [m.lora_A.weight for m in lora_layers(unet).values()]
        B = [m.lora_B.weight for m in lora_layers(unet).values()]
        assert all((b != 0).any() for b in B)
        # with B = 0 the gradient of A is zero, so A only moves from the second step on
        assert all(torch.equal(a, a0) for a, a0 in zip(A, A0)) == (step == 0)
    for k, v in base_state_dict(unet).items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None for n, p in unet.named_parameters() if ".lora_" not in n)


def test_conv_1x1_target(inputs):
    unet = tiny_unet()
    before = run(unet, inputs)
    names = inject_lora(unet, targets=("proj_in", "proj_out"), rank=2, alpha=3)
    # 4 transformer blocks: down_blocks.0, mid_block, up_blocks.1 x 2
    assert len(names) == 8 and names[:2] == ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out"]
    layer = unet.get_submodule(names[0])
    assert isinstance(layer, LoRAConv2d) and layer.lora_A.weight.shape == (2, 8, 1, 1)
    assert torch.equal(run(unet, inputs), before)
    randomize_lora(unet)
    unmerged = run(unet, inputs)
    assert (unmerged - before).abs().max() > 0.1
    merge_lora(unet)
    torch.testing.assert_close(run(unet, inputs), unmerged, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- injection

def test_inject_matches_whole_name_parts_and_filter():
    model = nn.Module()
    model.to_out = nn.ModuleList([nn.Linear(4, 4)])
    model.xto_out = nn.ModuleList([nn.Linear(4, 4)])
    model.to_q = nn.Linear(4, 4)
    assert inject_lora(model, targets=("to_out.0",)) == ["to_out.0"]
    assert isinstance(model.to_out[0], LoRALinear) and type(model.xto_out[0]) is nn.Linear

    unet = tiny_unet()
    names = inject_lora(unet, filter=lambda n: ".attn2." in n)
    assert len(names) == 16 and all(".attn2." in n for n in names)


def test_inject_errors():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="no module of UNet2DConditionModel ends with"):
        inject_lora(unet, targets=("to_qq",))
    with pytest.raises(ValueError, match="after filter"):
        inject_lora(unet, filter=lambda n: "nope" in n)
    with pytest.raises(TypeError, match="1x1"):
        inject_lora(unet, targets=("conv_in",))  # a 3x3 conv
    inject_lora(unet)
    with pytest.raises(ValueError, match="already has a LoRA"):
        inject_lora(unet)


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path, inputs):
    unet = tiny_unet()
    inject_lora(unet, rank=4, alpha=3)
    randomize_lora(unet)
    expected = run(unet, inputs)
    file = save_lora(tmp_path, unet)
    assert file == tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == {f"unet.{k}" for k in lora_state_dict(unet)}
    assert json.loads(meta["nanobooth"]) == {"unet": {"rank": 4, "alpha": 3.0}}
    assert meta["format"] == "pt" and json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 3.0

    fresh = tiny_unet()
    info = load_lora(file, {"unet": fresh})
    assert info["unet"]["rank"] == 4 and info["unet"]["alpha"] == 3.0 and len(info["unet"]["modules"]) == 32
    assert all(m.scale == 0.75 for m in lora_layers(fresh).values())
    assert torch.equal(run(fresh, inputs), expected)
    load_lora(file, {"unet": fresh})  # into an already injected model of the same rank
    assert torch.equal(run(fresh, inputs), expected)
    other = tiny_unet()
    inject_lora(other, rank=2)
    with pytest.raises(ValueError, match="has rank 2"):
        load_lora(file, {"unet": other})


def test_load_plain_diffusers_file_means_scale_one(tmp_path, inputs):
    """A file with no alpha anywhere (diffusers before 0.34) has the scale baked into B: alpha = rank."""
    unet = tiny_unet()
    inject_lora(unet, rank=4)
    randomize_lora(unet)
    save_file({f"unet.{k}": v.contiguous() for k, v in lora_state_dict(unet).items()}, str(tmp_path / "x.safetensors"))
    fresh = tiny_unet()
    assert load_lora(tmp_path / "x.safetensors", {"unet": fresh})["unet"]["alpha"] == 4.0
    assert torch.equal(run(fresh, inputs), run(unet, inputs))


def test_load_errors(tmp_path):
    unet = tiny_unet()
    save_file({"unet.down_blocks.9.to_q.lora_A.weight": torch.zeros(2, 8),
               "unet.down_blocks.9.to_q.lora_B.weight": torch.zeros(8, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="match no module"):
        load_lora(tmp_path / "bad.safetensors", {"unet": unet})
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(2, 8)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="pass the 'text_encoder' model"):
        load_lora(tmp_path / "te.safetensors", {"unet": unet})
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 8)}, str(tmp_path / "kohya.safetensors"))
    with pytest.raises(ValueError, match="kohya"):
        load_lora(tmp_path / "kohya.safetensors", {"unet": unet})
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="without lora_B"):
        load_lora(tmp_path / "half.safetensors", {"unet": unet})
    with pytest.raises(FileNotFoundError):
        load_lora(tmp_path / "missing", {"unet": unet})
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(tmp_path, unet)


def test_diffusers_loads_our_file(tmp_path, inputs):
    pytest.importorskip("peft")
    unet = tiny_unet()
    inject_lora(unet, rank=4, alpha=3)
    randomize_lora(unet)
    save_lora(tmp_path, unet)
    theirs = tiny_unet()
    # use_safetensors=True: without it `load_lora_adapter(folder)` skips the safetensors branch and with it
    # the metadata that carries alpha (diffusers 0.42); `load_lora_weights` sets it itself
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", use_safetensors=True)
    torch.testing.assert_close(run(theirs, inputs), run(unet, inputs), atol=1e-5, rtol=0)


def test_pipeline_load_lora_weights_reads_unet_and_text_encoder(tmp_path, inputs):
    pytest.importorskip("peft")
    unet, text_encoder = tiny_unet(), nn.Module()
    # our CLIP keeps the checkpoint's `text_model.` level (transformers >= 5 drops it): file keys are
    # `text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj.lora_A.weight`
    text_encoder.text_model = tiny_text_encoder()
    inject_lora(unet, rank=4, alpha=3)
    inject_lora(text_encoder, targets=TEXT_TARGETS, rank=2, alpha=5)
    randomize_lora(unet, seed=1)
    randomize_lora(text_encoder, seed=2)
    save_lora(tmp_path, {"unet": unet, "text_encoder": text_encoder})

    vae = diffusers.AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_text_encoder(), tokenizer=None, unet=tiny_unet(),
        scheduler=diffusers.DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(run(pipe.unet, inputs), run(unet, inputs), atol=1e-5, rtol=0)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = text_encoder.text_model(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state
        plain = tiny_text_encoder()(ids).last_hidden_state
    assert (ours - plain).abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    fresh_unet, fresh_text = tiny_unet(), nn.Module()
    fresh_text.text_model = tiny_text_encoder()
    info = load_lora(tmp_path, {"unet": fresh_unet, "text_encoder": fresh_text})
    assert (info["text_encoder"]["rank"], info["text_encoder"]["alpha"]) == (2, 5.0)
    with torch.no_grad():
        assert torch.equal(fresh_text.text_model(ids).last_hidden_state, ours)
    assert torch.equal(run(fresh_unet, inputs), run(unet, inputs))


@pytest.mark.parametrize("init, peft_init", [("gaussian", "gaussian"), ("kaiming", True)])
def test_a_init_std_is_diffusers_gaussian_by_default_and_kaiming_as_an_option(init, peft_init):
    """A's std at init: gaussian 1/r (diffusers' train_dreambooth_lora.py: peft init_lora_weights="gaussian"),
    kaiming 1/sqrt(3 in) (nn.Linear's default: peft's own default, kohya's); B = 0 in both. peft's layer of the
    same shape is the reference."""
    from peft import LoraConfig, get_peft_model
    rank, d_in = 4, 1024
    torch.manual_seed(0)
    ours = LoRALinear(nn.Linear(d_in, 320), rank=rank, **({} if init == "gaussian" else {"init": init}))
    expected = 1 / rank if init == "gaussian" else 1 / math.sqrt(3 * d_in)        # 0.25, 0.018
    assert ours.lora_A.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert (ours.lora_B.weight == 0).all()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 320))
    theirs = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=peft_init, target_modules=["0"]))
    peft_A = theirs.base_model.model[0].lora_A["default"].weight
    assert ours.lora_A.weight.std().item() == pytest.approx(peft_A.std().item(), rel=0.05)
    assert inject_lora(tiny_unet(), rank=rank) and inject_lora(tiny_unet(), rank=rank, init="kaiming")
    with pytest.raises(ValueError, match="init must be one of"):
        LoRALinear(nn.Linear(4, 4), init="uniform")
