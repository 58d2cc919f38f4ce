"""Seconds per image: our `pipeline.generate` against diffusers' `StableDiffusionPipeline`, same weights, same run.

Scenario (c), the seconds per image the README quotes (tiny model, CPU):

    one prompt, 50 DDIM steps, classifier-free guidance 7.5 (the UNet sees a batch of 2: negative "" and
    the prompt), eta 0, then the VAE decode and the conversion to a PIL image, at --size pixels.

    ours      pipeline.generate(models, [prompt], steps, guidance=7.5, sampler="ddim", progress=False)
    diffusers StableDiffusionPipeline(..., scheduler=DDIMScheduler(our schedule's config), safety_checker=None)
              (prompt, num_inference_steps, guidance_scale=7.5, generator=CPU generator), its default attention
              processor (AttnProcessor2_0 = SDPA), progress bar off

Both time the whole call: prompt encoding, the denoising loop, the decode, the PIL conversion. The two
images are compared once (max pixel difference) to show both compute the same thing.

    python benchmarks/bench_sampling.py --config tiny                 # seconds per image, tiny model, CPU
    python benchmarks/bench_sampling.py --config mid --repeats 3
    python benchmarks/bench_sampling.py --config sd15 --device cuda --dtype float16
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from common import PROMPT

GUIDANCE = 7.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=list(common.CONFIGS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: per config, see common.py)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(common.DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the core count)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--name", default=None, help="results/NAME.json (default: sampling_CONFIG_DEVICE_DTYPE)")
    p.add_argument("--probe", default=None, choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or common.SAMPLE_SIZE[args.config]
    return args


# ----------------------------------------------------------------------------- the two sides

def build_ours(models: dict, args):
    """The callable that makes one image with our code."""
    from pipeline import SDModels, generate
    from schedulers import NoiseSchedule
    dtype = common.DTYPES[args.dtype]
    for name in ("unet", "vae", "text_encoder"):
        models[name].to(args.device, dtype).eval()
    sd = SDModels(tokenizer=models["tokenizer"], text_encoder=models["text_encoder"], unet=models["unet"],
                  vae=models["vae"], schedule=NoiseSchedule.sd())
    return lambda: generate(sd, [PROMPT], seed=0, steps=args.steps, guidance=GUIDANCE, sampler="ddim",
                            height=args.size, width=args.size, progress=False)


def build_diffusers(models: dict, args):
    """The callable that makes one image with diffusers' StableDiffusionPipeline and DDIMScheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from schedulers import NoiseSchedule
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=models["tokenizer"],
                                   unet=models["unet"], scheduler=DDIMScheduler.from_config(NoiseSchedule.sd().to_config()),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(args.device, common.DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=args.size,
                        width=args.size, generator=torch.Generator("cpu").manual_seed(0)).images


def model_flops(args) -> int:
    """FLOPs of one image: 2 prompt encodings (prompt and ""), `steps` UNet calls on a batch of 2, one decode."""
    with torch.device("meta"):
        m = common.our_models(args.config)
        h = args.size // 8
        ids = torch.zeros(1, 77, dtype=torch.long)
        text = common.count_flops(lambda: m["text_encoder"](ids))
        context = torch.zeros(2, 77, m["unet"].config.cross_attention_dim)
        unet = common.count_flops(lambda: m["unet"](torch.zeros(2, 4, h, h), torch.tensor([999, 999]), context))
        decode = common.count_flops(lambda: m["vae"].decode(torch.zeros(1, 4, h, h)))
    return 2 * text + args.steps * unet + decode


# ----------------------------------------------------------------------------- main

def probe(args) -> None:
    """Child process: peak memory of one side alone (prints one JSON line)."""
    import json
    common.setup(args.threads, args.device)
    if args.probe == "ours":
        result = common.measure_peak(lambda: build_ours(common.our_models(args.config), args), args.device)
    else:
        result = common.measure_peak(lambda: build_diffusers(common.reference_models(args.config), args), args.device)
    print(json.dumps(result))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    info = common.setup(args.threads, args.device)
    name = args.name or f"sampling_{args.config}_{args.device.split(':')[0]}_{args.dtype}"
    print(f"sampling, config {args.config}, {args.size} px, {args.steps} DDIM steps, guidance {GUIDANCE}, "
          f"{args.dtype}: {info['threads']} threads, load average {info['load_before']}", flush=True)

    ours, theirs = common.twin_models(args.config)
    fns = {"ours": build_ours(ours, args), "diffusers": build_diffusers(theirs, args)}
    a = np.stack([np.asarray(im, dtype=np.int16) for im in fns["ours"]()])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in fns["diffusers"]()])
    max_diff = int(np.abs(a - b).max())
    print(f"same weights, same seed: the two images differ by at most {max_diff}/255 per pixel", flush=True)

    t0 = time.time()
    times = common.time_interleaved(fns, args.repeats, args.warmup, args.device)
    rate = common.matmul_rate(args.device, common.DTYPES[args.dtype])
    flops = model_flops(args)
    rows = []
    for side, seconds in times.items():
        row = {"side": side, **common.summary(seconds)}
        row["s_per_image"] = row["median_ms"] / 1000
        row["steps_per_s"] = args.steps / row["s_per_image"]
        row["tflops"] = flops / row["s_per_image"] / 1e12
        row["mfu_pct"] = 100 * row["tflops"] / rate
        rows.append(row)
    common.add_ratios(rows, rows[-1])
    if not args.no_memory:
        script = Path(__file__).resolve()
        for row in rows:
            child = common.run_child(script, [*(argv if argv is not None else sys.argv[1:]), "--probe", row["side"]])
            row.update(child)
    info["load_after"] = round(__import__("os").getloadavg()[0], 2)

    print(f"\nscenario (c): one image, {args.size} px, {args.steps} DDIM steps, guidance {GUIDANCE}, + VAE decode; "
          f"config {args.config}, {args.dtype}")
    print(common.machine_line(info))
    print(f"matmul rate ({args.dtype}, measured): {rate:.3f} TFLOP/s; model FLOPs per image: {flops / 1e12:.4f} TFLOP\n")
    table = common.print_table(rows, [("side", "side", "s"), ("s_per_image", "s/image", ".3f"), *common.TIME_COLUMNS,
                                      ("steps_per_s", "it/s", ".2f"),
                                      ("peak_over_baseline_mib", "peak MiB", ".0f"), ("tflops", "TFLOP/s", ".4f"),
                                      ("mfu_pct", "MFU %", ".2f")])
    print(common.FOOTNOTE)
    result = {"scenario": "sampling", "config": args.config, "size": args.size, "steps": args.steps,
              "guidance": GUIDANCE, "dtype": args.dtype, "sampler": "ddim", "prompt": PROMPT,
              "max_pixel_diff": max_diff, "matmul_tflops": rate, "model_flops_per_image": flops, "machine": info,
              "command": "python benchmarks/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "wall_s": time.time() - t0, "rows": rows, "table": table}
    print(f"\nsaved {common.save_json(name, result)}")
    return result


if __name__ == "__main__":
    main()
