"""photoverse.py and photoverse_train.py: random fusion, the placeholder, the trainable set, the losses,
pretraining and one-command sampling end to end on tiny models, bad input. Faces are drawn here with PIL (no files
are shipped)."""
import copy
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import photoverse
import photoverse_train
import pipeline
import sample
import train
from attention import attention
from data import load_image, prepare
from hub import ModelLoadError
from image_encoders import CLIPConfig, CLIPModel, CLIPVisionConfig, ViTConfig, ViTModel
from lora import inject_lora
from photoverse import (DualAttention, IdentityEncoder, PhotoVerseConfig, add_image_branch, attach, draw_fusion,
                        embed_prompts, encode_with_words, image_states, set_image_condition, trainable_parameters,
                        trained_state)
from photoverse_train import TRAIN_PROMPT, face_loss, value_regulariser, word_regulariser
from text_encoder import EOS_ID, CLIPTextModel, CLIPTokenizer, TextEncoderConfig
from tiny import make_tiny_model
from unet import Attention, UNet, UNetConfig
from helpers import one_thread, randomize  # noqa: F401  (one_thread: an autouse fixture)

CASES = [(2.0, 0.0), (0.0, 2.0), (1.0, 1.0)]   # (gamma, sigma): text only, image only, both [paper]
RES = 64                                        # training images and the tiny encoders' input size
TINY = PhotoVerseConfig(vision_layers=(-1, 1), adapter_dim=32, rank=2, resolution=RES)
LOSS_CFG = dict(noise_offset=0.0, face_loss_weight=0.01, word_reg_weight=0.01, value_reg_weight=0.001)

# ----------------------------------------------------------------------------- tiny encoders and drawn faces


def draw_face(seed: int, size=(40, 48)) -> Image.Image:
    """A cartoon face: background, skin ellipse, two eyes, a mouth; colours and eye height vary with the seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    d.ellipse((w * 0.15, h * 0.1, w * 0.85, h * 0.95), fill=tuple(int(v) for v in rng.integers(120, 256, 3)))
    eye, dy = tuple(int(v) for v in rng.integers(0, 90, 3)), int(rng.integers(-3, 4))
    for x0 in (w * 0.3, w * 0.55):
        d.ellipse((x0, h * 0.38 + dy, x0 + w * 0.15, h * 0.48 + dy), fill=eye)
    d.arc((w * 0.3, h * 0.55, w * 0.7, h * 0.8), 20, 160, fill=(150, 30, 30), width=3)
    return im


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny SD1 and SD2 models, a tiny CLIP and DINO ViT (64 px input, 16 px patches) saved as the Hub has
    them, and four drawn faces."""
    root = tmp_path_factory.mktemp("photoverse")
    make_tiny_model(root / "sd1")
    make_tiny_model(root / "sd2", family="sd2")
    vision = CLIPVisionConfig(32, 37, 2, 4, image_size=RES, patch_size=16)
    randomize(CLIPModel(CLIPConfig(CLIPConfig.tiny().text, vision, 16)), 0).save_pretrained(root / "clip")
    randomize(ViTModel(ViTConfig(32, 37, 2, 4, image_size=RES)), 1).save_pretrained(root / "dino")
    (root / "faces").mkdir()
    for i in range(4):
        draw_face(i).save(root / "faces" / f"face_{i}.png")
    return root


def tiny_photoverse(assets, identity=True, seed=0):
    """PhotoVerse on the tiny models, built in memory as pretrain builds it."""
    torch.manual_seed(seed)
    sd = pipeline.load_models(assets / "sd1")
    vision = CLIPModel.from_pretrained(assets / "clip")
    dino = ViTModel.from_pretrained(assets / "dino")
    return attach(sd, vision, TINY, IdentityEncoder(dino, dino.preprocess.tensor, "DINO") if identity else None)


def face_batch(assets, rows=2, fusion_seed=0):
    x = torch.stack([prepare(load_image(assets / "faces" / f"face_{i}.png"), RES) for i in range(rows)])
    return {"pixel_values": x, "masks": torch.ones(rows, 1, RES, RES),
            "generators": [torch.Generator().manual_seed(100 + i) for i in range(rows)],
            "fusion_generator": torch.Generator().manual_seed(fusion_seed)}


