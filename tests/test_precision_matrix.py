"""Every fine-tuning method with the options a GPU user passes: mixed precision (bf16 and fp16), gradient
checkpointing, a validation prompt reached during the run, the text encoder trained where the method allows it,
class images, a checkpoint, a kill and a resume. On an SD1-style and an SD2-style (v-prediction) tiny model whose
native size is 64 px, training at 32 px, 2 + 1 steps per run. Also the README's GPU quick start, run as written
except scaled down."""
import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pipeline
import sample
import train
from image_encoders import CLIPConfig, CLIPModel, CLIPVisionConfig, ViTConfig, ViTModel
from tiny import make_tiny_model
from helpers import killed_after_first_checkpoint, one_thread, randomize  # noqa: F401  (one_thread: autouse)

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "assets" / "demo" / "dog"
METHODS = ("dreambooth", "dreambooth_lora", "textual_inversion", "comfusion", "objectdriven", "photoverse")
TEXT_ENCODER_TRAINS = ("dreambooth", "dreambooth_lora")   # the others refuse --train_text_encoder or ignore it


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny SD1 / SD2 models with a 64 px native size, tiny CLIP (64 px input, its text tower the SD text width)
    and DINO, one photo with its mask, one ComFusion scene."""
    root = tmp_path_factory.mktemp("matrix")
    for family in ("sd1", "sd2"):
        make_tiny_model(root / family, family=family, sample_size=8)
    vision = CLIPVisionConfig(32, 37, 2, 4, image_size=64, patch_size=16)
    randomize(CLIPModel(CLIPConfig(CLIPConfig.tiny().text, vision, 16)), 0).save_pretrained(root / "clip")
    randomize(ViTModel(ViTConfig(32, 37, 2, 4, image_size=64)), 1).save_pretrained(root / "dino")
    (root / "one").mkdir()
    shutil.copy(DOG / "02.jpg", root / "one" / "02.jpg")
    (root / "scenes.txt").write_text("on the beach\n")
    return root


def method_args(method: str, family: str, assets: Path, out: Path) -> list[str]:
    model = str(assets / family)
    common = ["--pretrained_model_name_or_path", model, "--resolution", "32", "--device", "cpu", "--output_dir",
              str(out), "--sample_steps", "2", "--num_validation_images", "1", "--class_sample_steps", "2"]
    classes = ["--class_data_dir", str(out.parent / f"classes-{method}-{family}")]
    if method in ("dreambooth", "dreambooth_lora"):
        return [*common, *classes, "--instance_data_dir", str(DOG), "--instance_prompt", "a photo of sks dog",
                "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "1",
                "--validation_prompt", "a photo of sks dog on the beach"]
    if method == "textual_inversion":
        return [*common, "--instance_data_dir", str(DOG), "--placeholder_token", "<sks>", "--initializer_token",
                "dog", "--gradient_accumulation_steps", "1", "--validation_prompt", "a photo of <sks> on the beach"]
    if method == "comfusion":
        return [*common, *classes, "--instance_data_dir", str(assets / "one"), "--instance_prompt",
                "a photo of sks dog", "--class_prompt", "a photo of dog", "--scenes", str(assets / "scenes.txt"),
                "--num_scene_images", "1", "--fusion_steps", "2", "--clip_model", str(assets / "clip"),
                "--dino_model", str(assets / "dino"), "--validation_prompt", "a photo of sks dog on the beach"]
    if method == "objectdriven":
        return [*common, *classes, "--instance_data_dir", str(assets / "one"), "--instance_mask",
                str(REPO / "assets" / "demo" / "dog_mask" / "02.png"), "--placeholder_token", "<o1>",
                "--initializer_token", "dog", "--num_class_images", "1", "--pe_steps", "2", "--clip_model",
                str(assets / "clip"), "--validation_prompt", "a photo of <o1> dog on the beach"]
    return [*common, "--instance_data_dir", str(DOG), "--clip_model", str(assets / "clip"), "--dino_model",
            str(assets / "dino"), "--vision_layers", "last,1", "--adapter_dim", "32", "--rank", "2",
            "--validation_prompt", "a photo of S* on the beach"]


def logs(out):
    return [json.loads(line) for line in (Path(out) / "logs.jsonl").read_text().splitlines()]


def cpu_fp16_works() -> bool:
    """fp16 autocast and GradScaler on this CPU: one conv forward and backward."""
    try:
        conv = torch.nn.Conv2d(2, 2, 1)
        scaler = torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            y = conv(torch.randn(1, 2, 4, 4))
        scaler.scale(y.float().sum()).backward()
        return y.dtype == torch.float16
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("method", METHODS)
def test_method_with_the_gpu_options_checkpoints_validates_and_resumes(method, family, precision, assets, tmp_path,
                                                                       monkeypatch):
    if precision == "fp16" and not cpu_fp16_works():
        pytest.skip("this CPU's torch has no fp16 autocast / GradScaler (bf16 is tested)")
    out = tmp_path / "run"
    args = [*method_args(method, family, assets, out), "--method", method, "--mixed_precision", precision,
            "--gradient_checkpointing", "--validation_steps", "1", "--max_train_steps", "3",
            "--checkpointing_steps", "2", *(["--train_text_encoder"] if method in TEXT_ENCODER_TRAINS else [])]
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(args))     # killed right after checkpoint-2
    assert (out / "checkpoint-2").is_dir()
    assert (out / "validation" / "step-000001.png").is_file()               # validation ran during the run
    train.main([*args, "--resume_from_checkpoint", "latest"])
    assert (out / "validation" / "step-000003.png").is_file()
    rows = logs(out)
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    info = json.loads((out / "nanobooth.json").read_text())
    assert info["method"] == method and info["step"] == 3
    with Image.open(out / "validation" / "step-000003.png") as im:
        assert im.size == (32, 32)
    if method in ("dreambooth", "comfusion"):                               # a full model, loadable, fp32
        models = pipeline.load_models(out)
        assert all(p.dtype == torch.float32 for m in (models.unet, models.vae, models.text_encoder)
                   for p in m.parameters())
    if method in ("dreambooth", "dreambooth_lora", "comfusion", "objectdriven"):
        with Image.open(next((out.parent / f"classes-{method}-{family}").rglob("*.png"))) as im:
            assert im.size == (64, 64)                                      # class images at the native size


# ----------------------------------------------------------------------------- the README's GPU quick start

def readme_command(program: str, first_flag: str) -> list[str]:
    """The README's `python {program} {first_flag} ...` command (with its continuation lines) as argv."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^python {re.escape(program)} {re.escape(first_flag)}(?:.*\\\n)*.*$", text, re.M)
    assert match, f"no 'python {program} {first_flag}' command in README.md"
    return shlex.split(match.group(0).replace("\\\n", " "))[2:]


