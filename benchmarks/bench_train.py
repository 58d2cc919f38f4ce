"""One DreamBooth training step: train.py's step against the step of diffusers' example scripts, same weights.

Scenarios (a) full fine-tuning and (b) LoRA; every step is batch 1 instance + 1 class image (prior
preservation, both halves through the UNet as one batch of 2), AdamW, gradient clipping at 1.0:

    full       (a) the whole UNet trains, fp32 master weights
    full_ckpt  (a) the same with gradient checkpointing
    lora       (b) LoRA rank 4 (alpha 4) on the attention projections to_q, to_k, to_v, to_out.0

--precision bf16: bf16 autocast, trainable weights fp32, frozen parts (VAE, text encoder; LoRA's base UNet)
stored in bf16, as both train.py and diffusers' scripts do. --precision fp32: everything fp32.

The sides (all time the same thing: from a batch already in memory - pixel values and token ids - to
weights updated; image loading and augmentation, the same work for both, are not timed):

    diffusers            the loop of diffusers' examples/dreambooth/train_dreambooth.py (full) and
                         train_dreambooth_lora.py (lora) with their defaults: every step the frozen VAE
                         encodes the pixels (latent_dist.sample() * scaling_factor) and the frozen text
                         encoder encodes the token ids (no --pre_compute_text_embeddings); DDPMScheduler.
                         add_noise; UNet2DConditionModel with the default SDPA processor, its forward under
                         bf16 autocast and its output cast to fp32 (what accelerate.prepare does with
                         mixed_precision="bf16"); instance and prior MSE; AdamW (lr 5e-6 full / 5e-4 LoRA,
                         betas 0.9/0.999, weight decay 1e-2, eps 1e-8); clip_grad_norm_ 1.0; constant LR
                         scheduler; zero_grad(set_to_none=False) (--set_grads_to_none is off) for full,
                         zero_grad() for LoRA; loss.item() for the log. LoRA: peft LoraConfig(r=4,
                         lora_alpha=4, init_lora_weights="gaussian", target_modules to_k/to_q/to_v/to_out.0/
                         add_k_proj/add_v_proj) via unet.add_adapter on the bf16 base; the script upcasts the
                         LoRA weights to fp32 only under fp16, so under bf16 they stay bf16 (its default).
                         Gradient checkpointing: unet.enable_gradient_checkpointing().
    ours_diffusers_work  our models and train.py's step, doing diffusers' work: VAE encode AND text encode
                         every step. The like-for-like comparison of the model code.
    ours                 train.py's defaults: the VAE encodes every step, the prompt embeddings are
                         computed once (the text encoder is frozen), as train.py does.
    ours_cache_latents   train.py --cache_latents: the VAE moments of each image computed once; each step
                         samples z = mean + std * eps from them. Our optimisation, not diffusers' loop.

The "ours" step is train.py's own code (one process, no DDP): `setup_trainable`, its dtype casts, a
`row_generator` per batch row, `losses.dreambooth_loss` under autocast, clip, AdamW step, LambdaLR step,
zero_grad(set_to_none=True), the GradScaler calls (no-ops unless fp16) and the loss logs (`.item()`).

    python benchmarks/bench_train.py --config tiny --precision fp32
    python benchmarks/bench_train.py --config mid --precision bf16 --repeats 5
    python benchmarks/bench_train.py --config sd15 --device cuda --precision bf16
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from common import CLASS_PROMPT, PROMPT

SCENARIOS = ("full", "full_ckpt", "lora")
SIDES = ("ours", "ours_cache_latents", "ours_diffusers_work", "diffusers")
LEGEND = {
    "ours": "train.py defaults: VAE encodes every step, prompt embeddings computed once (frozen text encoder)",
    "ours_cache_latents": "train.py --cache_latents: VAE moments computed once, a latent sampled from them each step",
    "ours_diffusers_work": "our code doing diffusers' work: VAE encode + text encode every step",
    "diffusers": "diffusers' train_dreambooth.py / train_dreambooth_lora.py loop: VAE + text encode every step",
}
RANK = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=list(common.CONFIGS))
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: per config, see common.py)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the core count)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--name", default=None, help="results/NAME.json (default: train_CONFIG_DEVICE_PRECISION)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # child process: SCENARIO:SIDE
    args = p.parse_args(argv)
    args.size = args.size or common.TRAIN_SIZE[args.config]
    args.scenarios = args.scenarios.split(",")
    args.sides = args.sides.split(",")
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"--scenarios: unknown '{s}', use {','.join(SCENARIOS)}")
    for s in args.sides:
        if s not in SIDES:
            p.error(f"--sides: unknown '{s}', use {','.join(SIDES)}")
    return args


def make_data(models: dict, args) -> dict:
    """One batch, the same for every side: 1 instance + 1 class image in [-1, 1] and their token ids."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, args.size, args.size, generator=g) * 2 - 1
    tok = models["tokenizer"]
    if hasattr(tok, "model_max_length"):  # transformers' tokenizer (diffusers' side)
        ids = tok([PROMPT, CLASS_PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
    else:
        ids = tok([PROMPT, CLASS_PROMPT])
    return {"pixels": pixels.to(args.device), "input_ids": ids.to(args.device)}


# ----------------------------------------------------------------------------- ours: train.py's step

def build_ours(models: dict, scenario: str, args) -> dict:
    """train.py's set-up and step for `scenario`; returns {side: step function} for the three ours variants,
    which share the models and the optimizer (they differ only in where the latents and embeddings come from)."""
    from pipeline import SDModels, encode_prompts
    from schedulers import NoiseSchedule
    from losses import dreambooth_loss
    from train import HALF, TrainConfig, row_generator, setup_trainable
    device = torch.device(args.device)
    lora = scenario == "lora"
    cfg = TrainConfig(method="dreambooth_lora" if lora else "dreambooth", mixed_precision=
                      "bf16" if args.precision == "bf16" else "no", gradient_checkpointing=scenario == "full_ckpt",
                      rank=RANK, with_prior_preservation=True)
    for name in ("unet", "vae", "text_encoder"):
        models[name].to(device)
    sd = SDModels(tokenizer=models["tokenizer"], text_encoder=models["text_encoder"], unet=models["unet"],
                  vae=models["vae"], schedule=NoiseSchedule.sd())
    data = make_data(models, args)

    # train.train(), "1. models": freeze, frozen parts in the mixed-precision dtype, then what trains (float32)
    half = HALF.get(cfg.mixed_precision)
    groups = setup_trainable(sd, cfg, frozen_dtype=half or torch.float32)
    sd.unet.gradient_checkpointing = cfg.gradient_checkpointing
    # "2. data": prompt embeddings once (text encoder frozen); with --cache_latents the VAE moments once
    vae_dtype = next(sd.vae.parameters()).dtype
    cached_text = {p: encode_prompts(sd, [p]) for p in (PROMPT, CLASS_PROMPT)}
    with torch.no_grad():
        dist = sd.vae.encode(data["pixels"].to(vae_dtype))
        s = sd.vae.config.scaling_factor
        latent_mean, latent_std = dist.mean * s, dist.std * s
    # "3. optimizer"
    optimizer = torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                  eps=cfg.adam_epsilon)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    trainable = [p for g in groups for p in g["params"]]
    sd.unet.train()
    count = [0]

    def batch(variant):  # train.py's draw_batch from the point where the rows are picked
        count[0] += 1
        b = {"generators": [row_generator(cfg, count[0], 0, kind, 0) for kind in (0, 1)], "n_prior": 1}
        if variant == "ours_diffusers_work":
            b["encoder_hidden_states"] = sd.text_encoder(data["input_ids"])[0]
        else:
            b["encoder_hidden_states"] = torch.cat([cached_text[PROMPT], cached_text[CLASS_PROMPT]])
        if variant == "ours_cache_latents":
            b["latent_mean"], b["latent_std"] = latent_mean, latent_std
        else:
            b["pixel_values"] = data["pixels"].to(device, vae_dtype)
        return b

    def step(variant):  # train.train(), "5. the loop", one optimizer step
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            loss, logs = dreambooth_loss(batch(variant), sd, cfg)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return logs

    return {v: (lambda v=v: step(v)) for v in ("ours", "ours_cache_latents", "ours_diffusers_work")}


# ----------------------------------------------------------------------------- diffusers: the example scripts' step

def build_diffusers(models: dict, scenario: str, args):
    """The set-up and one step of train_dreambooth.py (full) / train_dreambooth_lora.py (lora), as described
    in the module docstring, without accelerate's wrapper objects (on one device they only add autocast)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from schedulers import NoiseSchedule
    device = torch.device(args.device)
    unet, vae, text_encoder = models["unet"], models["vae"], models["text_encoder"]
    weight_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    noise_scheduler = DDPMScheduler.from_config(NoiseSchedule.sd().to_config())
    data = make_data(models, args)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if scenario == "lora":
        from peft import LoraConfig
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        lr, set_to_none = 5e-4, True
    else:
        unet.to(device)
        if scenario == "full_ckpt":
            unet.enable_gradient_checkpointing()
        params = list(unet.parameters())
        lr, set_to_none = 5e-6, False
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet.train()

    def step():
        pixel_values = data["pixels"].to(dtype=weight_dtype)
        model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                  device=model_input.device).long()
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = text_encoder(data["input_ids"], attention_mask=None, return_dict=False)[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, class_labels=None).sample
        model_pred = model_pred.float()                     # accelerate's convert_outputs_to_fp32
        target = noise
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean") + 1.0 * prior_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        return {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}

    return step


# ----------------------------------------------------------------------------- FLOPs

def model_flops(scenario: str, args) -> int:
    """UNet forward + backward on the batch of 2 for the scenario's trainable set, counted on our UNet.
    Checkpointing's recomputation, the VAE and the text encoder are not model FLOPs (the usual MFU rule)."""
    from lora import inject_lora, mark_only_lora_trainable
    with torch.device("meta"):
        unet = common.our_models(args.config)["unet"]
        if scenario == "lora":
            inject_lora(unet, rank=RANK)
            mark_only_lora_trainable(unet)
        h = args.size // 8
        x = torch.zeros(2, 4, h, h)
        context = torch.zeros(2, 77, unet.config.cross_attention_dim)
        t = torch.tensor([500, 500])
        return common.count_flops(lambda: unet(x, t, context).float().pow(2).mean().backward())


# ----------------------------------------------------------------------------- main

def probe(args) -> None:
    """Child process: the peak memory of one (scenario, side) alone; prints one JSON line."""
    scenario, side = args.probe.split(":")
    common.setup(args.threads, args.device)

    def build():
        if side == "diffusers":
            return build_diffusers(common.reference_models(args.config), scenario, args)
        return build_ours(common.our_models(args.config), scenario, args)[side]
    print(json.dumps(common.measure_peak(build, args.device)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    info = common.setup(args.threads, args.device)
    name = args.name or f"train_{args.config}_{args.device.split(':')[0]}_{args.precision}"
    print(f"training step, config {args.config}, {args.size} px, batch 1 instance + 1 class, {args.precision}: "
          f"{info['threads']} threads, load average {info['load_before']}", flush=True)
    rate = common.matmul_rate(args.device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    t0 = time.time()
    rows = []
    for scenario in args.scenarios:
        print(f"scenario {scenario}", flush=True)
        ours, theirs = common.twin_models(args.config)
        fns = build_ours(ours, scenario, args)
        fns["diffusers"] = build_diffusers(theirs, scenario, args)
        fns = {side: fns[side] for side in args.sides}
        times = common.time_interleaved(fns, args.repeats, args.warmup, args.device)
        del fns, ours, theirs
        gc.collect()
        flops = model_flops(scenario, args)
        scenario_rows = []
        for side, seconds in times.items():
            row = {"scenario": scenario, "side": side, **common.summary(seconds), "model_gflops": flops / 1e9}
            row["tflops"] = flops / (row["median_ms"] / 1000) / 1e12
            row["mfu_pct"] = 100 * row["tflops"] / rate
            scenario_rows.append(row)
        common.add_ratios(scenario_rows, next((r for r in scenario_rows if r["side"] == "diffusers"), None))
        for row in scenario_rows:
            if not args.no_memory:
                row.update(common.run_child(Path(__file__).resolve(), [*argv, "--probe", f"{scenario}:{row['side']}"]))
        rows += scenario_rows
    info["load_after"] = round(os.getloadavg()[0], 2)

    print(f"\nDreamBooth training step, config {args.config}, {args.size} px, 1 instance + 1 class image, "
          f"{'bf16 autocast, fp32 master weights' if args.precision == 'bf16' else 'fp32'}")
    print(common.machine_line(info))
    print(f"matmul rate ({args.precision}, measured): {rate:.3f} TFLOP/s; model FLOPs = UNet forward + backward\n")
    table = common.print_table(rows, [("scenario", "scenario", "s"), ("side", "side", "s"),
                                      *common.TIME_COLUMNS, ("it_per_s", "it/s", ".2f"),
                                      ("peak_over_baseline_mib", "peak MiB", ".0f"),
                                      ("model_gflops", "GFLOP/step", ".2f"), ("tflops", "TFLOP/s", ".4f"),
                                      ("mfu_pct", "MFU %", ".2f")])
    print("\n" + "\n".join(f"  {side}: {LEGEND[side]}" for side in args.sides))
    print(common.FOOTNOTE)
    result = {"scenario": "train_step", "config": args.config, "size": args.size, "precision": args.precision,
              "batch": "1 instance + 1 class", "lora_rank": RANK, "matmul_tflops": rate, "machine": info,
              "legend": {s: LEGEND[s] for s in args.sides},
              "command": "python benchmarks/bench_train.py " + " ".join(argv), "wall_s": time.time() - t0,
              "rows": rows, "table": table}
    print(f"\nsaved {common.save_json(name, result)}")
    return result


if __name__ == "__main__":
    main()
