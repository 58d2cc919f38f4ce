"""export.py and the kohya LoRA layout: diffusers' `load_lora_weights` reads our kohya file and generates the
image our merged model generates; the CLI converts a train.py LoRA result to kohya and merges one into a
single file; kohya files load back into our models; bad requests fail before any work."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import export
from lora import (UNET_TARGETS, inject_lora, load_lora, lora_layers, lora_parameters, merge_lora, save_lora,
                  save_lora_kohya)
from pipeline import generate, load_models, write_result_info

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PROMPT = "a photo of sks dog"


def with_lora(folder, seed=1):
    """Our tiny models with random LoRAs on the UNet (rank 4, alpha 8) and text encoder (rank 2, alpha 3)."""
    models = load_models(folder)
    inject_lora(models.unet, UNET_TARGETS, rank=4, alpha=8)
    inject_lora(models.text_encoder, TEXT_TARGETS, rank=2, alpha=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(models.unet) + lora_parameters(models.text_encoder):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return models


def parts(models):
    return {"unet": models.unet, "text_encoder": models.text_encoder}


def probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)


@torch.no_grad()
def run(models, ids):
    """(UNet output on a fixed probe, text encoder's last hidden state for `ids`)."""
    return models.unet(*probe()), models.text_encoder(ids)[0]


def image(models):
    out = generate(models, [PROMPT], seed=3, steps=3, guidance=7.5, height=64, width=64, progress=False)
    return np.asarray(out[0], dtype=np.float32) / 255


def test_diffusers_loads_our_kohya_file_with_the_same_image(tiny_sd1, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    models = with_lora(tiny_sd1)
    file = save_lora_kohya(tmp_path / "sks.safetensors", parts(models))
    tensors = load_file(file)
    n_unet, n_text = len(lora_layers(models.unet)), len(lora_layers(models.text_encoder))
    assert (n_unet, n_text) == (48, 12)  # 6 transformer blocks x 2 attentions x 4; 3 CLIP layers x 4
    assert len(tensors) == 3 * (n_unet + n_text)
    key = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, 32) and tensors[f"{key}.lora_up.weight"].shape == (16, 4)
    assert tensors["lora_te_text_model_encoder_layers_2_self_attn_out_proj.lora_up.weight"].shape == (32, 2)
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert all(v.ndim == 0 and v.dtype == torch.float32 for v in alphas.values())
    assert {float(v) for k, v in alphas.items() if k.startswith("lora_unet_")} == {8.0}
    assert {float(v) for k, v in alphas.items() if k.startswith("lora_te_")} == {3.0}
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "8"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPT, num_inference_steps=3, height=64, width=64, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    pipe.load_lora_weights(str(tmp_path), weight_name="sks.safetensors")  # detected by its `lora_unet_` keys
    ids = models.tokenizer([PROMPT, "a cat"])
    unet_out, text_out = run(models, ids)
    with torch.no_grad():
        theirs_unet, theirs_text = pipe.unet(*probe()).sample, pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(theirs_unet, unet_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs_text, text_out, atol=1e-5, rtol=0)

    merge_lora(models.unet)
    merge_lora(models.text_encoder)
    ours = image(models)
    theirs = pipe(PROMPT, num_inference_steps=3, height=64, width=64, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(theirs - plain).max() > 0.05  # the LoRA changes the image
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_cli_converts_a_lora_result_and_kohya_loads_back(tiny_sd1, tmp_path):
    models = with_lora(tiny_sd1)
    result = tmp_path / "run"
    save_lora(result / "pytorch_lora_weights.safetensors", parts(models))
    write_result_info(result, {"method": "dreambooth_lora", "base_model": str(tiny_sd1),
                               "lora": "pytorch_lora_weights.safetensors"})
    out = export.main(["--lora", str(result), "--format", "kohya", "--out", str(tmp_path / "a.safetensors"),
                       "--dtype", "fp32"])
    direct = load_file(save_lora_kohya(tmp_path / "b.safetensors", parts(models)))
    converted = load_file(out)
    assert converted.keys() == direct.keys() and all(torch.equal(converted[k], direct[k]) for k in direct)
    half = load_file(export.main(["--lora", str(result), "--out", str(tmp_path / "h.safetensors")]))
    assert half[next(k for k in half if k.endswith("lora_down.weight"))].dtype == torch.float16

    fresh = load_models(tiny_sd1)
    info = load_lora(out, parts(fresh))  # kohya names are matched against our module names
    assert (info["unet"]["rank"], info["unet"]["alpha"], len(info["unet"]["modules"])) == (4, 8.0, 48)
    assert (info["text_encoder"]["rank"], info["text_encoder"]["alpha"]) == (2, 3.0)
    ids = models.tokenizer([PROMPT])
    assert all(torch.equal(a, b) for a, b in zip(run(fresh, ids), run(models, ids)))


def test_cli_merges_a_lora_result_into_one_file(tiny_sd1, tmp_path):
    models = with_lora(tiny_sd1)
    result = tmp_path / "run"
    save_lora(result / "pytorch_lora_weights.safetensors", parts(models))
    write_result_info(result, {"method": "dreambooth_lora", "base_model": str(tiny_sd1),
                               "lora": "pytorch_lora_weights.safetensors"})
    out = export.main(["--model", str(result), "--out", str(tmp_path / "merged.safetensors"), "--dtype", "fp32"])
    merged = load_models(out)
    assert not lora_layers(merged.unet)
    ids = models.tokenizer([PROMPT])
    for a, b in zip(run(merged, ids), run(models, ids)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "merged" and set(json.loads(meta["nanobooth"])) == {
        "unet", "vae", "text_encoder", "scheduler"}

    default = load_file(export.main(["--model", str(tiny_sd1), "--out", str(tmp_path / "fp16.safetensors")]))
    assert all(v.dtype == torch.float16 for v in default.values())


def test_cli_errors(tiny_sd1, tmp_path):
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export.main(["--model", str(tiny_sd1), "--out", str(tmp_path / "x.ckpt")])
    with pytest.raises(SystemExit):  # argparse: exactly one of --model / --lora
        export.main(["--out", str(tmp_path / "x.safetensors")])
    models = with_lora(tiny_sd1)
    kohya = save_lora_kohya(tmp_path / "k.safetensors", models.unet)
    with pytest.raises(ValueError, match="already in the kohya layout"):
        export.main(["--lora", str(kohya), "--out", str(tmp_path / "y.safetensors")])
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        export.main(["--lora", str(tmp_path / "nothing"), "--out", str(tmp_path / "y.safetensors")])
    write_result_info(tmp_path / "full", {"method": "dreambooth", "base_model": str(tiny_sd1)})
    with pytest.raises(ValueError, match="export it with --model"):
        export.main(["--lora", str(tmp_path / "full"), "--out", str(tmp_path / "y.safetensors")])
    with pytest.raises(ValueError, match="not 'vae'"):   # text_encoder_2 is SDXL's lora_te2_
        save_lora_kohya(tmp_path / "z.safetensors", models.unet, prefix="vae")


# ----------------------------------------------------------------------------- SDXL

def test_sdxl_kohya_file_has_sd_scripts_names_and_loads_in_diffusers(tiny_sdxl, tmp_path):
    """SDXL's kohya layout (sd-scripts' sdxl_train_network.py): lora_unet_ + the original UNet layout's names,
    lora_te1_ / lora_te2_ for the two text encoders. diffusers' load_lora_weights reads it to the same image,
    and our load_lora reads it back to the same weights."""
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    models = load_models(tiny_sdxl)
    inject_lora(models.unet, UNET_TARGETS, rank=4, alpha=8)
    for encoder in models.text_encoders.values():
        inject_lora(encoder, TEXT_TARGETS, rank=2, alpha=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (models.unet, *models.text_encoders.values()):
            for p in lora_parameters(m):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    file = save_lora_kohya(tmp_path / "sks.safetensors", {"unet": models.unet, **models.text_encoders})
    keys = {k.partition(".")[0] for k in load_file(file)}
    # tiny_sdxl: 2 levels of 1 layer, so input_blocks = [conv_in, level 0: resnet, downsampler, level 1: resnet+attn]
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q" in keys        # down_blocks.1.attentions.0
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0" in keys      # depth 2 at the bottom
    assert "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k" in keys       # up_blocks.0.attentions.1
    assert "lora_te1_text_model_encoder_layers_2_self_attn_q_proj" in keys
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc1" not in keys and \
           "lora_te2_text_model_encoder_layers_2_self_attn_out_proj" in keys
    assert not any("down_blocks" in k or k.startswith("lora_te_") for k in keys)

    again = load_models(tiny_sdxl)
    info = load_lora(file, {"unet": again.unet, **again.text_encoders})
    assert set(info) == {"unet", "text_encoder", "text_encoder_2"}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = lora_layers(getattr(models, name)), lora_layers(getattr(again, name))
        assert a.keys() == b.keys() and all(torch.equal(a[n].lora_B.weight, b[n].lora_B.weight) for n in a), name

    kw = dict(seed=3, steps=3, guidance=5.0, height=64, width=64, progress=False)
    ours = np.asarray(generate(models, [PROMPT], "blurry", **kw)[0], dtype=np.float32) / 255
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                 output_type="np", generator=torch.Generator("cpu").manual_seed(3)).images[0]
    pipe.load_lora_weights(str(tmp_path), weight_name="sks.safetensors")
    theirs = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                  output_type="np", generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(plain - theirs).max() > 0.05                        # diffusers applied it
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6
