"""Train one of the embedded digits models on CPU, by wall-clock budget.

    python -m embedded.train --model large --minutes 10 --out embedded/weights/digits_large.safetensors
    python -m embedded.train --model small --minutes 5  --out embedded/weights/digits_small.safetensors
    python -m embedded.train --evaluate      # judge accuracy of the shipped pair (model card numbers)

Objective: v-prediction in ComfyUI's own parameterisation. With x_t = x0 + sigma * eps (ComfyUI's
EPS-style noise scaling, sigma from `model.model_sampling.sigmas`, timestep index uniform), the
network sees `model_sampling.calculate_input(sigma, x_t)` and timestep `model_sampling.timestep(sigma)`
and is trained towards v = (eps - sigma * x0) / sqrt(sigma^2 + sigma_data^2) * sigma_data, the one
output for which `V_PREDICTION.calculate_denoised(sigma, v, x_t) == x0` (checked by `check_target`).

The large model learns the text table (class embeddings + positional tokens); the small one is
trained against the large model's table, frozen, so one `encode` feeds both (train large first).
Forward passes run under bfloat16 autocast (fast on CPUs with AMX/AVX512-BF16); master weights,
Adam state and the EMA are float32. The EMA weights are saved, in float16 unless --fp32.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from . import digits as D


def v_target(model_sampling, sigma, x0, eps):
    """The v-prediction target in ComfyUI's parameterisation (sigma [B], x0 / eps [B, C, H, W])."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    sd = float(model_sampling.sigma_data)
    return (eps * sd - s * x0 / sd) / (s ** 2 + sd ** 2) ** 0.5


