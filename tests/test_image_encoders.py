"""image_encoders.py against transformers' CLIPModel, ViTModel and CLIPImageProcessor."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPImageProcessor
from transformers import CLIPModel as HFCLIPModel
from transformers import ViTConfig as HFViTConfig
from transformers import ViTModel as HFViTModel
from transformers.core_model_loading import revert_weight_conversion

import attention
import hub
from image_encoders import (IMAGENET_MEAN, IMAGENET_STD, CLIPConfig, CLIPModel, ViTConfig, ViTModel, clip_preprocess,
                            dino_preprocess)


def randomize_norms_and_biases(model, seed=0):
    """transformers initialises LayerNorms to (1, 0) and biases to 0: make them random, so a swap shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "embedding" in name or "cls_token" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def hf_clip_config(config: CLIPConfig) -> HFCLIPConfig:
    d = config.to_json()
    return HFCLIPConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                        projection_dim=d["projection_dim"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_norms_and_biases(HFCLIPModel(hf_clip_config(CLIPConfig.tiny()))).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    torch.manual_seed(1)
    model = randomize_norms_and_biases(HFViTModel(HFViTConfig(**ViTConfig.tiny().to_json()))).eval()
    folder = tmp_path_factory.mktemp("vit")
    model.save_pretrained(folder)
    return model, folder


def token_ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (3, 77), generator=g)
    ids[:, 0] = 49406
    for row, end in enumerate([5, 20, 76]):  # EOS at different places, padded with EOS after it (SD1/OpenAI style)
        ids[row, end:] = 49407
    return ids

# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("sdpa", [True, False])
def test_clip_matches_transformers(tiny_clip, sdpa):
    hf, folder = tiny_clip
    ours = CLIPModel.from_pretrained(folder)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = token_ids()
    attention.use_sdpa(sdpa)
    try:
        with torch.no_grad():
            image, text = ours.get_image_features(pixels), ours.get_text_features(ids)
            states = ours.vision_hidden_states(pixels, [0, 1, -1])
            ref_image = hf.get_image_features(pixel_values=pixels).pooler_output
            ref_text = hf.get_text_features(input_ids=ids).pooler_output
            ref_states = hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    finally:
        attention.use_sdpa(True)
    assert image.shape == (2, 16) and text.shape == (3, 16)
    assert (image - ref_image).abs().max() < 1e-5
    assert (text - ref_text).abs().max() < 1e-5
    for ours_state, i in zip(states, [0, 1, -1]):
        assert (ours_state - ref_states[i]).abs().max() < 1e-5
    assert (states[0] - states[2]).abs().max() > 0.1  # the layers do something


def test_vit_matches_transformers_and_drops_the_pooler(tiny_vit):
    hf, folder = tiny_vit
    assert any(k.startswith("pooler.") for k in load_file(folder / "model.safetensors"))
    ours = ViTModel.from_pretrained(folder)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, cls = ours(pixels), ours.features(pixels)
        ref = hf(pixel_values=pixels).last_hidden_state
    assert tokens.shape == (2, 197, 32)
    assert (tokens - ref).abs().max() < 1e-5
    assert (cls - ref[:, 0]).abs().max() < 1e-5


CONFIGS = {  # the fields of the Hub's config.json files that differ from transformers' defaults
    "openai/clip-vit-base-patch32": {
        "projection_dim": 512, "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                                               "num_hidden_layers": 12, "hidden_act": "quick_gelu"},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                          "num_hidden_layers": 12, "patch_size": 32, "image_size": 224, "hidden_act": "quick_gelu"}},
    "openai/clip-vit-large-patch14": {
        "projection_dim": 768, "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                               "num_hidden_layers": 12, "hidden_act": "quick_gelu"},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu"}},
    "facebook/dino-vits16": {"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6,
                             "num_hidden_layers": 12, "patch_size": 16, "image_size": 224, "hidden_act": "gelu",
                             "layer_norm_eps": 1e-12, "qkv_bias": True},
}
PRESETS = {"openai/clip-vit-base-patch32": CLIPConfig.vit_b32(), "openai/clip-vit-large-patch14": CLIPConfig.vit_l14(),
           "facebook/dino-vits16": ViTConfig.dino_vits16()}
PARAMETERS = {"openai/clip-vit-base-patch32": 151_277_313,  # the published counts, logit_scale included
              "openai/clip-vit-large-patch14": 427_616_513}


