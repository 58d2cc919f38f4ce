"""single_file.py: our single files round-trip exactly, diffusers' own LDM converters read them (tiny models
with outputs, full-size SD1.5 / SD2.1 layouts by key and shape on the meta device), the variants real files
have (no `text_model.`, the 24th OpenCLIP layer, EMA and schedule buffers, .ckpt) load, bad files fail early."""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pipeline
import sample
from hub import ModelLoadError
from pipeline import load_models, load_single_file, save_single_file
from single_file import OPENCLIP, fuse_qkv, layout, ldm_shape
from text_encoder import CLIPTextModel, TextEncoderConfig
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
FAMILIES = ["tiny_sd1", "tiny_sd2"]


def inputs(models, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = models.unet.config
    latents, image = torch.randn(2, 4, 8, 8, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    ids = models.tokenizer(["a photo of a cat", "a red car"])
    return latents, torch.tensor([10, 700]), context, image, ids


@torch.no_grad()
def outputs(models, x):
    latents, t, context, image, ids = x
    return {"unet": models.unet(latents, t, context), "decode": models.vae.decode(latents),
            "encode": models.vae.encode(image).mean, "text": models.text_encoder(ids)[0]}


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(diffusers folder, our models loaded from it, the single file we wrote from them)."""
    folder = request.getfixturevalue(request.param)
    models = load_models(folder)
    path = save_single_file(models, tmp_path_factory.mktemp("single") / f"{request.param}.safetensors")
    return folder, models, path


# ----------------------------------------------------------------------------- round trip

def test_round_trip_gives_identical_models(exported):
    folder, models, path = exported
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    sd2 = models.text_encoder.config.hidden_act == "gelu"
    assert meta["modelspec.architecture"] == ("stable-diffusion-v2-512" if sd2 else "stable-diffusion-v1")
    assert json.loads(meta["nanobooth"])["unet"]["block_out_channels"] == [16, 32]
    assert any(k.startswith(OPENCLIP if sd2 else "cond_stage_model.transformer.text_model.") for k in keys)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys)

    back = load_models(path)  # pipeline.load_models dispatches a .safetensors path to single_file.py
    assert back.unet.config == models.unet.config and back.vae.config == models.vae.config
    assert back.text_encoder.config == models.text_encoder.config
    assert back.schedule.to_config() == models.schedule.to_config()
    assert back.tokenizer.pad_token == models.tokenizer.pad_token
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(models, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    x = inputs(models)
    expected, got = outputs(models, x), outputs(back, x)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_fp16_export_halves_the_tensors(exported, tmp_path):
    _, models, path = exported
    half = save_single_file(models, tmp_path / "half.safetensors", dtype=torch.float16)
    sd, full = load_file(half), load_file(path)
    assert sd.keys() == full.keys() and all(v.dtype == torch.float16 for v in sd.values())
    back = load_single_file(half)
    assert next(back.unet.parameters()).dtype == torch.float32
    torch.testing.assert_close(back.unet.conv_in.weight, models.unet.conv_in.weight, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- diffusers' converters

def test_diffusers_converters_load_our_file_strict(exported):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    folder, models, path = exported
    checkpoint = load_file(path)
    x = inputs(models)
    latents, t, context, image, ids = x
    ours = outputs(models, x)

    unet = UNet2DConditionModel.from_config(models.unet.config.to_json()).eval()
    unet.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet.config), strict=True)
    vae = AutoencoderKL.from_config(models.vae.config.to_json()).eval()
    vae.load_state_dict(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae.config), strict=True)
    text_json = models.text_encoder.config.to_json()
    text = HFCLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_json.items() if not k.startswith("_")})).eval()
    if models.text_encoder.config.hidden_act == "gelu":
        converted = single_file_utils.convert_open_clip_checkpoint(text, checkpoint)
    else:
        converted = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (as diffusers does here)
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    text.load_state_dict(converted, strict=True)

    with torch.no_grad():
        theirs = {"unet": unet(latents, t, context).sample, "decode": vae.decode(latents).sample,
                  "encode": vae.encode(image).latent_dist.mean, "text": text(ids).last_hidden_state}
    for key, value in theirs.items():
        assert ours[key].abs().max() > 1e-3, key  # a real output, not zeros
        torch.testing.assert_close(value, ours[key], atol=1e-5, rtol=0)


def test_diffusers_from_single_file_generates_the_same_image(exported):
    """End to end: diffusers' own single-file pipeline loader (configs from the local folder, as offline users
    pass them) reads our file and draws the image we draw from the same seed."""
    from diffusers import StableDiffusionPipeline
    folder, models, path = exported
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a cat", num_inference_steps=3, height=64, width=64, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(1)).images[0]
    ours = np.asarray(pipeline.generate(models, ["a cat"], seed=1, steps=3, height=64, width=64, progress=False)[0])
    assert theirs.std() > 0.01 and np.abs(ours / 255 - theirs).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_layout_is_what_diffusers_reads(preset):
    """SD1.5 / SD2.1 sizes, on the meta device (no memory): diffusers detects the family from our keys and its
    converters give back exactly its models' key names and shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    configs = (getattr(UNetConfig, preset)(), getattr(VAEConfig, preset)(), getattr(TextEncoderConfig, preset)())
    with torch.device("meta"):
        ours = {"unet": UNet(configs[0]).state_dict(), "vae": VAE(configs[1]).state_dict(),
                "text_encoder": CLIPTextModel(configs[2]).state_dict()}
        unet = UNet2DConditionModel.from_config(configs[0].to_json()).state_dict()
        vae = AutoencoderKL.from_config(configs[1].to_json()).state_dict()
    checkpoint = {}
    for name, (prefix, names) in layout(*configs).items():
        sd = fuse_qkv(ours[name]) if prefix == OPENCLIP else ours[name]
        checkpoint |= {prefix + names[k]: ldm_shape(names[k], v) for k, v in sd.items()}
    # keys of the real files (diffusers' CHECKPOINT_KEY_NAMES and the SD1.5 / SD2.1 releases)
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == {"sd15": "v1", "sd21": "v2"}[preset]
    unet_keys = ["input_blocks.3.0.op.weight", "output_blocks.2.1.conv.bias", "output_blocks.5.2.conv.weight",
                 "middle_block.1.proj_in.weight", "output_blocks.11.0.skip_connection.weight", "out.2.weight"]
    vae_keys = ["decoder.up.3.upsample.conv.weight", "encoder.mid.attn_1.q.weight",
                "decoder.up.1.block.0.nin_shortcut.weight", "encoder.down.2.downsample.conv.bias"]
    for key in [f"model.diffusion_model.{k}" for k in unet_keys] + [f"first_stage_model.{k}" for k in vae_keys]:
        assert key in checkpoint, key
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in checkpoint
    if preset == "sd21":
        assert checkpoint[f"{OPENCLIP}transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
        assert f"{OPENCLIP}transformer.resblocks.23.ln_1.weight" not in checkpoint
    else:
        assert "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight" in checkpoint

    def same(converted, reference):
        assert converted.keys() == reference.keys()
        assert all(converted[k].shape == reference[k].shape for k in reference)
    same(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, configs[0].to_json()), unet)
    same(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, configs[1].to_json()), vae)
    if preset == "sd21":  # the converter only reads hidden_size from the model it is given
        hf = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=1024))
        text = single_file_utils.convert_open_clip_checkpoint(hf, checkpoint)
    else:
        text = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    same(text, ours["text_encoder"])


