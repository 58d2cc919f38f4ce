"""eval.py: metric math, identifier removal, the DreamBench lists, end to end against transformers, bad input."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPImageProcessor
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers import ViTConfig as HFViTConfig
from transformers import ViTModel as HFViTModel

import eval
import world
from face_encoder import IResNet
from image_encoders import IMAGENET_MEAN, IMAGENET_STD, CLIPConfig, FactorClassifier, FactorClassifierConfig, ViTConfig
from data import save_png
from text_encoder import CLIPTokenizer
from helpers import randomize

ASSET = Path(__file__).parent.parent / "assets" / "dreambench" / "prompts_and_classes.txt"

# ----------------------------------------------------------------------------- metric math and prompt lists


def test_pairwise_and_text_cosines_equal_a_hand_computation():
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    refs = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # row 0: cos = 1 and 1/sqrt(2); row 1: cos = 0 and 1/sqrt(2); each row averages over the references
    expected = torch.tensor([(1 + 2 ** -0.5) / 2, (0 + 2 ** -0.5) / 2])
    assert torch.allclose(eval.mean_cosine(gen, refs), expected, atol=1e-7)
    text = torch.tensor([[4.0, 3.0], [0.0, -5.0]])
    # (1, 0).(4, 3) / 5 = 0.8; (0, 2).(0, -5) / 10 = -1: each image against its own prompt only
    assert torch.allclose(eval.row_cosine(gen, text), torch.tensor([0.8, -1.0]), atol=1e-7)


def test_identifier_removal():
    assert eval.remove_identifier("a sks dog in the snow", "sks") == "a dog in the snow"
    assert eval.remove_identifier("sks a red sks dog", "sks") == "a red dog"
    assert eval.remove_identifier("a <sks> toy, a sksdog", "<sks>") == "a toy, a sksdog"  # whole words only
    assert eval.remove_identifier("a dog in the snow", "sks") == "a dog in the snow"


def test_prompt_lists_and_classes_equal_the_dataset_file():
    classes, objects, live = eval.parse_prompts_file(ASSET)
    assert classes == eval.CLASSES and objects == eval.OBJECT_PROMPTS and live == eval.LIVE_PROMPTS
    assert len(classes) == 30 and len(set(classes.values())) == 15 and len(objects) == len(live) == 25
    assert eval.OBJECT_PROMPTS[0].format("sks", "backpack") == "a sks backpack in the jungle"
    assert sorted(s for s, c in classes.items() if c in eval.LIVE_CLASSES) == [
        "cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert eval.dreambench(None) == (eval.CLASSES, eval.OBJECT_PROMPTS, eval.LIVE_PROMPTS)
    with pytest.raises(ValueError, match="not DreamBench"):
        eval.parse_prompts_file(Path(__file__))

# ----------------------------------------------------------------------------- end to end with tiny models


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny CLIP and DINO ViT written by transformers, and transformers' own tokenizer of the same vocabulary."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    d = CLIPConfig.tiny().to_json()
    clip = randomize(HFCLIPModel(HFCLIPConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                                              projection_dim=d["projection_dim"])), 0)
    vit = randomize(HFViTModel(HFViTConfig(**ViTConfig.tiny().to_json())), 1)
    clip.save_pretrained(root / "clip")
    vit.save_pretrained(root / "dino")
    CLIPTokenizer.from_pretrained(None).save_pretrained(root / "tokenizer")
    return {"clip": clip, "dino": vit, "tokenizer": HFCLIPTokenizer.from_pretrained(root / "tokenizer"),
            "clip_dir": root / "clip", "dino_dir": root / "dino"}


def smooth_image(seed, size):
    """Low-frequency colour patterns, so tiny encoders see different images as different."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / 40.0
    f = rng.uniform(0.3, 1.5, (3, 2))
    a = np.stack([np.sin(f[c, 0] * x + f[c, 1] * y + c) for c in range(3)], -1) * 0.45 + 0.5
    return Image.fromarray((a * 255).round().astype(np.uint8))


