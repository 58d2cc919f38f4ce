"""What every benchmark shares: model sizes, twin models with the same weights, timing, memory, FLOPs, output.

The rules the scripts follow (so that their numbers can be quoted):

    1. ours and diffusers run in the SAME process on the SAME weights (diffusers' models are built from our
       configs' `to_json()`, ours load their state dicts strict=True), so both compute the same thing;
    2. repetitions are interleaved (A B C, B C A, C A B, ...) after a warm-up; we report the median and the
       ratio to diffusers paired by round (a load that drifts between rounds cancels), from the wall clock
       and from the process CPU time (which leaves out the time spent waiting for a core);
    3. the thread count is set once for everything (`torch.set_num_threads`), and the load average of the
       machine is recorded before and after;
    4. peak memory is measured in a fresh child process per (scenario, side), which builds only that side:
       on CPU the peak resident set size (VmHWM, reset with /proc/self/clear_refs after a warm-up run, so
       it is the peak of one steady-state run), on CUDA `torch.cuda.max_memory_allocated`;
    5. MFU = model FLOPs / median time / the matmul rate measured on the same device and dtype. Model FLOPs
       are counted on our modules with torch.utils.flop_counter on the meta device (no compute), with the
       hand-written attention path because the counter does not see the CPU SDPA kernel;
    6. benchmarks print and save; they never assert.

Sizes (`CONFIGS`): `tiny` is the test/demo model (tiny.py), `sd15` the real SD1.5 architecture (random
weights time the same as real ones), `mid` a four-level SD-shaped model at 1/5 of SD1.5's width (1/25 of
its FLOPs per pixel) that takes about half a second per training step at 128 px on one CPU core.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attention  # noqa: E402  (after the path insert: the product modules live in the repository root)
from text_encoder import TextEncoderConfig  # noqa: E402
from unet import UNetConfig  # noqa: E402
from vae import VAEConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a photo of sks dog on the beach"
CLASS_PROMPT = "a photo of dog"

# ----------------------------------------------------------------------------- model sizes

MID_UNET = UNetConfig(block_out_channels=(64, 128, 256, 256), cross_attn=(True, True, True, False),
                      num_heads=(4, 4, 4, 4), cross_attention_dim=256, sample_size=16)
MID_VAE = VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=8, sample_size=128)
MID_TEXT = TextEncoderConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)

CONFIGS = {  # name -> (UNet, VAE, text encoder) configs
    "tiny": (UNetConfig.tiny(), VAEConfig.tiny(), TextEncoderConfig.tiny()),
    "mid": (MID_UNET, MID_VAE, MID_TEXT),
    "sd15": (UNetConfig.sd15(), VAEConfig.sd15(), TextEncoderConfig.sd15()),
}
# Default image sides in pixels. tiny: sampling at the UNet's native size (sample_size 16 -> 128 px, what
# `python sample.py --model runs/tiny-model` makes), training at train.py --demo's 64 px. mid: 128 px, so
# that a run stays within minutes on 2 CPU cores. sd15: 512 px, SD 1.5's native size.
SAMPLE_SIZE = {"tiny": 128, "mid": 128, "sd15": 512}
TRAIN_SIZE = {"tiny": 64, "mid": 128, "sd15": 512}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def twin_models(config: str, seed: int = 0):
    """Random diffusers/transformers models of `config` and ours holding the very same weights.

    Returns (ours: dict unet/vae/text_encoder/tokenizer, theirs: dict unet/vae/text_encoder/tokenizer).
    Every norm and bias gets noise too (as tests/conftest.py does), so no layer is an identity.
    """
    theirs = reference_models(config, seed)
    ours = our_models(config)
    ours["unet"].load_state_dict(theirs["unet"].state_dict(), strict=True)
    ours["vae"].load_state_dict(theirs["vae"].state_dict(), strict=True)
    from text_encoder import hub_keys  # transformers 5 drops the `text_model.` prefix; hub_keys puts it back
    ours["text_encoder"].load_state_dict(hub_keys(theirs["text_encoder"].state_dict()), strict=True)
    return ours, theirs


def reference_models(config: str, seed: int = 0) -> dict:
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from text_encoder import CLIPTokenizer
    unet_cfg, vae_cfg, text_cfg = CONFIGS[config]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_cfg.to_json())
    vae = AutoencoderKL.from_config(vae_cfg.to_json())
    text = HFCLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.to_json().items() if not k.startswith("_")}))
    with torch.no_grad():
        for name, p in list(unet.named_parameters()) + list(vae.named_parameters()):
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:  # the same vocabulary for both tokenizers
        CLIPTokenizer.from_pretrained(None).save_pretrained(tmp)
        tokenizer = HFCLIPTokenizer.from_pretrained(tmp)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tokenizer}


def our_models(config: str) -> dict:
    from text_encoder import CLIPTextModel, CLIPTokenizer
    from unet import UNet
    from vae import VAE
    unet_cfg, vae_cfg, text_cfg = CONFIGS[config]
    return {"unet": UNet(unet_cfg), "vae": VAE(vae_cfg), "text_encoder": CLIPTextModel(text_cfg),
            "tokenizer": CLIPTokenizer.from_pretrained(None)}


# ----------------------------------------------------------------------------- machine

def setup(threads: int | None, device: str) -> dict:
    """Fix the thread count for the whole process; return what the results must say about the machine."""
    if threads:
        torch.set_num_threads(threads)
    import diffusers
    import transformers
    info = {"device": device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": cpu_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_before": round(os.getloadavg()[0], 2)}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Median TFLOP/s of an n x n x n GEMM (2 n^3 FLOPs) on `device` in `dtype`: the denominator of MFU."""
    n = 8192 if device.startswith("cuda") else n
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------- timing

