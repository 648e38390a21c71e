"""Seeing a run: one compact progress line per logging step (loss, learning rate, tokens/s, ETA; GRPO's
reward too), the experiment trackers (--report_to), and a loss plot in the run folder at the end."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from unift.errors import UniftError

log = logging.getLogger("unift")

TRACKERS = ("tensorboard", "wandb")
LOSS_PLOT = "loss.png"


def tracker_names(value: str | None) -> list[str]:
    """--report_to's trackers, each known and installed (checked when the arguments are built)."""
    names = [n.strip() for n in (value or "none").split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UniftError(f"--report_to: unknown {', '.join(unknown)}; choose none or from {', '.join(TRACKERS)}")
    from importlib.util import find_spec

    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}
    missing = [n for n in names if find_spec(needs[n]) is None]
    if missing:
        raise UniftError(f"--report_to {','.join(missing)}: not installed (pip install {' '.join(missing)})")
    return names


def check_report_to(value: str) -> str:
    tracker_names(value)
    return value


def report_targets(value: str | None, output_dir: str) -> list[str]:
    """--report_to as the Trainer's list; wandb's files go to the run folder unless WANDB_DIR says otherwise."""
    names = tracker_names(value)
    if "wandb" in names:
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        os.environ.setdefault("WANDB_PROJECT", "unift")
    return names


def clock(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


def reward_part(logs: dict[str, Any]) -> str:
    """--stage grpo's figures of the step: the mean reward, its spread, the completions' mean length."""
    if "reward" not in logs:
        return ""
    return (f"reward {logs['reward']:.3f} ± {logs.get('reward_std', float('nan')):.3f}  "
            f"length {logs.get('completions/mean_length', float('nan')):.1f}  ")


def reward_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's GRPO figures per logged step: the mean reward, its spread, each reward's mean, the
    completions' mean length; {} for the other stages."""
    steps = [h for h in history if "reward" in h and "loss" in h]
    if not steps:
        return {}
    keep = ("reward", "reward_std", "completions/mean_length", "kl", "entropy")
    return {"reward_curve": [{"step": h["step"], **{k: h[k] for k in h if k in keep or k.startswith("rewards/")}}
                             for h in steps]}


def progress_callback(tokens_seen: Callable[[], int]):
    """A replacement for the Trainer's ProgressCallback: its bar, but each log as one readable line with
    the tokens/s and ETA of this session (a resumed run measures from its own start)."""
    from transformers.trainer_callback import ProgressCallback

    class RunProgress(ProgressCallback):
        started = 0.0
        first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.perf_counter(), state.global_step
            return super().on_train_begin(args, state, control, **kwargs)

        def rate(self) -> float:
            elapsed = time.perf_counter() - self.started
            return tokens_seen() / elapsed if elapsed > 0 else 0.0

        def eta(self, state) -> float:
            done = state.global_step - self.first_step
            elapsed = time.perf_counter() - self.started
            return elapsed / done * (state.max_steps - state.global_step) if done > 0 else float("nan")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            head = f"step {state.global_step}/{state.max_steps}"
            if "loss" in logs:
                eta = self.eta(state)
                line = (f"{head}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.3g}  "
                        f"{reward_part(logs)}{logs.get('tokens_per_second', self.rate()):.0f} tokens/s  "
                        f"ETA {clock(eta) if eta == eta else '?'}")
            elif "eval_loss" in logs:
                line = f"{head}  eval loss {logs['eval_loss']:.4f}"
            else:
                return  # the end-of-training summary: train() reports it once
            self.training_bar.write(line, file=sys.stderr)  # beside the bar and unift's own log lines

    return RunProgress()


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training (and evaluation) loss against the step, as a PNG; None when nothing was logged. GRPO's
    mean reward and its spread get a panel of their own (its loss hovers near 0 by construction)."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    try:
        import matplotlib
    except ImportError:
        log.warning("no %s: matplotlib is not installed (pip install matplotlib)", path.name)
        return None
    matplotlib.use("Agg")  # no display on a training server
    import matplotlib.pyplot as plt

    rewards = [(h["step"], h["reward"], h.get("reward_std", 0.0)) for h in history if "reward" in h and "loss" in h]
    fig, axes = plt.subplots(2 if rewards else 1, 1, figsize=(7, 6.5 if rewards else 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if rewards:
        steps, means, spreads = zip(*rewards)
        low = [m - s for m, s in zip(means, spreads)]
        high = [m + s for m, s in zip(means, spreads)]
        axes[1][0].fill_between(steps, low, high, alpha=0.2, label="± spread of the step's completions")
        axes[1][0].plot(steps, means, linewidth=1.2, label="mean reward")
        axes[1][0].set_xlabel("optimizer step")
        axes[1][0].set_ylabel("reward")
        axes[1][0].grid(alpha=0.3)
        axes[1][0].legend()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
