"""The object-driven one-shot method: L_os and the prototypical target by hand, stage 1, CLI runs (one and two
objects, resume), sampling from the result, bad input."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import methods
import pipeline
import sample
import train
from data import prepare
from image_encoders import CLIPConfig, CLIPModel
from losses import clip_text_features, masked_mse, objectdriven_loss, prototypical_target
from schedulers import NoiseSchedule
from text_encoder import TextEncoderConfig
from tiny import tiny_models
from helpers import killed_after_first_checkpoint, randomize

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"

# ----------------------------------------------------------------------------- loss terms by hand


def test_masked_loss_equals_a_hand_computation_and_ignores_the_background():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, 0, 0, :2] = 1                                     # row 0: two object pixels
    mask[1, 0, 1:, 1:] = 0.5                                  # row 1: a soft mask (area-resized edges)
    err = (pred - target) ** 2
    expected = torch.stack([(err[i] * mask[i]).sum() / (mask[i].sum() * 4) for i in range(2)]).mean()
    assert torch.allclose(masked_mse(pred, target, mask, 0.0, torch.ones(2)), expected, atol=1e-6)
    # background weight b: W = M + b (1 - M)
    W = mask + 0.25 * (1 - mask)
    expected_b = torch.stack([(err[i] * W[i]).sum() / (W[i].sum() * 4) for i in range(2)]).mean()
    assert torch.allclose(masked_mse(pred, target, mask, 0.25, torch.ones(2)), expected_b, atol=1e-6)
    assert torch.allclose(masked_mse(pred, target, mask, 1.0, torch.ones(2)), err.mean(), atol=1e-6)  # plain MSE
    # b = 0: a change outside the mask changes neither the loss nor any gradient outside it
    outside = (mask == 0).expand_as(pred)
    changed = pred + 5.0 * outside
    assert torch.equal(masked_mse(changed, target, mask, 0.0, torch.ones(2)), masked_mse(pred, target, mask, 0.0, torch.ones(2)))
    p = pred.clone().requires_grad_(True)
    masked_mse(p, target, mask, 0.0, torch.ones(2)).backward()
    assert p.grad[outside].abs().max() == 0 and p.grad[~outside].abs().max() > 0
    assert masked_mse(pred, target, mask, 0.25, torch.ones(2)) != masked_mse(changed, target, mask, 0.25, torch.ones(2))


def test_objectdriven_loss_resizes_the_mask_to_the_latent_grid_by_area():
    """One instance row and one class row through a stand-in UNet: L_os uses the 8x-average-pooled pixel mask."""
    torch.manual_seed(1)
    schedule = NoiseSchedule.sd()
    out = torch.randn(2, 4, 4, 4)
    models = SimpleNamespace(unet=lambda z, t, c: out, schedule=schedule)
    z0 = torch.randn(2, 4, 4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 3:20, 5:30] = 1                                            # edges inside 8x8 cells: fractional weights
    batch = {"latent_mean": z0, "latent_std": torch.zeros_like(z0), "n_prior": 1, "mask": mask,
             "generators": [torch.Generator().manual_seed(i) for i in (4, 5)], "encoder_hidden_states": torch.ones(2, 3, 8)}
    cfg = SimpleNamespace(noise_offset=0.0, snr_gamma=None, background_weight=0.0, prior_loss_weight=0.5)
    loss, logs = objectdriven_loss(batch, models, cfg)
    gens = [torch.Generator().manual_seed(i) for i in (4, 5)]            # the same draws: latent sample, t, noise
    for g in gens:
        torch.randn(4, 4, 4, generator=g)
        torch.randint(0, 1000, (1,), generator=g)
    noise = torch.stack([torch.randn(4, 4, 4, generator=g) for g in gens])
    M = F.avg_pool2d(mask, 8)                                             # (1, 1, 4, 4)
    err = (out - noise) ** 2
    l_os = (err[0] * M[0]).sum() / (4 * M.sum())
    l_prior = err[1].mean()
    assert abs(logs["loss_object"] - l_os.item()) < 1e-5 and abs(logs["loss_prior"] - l_prior.item()) < 1e-5
    assert abs(loss.item() - (l_os + 0.5 * l_prior).item()) < 1e-5


def test_prototypical_target_is_the_mean_of_three_unit_vectors():
    a, b, c = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    g = prototypical_target(a, b, c)
    assert torch.allclose(g, torch.tensor([1 + 2 ** -0.5, 2 ** -0.5, -1.0]) / 3, atol=1e-7)
    # L_pe = 1 - cos(T, g): for T = a, cos = g_x / |g|
    l_pe = 1 - F.cosine_similarity(a[None], g[None]).item()
    assert abs(l_pe - (1 - g[0].item() / g.norm().item())) < 1e-6

# ----------------------------------------------------------------------------- tiny CLIP and inputs


def tiny_clip(text=None, seed=0) -> CLIPModel:
    """A tiny CLIP with random weights (larger than the init, so images differ); its text width is the tiny SD's."""
    cfg = CLIPConfig.tiny()
    return randomize(CLIPModel(CLIPConfig(text or cfg.text, cfg.vision, cfg.projection_dim)), seed)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tiny_clip().save_pretrained(folder)
    return folder