def time_interleaved(fns: dict, repeats: int, warmup: int = 1, device: str = "cpu", progress: bool = True) -> dict:
    """{name: fn} -> {name: {"wall": [s], "cpu": [s]}}. Each fn runs `warmup` times untimed, then `repeats`
    rounds; round r runs the sides in an order rotated by r, so no side always goes first (or right after
    another). "cpu" is the process CPU time of the call: on a shared CPU with one torch thread it is the
    compute itself, without the time spent waiting for a core, so it is the steadier number under load."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
        if progress:
            print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n]['wall'][-1]:.3f}s" for n in names), flush=True)
    return times


def summary(t: dict) -> dict:
    wall, cpu = t["wall"], t["cpu"]
    med = statistics.median(wall)
    return {"median_ms": 1000 * med, "min_ms": 1000 * min(wall), "max_ms": 1000 * max(wall), "it_per_s": 1 / med,
            "cpu_median_ms": 1000 * statistics.median(cpu), "repeats": len(wall),
            "all_ms": [round(1000 * s, 2) for s in wall], "all_cpu_ms": [round(1000 * s, 2) for s in cpu]}


# ----------------------------------------------------------------------------- memory (child processes)

def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return status_kib("VmHWM") * 1024


def rss_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device)
    return status_kib("VmRSS") * 1024


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def preload() -> None:
    """Import every library either side uses, so a child's baseline holds them whichever side it measures."""
    import diffusers.optimization  # noqa: F401
    import peft  # noqa: F401
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,  # noqa: F401
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import losses  # noqa: F401
    import sample  # noqa: F401
    import train  # noqa: F401


def measure_peak(build, device: str) -> dict:
    """In a child process: `build()` -> fn; run fn once (warm-up: optimizer state, caches), reset the peak,
    run fn again. Returns the peak during that run and the baseline before `build` (interpreter, libraries)."""
    import gc
    preload()
    gc.collect()
    baseline = rss_bytes(device)
    fn = build()
    fn()
    gc.collect()
    reset_peak(device)
    fn()
    sync(device)
    peak = peak_bytes(device)
    return {"peak_mib": peak / 2 ** 20, "baseline_mib": baseline / 2 ** 20, "peak_over_baseline_mib": (peak - baseline) / 2 ** 20}


def run_child(script: Path, args: list[str], timeout: int = 1800) -> dict:
    """Run `script args --probe ...` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- FLOPs

def count_flops(fn) -> int:
    """FLOPs of fn() (forward, and backward if fn calls it), counted by torch.utils.flop_counter.

    Run it on meta-device models and inputs: shapes only, no compute. Attention goes through the
    hand-written path (matmuls the counter sees; it has no formula for the CPU SDPA kernel); the FLOPs are
    the same by definition.
    """
    from torch.utils.flop_counter import FlopCounterMode
    saved, attention.SDPA = attention.SDPA, False
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        attention.SDPA = saved
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- output

def save_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def add_ratios(rows: list[dict], base: dict | None) -> None:
    """x diffusers: the median over rounds of diffusers' time / this row's time IN THE SAME ROUND, from the
    wall clock and from the CPU time. A round runs every side back to back, so a load that drifts from one
    round to the next cancels in the ratio; medians of the separate columns do not pair the runs."""
    for row in rows:
        for key, out in (("all_ms", "x_diffusers"), ("all_cpu_ms", "x_cpu")):
            row[out] = statistics.median(b / a for a, b in zip(row[key], base[key])) if base else None


TIME_COLUMNS = [("median_ms", "median ms", ".1f"), ("min_ms", "min ms", ".1f"), ("cpu_median_ms", "cpu ms", ".1f"),
                ("x_diffusers", "x diffusers", ".2f"), ("x_cpu", "x (cpu)", ".2f")]
FOOTNOTE = ("  median ms / min ms: wall clock over the repeats; cpu ms: median process CPU time (steadier than the "
            "wall clock on a loaded machine with one thread); x diffusers / x (cpu): median over the rounds of "
            "diffusers' time / this row's time in the same round, wall clock / CPU time (above 1 = faster than "
            "diffusers); it/s = 1 / median (sampling: denoising steps / median); peak MiB: peak resident memory "
            "(CUDA: max allocated) of a child process running only that side, over its baseline before the models "
            "were built; TFLOP/s and MFU from the model FLOPs, the median time and the measured matmul rate")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Missing values print as '-'. Returns the table as text."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], f) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def machine_line(info: dict) -> str:
    return (f"{info['device']} ({info.get('gpu') or info['cpu']}), {info['threads']} threads of {info['cpu_count']} "
            f"cores, load average {info['load_before']} before / {info.get('load_after', '?')} after; torch "
            f"{info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}")