def fusion_seed(case) -> int:
    return next(s for s in range(100) if draw_fusion(torch.Generator().manual_seed(s)) == case)

# ----------------------------------------------------------------------------- random fusion and the dual attention


def test_random_fusion_draws_each_case_a_third_of_the_time():
    g = torch.Generator().manual_seed(0)
    n = 30000
    counts = Counter(draw_fusion(g) for _ in range(n))
    assert set(counts) == set(CASES)
    for case in CASES:                       # binomial sd = sqrt(2/9 / n) = 0.0027: the tolerance is 5.5 sd
        assert abs(counts[case] / n - 1 / 3) < 0.015, counts


def hand_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, written out with no library attention."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, n, c)


def test_each_fusion_case_computes_the_stated_sum():
    torch.manual_seed(0)
    base = Attention(16, 8, heads=2)
    dual = DualAttention(base)
    assert dual.to_q is base.to_q and dual.to_out is base.to_out                  # the base modules themselves
    assert torch.equal(dual.to_k_s.weight, base.to_k.weight) and torch.equal(dual.to_v_s.weight, base.to_v.weight)
    with torch.no_grad():                                                         # make the two branches differ
        dual.to_k_s.weight.add_(torch.randn_like(dual.to_k_s.weight))
        dual.to_v_s.weight.add_(torch.randn_like(dual.to_v_s.weight))
    x, c, f = torch.randn(2, 5, 16), torch.randn(2, 7, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        q = base.to_q(x)
        text, image = attention(q, base.to_k(c), base.to_v(c), 2), attention(q, dual.to_k_s(f), dual.to_v_s(f), 2)
        by_hand = hand_attention(q, base.to_k(c), base.to_v(c), 2), hand_attention(q, dual.to_k_s(f), dual.to_v_s(f), 2)
        exact = {(2.0, 0.0): 2 * text, (0.0, 2.0): 2 * image, (1.0, 1.0): text + image}
        outs = {}
        for gamma, sigma in CASES:
            set_image_condition(dual, f, gamma, sigma)
            outs[gamma, sigma] = dual(x, c)
            assert torch.equal(outs[gamma, sigma], base.to_out(exact[gamma, sigma]))
            assert torch.allclose(outs[gamma, sigma], base.to_out(gamma * by_hand[0] + sigma * by_hand[1]), atol=1e-5)
    assert not torch.allclose(outs[CASES[0]], outs[CASES[1]], atol=1e-3)
    assert not torch.allclose(outs[CASES[0]], outs[CASES[2]], atol=1e-3)


def test_sigma_0_gamma_1_and_lora_b_0_give_the_base_unet_exactly():
    torch.manual_seed(0)
    base = UNet(UNetConfig.tiny()).eval()
    pv = copy.deepcopy(base)
    assert len(add_image_branch(pv)) == 6                       # every attn2: 2 down, 1 mid, 3 up
    inject_lora(pv, ("to_k", "to_v"), rank=2, alpha=1.0, filter=lambda n: ".attn2." in n)
    z, t, c, f = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        set_image_condition(pv, f, 1.0, 0.0)
        assert torch.equal(pv(z, t, c), base(z, t, c))
        set_image_condition(pv, f, 1.0, 1.0)                    # the image branch is live
        assert not torch.allclose(pv(z, t, c), base(z, t, c), atol=1e-4)
        set_image_condition(pv, f, 1.0, 0.0)
        for name, p in pv.named_parameters():                   # and so is LoRA once B != 0
            if ".lora_B" in name:
                p.fill_(0.1)
        assert not torch.allclose(pv(z, t, c), base(z, t, c), atol=1e-4)
    plain = UNet(UNetConfig.tiny())                             # base keys unchanged: they load strict=True
    plain.load_state_dict({k: v for k, v in pv.state_dict().items() if not photoverse.is_trained(k)}, strict=True)

# ----------------------------------------------------------------------------- the placeholder S*


@pytest.fixture(scope="module")
def text():
    torch.manual_seed(0)
    return CLIPTokenizer.from_pretrained(None), CLIPTextModel(TextEncoderConfig.tiny()).eval()


def test_pseudo_words_replace_the_placeholder_and_the_rest_shifts(text):
    tok, enc = text
    table = enc.text_model.embeddings.token_embedding.weight.detach()
    placeholder = photoverse.add_placeholder(tok)
    assert tok.encode("a photo of S* on the grass") .count(placeholder) == 1    # one token for S*
    # words that are real rows ("red", "dog"): the prompt must become exactly "a photo of red dog on the grass"
    words = table[tok.encode("red dog")[1:-1]][None]
    ids, embeds = embed_prompts(tok, enc, ["a photo of S* on the grass"], words)
    ref = tok(["a photo of red dog on the grass"])
    assert ids[0, 4:6].tolist() == [placeholder] * 2
    assert torch.equal(ids[0, :4], ref[0, :4]) and torch.equal(ids[0, 6:], ref[0, 6:])
    assert torch.equal(embeds, table[ref])
    with torch.no_grad():
        (h, pooled), (h_ref, pooled_ref) = enc(ids, inputs_embeds=embeds), enc(ref)
    assert torch.equal(h, h_ref) and torch.equal(pooled, pooled_ref)           # pooled at the shifted EOS
    # m = 5 random words: positions 4..8, the prompt after S* shifted by 4, EOS at its old place + 4
    words = torch.randn(1, 5, 32)
    ids, embeds = embed_prompts(tok, enc, ["a photo of S* on the grass"], words)
    original = tok(["a photo of S* on the grass"])[0]
    assert torch.equal(embeds[0, 4:9], words[0])
    assert torch.equal(ids[0, 9:], original[5:5 + 68]) and torch.equal(embeds[0, 9:], table[original[5:5 + 68]])
    eos = (ids[0] == EOS_ID).nonzero()[0].item()
    assert eos == (original == EOS_ID).nonzero()[0].item() + 4
    with torch.no_grad():
        h, pooled = enc(ids, inputs_embeds=embeds)
    assert torch.equal(pooled[0], h[0, eos])


def test_long_prompts_are_cut_at_77_keeping_the_eos(text):
    tok, enc = text
    table = enc.text_model.embeddings.token_embedding.weight.detach()
    prompt = "a photo of S* " + "very " * 80 + "tall"
    words = torch.randn(1, 5, 32)
    ids, embeds = embed_prompts(tok, enc, [prompt], words)
    full = tok.encode(prompt)                                                   # not truncated: 86 ids
    assert ids.shape == (1, 77) and embeds.shape == (1, 77, 32)
    assert ids[0, 76] == EOS_ID and torch.equal(embeds[0, 76], table[EOS_ID])
    assert torch.equal(embeds[0, 4:9], words[0]) and ids[0, 9:76].tolist() == full[5:72]
    with torch.no_grad():
        h, pooled = enc(ids, inputs_embeds=embeds)
    assert torch.equal(pooled[0], h[0, 76])
    with pytest.raises(ValueError, match="falls past CLIP's 77 tokens"):       # S* itself would be cut off
        embed_prompts(tok, enc, ["very " * 73 + "S*"], words)


@pytest.mark.parametrize("prompt", ["a photo of a man", "a photo of S* and S*", "a photo of s*"])
def test_a_prompt_needs_exactly_one_placeholder(text, prompt):
    tok, enc = text
    with pytest.raises(ValueError, match="exactly once") as e:
        embed_prompts(tok, enc, [prompt], torch.randn(1, 1, 32))
    assert "\n" not in str(e.value)

# ----------------------------------------------------------------------------- the losses


def test_regularisers_equal_hand_computations():
    assert word_regulariser(torch.tensor([[[1.0, -2.0], [3.0, -4.0]]])).item() == 2.5
    layers = torch.nn.Sequential(DualAttention(Attention(2, 2, heads=1)), DualAttention(Attention(2, 2, heads=1)))
    with torch.no_grad():
        layers[0].to_v_s.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        layers[1].to_v_s.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    f = torch.tensor([[[1.0, 2.0], [-3.0, 0.5]]])
    # V_S = f W^T: layer 0 [[1, -2], [-3, -0.5]] -> mean |.| 1.625; layer 1 [[4, 0], [-5.5, 0]] -> 2.375
    assert value_regulariser(layers, f).item() == pytest.approx(2.0, abs=1e-7)


def test_face_loss_is_one_minus_the_cosine_of_the_face_regions():
    identity = IdentityEncoder(lambda z: z.mean(dim=(2, 3)), lambda x: x, "toy")   # F = mean colour
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    c, d = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 2.0])
    x[1, :, :2, :2], x_hat[1, :, :2, :2] = c[:, None, None], d[:, None, None]  # row 1's face: the top-left 2x2
    masks = torch.ones(2, 1, 4, 4)
    masks[1] = 0
    masks[1, :, :2, :2] = 1
    expected = torch.stack([1 - F.cosine_similarity(x[0].mean(dim=(1, 2)), x_hat[0].mean(dim=(1, 2)), dim=0),
                            1 - F.cosine_similarity(c, d, dim=0)])
    assert torch.allclose(face_loss(identity, x, x_hat, masks), expected, atol=1e-6)


