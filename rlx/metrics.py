"""Metric reduction (across micro-batches and ranks) and sinks: console, JSONL, wandb, TensorBoard.

The trainer builds one `MetricLogger` per run and hands it one flat dict per step; only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from rlx.errors import UserError

METRICS_FILE = "metrics.jsonl"
# Keys the console line shows when present: (label, key, format).
_CONSOLE_KEYS = (
    ("reward", "reward/mean", "{:.3f}"),
    ("acc", "reward/acc", "{:.3f}"),
    ("val_acc", "val/acc", "{:.3f}"),
    ("len", "response/length_mean", "{:.0f}"),
)


_DROP = object()


def _json_value(value: Any):
    """Numbers as floats (NaN and inf as null, which JSON lacks), strings kept, anything else dropped."""
    if isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _DROP
    return number if math.isfinite(number) else None


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricLogger:
    """Writes one metrics dict per step to the enabled sinks (`cfg` is a LoggingConfig).

    - console: on a TTY with `progress_bar`, one line rewritten in place (step/total, reward,
      accuracy, s/step, ETA); otherwise, e.g. in a log file, one plain line per step.
    - jsonl: `run_dir/metrics.jsonl`, one object per step: `{"step": N, key: float, ...}`,
      NaN/inf as null; appended to, so a resumed run continues the file (readers keep the last
      line of a step).
    - wandb: a run in `run_dir/wandb`, initialized with `config_dict`; mode from `WANDB_MODE`
      when set, else `cfg.wandb_mode` (offline needs no network).
    - tensorboard: scalars under `run_dir/tensorboard`.
    Ranks other than 0 write nothing. `total_steps` (for ETA) may be set after construction.
    """

    def __init__(self, run_dir: str, cfg: Any, config_dict: dict | None = None, rank: int = 0, total_steps: int = 0):
        self.run_dir = str(run_dir)
        self.total_steps = total_steps
        self.enabled = rank == 0
        self.console = self.enabled and getattr(cfg, "console", True)
        self.live_line = self.console and getattr(cfg, "progress_bar", True) and sys.stdout.isatty()
        self._jsonl = self._wandb = self._tensorboard = None
        self._last_time: float | None = None
        self._step_times: list[float] = []
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        if getattr(cfg, "jsonl", True):
            self._jsonl = open(os.path.join(self.run_dir, METRICS_FILE), "a", encoding="utf-8")
        if getattr(cfg, "wandb", False):
            self._wandb = self._init_wandb(cfg, config_dict)
        if getattr(cfg, "tensorboard", False):
            self._tensorboard = self._init_tensorboard()

    def _init_wandb(self, cfg: Any, config_dict: dict | None):
        try:
            import wandb
        except ImportError as e:
            raise UserError("logging.wandb = true needs wandb: pip install 'rlx[wandb]'") from e
        mode = os.environ.get("WANDB_MODE") or getattr(cfg, "wandb_mode", "offline")
        return wandb.init(
            project=getattr(cfg, "wandb_project", "") or "rlx",
            name=os.path.basename(os.path.abspath(self.run_dir)),
            dir=self.run_dir,
            config=config_dict or {},
            mode=mode,
        )

    def _init_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("logging.tensorboard = true needs tensorboard: pip install tensorboard") from e
        return SummaryWriter(log_dir=os.path.join(self.run_dir, "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one step's metrics in every enabled sink."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._last_time is not None:
            self._step_times.append(now - self._last_time)
        self._last_time = now
        if self._jsonl is not None:
            record = {"step": step}
            for key, value in metrics.items():
                value = _json_value(value)
                if value is not _DROP:
                    record[key] = value
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()  # a crashed run keeps every finished step
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(_json_value(v), float)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, step)
        if self.console:
            self._print(self.format_line(metrics, step))

    def format_line(self, metrics: dict[str, Any], step: int) -> str:
        """`step 12/100 | reward 0.420 | acc 0.400 | 3.2 s/step | ETA 4m42s` (present keys only)."""
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        for label, key, fmt in _CONSOLE_KEYS:
            value = metrics.get(key)
            if isinstance(_json_value(value), float):
                parts.append(f"{label} {fmt.format(float(value))}")
        recent = self._step_times[-20:]  # a moving window: early steps (warm-up) fade out
        if recent:
            per_step = sum(recent) / len(recent)
            parts.append(f"{per_step:.1f} s/step")
            if self.total_steps and step < self.total_steps:
                parts.append(f"ETA {_format_duration(per_step * (self.total_steps - step))}")
        return " | ".join(parts)

    def _print(self, line: str) -> None:
        if self.live_line:
            sys.stdout.write("\r\033[K" + line)
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self.live_line and self._last_time is not None:
            sys.stdout.write("\n")
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
