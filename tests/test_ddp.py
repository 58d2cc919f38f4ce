"""Multi-process training with torchrun (gloo on CPU): the same step as one process with the whole batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "assets" / "demo" / "dog"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nproc: int) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(launcher + ["train.py", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def common(model, out, class_dir, steps, batch):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", DOG, "--output_dir", out,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--center_crop", "--random_flip",
            "--max_train_steps", steps, "--train_batch_size", batch, "--learning_rate", "1e-4", "--device", "cpu",
            "--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", class_dir,
            "--num_class_images", "2", "--class_sample_steps", "2", "--checkpointing_steps", "1"]


def logs(out):
    return [json.loads(line) for line in (Path(out) / "logs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tiny_sd1):
    return tiny_sd1


def test_two_processes_batch_1_equal_one_process_batch_2(model_dir, tmp_path):
    stdout = run_train(common(model_dir, tmp_path / "ddp", tmp_path / "cls-ddp", 1, 1), nproc=2)
    run_train(common(model_dir, tmp_path / "one", tmp_path / "cls-one", 1, 2), nproc=1)
    # class images: made once, shared out between the ranks, and the same images as one process makes
    ddp_cls, one_cls = sorted((tmp_path / "cls-ddp").iterdir()), sorted((tmp_path / "cls-one").iterdir())
    assert [p.name for p in ddp_cls] == [p.name for p in one_cls] == ["class_00000.png", "class_00001.png"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ddp_cls, one_cls))
    # the same update. lr 1e-4: Adam's first step moves each weight by about lr * g / (|g| + eps), so for
    # gradients near eps the float-summation differences of the two reductions are amplified up to lr.
    a = load_file(tmp_path / "ddp" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(Path(model_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 5e-5          # the step changed the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    la, lb = logs(tmp_path / "ddp"), logs(tmp_path / "one")
    assert len(la) == 1 and la[0]["loss"] == pytest.approx(lb[0]["loss"], abs=1e-5)
    assert stdout.count("trained dreambooth for 1 steps") == 1                  # only rank 0 reports and writes


def test_two_process_run_resumes_from_its_checkpoint(model_dir, tmp_path):
    run_train(common(model_dir, tmp_path / "straight", tmp_path / "cls", 3, 1), nproc=2)
    run_train(common(model_dir, tmp_path / "resumed", tmp_path / "cls", 2, 1), nproc=2)
    stdout = run_train(common(model_dir, tmp_path / "resumed", tmp_path / "cls", 3, 1) +
                       ["--resume_from_checkpoint", "latest"], nproc=2)
    assert "at step 2" in stdout
    a, b = logs(tmp_path / "straight"), logs(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert a[2]["loss"] == pytest.approx(b[2]["loss"], abs=1e-6)
    assert torch.equal(load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.bias"],
                       load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.bias"])
