#!/usr/bin/env python
"""Train a class-conditional FlexDiT on Fashion-MNIST (pixel space, 1 x 32 x 32).

What is trained, and how (spec sections 1-3):
- all three FlexDiT segments: Poolingformer blocks -> SDTMs -> top dense blocks;
- ``learn_sigma``: the improved-DDPM hybrid loss as DiT trains it, MSE on eps plus the VLB
  term (KL of the true posterior against the model's learned-range variance, with the model
  mean built from the stop-gradient eps; the discretised Gaussian decoder NLL at t = 0),
  T = 1000 linear betas 1e-4 .. 0.02;
- label dropout 0.1 (the null class) so classifier-free guidance works;
- the paper's temporal schedule: the timesteps are split into equal stages, each batch
  draws t from ONE stage and runs the SDTMs at that stage's sparse grid s, noisiest stage
  fewest tokens.

Seeded and resumable (``--resume STATE``); the EMA weights are what gets saved, as a project
checkpoint (``model.safetensors`` + ``config.json``) plus ``TRAINING.md``.

    python examples/fashion/train_flexdit.py --out models/fashion-flexdit --steps 4000
    python examples/fashion/train_flexdit.py --resume out/fashion-train/train_state.pt --steps 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flexdit_export.checkpoints import parse_layout, save_checkpoint
from flexdit_export.errors import UserError
from flexdit_export.model import ModelConfig, build_model
from flexdit_export.schedule import describe, parse_schedule
from flexdit_fashion.datasets import FASHION_CLASSES, load_model_split

T = 1000


# ---------------------------------------------------------------- diffusion (training side)
class TrainingDiffusion:
    """q(x_t | x_0), the true posterior and the hybrid loss of improved DDPM (learned range)."""

    def __init__(self, num_timesteps: int = T, beta_start: float = 1e-4, beta_end: float = 0.02):
        b = np.linspace(beta_start * 1000 / num_timesteps, beta_end * 1000 / num_timesteps, num_timesteps,
                        dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        acp = np.append(1.0, ac[:-1])
        pv = b * (1.0 - acp) / (1.0 - ac)
        tabs = {
            "sqrt_ac": np.sqrt(ac), "sqrt_1m_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1.0),
            "post_log_var": np.log(np.append(pv[1], pv[1:])), "log_betas": np.log(b),
            "coef1": b * np.sqrt(acp) / (1.0 - ac), "coef2": (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac),
        }
        self.tabs = {k: torch.from_numpy(v) for k, v in tabs.items()}  # float64, cast at use

    def _at(self, name, t):
        return self.tabs[name][t].float().view(-1, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        return self._at("sqrt_ac", t) * x0 + self._at("sqrt_1m_ac", t) * noise

    def losses(self, out, x0, x_t, t, noise):
        """-> (loss per sample, mse per sample, vb per sample); vb in bits per dimension."""
        C = x0.shape[1]
        eps, v = out[:, :C], out[:, C:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        # VLB term on the variance only: the mean comes from the frozen eps (stop-gradient).
        frac = (v + 1) / 2
        min_log, max_log = self._at("post_log_var", t), self._at("log_betas", t)
        model_log_var = frac * max_log + (1 - frac) * min_log
        x0_pred = self._at("sqrt_recip_ac", t) * x_t - self._at("sqrt_recipm1_ac", t) * eps.detach()
        model_mean = self._at("coef1", t) * x0_pred + self._at("coef2", t) * x_t
        true_mean = self._at("coef1", t) * x0 + self._at("coef2", t) * x_t
        true_log_var = self._at("post_log_var", t)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3))
        nll = nll / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse + vb, mse, vb


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised to 256 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ---------------------------------------------------------------- training
class ThreadGovernor:
    """``--threads auto``: time windows of steps and run with the faster of 1 and ``max_threads``
    threads; the other count is re-measured every ``probe_every`` steps since load changes."""

    def __init__(self, max_threads: int = 2, window: int = 10, probe_every: int = 250):
        self.max, self.window, self.probe_every = max_threads, window, probe_every
        self.n, self.times, self.median, self.last_probe = max_threads, [], {}, 0
        torch.set_num_threads(self.n)

    def record(self, seconds: float, step: int) -> None:
        self.times.append(seconds)
        if len(self.times) < self.window:
            return
        self.median[self.n] = float(np.median(self.times[1:]))  # first step after a switch is noisy
        self.times = []
        other = 1 if self.n == self.max else self.max
        if other not in self.median or step - self.last_probe >= self.probe_every:
            self.last_probe, self.n = step, other
        elif self.median[other] < self.median[self.n]:
            self.n = other
        torch.set_num_threads(self.n)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="models/fashion-flexdit", help="checkpoint directory to write (EMA weights)")
    ap.add_argument("--work-dir", default="out/fashion-train", help="training state and loss log")
    ap.add_argument("--resume", help="training-state file to continue from (its architecture and seed are used)")
    ap.add_argument("--data-dir", help="Fashion-MNIST IDX directory (default /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--steps", type=int, default=8000, help="total optimiser steps (also when resuming)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    ap.add_argument("--min-lr-frac", type=float, default=0.05, help="cosine decay ends at lr * this")
    ap.add_argument("--amp", choices=("bf16", "off"), default="bf16",
                    help="bf16 autocast for the forward/backward (weights, optimiser and EMA stay fp32): "
                         "~1.8x faster on CPUs with AVX512-BF16/AMX")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--layout", default="1/2x1,1,1,1/1",
                    help="Poolingformer/SDTMs x [merge,semantic,recover,dense]/top blocks")
    ap.add_argument("--schedule", default="750:4,500:5,250:6,0:7",
                    help="trained stages 'lo:s,...', noisiest first (each batch uses one stage)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="2",
                    help="torch CPU threads, or 'auto': switch between 1 and 2 by measured step time (on a shared "
                         "machine two threads can be 30x slower than one while another process holds a core)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=500, help="write the training state every N steps")
    ap.add_argument("--default-sampler", choices=("ddpm", "ddim"), default="ddpm")
    ap.add_argument("--default-steps", type=int, default=100)
    ap.add_argument("--default-cfg-scale", type=float, default=4.0)
    ap.add_argument("--stop-at", type=int,
                    help="stop after this step as an interruption would (the state is saved; continue with --resume)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


ARCH_KEYS = ("hidden", "heads", "patch", "layout", "schedule", "seed", "batch", "lr", "warmup", "min_lr_frac",
             "ema_decay", "amp")
ARCH_DEFAULTS = {"amp": "off"}  # states written before the flag existed trained in fp32


def make_config(a) -> ModelConfig:
    npf, nd, group, ntop = parse_layout(a.layout)
    stages = parse_schedule(a.schedule, T=T, grid=32 // a.patch, family="flexdit")
    grids = [st.sparse_grid for st in stages]
    return ModelConfig(family="flexdit", hidden_size=a.hidden, num_heads=a.heads, patch_size=a.patch, input_size=32,
                       in_channels=1, learn_sigma=True, num_classes=len(FASHION_CLASSES),
                       depth=npf + nd * sum(group) + ntop,
                       num_poolingformer=npf, num_dumbbell=nd, dumbbell_group=group, num_normal_block=ntop,
                       semantic_size=max(g for g in grids if g is not None))


def lr_at(a, step):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def compute_context(amp: str):
    """bf16: autocast the network's matmuls to bf16 and use the plain (math) attention kernel,
    which beats the CPU flash kernel at these 16-64 token sequences; off: fp32 as exported."""
    stack = contextlib.ExitStack()
    if amp == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return stack


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def save_state(path: Path, model, ema, opt, step, gen, a, history, elapsed):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "args": vars(a), "history": history,
                "elapsed": elapsed}, tmp)
    tmp.replace(path)


def main(argv=None) -> int:
    try:
        return _train(argv)
    finally:
        # it may run in-process (the tests do): flushing denormals would change every later float
        # comparison there (a subnormal compares equal to 0), so leave the process as it was
        torch.set_flush_denormal(False)


def _train(argv) -> int:
    a = parse_args(argv)
    command = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    governor = ThreadGovernor() if a.threads == "auto" else None
    if governor is None:
        torch.set_num_threads(int(a.threads))
    # Adam's second moments of the adaLN-Zero / zero-initialised layers underflow into
    # denormals within a few steps, which makes CPU arithmetic ~20x slower: flush them.
    torch.set_flush_denormal(True)
    state = None
    if a.resume:
        try:
            state = torch.load(a.resume, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read training state {a.resume}: {str(e).splitlines()[0][:200]}") from None
        for k in ARCH_KEYS:  # the run's identity comes from the state, not from the flags
            setattr(a, k, state["args"].get(k, ARCH_DEFAULTS.get(k)))
    cfg = make_config(a)
    stages = parse_schedule(a.schedule, T=T, grid=cfg.grid, family="flexdit")
    if len(stages) < 1 or any(st.sparse_grid is None for st in stages):
        raise UserError("every trained stage needs a sparse grid")
    torch.manual_seed(a.seed)
    model = build_model(cfg, class_dropout_prob=0.1).train()
    ema = build_model(cfg, class_dropout_prob=0.1).eval()
    ema.load_state_dict(model.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 1)
    step, history, elapsed = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, history, elapsed = int(state["step"]), list(state["history"]), float(state["elapsed"])
    history.append({"command": command, "from_step": step, "to_step": a.steps, "threads": a.threads})

    x_all, y_all = load_model_split("train", a.data_dir)
    x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
    diff = TrainingDiffusion()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path, log_path = work / "train_state.pt", work / "loss_log.jsonl"
    if state is None and log_path.exists():
        log_path.unlink()
    elif log_path.exists():  # drop what was logged after the saved state (it will be redone)
        kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.name}: {n_params / 1e6:.2f}M params, {cfg.num_tokens} dense tokens; stages: "
          f"{describe(stages, cfg.grid)}", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=a.steps, initial=step, disable=a.no_progress, dynamic_ncols=True, desc="train")
    window = {"loss": [], "mse": [], "vb": []}
    recent = []
    t_start = time.perf_counter()
    seg_start_elapsed = elapsed
    stop = min(a.steps, a.stop_at) if a.stop_at is not None else a.steps
    while step < stop:
        t_step = time.perf_counter()
        sid = int(torch.randint(len(stages), (1,), generator=gen))
        st = stages[sid]
        idx = torch.randint(x_all.shape[0], (a.batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        t = torch.randint(st.t_min, st.t_max + 1, (a.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = diff.q_sample(x0, t, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(a, step)
        with compute_context(a.amp):
            out = model(x_t, t.float(), y, st.sparse_grid)
        loss, mse, vb = diff.losses(out.float(), x0, x_t, t, noise)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, model, min(a.ema_decay, (1 + step) / (10 + step)))
        window["loss"].append(loss.item())
        window["mse"].append(mse.mean().item())
        window["vb"].append(vb.mean().item())
        recent = (recent + [(loss.item(), mse.mean().item())])[-200:]
        bar.update(1)
        if governor is not None:
            governor.record(time.perf_counter() - t_step, step)
        if step % a.log_every == 0 or step == a.steps:
            rec = {"step": step, "lr": lr_at(a, step - 1), "threads": torch.get_num_threads(),
                   **{k: float(np.mean(v)) for k, v in window.items()},
                   "elapsed_s": round(elapsed + time.perf_counter() - t_start, 1)}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", mse=f"{rec['mse']:.4f}")
            window = {k: [] for k in window}
        if step % a.save_every == 0 or step == stop:
            save_state(state_path, model, ema, opt, step, gen, a, history, elapsed + time.perf_counter() - t_start)
    bar.close()
    elapsed += time.perf_counter() - t_start
    if step < a.steps:
        print(f"stopped at step {step} of {a.steps}; continue with --resume {state_path}", file=sys.stderr)
        return 0
    if not recent:  # nothing left to train: report the last logged losses
        last = [json.loads(line) for line in log_path.read_text().splitlines()[-4:]] if log_path.exists() else []
        # each logged record is the mean of log_every steps: weight them back into steps
        recent = [(r["loss"], r["mse"]) for r in last for _ in range(a.log_every)] or [(float("nan"), float("nan"))]
    final_loss = float(np.mean([r[0] for r in recent]))
    final_mse = float(np.mean([r[1] for r in recent]))
    save_state(state_path, model, ema, opt, step, gen, a, history, elapsed)
    schedule_text = ",".join(f"{st.t_min}:{st.sparse_grid}" for st in stages)
    training = {"commands": [h["command"] for h in history], "command": history[0]["command"], "seed": a.seed,
                "steps": step, "batch": a.batch, "lr": a.lr, "ema_decay": a.ema_decay, "amp": a.amp,
                "final_loss": round(final_loss, 5), "final_mse": round(final_mse, 5),
                "final_loss_window": len(recent), "wall_time_s": round(elapsed, 1),
                "threads": history[0].get("threads", a.threads), "torch": torch.__version__,
                "dataset": "Fashion-MNIST train (60000)",
                "parameters": n_params}
    extra = {"sampling": {"sampler": a.default_sampler, "steps": a.default_steps, "cfg_scale": a.default_cfg_scale},
             "schedule": schedule_text, "training": training}
    out = save_checkpoint(ema, a.out, class_names=FASHION_CLASSES, extra=extra)
    write_training_md(out, cfg, training, extra, stages, segment_s=elapsed - seg_start_elapsed)
    print(f"saved EMA checkpoint to {out} (step {step}, final loss {final_loss:.4f}, mse {final_mse:.4f}, "
          f"wall {elapsed / 60:.1f} min)", file=sys.stderr)
    return 0


AMP_TEXT = {"bf16": "bf16 autocast forward/backward (math attention); fp32 weights, AdamW state and EMA",
            "off": "fp32"}


def write_training_md(out: Path, cfg: ModelConfig, training: dict, extra: dict, stages, segment_s: float):
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    lines = [
        "# fashion-flexdit: a class-conditional FlexDiT trained on Fashion-MNIST", "",
        f"Model: {cfg.name}, pixel space 1x{cfg.input_size}x{cfg.input_size}, patch {cfg.patch_size} -> "
        f"{cfg.grid}x{cfg.grid} = {cfg.num_tokens} dense tokens, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"layout {cfg.num_poolingformer} Poolingformer / {cfg.num_dumbbell} SDTMs x {cfg.dumbbell_group} / "
        f"{cfg.num_normal_block} top blocks (depth {cfg.depth}), learn_sigma, {cfg.num_classes} classes; "
        f"{training['parameters'] / 1e6:.2f}M parameters, {size_mb:.1f} MB of weights (EMA).", "",
        f"Temporal schedule (trained as the paper does: each batch one stage): `{extra['schedule']}`",
        f"({describe(stages, cfg.grid)}).", "",
        "Training command(s), run from the repository root (the first started the run, later ones resumed it):", "",
        *[f"    {c}" for c in training["commands"]], "",
        "| | |", "|---|---|",
        f"| seed | {training['seed']} |",
        f"| optimiser steps | {training['steps']} (batch {training['batch']}, AdamW lr {training['lr']}, "
        f"warm-up + cosine, EMA {training['ema_decay']}) |",
        f"| compute | {AMP_TEXT[training.get('amp', 'off')]} |",
        f"| final loss (mean of the last {training['final_loss_window']} steps) | {training['final_loss']} "
        f"(MSE part {training['final_mse']}) |",
        f"| wall time | {training['wall_time_s'] / 60:.1f} min, torch threads {training['threads']} "
        f"(torch {training['torch']}) |",
        "| loss | improved-DDPM hybrid: MSE(eps) + VLB(learned range, stop-grad mean), T = 1000 linear betas |",
        f"| label dropout | 0.1 (null class {cfg.num_classes} for CFG) |", "",
        f"Runtime defaults stored in config.json: {json.dumps(extra['sampling'])}.", "",
        "Convert and sample:", "",
        f"    flexdit-export convert {out} -o /tmp/fashion-bundle --schedule {extra['schedule']} --force",
        "    flexdit-run examples/fashion/prompts.txt --bundle /tmp/fashion-bundle", "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"train_flexdit: error: {e}", file=sys.stderr)
        sys.exit(2)