GENERATED = {"dog": [("a sks dog in the snow", (256, 256)), ("a sks dog in the snow", (300, 240)),
                     ("a sks dog on the beach", (240, 320))],
             "cat": [("a sks cat wearing a red hat", (256, 256)), ("a sks cat wearing a red hat", (256, 256))]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """images/<subject>/*.png with a `prompt` text chunk, and a DreamBench-style reference folder."""
    root = tmp_path_factory.mktemp("eval")
    for s, (subject, images) in enumerate(GENERATED.items()):
        for i, (prompt, size) in enumerate(images):
            save_png(smooth_image(10 * s + i, size), root / "images" / subject / f"{i:02d}.png", {"prompt": prompt})
        (root / "dataset" / subject).mkdir(parents=True)
        for i in range(2 + s):  # real photos: JPEGs of other sizes, 2 for dog, 3 for cat
            smooth_image(100 + 10 * s + i, (320 + 16 * i, 280)).save(root / "dataset" / subject / f"{i:02d}.jpg")
    return root


def transformers_scores(encoders, images, prompts, references, keep_identifier=False):
    """The three metrics computed with transformers' models and processors only, per generated image."""
    clip_pre = CLIPImageProcessor()
    dino_pre = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)

    def normed(x):
        return x / x.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        def dino(paths):
            pixels = dino_pre(images=[Image.open(p) for p in paths], return_tensors="pt").pixel_values
            return normed(encoders["dino"](pixel_values=pixels).last_hidden_state[:, 0])

        def clip(paths):
            pixels = clip_pre(images=[Image.open(p) for p in paths], return_tensors="pt").pixel_values
            return normed(encoders["clip"].get_image_features(pixel_values=pixels).pooler_output)
        texts = [p if keep_identifier else p.replace("sks ", "") for p in prompts]
        ids = encoders["tokenizer"](texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = normed(encoders["clip"].get_text_features(input_ids=ids).pooler_output)
        image = clip(images)
        return {"dino": (dino(images) @ dino(references).T).mean(1), "clip_i": (image @ clip(references).T).mean(1),
                "clip_t": (image * text).sum(-1)}


def test_scoring_a_folder_matches_transformers(encoders, folders, tmp_path):
    out = tmp_path / "out"
    args = ["--images", str(folders / "images"), "--reference", str(folders / "dataset"), "--out", str(out),
            "--clip_model", str(encoders["clip_dir"]), "--dino_model", str(encoders["dino_dir"]), "--device", "cpu"]
    metrics = eval.main(args)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["backbones"] == {"dino": str(encoders["dino_dir"]), "clip": str(encoders["clip_dir"])}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["subject"] for r in rows] == ["cat"] * 2 + ["dog"] * 3 and saved["num_images"] == 5

    all_scores = {k: [] for k in ("dino", "clip_i", "clip_t")}
    for subject in ("cat", "dog"):
        images = sorted((folders / "images" / subject).iterdir())
        refs = sorted((folders / "dataset" / subject).iterdir())
        ref = transformers_scores(encoders, images, [p for p, _ in GENERATED[subject]], refs)
        ours = [r for r in rows if r["subject"] == subject]
        subject_row = next(r for r in saved["subjects"] if r["subject"] == subject)
        for k, v in ref.items():
            assert np.allclose([float(r[k]) for r in ours], v.numpy(), atol=1e-4), (subject, k)
            assert abs(subject_row[k] - v.mean().item()) < 1e-4
            all_scores[k] += v.tolist()
    for k, v in all_scores.items():
        assert abs(saved[k] - np.mean(v)) < 1e-4 and metrics[k] == saved[k]
    assert np.std(all_scores["dino"]) > 1e-3  # the images really differ, so the comparison means something
    snow = next(r for r in saved["prompts"] if r["prompt"] == "a sks dog in the snow")
    assert snow["num_images"] == 2 and len(saved["prompts"]) == 3

    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (128 * (3 + 1 + 3), 128 * 2)  # widest row: 3 references, a gap, 3 generated (dog)

    kept = eval.main(args + ["--keep_identifier", "--out", str(tmp_path / "kept")])
    ref = transformers_scores(encoders, sorted((folders / "images" / "dog").iterdir()),
                              [p for p, _ in GENERATED["dog"]], sorted((folders / "dataset" / "dog").iterdir()), True)
    dog = next(r for r in kept["subjects"] if r["subject"] == "dog")
    assert abs(dog["clip_t"] - ref["clip_t"].mean().item()) < 1e-4 and kept["dino"] == metrics["dino"]
    assert kept["clip_t"] != metrics["clip_t"]