def box_mask(path, box, size=(128, 128)):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    mask.save(path)
    return path


@pytest.fixture(scope="module")
def two_objects(tmp_path_factory):
    """One image with two objects: the dog (the demo's hand-made mask) and a box below it, 'table'."""
    root = tmp_path_factory.mktemp("objects")
    shutil.copy(DEMO / "dog" / "02.jpg", root / "photo.jpg")
    shutil.copy(DEMO / "dog_mask" / "02.png", root / "dog.png")
    box_mask(root / "table.png", (0, 116, 128, 128))
    (root / "objects.json").write_text(json.dumps([
        {"image": "photo.jpg", "mask": "dog.png", "class": "dog", "token": "<o1>"},
        {"image": "photo.jpg", "mask": "table.png", "class": "table", "token": "<o2>"}]))
    return root


def argv(model, out, clip, *extra):
    return ["--method", "objectdriven", "--pretrained_model_name_or_path", str(model), "--resolution", "32",
            "--center_crop", "--output_dir", str(out), "--device", "cpu", "--clip_model", str(clip),
            "--class_data_dir", str(Path(out).parent / "classes"), "--num_class_images", "1", "--class_sample_steps",
            "2", "--pe_steps", "3", "--max_train_steps", "2", "--learning_rate", "1e-2", "--token_lr", "1e-2",
            *map(str, extra)]


def logs(out):
    return [json.loads(line) for line in (Path(out) / "logs.jsonl").read_text().splitlines()]

# ----------------------------------------------------------------------------- stage 1