def test_the_face_loss_is_skipped_above_its_timestep_limit(assets, monkeypatch):
    models = tiny_photoverse(assets)
    seen = []
    dino = models.identity

    def spy(x):
        seen.append(x.shape[0])
        return dino(x)
    models.identity = spy
    cfg = SimpleNamespace(**LOSS_CFG, face_loss_max_timestep=600)
    monkeypatch.setattr(photoverse_train, "draw_timesteps", lambda gens, schedule, device: torch.tensor([100, 800]))
    loss, logs = photoverse_train.photoverse_loss(face_batch(assets), models, cfg)
    assert seen == [1, 1] and logs["loss_face"] > 0       # real and estimate, of the t = 100 row only
    total = logs["loss_ldm"] + 0.01 * logs["loss_face"] + 0.01 * logs["loss_words"] + 0.001 * logs["loss_values"]
    assert loss.item() == pytest.approx(total, rel=1e-6)
    monkeypatch.setattr(photoverse_train, "draw_timesteps", lambda gens, schedule, device: torch.tensor([600, 999]))
    seen.clear()
    loss, logs = photoverse_train.photoverse_loss(face_batch(assets), models, cfg)
    assert seen == [] and logs["loss_face"] == 0.0        # no row below 600: no decode, no face encoder

# ----------------------------------------------------------------------------- what trains