def test_one_subject_folder_with_a_given_prompt_and_a_face_model(encoders, folders, tmp_path):
    torch.manual_seed(0)
    torch.save(IResNet((1, 1, 1, 1), num_features=64).state_dict(), tmp_path / "backbone.pth")
    metrics = eval.main(["--images", str(folders / "images" / "dog"), "--reference", str(folders / "dataset" / "dog"),
                         "--prompt", "a photo of sks dog", "--out", str(tmp_path), "--clip_model",
                         str(encoders["clip_dir"]), "--dino_model", str(encoders["dino_dir"]), "--device", "cpu",
                         "--face_model", str(tmp_path / "backbone.pth")])
    assert [r["subject"] for r in metrics["subjects"]] == ["dog"]
    assert [r["prompt"] for r in metrics["prompts"]] == ["a photo of sks dog"]
    assert -1 <= metrics["face"] <= 1 and metrics["backbones"]["face"] == str(tmp_path / "backbone.pth")
    assert list(csv.DictReader(open(tmp_path / "metrics.csv")))[0].keys() >= {"dino", "clip_i", "clip_t", "face"}


def test_protocol_generates_then_scores(tiny_sd1, encoders, folders, tmp_path):
    dataset = tmp_path / "dreambench"
    (dataset / "dog").mkdir(parents=True)
    for p in (folders / "dataset" / "dog").iterdir():
        (dataset / "dog" / p.name).write_bytes(p.read_bytes())
    # an edited copy of the prompts file: proves the dataset's own file is read when it is there
    (dataset / eval.PROMPTS_FILE).write_text(ASSET.read_text().replace("wearing a red hat", "wearing a blue hat"))
    out = tmp_path / "out"
    metrics = eval.main(["--model", str(tiny_sd1), "--dataset", str(dataset), "--subjects", "dog", "--prompt_ids",
                         "1", "10", "--num_images", "1", "--steps", "2", "--out", str(out), "--clip_model",
                         str(encoders["clip_dir"]), "--dino_model", str(encoders["dino_dir"]), "--device", "cpu"])
    pngs = sorted((out / "images" / "dog").glob("*.png"))
    assert [Image.open(p).text["prompt"] for p in pngs] == ["a sks dog in the snow", "a sks dog wearing a blue hat"]
    assert Image.open(pngs[0]).size == (128, 128)  # the tiny UNet's sample_size 16 x 8
    assert [r["prompt"] for r in metrics["prompts"]] == ["a sks dog in the snow", "a sks dog wearing a blue hat"]
    assert metrics["model"] == str(tiny_sd1) and -1 <= metrics["clip_t"] <= 1
    assert (out / "metrics.csv").is_file() and (out / "contact_sheet.png").is_file()

# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ref = str(folders / "dataset" / "dog")
    with pytest.raises(ValueError, match="has no images"):
        eval.main(["--images", str(empty), "--reference", ref])
    no_prompt = tmp_path / "jpgs"
    no_prompt.mkdir()
    smooth_image(0, (64, 64)).save(no_prompt / "a.jpg")
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no prompt .*a.jpg.*--prompt"):
        eval.main(["--images", str(no_prompt), "--reference", ref])
    with pytest.raises(ValueError, match="unknown subject.*dogg.*DreamBench's are backpack"):
        eval.main(["--model", str(tmp_path), "--dataset", str(folders / "dataset"), "--subjects", "dogg"])
    with pytest.raises(ValueError, match="--sampler must be one of"):
        eval.main(["--model", str(tmp_path), "--dataset", str(folders / "dataset"), "--sampler", "heun"])
    with pytest.raises(ValueError, match="subject 'bird' has no images"):
        eval.main(["--images", str(folders / "images"), "--reference", str(folders / "dataset"), "--subjects", "bird"])
    with pytest.raises(ValueError, match="no reference images for subject 'cat'"):
        eval.main(["--images", str(folders / "images"), "--reference", str(empty)])
    with pytest.raises(ValueError, match="give --images DIR .* or --model"):
        eval.main(["--reference", ref])
    with pytest.raises(eval.ModelLoadError, match="--clip_model './missing' does not exist"):
        eval.main(["--images", str(no_prompt), "--reference", ref, "--clip_model", "./missing"])

# ----------------------------------------------------------------------------- toy world: factor accuracy


def test_prompt_factors_reads_the_world_factors_a_prompt_names():
    assert eval.prompt_factors("a sks star on the beach") == {"shape": "star", "scene": "beach"}
    assert eval.prompt_factors("a red circle in front of a brick wall") == {
        "shape": "circle", "colour": "red", "scene": "brick wall"}
    assert eval.prompt_factors("A Purple  sks Heart ON A WOODEN FLOOR") == {
        "shape": "heart", "colour": "purple", "scene": "wooden floor"}
    assert eval.prompt_factors("a red sks star") == {"shape": "star", "colour": "red"}
    # a colour after the shape belongs to something else; without a shape there is no object to colour
    assert eval.prompt_factors("a sks star on top of pink fabric") == {"shape": "star"}
    assert eval.prompt_factors("a sks dog with a blue house in the background") == {}
    assert eval.prompt_factors("a red sks dog in the snow") == {"scene": "snow"}
    # whole words only: no star in "starfish", no ring in "earring", no red in "reddish", no scene in "on the beaches"
    assert eval.prompt_factors("a reddish starfish with an earring on the beaches") == {}
    # the longest scene phrase wins, and its words name no shape or colour
    assert eval.prompt_factors("a star in the water in front of a brick wall")["scene"] == "brick wall"
    for prompt, factors in world.eval_prompts(50, seed=3):  # the benchmark's prompts read back exactly
        assert eval.prompt_factors(prompt) == factors


def fixed_classifier(image_size=32, **says) -> FactorClassifier:
    """A tiny FactorClassifier whose heads ignore the image: zero weights, a bias that picks says[factor]."""
    factors = {"shape": list(world.SHAPES), "colour": list(world.COLOURS), "scene": list(world.SCENES)}
    torch.manual_seed(0)
    classifier = FactorClassifier(FactorClassifierConfig(factors, widths=(8, 16), image_size=image_size))
    with torch.no_grad():
        for name, head in classifier.heads.items():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([float(label == says[name]) for label in factors[name]]))
    return classifier.eval()