# ----------------------------------------------------------------------------- files made elsewhere

def test_variants_of_real_files_load(exported, tmp_path):
    """No `nanobooth` metadata (configs passed instead), SD1 text keys without `text_model.` plus the
    `position_ids` buffer, SD2's 24th OpenCLIP layer and `text_projection`, EMA and schedule buffers, .ckpt."""
    _, models, path = exported
    sd = load_file(path)
    sd2 = models.text_encoder.config.hidden_act == "gelu"
    if sd2:
        n = models.text_encoder.config.num_hidden_layers
        sd |= {k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): torch.randn_like(v) for k, v in sd.items()
               if f"resblocks.{n - 1}." in k}
        sd |= {f"{OPENCLIP}text_projection": torch.randn(32, 32), f"{OPENCLIP}logit_scale": torch.tensor(4.6)}
    else:
        sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
              for k, v in sd.items()}
        sd["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    sd |= {"alphas_cumprod": models.schedule.alphas_cumprod, "model_ema.decay": torch.tensor(0.9999),
           "model_ema.diffusion_modelconv_inweight": torch.randn(16, 4, 3, 3)}
    configs = dict(unet_config=models.unet.config, vae_config=models.vae.config, text_config=models.text_encoder.config)
    save_file(sd, str(tmp_path / "plain.safetensors"))
    torch.save({"state_dict": sd, "global_step": 470000}, tmp_path / "plain.ckpt")
    x = inputs(models)
    expected = outputs(models, x)
    for file in ("plain.safetensors", "plain.ckpt"):
        back = load_single_file(tmp_path / file, **configs)
        for key, value in outputs(back, x).items():
            assert torch.equal(value, expected[key]), (file, key)
    # without configs or metadata the presets apply, which a tiny file does not fit: say so, naming shapes
    with pytest.raises(ModelLoadError, match="(missing keys|expects).* pass the right config") as e:
        load_single_file(tmp_path / "plain.safetensors")
    assert "\n" not in str(e.value)