def test_an_optimizer_step_changes_only_adapters_lora_and_w_s(assets):
    models = tiny_photoverse(assets)
    frozen = {"unet": models.unet, "vae": models.vae, "text_encoder": models.text_encoder, "vision": models.vision,
              "face": models.identity.model}
    before = {part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in frozen.items()}
    trained_before = {k: v.detach().clone() for k, v in trained_state(models).items()}
    assert {n for n, p in models.unet.named_parameters() if p.requires_grad} == \
        {n for n in models.unet.state_dict() if photoverse.is_trained(n)}
    optimizer = torch.optim.AdamW(trainable_parameters(models), lr=1e-3, weight_decay=0.0)
    cfg = SimpleNamespace(**LOSS_CFG, face_loss_max_timestep=1000)
    loss, _ = photoverse_train.photoverse_loss(face_batch(assets, fusion_seed=fusion_seed((1.0, 1.0))), models, cfg)
    loss.backward()
    optimizer.step()
    for part, m in frozen.items():
        after = m.state_dict()
        for k, v in before[part].items():
            if not photoverse.is_trained(k):
                assert torch.equal(after[k], v), f"{part}.{k} changed"
    for k, v in trained_state(models).items():
        # with B = 0, A gets no gradient on the first step (LoRA's update is B A x); everything else moves
        assert torch.equal(v, trained_before[k]) == (".lora_A" in k), k