def test_prototypical_stage_lowers_l_pe_and_changes_exactly_one_row(two_objects):
    models = tiny_models()
    cfg = train.TrainConfig(method="objectdriven", pe_steps=15, pe_lr=5e-2)
    obj = methods.read_objects(train.TrainConfig(method="objectdriven", objects=str(two_objects / "objects.json")))[0]
    train.setup_trainable(models, cfg, {obj.token: obj.cls})
    table = models.text_encoder.text_model.embeddings.token_embedding.weight
    before = table.detach().clone()
    lines = methods.prototypical_stage(models, tiny_clip(), [obj], cfg)
    losses = [line["loss_pe"] for line in lines]
    assert len(losses) == 15 and losses[-1] < losses[0] - 1e-3, losses
    changed = (table.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [models.tokenizer.encode("<o1>")[1]]
    assert table.grad is None                                            # stage 1 leaves no gradient on the table


def test_text_features_are_sd_text_encoder_through_the_clip_projection():
    """T with the token's row swapped in equals T of a table whose row is that vector."""
    models, clip = tiny_models(), tiny_clip()
    train.setup_trainable(models, train.TrainConfig(method="objectdriven"), {"<o1>": "dog"})
    ids = models.tokenizer(["a photo of <o1>"])
    token = models.tokenizer.encode("<o1>")[1]
    row = torch.randn(32)
    swapped = clip_text_features(models, clip, ids, {token: row})
    with torch.no_grad():
        models.text_encoder.text_model.embeddings.token_embedding.weight[token] = row
        pooled = models.text_encoder(ids)[1]
    assert torch.allclose(swapped, pooled @ clip.text_projection.weight.T, atol=1e-5)

# ----------------------------------------------------------------------------- end to end


def test_two_objects_from_the_cli_then_sample(tiny_sd1, clip_dir, two_objects, tmp_path):
    out = tmp_path / "run"
    train.main(argv(tiny_sd1, out, clip_dir, "--objects", two_objects / "objects.json", "--background_weight", "0.1"))
    info = json.loads((out / "nanobooth.json").read_text())
    assert info["method"] == "objectdriven" and info["instance_prompt"] == "a photo of <o1> dog and <o2> table"
    assert info["loss_encoders"] == {"clip": str(clip_dir)}
    assert info["embeddings"] == ["learned_embeds-1.safetensors", "learned_embeds-2.safetensors"]  # one per token
    files = [load_file(out / name) for name in info["embeddings"]]
    assert [list(f) for f in files] == [["<o1>"], ["<o2>"]]
    embeds = {k: v for f in files for k, v in f.items()}
    lora = load_file(out / info["lora"])
    assert lora and all(k.startswith("unet.") and ".lora_" in k for k in lora)
    # class-characterizing prior: one folder per class, made by the frozen model from "a photo of {class}"
    for cls in ("dog", "table"):
        pngs = list((tmp_path / "classes" / cls).glob("*.png"))
        assert len(pngs) == 1 and Image.open(pngs[0]).text["prompt"] == f"a photo of {cls}"
    lines = logs(out)
    stage1 = [r for r in lines if "loss_pe" in r]
    assert [(r["token"], r["pe_step"]) for r in stage1] == [("<o1>", 1), ("<o1>", 2), ("<o1>", 3),
                                                            ("<o2>", 1), ("<o2>", 2), ("<o2>", 3)]
    stage2 = [r for r in lines if r["step"] > 0]
    assert [r["step"] for r in stage2] == [1, 2]
    for r in stage2:
        assert abs(r["loss"] - (r["loss_object"] + r["loss_prior"])) < 1e-6
    # the result samples in one command, and the tokens are the trained rows
    paths = sample.main(["--model", str(out), "--prompt", "a photo of <o1> dog and <o2> table", "--steps", "2",
                         "--out", str(tmp_path / "samples"), "--device", "cpu"])
    assert len(paths) == 1 and Image.open(paths[0]).size == (128, 128)
    loaded = pipeline.load_trained(out)
    table = loaded.text_encoder.text_model.embeddings.token_embedding.weight
    for token in ("<o1>", "<o2>"):
        assert torch.equal(table[loaded.tokenizer.encode(token)[1]], embeds[token])
    # diffusers reads the files (it refuses one file with several tokens) and draws what we draw
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion([str(out / name) for name in info["embeddings"]])
    prompt = "a photo of <o1> dog and <o2> table"
    ref = pipe([prompt], num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(3),
               output_type="np").images
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in pipeline.generate(
        loaded, [prompt], seed=3, steps=3, height=64, width=64, progress=False)])
    assert np.abs(ours - ref).max() <= 1 / 255