def test_v_prediction_is_an_option(exported):
    _, models, path = exported
    assert load_single_file(path).schedule.prediction_type == "epsilon"
    assert load_single_file(path, prediction_type="v_prediction").schedule.prediction_type == "v_prediction"


def test_sample_cli_takes_a_single_file(exported, tmp_path):
    _, models, path = exported
    args = ["--model", str(path), "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32",
            "--device", "cpu", "--out", str(tmp_path)]
    png = np.asarray(Image.open(sample.main(args)[0]))
    expected = pipeline.generate(models, ["a cat"], seed=0, steps=2, height=32, width=32, progress=False)[0]
    assert png.std() > 1 and np.array_equal(png, np.asarray(expected))
    with pytest.raises(ModelLoadError, match="does not exist"):
        sample.main(["--model", str(tmp_path / "missing.safetensors"), "--prompt", "a cat"])


# ----------------------------------------------------------------------------- bad input

class NotWeights:
    pass


def test_unrecognised_file_lists_what_was_expected(tiny_sd1, tmp_path):
    unet_only = tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"  # a diffusers component, not a single file
    with pytest.raises(ModelLoadError, match="not an SD 1.x/2.x single-file") as e:
        load_models(unet_only)
    message = str(e.value)
    for expected in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.",
                     "cond_stage_model.model.", "found conv_in.bias"):
        assert expected in message
    sdxl = {"model.diffusion_model.conv.weight": torch.zeros(1), "first_stage_model.conv.weight": torch.zeros(1),
            "conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelLoadError, match="found conditioner.embedders"):
        load_single_file(tmp_path / "sdxl.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_single_file(tmp_path / "missing.ckpt")
    mixed = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
             "first_stage_model.conv.weight": torch.zeros(1), "cond_stage_model.transformer.text_model.x": torch.zeros(1)}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ModelLoadError, match=r"mixes parts: a SD1 text encoder but UNet cross-attention widths \[1024\]"):
        load_single_file(tmp_path / "mixed.safetensors")


def test_a_pickle_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    pickled = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": NotWeights()}
    torch.save(pickled, tmp_path / "a.ckpt")
    with pytest.raises(ModelLoadError, match="not a plain state-dict pickle, so it is refused"):
        load_single_file(tmp_path / "a.ckpt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.ckpt")  # a whole pickled module
    with pytest.raises(ModelLoadError, match="refused"):
        load_single_file(tmp_path / "module.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.x": 3}}, tmp_path / "numbers.ckpt")
    with pytest.raises(ModelLoadError, match="not a state dict"):
        load_single_file(tmp_path / "numbers.ckpt")