# ----------------------------------------------------------------------------- end to end


def fixed_ldm(models, faces: Path) -> float:
    """Mean L_ldm over the faces at fixed timesteps and noise, in each of the three fusion cases."""
    x = torch.stack([prepare(load_image(p), RES) for p in sorted(faces.glob("*.png"))])
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        words, tokens = models.adapters(image_states(models, x))
        c = encode_with_words(models.tokenizer, models.text_encoder, [TRAIN_PROMPT] * len(x), words)
        z0 = models.vae.encode(x).mean * models.vae.config.scaling_factor
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(z0.shape, generator=g)
            tt = torch.full((len(x),), t)
            for gamma, sigma in CASES:
                set_image_condition(models.unet, tokens, gamma, sigma)
                total += F.mse_loss(models.unet(models.schedule.add_noise(z0, noise, tt), tt, c), noise).item()
    return total / 15


def pretrain_args(assets, out, steps=30, *extra, faces=None):
    return ["--method", "photoverse", "--pretrained_model_name_or_path", str(assets / "sd1"), "--instance_data_dir",
            str(faces or assets / "faces"), "--clip_model", str(assets / "clip"), "--dino_model", str(assets / "dino"),
            "--vision_layers", "last,1", "--adapter_dim", "32", "--rank", "2", "--resolution", str(RES),
            "--train_batch_size", "2", "--learning_rate", "3e-2", "--max_train_steps", str(steps),
            "--checkpointing_steps", "10", "--output_dir", str(out), "--device", "cpu", *map(str, extra)]


def test_pretraining_lowers_the_loss_and_one_command_writes_images(assets, tmp_path, capsys):
    before = fixed_ldm(tiny_photoverse(assets, identity=False), assets / "faces")
    out = train.main(pretrain_args(assets, tmp_path / "run", 60, "--face_loss_max_timestep", "1000",
                                   "--checkpointing_steps", "30"))
    assert out == tmp_path / "run"
    assert "face loss: DINO fallback" in capsys.readouterr().out
    models = photoverse.load_photoverse(tmp_path / "run")
    after = fixed_ldm(models, assets / "faces")
    assert after < 0.93 * before, (before, after)           # measured: 0.88
    logs = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    assert len(logs) == 60 and all(r["loss_face"] >= 0 for r in logs)
    assert {(r["gamma"], r["sigma"]) for r in logs} == set(CASES)            # every fusion case was trained
    meta = photoverse.read_adapter_meta(tmp_path / "run")
    assert meta["face_loss"].startswith("DINO fallback") and meta["step"] == 60
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["face_loss"].startswith("DINO fallback")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "run" / photoverse.CHECKPOINT_NAME)        # only the trained parts
    assert saved and all(k.startswith("adapters.") or photoverse.is_trained(k) for k in saved)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-30", "checkpoint-60"]

    face = assets / "faces" / "face_0.png"
    paths = sample.main(["--method", "photoverse", "--adapter", str(tmp_path / "run"), "--face", str(face), "--prompt",
                         "a photo of S* as a chef", "--num_images", "2", "--steps", "3", "--height", "32", "--width",
                         "32", "--out", str(tmp_path / "images"), "--device", "cpu", "--sigma", "1.5"])
    assert [p.name for p in paths] == ["0000.png", "0001.png"] and (tmp_path / "images" / "grid.png").is_file()
    im = Image.open(paths[0])
    assert im.size == (32, 32) and im.text["face"] == str(face) and im.text["sigma"] == "1.5"
    assert np.asarray(im, dtype=np.float32).std() > 1                       # an image, not a constant
    # the same seed through the API gives the same pixels; another face gives other pixels
    again = photoverse.generate(models, load_image(face), ["a photo of S* as a chef"], sigma=1.5, steps=3, height=32,
                                width=32, latents=pipeline.initial_latents(2, 32, 32, 0)[:1], progress=False)[0]
    assert np.abs(np.asarray(again, dtype=np.int16) - np.asarray(im, dtype=np.int16)).max() <= 1
    other = photoverse.generate(models, draw_face(9), ["a photo of S* as a chef"], sigma=1.5, steps=3, height=32,
                                width=32, latents=pipeline.initial_latents(2, 32, 32, 0)[:1], progress=False)[0]
    assert not np.array_equal(np.asarray(other), np.asarray(im))


