"""Train the embedded crops models on CPU, by wall-clock budget.

    python -m embedded.train --model large            # 20 min -> embedded/weights/crops_large.safetensors
    python -m embedded.train --model small            # 8 min  -> embedded/weights/crops_small.safetensors
    python -m embedded.train --judge                  # 3 min  -> embedded/weights/crops_judge.safetensors
    python -m embedded.train --evaluate               # judge readings of the shipped pair (model card numbers)

Objective: v-prediction in ComfyUI's own parameterisation. With x_t = x0 + sigma * eps (ComfyUI's
EPS-style noise scaling, sigma from `model.model_sampling.sigmas`, timestep index uniform), the
network sees `model_sampling.calculate_input(sigma, x_t)` and timestep `model_sampling.timestep(sigma)`
and is trained towards v = (eps - sigma * x0) / sqrt(sigma^2 + sigma_data^2) * sigma_data, the one
output for which `V_PREDICTION.calculate_denoised(sigma, v, x_t) == x0` (checked by `check_target`).

Every batch draws fresh captions from the training distribution and renders their crops
(`embedded.rendering.render`, train digits only). The text encoder is fixed, so the two models
train independently. Forward passes run under bfloat16 autocast (fast on CPUs with
AMX/AVX512-BF16); master weights, Adam state and the EMA are float32. The EMA weights are
saved, in float16 unless --fp32.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kb_tools.core.records import Recipe

from . import judge
from .captions import random_training_captions, sample_captions
from .models import WEIGHT_FILES, build_model, load_into, load_models, read_weights, setup_comfy, unet_config
from .rendering import render
from .text_encoder import context


def v_target(model_sampling, sigma, x0, eps):
    """The v-prediction target in ComfyUI's parameterisation (sigma [B], x0 / eps [B, C, H, W])."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    sd = float(model_sampling.sigma_data)
    return (eps * sd - s * x0 / sd) / (s ** 2 + sd ** 2) ** 0.5


