#!/usr/bin/env python
"""Train localdiff's embedded default model: a small 64x64 face DDPM distilled from a face GAN.

Faces come from the DCGAN in ``gan-face-generate`` (``pip install --no-deps gan-face-generate==1.1.1``), drawn on
the fly from the training seed range (see ``localdiff.facegan``); nothing is stored but weights.

The model is a diffusers ``UNet2DModel`` (epsilon prediction) with a ``DDPMScheduler`` config, so it loads
through the same code path as hub models. The recipe options are the ones the model card's A/B table measures:

* ``--arch``: ``v0`` (no attention outside the 8x8 mid block) or ``attn16`` (self-attention at 16x16 in the
  encoder and decoder, like google/ddpm-ema-celebahq-256);
* ``--precision``: ``fp32`` or ``bf16`` (autocast; the loss and the optimiser stay fp32);
* ``--loss``: ``mse`` (plain epsilon MSE) or ``min-snr`` (Hang et al. 2023: each sample's epsilon loss weighted by
  min(SNR(t), gamma) / SNR(t), ``--snr-gamma`` 5);
* ``--lr``, ``--batch-size``, ``--ema-decay``.

Training is seeded and resumable. ``--work-dir`` keeps a full checkpoint (raw weights, EMA weights and the AdamW
state, safetensors, no pickles), the loss log (CSV) and sample grids; ``--resume`` continues from it. Where that
local checkpoint is missing (a fresh clone), ``--resume-from DIR`` continues from a compact state committed to the
repository (``ema.safetensors`` and ``raw.safetensors`` in fp16, ``state.json``): the optimiser moments are not
kept there (they would double the size), so the learning rate is warmed up again over ``--warmup`` steps.
``--save-compact DIR`` writes that compact state at every checkpoint. ``--export DIR`` writes the EMA weights in
fp16 with the configs, ready to ship.

Examples::

    # the v2 recipe on 2 CPU cores, in resumable 60-minute pieces
    nice python scripts/train_default_model.py --arch attn16 --loss min-snr --time-limit 60 \\
        --work-dir runs/v2 --save-compact training/v2 --resume
    # GPU (bf16 autocast), about 10 minutes
    python scripts/train_default_model.py --device cuda --precision bf16 --batch-size 128 --steps 20000
    # export a run into the package
    python scripts/train_default_model.py --work-dir runs/v2 --export-only --export src/localdiff/default_model
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from localdiff.facegan import TRAIN_SEEDS, FaceGAN

# The default model's architectures: 64 px, four levels (64, 32, 16, 8), h-space = mid block at 8x8x256.
_BASE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128, 256),
    layers_per_block=1,
    norm_num_groups=16,
    add_attention=True,  # attention in the mid block, at the 8x8 bottleneck
)
ARCHS = {
    "v0": dict(_BASE, down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4),
    # self-attention at 16x16 on both sides: down_blocks[2] runs at 16x16, up_blocks[1] too
    "attn16": dict(_BASE, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                   attention_head_dim=32),
}
UNET_CONFIG = ARCHS["v0"]  # v0's architecture, kept under its old name
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        prediction_type="epsilon", clip_sample=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/default_model"), help="checkpoints, logs, samples")
    p.add_argument("--arch", choices=sorted(ARCHS), default="v0", help="U-Net layout (default: v0)")
    p.add_argument("--steps", type=int, default=100_000, help="total optimiser steps (default: 100000)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN", help="stop (and save) after MIN minutes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--decay-start", type=int, default=None, metavar="STEP",
                   help="from this step on, decay the learning rate (cosine) to --min-lr over --decay-steps steps "
                        "(default: constant learning rate)")
    p.add_argument("--decay-steps", type=int, default=1000, help="length of that decay (default: 1000)")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the decay (default: 1e-4)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--loss", choices=("mse", "min-snr"), default="mse")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="gamma of the min-SNR weighting (default: 5)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="autocast precision (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--swd-every", type=int, default=0, metavar="STEPS",
                   help="score the EMA weights every STEPS steps (SWD against held-out GAN faces and held-out "
                        "epsilon MSE, appended to swd.csv; default: never)")
    p.add_argument("--swd-n", type=int, default=256, help="samples for that SWD (default: 256)")
    p.add_argument("--swd-steps", type=int, default=10, help="DDIM steps for those samples (default: 10)")
    p.add_argument("--resume", action="store_true", help="continue from --work-dir's checkpoint")
    p.add_argument("--resume-from", type=Path, default=None, metavar="DIR",
                   help="if --work-dir has no checkpoint, continue from the compact state in DIR")
    p.add_argument("--save-compact", type=Path, default=None, metavar="DIR",
                   help="also write the compact (fp16, no optimiser state) resumable state here at each checkpoint")
    p.add_argument("--export", type=Path, default=None, metavar="DIR", help="write the shippable model here at the end")
    p.add_argument("--export-only", action="store_true",
                   help="only export --work-dir's last checkpoint to --export (no training)")
    return p.parse_args(argv)


def make_model(arch: str = "v0"):
    from diffusers import DDPMScheduler, UNet2DModel

    return UNet2DModel(**ARCHS[arch]), DDPMScheduler(**SCHEDULER_CONFIG)


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR with SNR = a / (1 - a)."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(unet, x0, t, noise, alphas_cumprod, *, loss: str = "mse", gamma: float = 5.0,
                   autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The epsilon-prediction training loss of one batch (mean over the batch) and, detached, the plain epsilon
    MSE (the same number for both losses, so runs with different weightings can be compared)."""
    a = alphas_cumprod[t][:, None, None, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        pred = unet(xt, t).sample
    mse = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
    weighted = mse * min_snr_weights(alphas_cumprod[t], gamma) if loss == "min-snr" else mse
    return weighted.mean(), mse.detach().mean()


def save_checkpoint(work: Path, unet, ema, opt, step: int, elapsed: float, arch: str) -> None:
    tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    names = {p: n for n, p in unet.named_parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt.{key}.{names[p]}"] = value.detach().cpu().contiguous()
            elif torch.is_tensor(value):
                tensors[f"opt.{key}.{names[p]}"] = value.detach().cpu().reshape(1)
    meta = {"step": str(step), "elapsed_s": f"{elapsed:.1f}", "arch": arch}
    tmp = work / "checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(work / "checkpoint.safetensors")


def load_checkpoint(work: Path, unet, ema, opt, arch: str) -> tuple[int, float]:
    from safetensors import safe_open

    path = work / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if meta.get("arch", "v0") != arch:
        raise SystemExit(f"{path} holds a {meta.get('arch', 'v0')} model; pass --arch {meta.get('arch', 'v0')}")
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


def save_compact(path: Path, unet, ema, step: int, elapsed: float, arch: str, args) -> None:
    """Raw and EMA weights in fp16 plus the run's settings: enough to continue training from a fresh clone."""
    path.mkdir(parents=True, exist_ok=True)
    for name, net in (("raw", unet), ("ema", ema)):
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
        save_file(tensors, str(path / f"{name}.safetensors.tmp"))
        (path / f"{name}.safetensors.tmp").replace(path / f"{name}.safetensors")
    state = dict(step=step, elapsed_s=round(elapsed, 1), **recipe(args, arch))
    if args.decay_start is not None:
        state["lr_now"] = learning_rate(step, args.lr, decay_start=args.decay_start, decay_steps=args.decay_steps,
                                        min_lr=args.min_lr, warmup=1)
    (path / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_compact(path: Path, unet, ema, arch: str) -> tuple[int, float]:
    state = json.loads((path / "state.json").read_text())
    if state["arch"] != arch:
        raise SystemExit(f"{path} holds a {state['arch']} model; pass --arch {state['arch']}")
    for name, net in (("raw", unet), ("ema", ema)):
        weights = load_file(str(path / f"{name}.safetensors"))
        net.load_state_dict({k: v.float() for k, v in weights.items()})
    return int(state["step"]), float(state["elapsed_s"])


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


class SampleQuality:
    """SWD of the EMA weights' samples against held-out GAN faces and held-out epsilon MSE, logged to a CSV."""

    def __init__(self, gan: FaceGAN, path: Path, n: int, steps: int):
        from localdiff.facegan import SWD_REFERENCE_SEEDS, VALIDATION_SEEDS

        self.reference = gan.face_range(SWD_REFERENCE_SEEDS, n).cpu()
        self.validation = gan.face_range(VALIDATION_SEEDS, 256).cpu()
        self.path, self.n, self.steps = path, n, steps

    @torch.no_grad()
    def __call__(self, ema, step: int, images_seen: int, elapsed: float) -> dict:
        from diffusers import DDIMScheduler

        from localdiff.metrics import heldout_eps_mse, swd
        from localdiff.model import DiffusionModel
        from localdiff.sampling import generate, make_schedule

        model = DiffusionModel(ema, DDIMScheduler(**SCHEDULER_CONFIG), name="ema", fingerprint="training")
        samples = generate(model, self.n, make_schedule(model, self.steps), seed=0, batch_size=32)
        score = swd(samples, self.reference)
        mse = heldout_eps_mse(lambda x, t: ema(x.to(ema.device), t.to(ema.device)).sample,
                              model.scheduler.alphas_cumprod, self.validation)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "images_seen", "elapsed_s", "swd_mean", *[f"swd_{k}" for k in score if k != "mean"],
                            "heldout_eps_mse", "n", "ddim_steps"])
            w.writerow([step, images_seen, f"{elapsed:.1f}", f"{score['mean']:.2f}",
                        *[f"{v:.2f}" for k, v in score.items() if k != "mean"], f"{mse:.5f}", self.n, self.steps])
        return dict(score, heldout_eps_mse=mse)


def export(ema, path: Path, info: dict) -> None:
    """Ship the EMA weights in fp16 with the model and scheduler configs (diffusers layout)."""
    from diffusers import DDPMScheduler

    unet = copy.deepcopy(ema).to("cpu", torch.float16)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    (path / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def recipe(args, arch: str | None = None) -> dict:
    """The run's training settings, as recorded in ``state.json`` and the exported ``training.json``."""
    out = dict(arch=arch or args.arch, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, loss=args.loss,
               snr_gamma=args.snr_gamma, ema_decay=args.ema_decay, seed=args.seed, precision=args.precision,
               torch=torch.__version__)
    if args.decay_start is not None:
        out.update(decay_start=args.decay_start, decay_steps=args.decay_steps, min_lr=args.min_lr)
    return out


def learning_rate(step: int, lr: float, *, warm_from: int = 0, warmup: int = 200, decay_start: int | None = None,
                  decay_steps: int = 1000, min_lr: float = 1e-4) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up from ``warm_from``, then constant,
    then (if ``decay_start`` is set) a cosine from ``lr`` down to ``min_lr`` over ``decay_steps`` steps."""
    rate = lr
    if decay_start is not None and step >= decay_start:
        done = min(1.0, (step - decay_start) / max(1, decay_steps))
        rate = min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * done))
    return rate * min(1.0, (step + 1 - warm_from) / warmup)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    unet, scheduler = make_model(args.arch)
    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed_before, warm_from = 0, 0.0, 0
    if (args.resume or args.export_only) and (work / "checkpoint.safetensors").is_file():
        step, elapsed_before = load_checkpoint(work, unet, ema, opt, args.arch)
        print(f"resumed at step {step}")
    elif args.resume_from is not None and (args.resume_from / "state.json").is_file():
        step, elapsed_before = load_compact(args.resume_from, unet, ema, args.arch)
        warm_from = step  # fresh AdamW moments: warm the learning rate up again
        print(f"resumed at step {step} from the compact state in {args.resume_from} (optimiser state re-warmed)")
        for name in ("loss.csv", "swd.csv"):  # a new work folder goes on with the committed curves
            if (args.resume_from / name).is_file() and not (work / name).is_file():
                shutil.copyfile(args.resume_from / name, work / name)
    if args.export_only:
        if args.export is None:
            raise SystemExit("--export-only needs --export DIR")
        export(ema, args.export, dict(steps=step, images_seen=step * args.batch_size, **recipe(args),
                                      wall_minutes=round(elapsed_before / 60, 1),
                                      note="EMA weights of the last checkpoint"))
        print(f"exported step {step} to {args.export}")
        return
    gan = FaceGAN(device)
    alphas = scheduler.alphas_cumprod.to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + step)

    log_path = work / "loss.csv"
    new_log = not log_path.exists() or step == 0
    log_file = open(log_path, "w" if new_log else "a", newline="")
    log = csv.writer(log_file)
    if new_log:
        log.writerow(["step", "loss", "mse", "lr", "elapsed_s"])

    quality = SampleQuality(gan, work / "swd.csv", args.swd_n, args.swd_steps) if args.swd_every else None

    def checkpoint(elapsed: float) -> None:
        save_checkpoint(work, unet, ema, opt, step, elapsed, args.arch)
        log_file.flush()
        if args.save_compact is not None:
            save_compact(args.save_compact, unet, ema, step, elapsed, args.arch, args)
            for name in ("loss.csv", "swd.csv"):
                if (work / name).is_file():
                    shutil.copyfile(work / name, args.save_compact / name)

    start = wall_start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    running = None
    n_train = len(TRAIN_SEEDS)
    while step < args.steps:
        if args.time_limit is not None and (time.time() - wall_start) / 60 > args.time_limit:
            print(f"time limit reached at step {step}")
            break
        first = step * args.batch_size
        seeds = [TRAIN_SEEDS[(first + i) % n_train] for i in range(args.batch_size)]
        x0 = gan.faces(seeds)
        flip = torch.rand(len(seeds), generator=gen) < 0.5
        x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(seeds),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        lr = learning_rate(step, args.lr, warm_from=warm_from, warmup=args.warmup, decay_start=args.decay_start,
                           decay_steps=args.decay_steps, min_lr=args.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, mse = diffusion_loss(unet, x0, t, noise, alphas, loss=args.loss, gamma=args.snr_gamma,
                              autocast_dtype=autocast_dtype)
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
        log.writerow([step, f"{loss.item():.5f}", f"{mse.item():.5f}", f"{lr:.3g}", f"{elapsed:.1f}"])
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % args.checkpoint_every == 0:
            checkpoint(elapsed)
        if step % args.sample_every == 0:
            sample_grid(ema, SCHEDULER_CONFIG, work / f"samples_{step:06d}.png")
        if quality is not None and step % args.swd_every == 0:
            t_q = time.time()
            q = quality(ema, step, step * args.batch_size, elapsed_before + t_q - start)
            bar.write(f"step {step}: SWD {q['mean']:.1f}, held-out eps MSE {q['heldout_eps_mse']:.4f}")
            start += time.time() - t_q  # the logged training time leaves the scoring out
            checkpoint(elapsed_before + time.time() - start)
    bar.close()
    elapsed = elapsed_before + time.time() - start
    checkpoint(elapsed)
    log_file.close()
    sample_grid(ema, SCHEDULER_CONFIG, work / f"samples_{step:06d}.png")
    print(f"step {step}, {elapsed / 60:.1f} min, smoothed loss {running}")
    if args.export is not None:
        info = dict(steps=step, images_seen=step * args.batch_size, **recipe(args),
                    device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                    minutes=round(elapsed / 60, 1), final_smoothed_loss=running)
        export(ema, args.export, info)
        print(f"exported to {args.export}")


if __name__ == "__main__":
    main()