def test_resume_equals_a_straight_run(assets, tmp_path, monkeypatch):
    import checkpoint
    train.main(pretrain_args(assets, tmp_path / "straight", 4, "--checkpointing_steps", "2"))
    real_save = checkpoint.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(pretrain_args(assets, tmp_path / "resumed", 4, "--checkpointing_steps", "2"))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    train.main(pretrain_args(assets, tmp_path / "resumed", 4, "--checkpointing_steps", "2",
                             "--resume_from_checkpoint", "latest"))
    a, b = [[json.loads(line)["loss"] for line in (tmp_path / d / "logs.jsonl").read_text().splitlines()]
            for d in ("straight", "resumed")]
    assert len(a) == len(b) == 4 and a == pytest.approx(b, abs=1e-6)

# ----------------------------------------------------------------------------- face regions from masks and boxes


def test_masks_and_boxes_give_the_face_region(tmp_path):
    for i in range(3):
        draw_face(i, (40, 40)).save(tmp_path / f"f{i}.png")
    (tmp_path / "masks").mkdir()
    mask = Image.new("L", (40, 40))
    ImageDraw.Draw(mask).rectangle((0, 0, 19, 39), fill=255)                     # the left half
    mask.save(tmp_path / "masks" / "f0.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"f1.png": [0, 20, 40, 40]}))  # the bottom half
    faces = photoverse_train.FaceFolder(tmp_path)
    (_, m0), (_, m1), (_, m2) = (faces.load(i, 40) for i in range(3))
    assert m0[0, :, :20].min() == 1 and m0[0, :, 20:].max() == 0
    assert m1[0, 20:].min() == 1 and m1[0, :20].max() == 0
    assert m2.min() == 1                                                          # neither: the whole image [ours]
    (tmp_path / "boxes.json").write_text(json.dumps({"f1.png": [0, 20, 50, 40]}))
    with pytest.raises(ValueError, match="inside its 40x40 pixels"):
        photoverse_train.FaceFolder(tmp_path)
    (tmp_path / "boxes.json").unlink()
    Image.new("L", (20, 20)).save(tmp_path / "masks" / "f2.png")
    with pytest.raises(ValueError, match="must have its image's size"):
        photoverse_train.FaceFolder(tmp_path)

# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model loads: bad input must be caught before."""
    monkeypatch.setattr(photoverse, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(photoverse_train, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(photoverse, "load_photoverse", lambda *a, **k: pytest.fail("a model was loaded"))


def sample_args(tmp_path, adapter, face, prompt="a photo of S* as a chef", *extra):
    return ["--method", "photoverse", "--adapter", str(adapter), "--face", str(face), "--prompt", prompt,
            "--out", str(tmp_path / "out"), "--device", "cpu", *extra]


def test_an_unreadable_face_image_fails_clearly(assets, tmp_path, no_loading):
    bad = tmp_path / "face.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*face.png") as e:
        sample.main(sample_args(tmp_path, tmp_path / "adapter.safetensors", bad))
    assert "\n" not in str(e.value)
    faces = tmp_path / "faces"
    faces.mkdir()
    draw_face(0).save(faces / "a.png")
    (faces / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="cannot read face image .*b.png"):
        train.main(pretrain_args(assets, tmp_path / "run", 1, faces=faces))


def test_a_prompt_without_the_placeholder_fails_before_loading(assets, tmp_path, no_loading):
    with pytest.raises(ValueError, match="exactly once"):
        sample.main(sample_args(tmp_path, tmp_path / "adapter.safetensors", assets / "faces" / "face_0.png",
                                "a photo of a man as a chef"))
    with pytest.raises(ValueError, match="must not contain S"):
        sample.main(sample_args(tmp_path, tmp_path / "adapter.safetensors", assets / "faces" / "face_0.png",
                                "a photo of S*", "--negative_prompt", "S*"))
    with pytest.raises(ValueError, match="exactly once"):
        train.main(pretrain_args(assets, tmp_path / "run", 1, "--validation_prompt", "a photo of a man"))


def test_an_adapter_for_another_base_model_fails_clearly(assets, tmp_path):
    models = tiny_photoverse(assets, identity=False)
    adapter = photoverse.save_adapter(tmp_path / "pv.safetensors", models, {
        "base_model": str(assets / "sd1"), "clip_model": str(assets / "clip"), "face_loss": "none", "step": 0})
    with pytest.raises(ValueError, match="built for another base model: unet_config_sha256") as e:
        sample.main(sample_args(tmp_path, adapter, assets / "faces" / "face_0.png", "a photo of S*",
                                "--model", str(assets / "sd2"), "--steps", "1"))
    assert str(assets / "sd1") in str(e.value) and "\n" not in str(e.value)
    not_ours = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(1)}, str(not_ours))
    with pytest.raises(ValueError, match="not a PhotoVerse adapter checkpoint"):
        sample.main(sample_args(tmp_path, not_ours, assets / "faces" / "face_0.png"))
    with pytest.raises(ValueError, match="does not exist"):
        sample.main(sample_args(tmp_path, tmp_path / "missing", assets / "faces" / "face_0.png"))