def test_factor_accuracy_counts_each_factor_over_the_images_that_name_it():
    classifier = fixed_classifier(shape="star", colour="red", scene="beach")
    images = [smooth_image(i, (64, 64)) for i in range(5)]
    expected = [{"shape": "star", "scene": "snow"}, {"shape": "circle", "colour": "red"},
                {"shape": "star", "colour": "red", "scene": "beach"}, {}, {"shape": "star"}]
    assert eval.factor_accuracy(classifier, images, expected) == {"colour": 1.0, "scene": 0.5, "shape": 0.75}
    assert eval.factor_hits(classifier, images, expected)[:2] == [{"shape": 1.0, "scene": 0.0},
                                                                 {"shape": 0.0, "colour": 1.0}]
    assert eval.factor_accuracy(classifier, images[:1], [{"colour": "blue"}]) == {"colour": 0.0}
    assert eval.factor_accuracy(classifier, [], []) == {}
    with pytest.raises(ValueError, match="cannot predict scene 'on the beach'.*grass, snow"):
        eval.factor_accuracy(classifier, images[:1], [{"scene": "on the beach"}])  # the phrase, not the label
    with pytest.raises(ValueError, match="no 'size' head"):
        eval.factor_accuracy(classifier, images[:1], [{"size": "small"}])
    with pytest.raises(ValueError, match="2 images but 1 expected"):
        eval.factor_accuracy(classifier, images[:2], [{}])


def test_the_classifier_option_adds_factor_accuracy(tiny_sd1, encoders, folders, tmp_path):
    fixed_classifier(shape="star", colour="red", scene="beach").save_pretrained(tmp_path / "classifier")
    dataset = tmp_path / "toy"
    (dataset / "checkered_star").mkdir(parents=True)
    for p in (folders / "dataset" / "dog").iterdir():
        (dataset / "checkered_star" / p.name).write_bytes(p.read_bytes())
    templates = ["a {0} {1} on the beach", "a red {0} {1} in the snow", "a {0} {1} on top of pink fabric"]
    lines = [f"'{t}'.format(unique_token, class_token)," for t in templates]
    (dataset / eval.PROMPTS_FILE).write_text("\n".join(["Classes", "subject_name,class", "checkered_star,star",
                                                        "Prompts", "Object Prompts", *lines,
                                                        "Live Subject Prompts", *lines]))
    out = tmp_path / "out"
    metrics = eval.main(["--model", str(tiny_sd1), "--dataset", str(dataset), "--num_images", "2", "--steps", "1",
                         "--out", str(out), "--clip_model", str(encoders["clip_dir"]), "--dino_model",
                         str(encoders["dino_dir"]), "--classifier", str(tmp_path / "classifier"), "--device", "cpu"])
    # the classifier always says red star on the beach: every image shows the star and the one red asked for,
    # the beach is right for the beach prompt and wrong for the snow one; the fabric prompt names no scene
    assert (metrics["shape_acc"], metrics["colour_acc"], metrics["scene_acc"]) == (1.0, 1.0, 0.5)
    by_prompt = {r["prompt"]: r for r in metrics["prompts"]}
    assert by_prompt["a red sks star in the snow"]["scene_acc"] == 0.0
    assert by_prompt["a sks star on top of pink fabric"]["scene_acc"] is None
    assert by_prompt["a sks star on the beach"]["colour_acc"] is None
    assert metrics["backbones"]["classifier"] == str(tmp_path / "classifier")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [(r["shape_acc"], r["colour_acc"], r["scene_acc"]) for r in rows[::2]] == [
        ("1.0", "", "1.0"), ("1.0", "1.0", "0.0"), ("1.0", "", "")]
    assert len(rows) == 6 and json.loads((out / "metrics.json").read_text())["scene_acc"] == 0.5


def test_a_missing_classifier_folder_fails_before_any_model_loads(encoders, folders, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the arguments were checked")
    monkeypatch.setattr(eval.ViTModel, "from_pretrained", no_loading)
    monkeypatch.setattr(eval.CLIPModel, "from_pretrained", no_loading)
    base = ["--images", str(folders / "images"), "--reference", str(folders / "dataset"), "--out", str(tmp_path)]
    with pytest.raises(eval.ModelLoadError, match="--classifier '.*missing' is not a factor classifier folder"):
        eval.main(base + ["--classifier", str(tmp_path / "missing")])
    with pytest.raises(eval.ModelLoadError, match="is not a factor classifier folder"):  # a ViT: no factors
        eval.main(base + ["--classifier", str(encoders["dino_dir"])])