@pytest.mark.parametrize("repo", list(CONFIGS))
def test_full_size_models_have_the_checkpoint_keys_and_shapes(repo):
    d = CONFIGS[repo]
    clip = "clip" in repo
    with torch.device("meta"):
        hf = HFCLIPModel(HFCLIPConfig(**d)) if clip else HFViTModel(HFViTConfig(**d))
        ours = (CLIPModel(CLIPConfig.from_json(d)) if clip else ViTModel(ViTConfig.from_json(d)))
    assert (CLIPConfig if clip else ViTConfig).from_json(d) == PRESETS[repo]
    # transformers 5 renames some modules in memory (ViT: layers.0.attention.q_proj); the files keep the old
    # names, which `revert_weight_conversion` gives back, as save_pretrained does
    expected = {k: tuple(v.shape) for k, v in revert_weight_conversion(hf, hf.state_dict()).items()
                if not k.startswith("pooler.") and not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    if repo in PARAMETERS:
        assert sum(p.numel() for p in ours.parameters()) == PARAMETERS[repo]


def test_loads_transformers_4_files_and_old_configs(tiny_clip, tmp_path):
    """The Hub's openai files (transformers 4) carry position_ids buffers; old configs use `*_config_dict`."""
    _, folder = tiny_clip
    sd = load_file(folder / "model.safetensors")
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    save_file(sd, tmp_path / "model.safetensors")
    config = hub.read_json(folder / "config.json")
    config["text_config_dict"] = {"num_hidden_layers": config["text_config"].pop("num_hidden_layers")}
    hub.atomic_write(tmp_path / "config.json", lambda p: p.write_text(json.dumps(config)))
    ours = CLIPModel.from_pretrained(tmp_path)
    assert ours.config == CLIPModel.from_pretrained(folder).config
    sd.pop("visual_projection.weight")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(hub.ModelLoadError, match=r"missing keys: \[visual_projection.weight\]"):
        CLIPModel.from_pretrained(tmp_path)


def test_save_pretrained_loads_in_transformers(tiny_clip, tiny_vit, tmp_path):
    for (hf, folder), ours_cls, hf_cls in [(tiny_clip, CLIPModel, HFCLIPModel), (tiny_vit, ViTModel, HFViTModel)]:
        ours = ours_cls.from_pretrained(folder)
        ours.save_pretrained(tmp_path / ours_cls.__name__)
        back = hf_cls.from_pretrained(tmp_path / ours_cls.__name__).eval()
        ref = hf.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items() if not k.startswith("pooler."))


def test_wrong_pixel_size_and_layer_index_are_clear_errors(tiny_clip):
    ours = CLIPModel.from_pretrained(tiny_clip[1])
    with pytest.raises(ValueError, match=r"\(b, 3, 224, 224\).*preprocess"):
        ours.get_image_features(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="hidden state indices"):
        ours.vision_hidden_states(torch.zeros(1, 3, 224, 224), [3])

# ----------------------------------------------------------------------------- preprocessing


def sample_images(seed=0):
    """Random images of several sizes and every common mode (transparency composites onto white)."""
    rng = np.random.default_rng(seed)
    out = []
    for (h, w), mode in [((300, 400), "RGB"), ((511, 250), "L"), ((224, 224), "RGBA"), ((100, 150), "P"),
                         ((225, 700), "RGB"), ((64, 63), "LA"), ((1000, 999), "CMYK")]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        if mode in ("RGBA", "LA"):
            im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        out.append(im)
    return out


def test_clip_and_dino_preprocessing_match_transformers():
    """Both run PIL's bicubic resize on the same uint8 image, then the same float32 arithmetic, so we require
    1e-5 (a bound of 1e-2 per value would be about 2/3 of one uint8 step after dividing by CLIP's std 0.27)."""
    clip_ref = CLIPImageProcessor()  # openai/clip-vit-*'s preprocessor_config.json is this default
    dino_ref = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    for im in sample_images():
        for ours, ref in [(clip_preprocess(), clip_ref), (dino_preprocess(), dino_ref)]:
            expected = ref(images=im, return_tensors="pt").pixel_values
            got = ours([im])
            assert got.shape == expected.shape == (1, 3, 224, 224)
            assert (got - expected).abs().max() < 1e-5, im.mode


def test_tensor_preprocessing_is_close_to_pil_and_differentiable(tiny_clip):
    """On a smooth image the tensor path differs from the PIL path only by PIL's uint8 rounding (<= 0.5/255
    per value before normalising: 0.0075 after dividing by the std) plus small kernel differences."""
    y, x = np.mgrid[0:300, 0:420] / 60.0
    a = np.stack([np.sin(x + y), np.cos(x - 0.5 * y), np.sin(0.7 * x) * np.cos(y)], -1) * 0.45 + 0.5
    im = Image.fromarray((a * 255).round().astype(np.uint8))
    t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].requires_grad_()
    for pre in (clip_preprocess(), dino_preprocess()):
        assert (pre.tensor(t) - pre([im])).abs().max() < 0.02
    model = CLIPModel.from_pretrained(tiny_clip[1])
    model.get_image_features(clip_preprocess().tensor(t)).square().sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