def test_bad_pretraining_settings_fail_before_loading(assets, tmp_path, no_loading):
    with pytest.raises(ValueError, match="--vision_layers must be comma-separated layer numbers"):
        train.main(pretrain_args(assets, tmp_path, 1, "--vision_layers", "last,four"))
    with pytest.raises(ModelLoadError, match="--face_encoder .* does not exist"):
        train.main(pretrain_args(assets, tmp_path, 1, "--face_encoder", str(tmp_path / "arcface.pth")))
    with pytest.raises(ValueError, match="--face_loss_weight must be >= 0"):
        train.main(pretrain_args(assets, tmp_path, 1, "--face_loss_weight", "-1"))


    with pytest.raises(ValueError, match=r"in \[-3, 2\] \(the image tower has 2 layers"):   # the tiny tower
        train.main(pretrain_args(assets, tmp_path, 1, "--vision_layers", "last,4,8,12,16"))
    with pytest.raises(ValueError, match="--snr_gamma does not apply"):
        train.main(pretrain_args(assets, tmp_path, 1, "--snr_gamma", "5"))
    with pytest.raises(ValueError, match="--export does not apply to --method photoverse"):
        train.main(pretrain_args(assets, tmp_path, 1, "--export", "kohya"))
    with pytest.raises(ValueError, match="--face_encoder is an option of --method photoverse"):   # and the reverse
        train.main(["--method", "dreambooth", "--face_encoder", str(tmp_path / "arcface.pth")])