def test_export_refuses_textual_inversion_tokens(tiny_sd1, tmp_path):
    models = load_models(tiny_sd1)
    pipeline.add_token(models, "<sks>", torch.zeros(32))
    with pytest.raises(ValueError, match="added token"):
        save_single_file(models, tmp_path / "ti.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_single_file(load_models(tiny_sd1), tmp_path / "x.ckpt")


# ----------------------------------------------------------------------------- SDXL

@pytest.fixture(scope="module")
def exported_sdxl(tiny_sdxl, tmp_path_factory):
    models = load_models(tiny_sdxl)
    return tiny_sdxl, models, save_single_file(models, tmp_path_factory.mktemp("single") / "tiny_sdxl.safetensors")


def test_sdxl_round_trip_gives_identical_models(exported_sdxl):
    folder, models, path = exported_sdxl
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert "model.diffusion_model.label_emb.0.0.weight" in keys and "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in keys   # all 3 layers
    back = load_models(path)
    assert back.force_zeros_for_empty_prompt and back.tokenizer_2.pad_token == "!" and back.tokenizer.pad_token != "!"
    assert back.schedule.to_config() == models.schedule.to_config()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(models, name), getattr(back, name)
        assert ours.config == theirs.config, name
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    kw = dict(seed=2, steps=3, height=32, width=48, progress=False, output="pt")
    # equal weights; the matmul kernels may round the last bit differently on differently aligned memory
    torch.testing.assert_close(pipeline.generate(back, ["a cat"], **kw), pipeline.generate(models, ["a cat"], **kw),
                               atol=1e-5, rtol=0)


def test_sdxl_diffusers_from_single_file_generates_the_same_image(exported_sdxl):
    from diffusers import StableDiffusionXLPipeline
    folder, models, path = exported_sdxl
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                      add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a cat", negative_prompt="blurry", num_inference_steps=3, height=64, width=96, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert theirs.std() > 0.01
    # the folder's scheduler is SDXL's Euler, and guidance 5.0 the pipeline's default
    ours = pipeline.generate(models, ["a cat"], "blurry", seed=1, steps=3, height=64, width=96, sampler="euler",
                           guidance=5.0, progress=False)[0]
    assert np.abs(np.asarray(ours) / 255 - theirs).max() <= 1 / 255 + 1e-6


def test_sdxl_full_size_layout_is_what_diffusers_reads():
    """SDXL base sizes on the meta device: diffusers detects "xl_base" from our keys and its converters give back
    exactly its UNet's and both text encoders' key names and shapes."""
    from diffusers import UNet2DConditionModel
    from vae import PRESETS as VAE_PRESETS
    configs = (UNetConfig.sdxl(), VAE_PRESETS["sdxl"], TextEncoderConfig.sd15(), TextEncoderConfig.sdxl_2())
    with torch.device("meta"):
        ours = {"unet": UNet(configs[0]).state_dict(), "vae": VAE(configs[1]).state_dict(),
                "text_encoder": CLIPTextModel(configs[2]).state_dict(),
                "text_encoder_2": CLIPTextModel(configs[3]).state_dict()}
        unet = UNet2DConditionModel.from_config(configs[0].to_json()).state_dict()
    checkpoint = {}
    for name, (prefix, names) in layout(*configs).items():
        sd = fuse_qkv(ours[name]) if name == "text_encoder_2" else ours[name]
        checkpoint |= {prefix + names[k]: ldm_shape(names[k], v) for k, v in sd.items()}
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == "xl_base"
    for key in ["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.bias",
                "model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.label_emb.0.2.bias",
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"]:
        assert key in checkpoint, key
    assert checkpoint["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, configs[0].to_json())
    assert converted.keys() == unet.keys() and all(converted[k].shape == unet[k].shape for k in unet)
    hf = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=1280))
    text_2 = single_file_utils.convert_open_clip_checkpoint(hf, checkpoint, prefix="conditioner.embedders.1.model.")
    assert text_2.keys() == ours["text_encoder_2"].keys()
    assert all(text_2[k].shape == ours["text_encoder_2"][k].shape for k in text_2)
    text_1 = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    assert text_1.keys() == ours["text_encoder"].keys()