def replace_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """Each flag's value replaced (every flag named must be in the command)."""
    argv = list(argv)
    for flag, value in values.items():
        argv[argv.index(flag) + 1] = value
    return argv


def test_the_readme_gpu_quick_start_runs_scaled_down(tmp_path, monkeypatch):
    """The quick start's train.py and sample.py commands exactly as the README writes them, but: the tiny model, 64 px,
    2 steps, 2 class images, the demo photos, --device cpu, and validation every step (the README's validates at
    step 100)."""
    model = make_tiny_model(tmp_path / "tiny", sample_size=8)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(DOG, tmp_path / "photos")                               # the README's photos/ folder
    quick = readme_command("train.py", "--method dreambooth --pretrained_model_name_or_path")
    assert {"--mixed_precision", "--gradient_checkpointing", "--validation_prompt", "--with_prior_preservation"} <= set(quick)
    argv = replace_values(quick, {"--pretrained_model_name_or_path": str(model), "--resolution": "64",
                                  "--max_train_steps": "2", "--num_class_images": "2"})
    argv += ["--device", "cpu", "--validation_steps", "1", "--sample_steps", "2", "--num_validation_images", "1",
             "--class_sample_steps", "2"]
    out = train.main(argv)
    assert (out / "validation" / "step-000001.png").is_file() and (out / "model_index.json").is_file()
    assert [r["step"] for r in logs(out)] == [1, 2]
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 2
    vae = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in vae.values())              # the frozen VAE written as loaded
    then = readme_command("sample.py", "--model runs/dog")
    paths = sample.main(then + ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--out",
                                str(tmp_path / "samples")])
    assert len(paths) == 4