def test_k_and_v_use_the_papers_scale_and_lora_scale_0_is_the_base_cross_attention(assets, tmp_path):
    """K = W_k c + alpha dW c with alpha = 1 [paper] for the default training config (rank 2 here), and with
    `lora_scale=0` at inference (sample.py --lora_scale 0) the text branch is the base cross-attention again."""
    from lora import lora_layers, set_lora_scale
    config = photoverse_train.photoverse_config(train.parse_args(pretrain_args(assets, tmp_path / "x")))
    assert config.rank == 2 and config.lora_alpha is None
    torch.manual_seed(0)
    base = pipeline.load_models(assets / "sd1")
    models = attach(pipeline.load_models(assets / "sd1"), CLIPModel.from_pretrained(assets / "clip"), config)
    layers = {n: m for n, m in lora_layers(models.unet).items()}
    assert layers and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in layers)
    assert all(m.scale == 1.0 for m in layers.values())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.weight.copy_(0.3 * torch.randn(m.lora_B.weight.shape, generator=g))
    name, layer = next(iter(layers.items()))
    c = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        dW = layer.lora_B.weight @ layer.lora_A.weight
        assert torch.allclose(layer(c), c @ (layer.weight + 1.0 * dW).T, atol=1e-5)       # alpha = 1
    z, t, f = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        set_image_condition(models.unet, f, 1.0, 0.0)                  # the image branch off: only the text branch
        assert not torch.allclose(models.unet(z, t, c), base.unet(z, t, c), atol=1e-4)     # LoRA live at scale 1
        set_lora_scale(models.unet, 0.0)
        assert torch.equal(models.unet(z, t, c), base.unet(z, t, c))
    # the same from a checkpoint and from the command line
    file = photoverse.save_adapter(tmp_path / "pv.safetensors", models, {"base_model": str(assets / "sd1"),
                                                                          "clip_model": str(assets / "clip")})
    assert all(m.scale == 1.0 for m in lora_layers(photoverse.load_photoverse(file).unet).values())
    assert all(m.scale == 0.0 for m in lora_layers(photoverse.load_photoverse(file, lora_scale=0).unet).values())
    paths = sample.main(sample_args(tmp_path, file, assets / "faces" / "face_0.png", "a photo of S*", "--lora_scale",
                                    "0", "--steps", "2", "--height", "32", "--width", "32"))
    with Image.open(paths[0]) as im:
        assert im.text["lora_scale"] == "0.0"
    mask = Image.new("L", load_image(assets / "faces" / "face_0.png").size)
    ImageDraw.Draw(mask).rectangle((5, 5, 30, 40), fill=255)
    mask.save(tmp_path / "mask.png")
    masked = sample.main(sample_args(tmp_path / "m", file, assets / "faces" / "face_0.png", "a photo of S*",
                                     "--lora_scale", "0", "--steps", "2", "--height", "32", "--width", "32",
                                     "--face_mask", str(tmp_path / "mask.png")))
    assert not np.array_equal(np.asarray(Image.open(masked[0])), np.asarray(Image.open(paths[0])))  # the crop is used


def test_the_reference_is_the_1_3x_face_crop_masked_when_a_region_is_given():
    """Box rows 10..29 x cols 20..29 (20 x 10 px) of a 40 x 40 image: the crop is 26 x 13 px about its centre, the
    non-face pixels in it 0, resized back to 40 x 40. An all-ones mask leaves the image as it is."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    masks = torch.zeros(2, 1, 40, 40)
    masks[0, :, 10:30, 20:30] = 1
    masks[1] = 1
    ref = photoverse.reference_faces(x, masks)
    assert torch.equal(ref[1], x[1])
    top, left = (10 + 30 - 26) // 2, (20 + 30 - 13) // 2                   # about the box's centre: 26 x 13 px
    crop = (x[0] * masks[0])[:, top:top + 26, left:left + 13]
    expected = F.interpolate(crop[None], size=(40, 40), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(ref[0], expected, atol=1e-6)
    assert (ref[0][:, :, :3] == 0).all()                                   # the margin around the box is masked
    edge = torch.zeros(1, 1, 40, 40)
    edge[0, :, 0:20, 0:20] = 1                                             # a box at the corner: kept inside
    assert photoverse.reference_faces(x[:1], edge).shape == (1, 3, 40, 40)


def test_pretraining_feeds_the_adapters_the_reference_faces(assets, monkeypatch):
    models = tiny_photoverse(assets)
    batch = face_batch(assets)
    batch["masks"][0, :, :, 32:] = 0                                       # row 0: its left half is the face
    seen = []
    real = photoverse_train.image_states
    monkeypatch.setattr(photoverse_train, "image_states", lambda m, x: seen.append(x) or real(m, x))
    photoverse_train.photoverse_loss(batch, models, train.TrainConfig(method="photoverse", **LOSS_CFG))
    assert torch.equal(seen[0], photoverse.reference_faces(batch["pixel_values"], batch["masks"]))
    assert torch.equal(seen[0][1], batch["pixel_values"][1]) and not torch.equal(seen[0][0], batch["pixel_values"][0])