def check_target(model_sampling, atol: float = 1e-4) -> float:
    """calculate_denoised(sigma, v_target, x_t) must give x0 back; returns the max abs error."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((64, 3, 4, 4), generator=gen) * 2 - 1
    eps = torch.randn((64, 3, 4, 4), generator=gen)
    idx = torch.linspace(0, len(model_sampling.sigmas) - 1, 64).long()
    sigma = model_sampling.sigmas[idx].float()
    x_t = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    back = model_sampling.calculate_denoised(sigma, v_target(model_sampling, sigma, x0, eps), x_t)
    err = float((back - x0).abs().max())
    if not err <= atol:
        raise AssertionError(f"v target does not invert ComfyUI's calculate_denoised: max error {err}")
    return err


def _ema_update(ema: dict, params: dict, decay: float) -> None:
    with torch.no_grad():
        for k, p in params.items():
            ema[k].mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def train(size: str, minutes: float, out: Path, *, batch: int = 128, lr: float = 1e-3, drop: float = 0.1,
          ema_max: float = 0.999, seed: int = 0, fp32: bool = False, log_every: int = 10, threads: int = 2,
          init_from: Path | None = None) -> dict:
    """Train the large or small crops UNet for `minutes` of wall clock and save its EMA weights to `out`."""
    setup_comfy(threads)
    torch.manual_seed(seed)
    patcher = build_model(size, seed=seed)
    model = patcher.model
    net = model.diffusion_model
    ms = model.model_sampling
    print(f"v-target check: max |calculate_denoised(sigma, v, x_t) - x0| = {check_target(ms):.2e}", flush=True)

    previous = {}
    if init_from is not None:  # continue an earlier run (its float32 EMA weights)
        tensors, meta = read_weights(size, init_from)
        load_into(net, tensors, size, init_from)
        previous = json.loads(meta.get("embedded_crops", "{}"))
        print(f"continuing from {init_from}: {previous.get('iterations')} iterations, {previous.get('seconds')} s", flush=True)

    params = {f"diffusion_model.{k}": p for k, p in net.named_parameters()}
    ema = {k: p.detach().clone().float() for k, p in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    sigmas = ms.sigmas.float()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"training {size}: {n_params:,} UNet parameters, captions drawn fresh every batch, batch {batch}, "
          f"{minutes} min budget", flush=True)

    budget = minutes * 60.0
    start = time.perf_counter()
    it = 0
    running = None
    net.train()
    gen = torch.Generator().manual_seed(seed + 1)
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        frac = elapsed / budget
        cur_lr = lr * min(1.0, (it + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        captions = random_training_captions(batch, gen)
        x0, _ = render(captions, gen, "train")
        # Classifier-free guidance: the condition is dropped to the unconditional context `drop` of the time.
        keep = torch.rand(batch, generator=gen) >= drop
        ctx = context([c if k else None for c, k in zip(captions, keep.tolist())])
        idx = torch.randint(0, len(sigmas), (batch,), generator=gen)
        sigma = sigmas[idx]
        eps = torch.randn(x0.shape, generator=gen)
        x_t = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32):
            pred = net(ms.calculate_input(sigma, x_t), ms.timestep(sigma).float(), context=ctx)
        loss = torch.nn.functional.mse_loss(pred.float(), v_target(ms, sigma, x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        it += 1
        _ema_update(ema, params, min(ema_max, (1 + it) / (10 + it)))
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if it % log_every == 0:
            print(f"it {it:5d}  {elapsed:6.1f} s  loss {value:.4f}  avg {running:.4f}  lr {cur_lr:.2e}", flush=True)

    seconds = time.perf_counter() - start
    dtype = torch.float32 if fp32 else torch.float16
    earlier = previous.get("sessions", [])
    sessions = earlier + [{"iterations": it, "seconds": round(seconds, 1), "lr": lr, "batch": batch}]
    info = {"model": size, "unet_parameters": n_params, "iterations": sum(x["iterations"] for x in sessions),
            "seconds": round(sum(x["seconds"] for x in sessions), 1), "sessions": sessions,
            "final_loss_ema": round(float(running), 5), "batch": batch, "lr": lr, "cfg_drop": drop,
            "ema_max": ema_max, "dtype": str(dtype).replace("torch.", ""), "unet_config": unet_config(size),
            "objective": "v-prediction, ComfyUI ModelSamplingDiscrete (SD schedule)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"embedded_crops": json.dumps(info)}
    save_file({k: v.to(dtype).contiguous() for k, v in ema.items()}, str(out), metadata=meta)
    # A float32 copy next to the output lets the float16 export be checked against it (and training continue).
    if not fp32:
        save_file({k: v.float().contiguous() for k, v in ema.items()}, str(out.with_suffix(".fp32.safetensors")),
                  metadata=meta)
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB): {it} iterations in {seconds:.0f} s, "
          f"final loss (EMA of batches) {running:.4f}", flush=True)
    return info


def train_judge(minutes: float, out: Path, *, batch: int = 256, lr: float = 2e-3, seed: int = 0,
                threads: int = 2) -> dict:
    """Train the judge CNN on rendered real crops (train digits): source, geometry and sepia heads."""
    torch.set_num_threads(threads)
    net = judge.judge_net()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 7)
    budget, start, it, running = minutes * 60.0, time.perf_counter(), 0, None
    while time.perf_counter() - start < budget:
        frac = (time.perf_counter() - start) / budget
        for g in opt.param_groups:
            g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        captions = random_training_captions(batch, gen)
        x, geo = render(captions, gen, "train")
        x = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)  # robust to sampler residue
        src = torch.tensor([c.source for c in captions])
        sep = torch.tensor([c.sepia for c in captions])
        _, logits, geo_hat, sep_hat = net(x)
        loss = (F.cross_entropy(logits, src) + 4.0 * F.mse_loss(geo_hat, torch.from_numpy(judge.geometry_target(geo)))
                + 4.0 * F.mse_loss(sep_hat, sep))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        if it % 50 == 0:
            print(f"judge it {it:5d}  loss {running:.4f}", flush=True)
    net.train(False)
    quality = judge_quality(net)
    info = {"iterations": it, "seconds": round(time.perf_counter() - start, 1), "batch": batch,
            "final_loss_ema": round(running, 5), "heldout": quality}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"judge.{k}": v.to(torch.float16).contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={"embedded_crops_judge": json.dumps(info)})
    print(f"saved {out}: {json.dumps(info)}", flush=True)
    return info


def judge_quality(net=None, count: int = 2000) -> dict:
    """Judge accuracy / errors on real crops of held-out captions and held-out digits."""
    gen = torch.Generator().manual_seed(99)
    captions = sample_captions(count, "heldout")
    x, geo = render(captions, gen, "heldout")
    if net is None:
        reading = judge.read(x)
        src, geo_hat, sep_hat = reading.source, reading.geometry, reading.sepia
    else:
        with torch.no_grad():
            _, logits, geo_hat, sep_hat = net(x)
        src, geo_hat, sep_hat = logits.argmax(-1).numpy(), geo_hat.numpy(), sep_hat.numpy()
    truth = np.array([c.source for c in captions])
    err = np.abs(geo_hat - judge.geometry_target(geo))
    return {"count": count, "source_accuracy": round(float((src == truth).mean()), 4),
            "digit_accuracy": round(float((src == truth)[truth < 10].mean()), 4),
            "cx_cy_mae": round(float(err[:, :2].mean()), 4), "log_size_mae": round(float(err[:, 2].mean()), 4),
            "sepia_mae": round(float(np.abs(sep_hat - np.array([c.sepia for c in captions])).mean()), 4)}


def generate(model, prompts, seeds, *, cfg: float = 3.0, steps: int = 20, sampler: str = "euler") -> torch.Tensor:
    """Plain ComfyUI sampling of caption prompts, one seed per item: latents [B, 3, 16, 16]."""
    from . import sampling  # imports ComfyUI, which setup_comfy configures first

    return sampling.plain(model, prompts, seeds, Recipe(sampler, "normal", steps, cfg)).latents


def evaluate(large_path=None, small_path=None, count: int = 200, cfg: float = 3.0, steps: int = 20) -> dict:
    """Judge readings of `count` samples of held-out captions (seeds 10000+) per model, beside real crops."""
    setup_comfy(2)
    large, small, _ = load_models(large_path, small_path)
    out = {"judge_on_real_heldout": judge_quality(), "count": count, "cfg": cfg, "steps": steps}
    captions = sample_captions(count, "heldout")
    seeds = [10000 + i for i in range(count)]
    truth = np.array([c.source for c in captions])
    for name, model in (("large", large), ("small", small)):
        t0 = time.perf_counter()
        lat = generate(model, [c.prompt() for c in captions], seeds, cfg=cfg, steps=steps)
        j = judge.read(lat)
        err = np.abs(j.geometry - judge.geometry_target(captions))
        out[name] = {"source_accuracy": round(float((j.source == truth).mean()), 4),
                     "cx_cy_mae": round(float(err[:, :2].mean()), 4), "log_size_mae": round(float(err[:, 2].mean()), 4),
                     "sepia_mae": round(float(np.abs(j.sepia - np.array([c.sepia for c in captions])).mean()), 4),
                     "seconds": round(time.perf_counter() - t0, 1), "finite": bool(np.isfinite(lat.numpy()).all())}
        print(f"{name}: {out[name]}", flush=True)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["large", "small"])
    p.add_argument("--judge", action="store_true", help="train the judge CNN instead of a diffusion model")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 20 large, 8 small, 3 judge)")
    p.add_argument("--out", type=Path)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="save float32 weights and train without bf16 autocast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an earlier run's float32 file (<out>.fp32.safetensors)")
    p.add_argument("--evaluate", action="store_true", help="judge readings of the shipped (or given) pair")
    p.add_argument("--large", type=Path, default=None)
    p.add_argument("--small", type=Path, default=None)
    p.add_argument("--count", type=int, default=200)
    a = p.parse_args(argv)
    if a.evaluate:
        evaluate(a.large, a.small, a.count)
        return 0
    if a.judge:
        train_judge(a.minutes or 3.0, a.out or WEIGHT_FILES["judge"], threads=a.threads)
        return 0
    if a.model is None:
        p.error("--model large|small, --judge or --evaluate is required")
    minutes = a.minutes or {"large": 20.0, "small": 8.0}[a.model]
    train(a.model, minutes, a.out or WEIGHT_FILES[a.model], batch=a.batch, lr=a.lr, seed=a.seed, fp32=a.fp32,
          threads=a.threads, init_from=a.init_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