def test_one_object_from_instance_dir_and_mask_and_resume(tiny_sd1, clip_dir, tmp_path, monkeypatch):
    (tmp_path / "photo").mkdir()
    shutil.copy(DEMO / "dog" / "02.jpg", tmp_path / "photo" / "02.jpg")
    one = ["--instance_data_dir", tmp_path / "photo", "--instance_mask", DEMO / "dog_mask" / "02.png",
           "--placeholder_token", "<dog1>", "--initializer_token", "dog", "--random_flip", "--checkpointing_steps", "2",
           "--max_train_steps", "3"]
    train.main(argv(tiny_sd1, tmp_path / "straight", clip_dir, *one))
    assert json.loads((tmp_path / "straight" / "nanobooth.json").read_text())["instance_prompt"] == "a photo of <dog1> dog"
    # killed after the checkpoint of step 2, then resumed: stage 1 is not run again, and the steps match
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(argv(tiny_sd1, tmp_path / "resumed", clip_dir, *one)))
    monkeypatch.setattr(train, "prototypical_stage", lambda *a: pytest.fail("stage 1 ran again on resume"))
    train.main(argv(tiny_sd1, tmp_path / "resumed", clip_dir, *one, "--resume_from_checkpoint", "latest"))
    a, b = logs(tmp_path / "straight"), logs(tmp_path / "resumed")
    assert [r.get("pe_step", r["step"]) for r in b] == [1, 2, 3, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra.get("loss_pe", ra.get("loss")) == pytest.approx(rb.get("loss_pe", rb.get("loss")), abs=1e-6)
    ea, eb = (load_file(tmp_path / run / "learned_embeds.safetensors")["<dog1>"] for run in ("straight", "resumed"))
    assert torch.allclose(ea, eb, atol=1e-6)


def test_masks_are_cropped_with_their_image(two_objects):
    """union_mask + prepare with a replayed generator: the mask's crop is the image's crop."""
    union = methods.union_mask([two_objects / "dog.png", two_objects / "table.png"])
    expected = np.maximum(np.asarray(Image.open(two_objects / "dog.png")), np.asarray(Image.open(two_objects / "table.png")))
    assert np.array_equal(np.asarray(union)[..., 0], expected)
    # an image whose pixels are its mask: cropping both with the same draws gives the same tensor
    g = torch.Generator().manual_seed(3)
    replay = torch.Generator().set_state(g.get_state())
    crop_image = prepare(union, 48, center_crop=False, flip=True, generator=g)
    crop_mask = prepare(union, 48, center_crop=False, flip=True, generator=replay)
    assert torch.equal(crop_image, crop_mask)

# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case, message", [
    ("small_mask", r"mask '.*small.png' is 64x64 but its image '.*photo.jpg' is 128x128"),
    ("empty_mask", r"mask '.*empty.png' is empty"),
    ("missing_mask", r"mask '.*nope.png' does not exist"),
    ("same_token", r"objects 1 and 2 both use the token '<o1>'"),
    ("two_images", r"learns from one image, but --instance_data_dir '.*' has 2"),
    ("no_mask", r"needs --instance_data_dir \(one image\) with --instance_mask"),
    ("class_prompt", r"drop --class_prompt"),
    ("bad_json", r"must be a non-empty JSON list of objects with exactly the string fields"),
])
def test_bad_input_fails_before_a_model_loads(case, message, two_objects, clip_dir, tmp_path, monkeypatch):
    shutil.copy(two_objects / "photo.jpg", tmp_path / "photo.jpg")
    shutil.copy(two_objects / "dog.png", tmp_path / "dog.png")
    box_mask(tmp_path / "small.png", (0, 0, 10, 10), size=(64, 64))
    Image.new("L", (128, 128), 100).save(tmp_path / "empty.png")              # grey 100 < 128: no object pixel
    entries = {"small_mask": [("small.png", "<o1>")], "empty_mask": [("empty.png", "<o1>")],
               "missing_mask": [("nope.png", "<o1>")], "same_token": [("dog.png", "<o1>"), ("dog.png", "<o1>")]}
    extra = []
    if case == "bad_json":
        (tmp_path / "spec.json").write_text(json.dumps([{"image": "photo.jpg", "mask": "dog.png", "class": "dog"}]))
        extra = ["--objects", tmp_path / "spec.json"]
    elif case in entries:
        (tmp_path / "spec.json").write_text(json.dumps([{"image": "photo.jpg", "mask": m, "class": "dog", "token": t}
                                                         for m, t in entries[case]]))
        extra = ["--objects", tmp_path / "spec.json"]
    else:
        folder = tmp_path / "images"
        folder.mkdir()
        shutil.copy(tmp_path / "photo.jpg", folder / "a.jpg")
        if case == "two_images":
            shutil.copy(tmp_path / "photo.jpg", folder / "b.jpg")
        extra = ["--instance_data_dir", folder] + ([] if case == "no_mask" else ["--instance_mask", two_objects / "dog.png"])
        extra += ["--class_prompt", "a photo of dog"] if case == "class_prompt" else []
    monkeypatch.setattr(train, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=message) as e:
        train.main(argv(tmp_path, tmp_path / "out", clip_dir, *extra))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_clip_whose_text_tower_does_not_fit_sd_is_an_error(tiny_sd1, two_objects, tmp_path):
    wide = tmp_path / "wide-clip"
    tiny_clip(TextEncoderConfig(hidden_size=48, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
              ).save_pretrained(wide)
    with pytest.raises(ValueError, match="48-wide text tower but the SD text encoder is 32-wide"):
        train.main(argv(tiny_sd1, tmp_path / "out", wide, "--objects", two_objects / "objects.json"))
    assert not (tmp_path / "classes").exists()                              # before any class image