def check_target(model_sampling, atol: float = 1e-4) -> float:
    """calculate_denoised(sigma, v_target, x_t) must give x0 back; returns the max abs error."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((64, 1, 4, 4), generator=gen) * 2 - 1
    eps = torch.randn((64, 1, 4, 4), generator=gen)
    idx = torch.linspace(0, len(model_sampling.sigmas) - 1, 64).long()
    sigma = model_sampling.sigmas[idx].float()
    x_t = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    back = model_sampling.calculate_denoised(sigma, v_target(model_sampling, sigma, x0, eps), x_t)
    err = float((back - x0).abs().max())
    if not err <= atol:
        raise AssertionError(f"v target does not invert ComfyUI's calculate_denoised: max error {err}")
    return err


def _ema_update(ema: dict, params: dict, decay: float) -> None:
    import torch

    with torch.no_grad():
        for k, p in params.items():
            ema[k].mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def train(size: str, minutes: float, out: Path, *, batch: int = 128, lr: float = 1e-3, drop: float = 0.12,
          ema_max: float = 0.999, seed: int = 0, fp32: bool = False, text_from: Path | None = None,
          log_every: int = 10, threads: int = 2, init_from: Path | None = None,
          freeze_text: bool = False) -> dict:
    D.setup_comfy(threads)
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    patcher = D.build_model(size, seed=seed)
    model = patcher.model
    net = model.diffusion_model
    ms = model.model_sampling
    print(f"v-target check: max |calculate_denoised(sigma, v, x_t) - x0| = {check_target(ms):.2e}", flush=True)

    images, labels = D.digits_8x8("train")
    x_all = D.to_model_space(images)
    y_all = torch.as_tensor(labels)
    n = len(x_all)

    if size == "large":
        class_embedding = torch.nn.Parameter(torch.randn(D.NUM_CLASSES + 1, D.CONTEXT_DIM))
        positional = torch.nn.Parameter(torch.randn(D.CONTEXT_TOKENS - 1, D.CONTEXT_DIM))
        text_params = [class_embedding, positional]
    else:
        tensors, _ = D.read_weights("large", text_from)
        class_embedding = tensors["text.class_embedding"].float()
        positional = tensors["text.positional"].float()
        text_params = []

    previous = {}
    if init_from is not None:  # continue an earlier run (its float32 EMA weights)
        tensors, meta = D.read_weights(size, init_from)
        D.load_into(patcher, tensors, size, init_from)
        previous = json.loads(meta.get("embedded_digits", "{}"))
        if text_params:
            with torch.no_grad():
                class_embedding.copy_(tensors["text.class_embedding"].float())
                positional.copy_(tensors["text.positional"].float())
        if freeze_text:  # the small model was trained against this table: keep it
            class_embedding.requires_grad_(False)
            positional.requires_grad_(False)
            text_params = []
        print(f"continuing from {init_from}: {previous.get('iterations')} iterations, {previous.get('seconds')} s", flush=True)

    params = {f"diffusion_model.{k}": p for k, p in net.named_parameters()}
    if text_params:
        params["text.class_embedding"], params["text.positional"] = class_embedding, positional
    ema = {k: p.detach().clone().float() for k, p in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    sigmas = ms.sigmas.float()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"training {size}: {n_params:,} UNet parameters, {n} images, batch {batch}, {minutes} min budget", flush=True)

    budget = minutes * 60.0
    start = time.perf_counter()
    it = 0
    running = None
    history = []
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
        pick = torch.randint(0, n, (batch,), generator=gen)
        x0, y = x_all[pick], y_all[pick].clone()
        y[torch.rand(batch, generator=gen) < drop] = D.NULL_CLASS
        idx = torch.randint(0, len(sigmas), (batch,), generator=gen)
        sigma = sigmas[idx]
        eps = torch.randn(x0.shape, generator=gen)
        x_t = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        context = torch.cat([class_embedding[y].unsqueeze(1), positional.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32):
            pred = net(ms.calculate_input(sigma, x_t), ms.timestep(sigma).float(), context=context)
        loss = torch.nn.functional.mse_loss(pred.float(), v_target(ms, sigma, x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        it += 1
        _ema_update(ema, params, min(ema_max, (1 + it) / (10 + it)))
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if it % log_every == 0:
            history.append((it, round(elapsed, 1), running))
            print(f"it {it:5d}  {elapsed:6.1f} s  loss {value:.4f}  avg {running:.4f}  lr {cur_lr:.2e}", flush=True)

    seconds = time.perf_counter() - start
    dtype = torch.float32 if fp32 else torch.float16
    state = {k: v.to(dtype).contiguous() for k, v in ema.items()}
    if not text_params:
        state["text.class_embedding"] = class_embedding.detach().to(dtype).contiguous()
        state["text.positional"] = positional.detach().to(dtype).contiguous()
    earlier = previous.get("sessions") or ([{k: previous.get(k) for k in ("iterations", "seconds", "lr", "batch")}]
                                           if previous.get("iterations") else [])
    sessions = earlier + [{"iterations": it, "seconds": round(seconds, 1), "lr": lr, "batch": batch}]
    info = {"model": size, "unet_parameters": n_params, "iterations": sum(x["iterations"] for x in sessions),
            "seconds": round(sum(x["seconds"] for x in sessions), 1), "sessions": sessions,
            "final_loss_ema": round(float(running), 5), "batch": batch, "lr": lr, "cfg_drop": drop,
            "ema_max": ema_max, "dtype": str(dtype).replace("torch.", ""), "unet_config": D.unet_config(size),
            "objective": "v-prediction, ComfyUI ModelSamplingDiscrete (SD schedule)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"embedded_digits": json.dumps(info)})
    # A float32 copy next to the output lets the float16 export be checked against it.
    if not fp32:
        save_file({k: v.float().contiguous() for k, v in ema.items()} | (
            {} if text_params else {"text.class_embedding": class_embedding.detach().float(), "text.positional": positional.detach().float()}),
            str(out.with_suffix(".fp32.safetensors")), metadata={"embedded_digits": json.dumps(info)})
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB): {it} iterations in {seconds:.0f} s, final loss (EMA of batches) {running:.4f}", flush=True)
    return info


def generate(model, encode, digits, seeds, *, cfg: float = 2.5, steps: int = 20, sampler: str = "euler"):
    """Plain ComfyUI sampling of 'digit N' prompts, one seed per item: latents [B, 1, 16, 16]."""
    import torch

    from kb_tools import comfy_sampling as cs
    from kb_tools.redi import batch_conditioning

    positive = batch_conditioning([encode(f"digit {d}") for d in digits])
    negative = encode("")
    latent = torch.zeros((len(digits), *D.LATENT_SHAPE))
    sigmas = cs.schedule_sigmas(model, sampler, "normal", steps)
    return cs.sample_sigmas(model, latent=latent, noise=cs.seeded_noise(latent, seeds), positive=positive,
                            negative=negative, cfg=cfg, sampler_name=sampler, sigmas=sigmas, seed=int(seeds[0]))


def evaluate(large_path=None, small_path=None, count: int = 200, cfg: float = 2.5, steps: int = 20) -> dict:
    """Judge accuracy of `count` samples (digits cycling 0..9, seeds 10000+) per model."""
    D.setup_comfy(2)
    import numpy as np

    large, small, encode = D.load_models(large_path, small_path)
    images, labels = D.digits_8x8("test")
    ref = float((D.classify(D.to_model_space(images)) == labels).mean())
    out = {"judge_test_accuracy_on_real_digits": round(ref, 4), "count": count, "cfg": cfg, "steps": steps}
    digits = [i % 10 for i in range(count)]
    seeds = [10000 + i for i in range(count)]
    for name, model in (("large", large), ("small", small)):
        t0 = time.perf_counter()
        lat = generate(model, encode, digits, seeds, cfg=cfg, steps=steps)
        acc = float((D.classify(lat) == np.array(digits)).mean())
        out[f"{name}_accuracy"] = round(acc, 4)
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        out[f"{name}_finite"] = bool(np.isfinite(lat.numpy()).all())
        print(f"{name}: judge accuracy {acc:.3f} on {count} samples ({out[f'{name}_seconds']} s)", flush=True)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["large", "small"])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", type=Path)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="save float32 weights and train without bf16 autocast")
    p.add_argument("--text-from", type=Path, default=None, help="large weights file with the text table (small model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an earlier run's float32 file (<out>.fp32.safetensors)")
    p.add_argument("--freeze-text", action="store_true",
                   help="with --init-from on the large model: keep its text table (the small model uses it)")
    p.add_argument("--evaluate", action="store_true", help="judge accuracy of the shipped (or given) pair")
    p.add_argument("--large", type=Path, default=None)
    p.add_argument("--small", type=Path, default=None)
    p.add_argument("--count", type=int, default=200)
    a = p.parse_args(argv)
    if a.evaluate:
        evaluate(a.large, a.small, a.count)
        return 0
    if a.model is None:
        p.error("--model large|small is required (or --evaluate)")
    out = a.out or D.WEIGHT_FILES[a.model]
    train(a.model, a.minutes, out, batch=a.batch, lr=a.lr, seed=a.seed, fp32=a.fp32, text_from=a.text_from,
          threads=a.threads, init_from=a.init_from, freeze_text=a.freeze_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
