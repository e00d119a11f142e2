"""`rlx plot RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG curves from runs' metrics.jsonl, one line per run.

Key contract (what the trainer writes to `metrics.jsonl`, one object per step with `step`):

| key                            | meaning                                                         |
|--------------------------------|-----------------------------------------------------------------|
| `reward/mean`                  | mean reward of the step's kept rollouts (`critic/score/mean`, verl's name, is read too) |
| `reward/acc`                   | mean `acc` extra of the step's rollouts (training accuracy)     |
| `val/acc`                      | validation accuracy, on validation steps only                   |
| `response/length_mean`         | mean response length in tokens                                  |
| `perf/total_generated_tokens`  | CUMULATIVE response tokens generated since the run started, discarded rollouts included (what the sampler paid for) |
| `sampler/num_response_tokens`  | response tokens generated in this step (fallback: cumulated here when the total is absent) |

Figures: reward.png, accuracy.png, response_length.png, and, for comparing samplers fairly at
equal generation cost (seed 000), reward_vs_tokens.png and val_acc_vs_tokens.png. A figure whose
keys no run has is skipped with a note. A resumed run's repeated steps keep their last line.
"""

from __future__ import annotations

import argparse
import json
import os

from rlx.errors import UserError
from rlx.metrics import METRICS_FILE

REWARD_KEYS = ("reward/mean", "critic/score/mean")
TOTAL_TOKENS_KEY = "perf/total_generated_tokens"
STEP_TOKENS_KEY = "sampler/num_response_tokens"

Series = tuple[list[float], list[float]]


def read_metrics(run_dir: str) -> list[dict]:
    """The run's step records sorted by step, the last line winning for a repeated step."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no {METRICS_FILE}")
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {lineno}: not JSON") from None
            if "step" in record:
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str, x_key: str = "step") -> Series:
    """(x, y) of the records that have a numeric `key` (null values skipped)."""
    points = [(r[x_key], r[key]) for r in records if r.get(key) is not None and r.get(x_key) is not None]
    return [float(x) for x, _ in points], [float(y) for _, y in points]


def with_total_tokens(records: list[dict]) -> list[dict]:
    """Records with `perf/total_generated_tokens`, cumulated from the per-step key when missing."""
    if any(TOTAL_TOKENS_KEY in r for r in records) or not any(STEP_TOKENS_KEY in r for r in records):
        return records
    total, out = 0.0, []
    for r in records:
        total += float(r.get(STEP_TOKENS_KEY) or 0.0)
        out.append({**r, TOTAL_TOKENS_KEY: total})
    return out


def reward_key(records: list[dict]) -> str | None:
    return next((k for k in REWARD_KEYS if any(r.get(k) is not None for r in records)), None)


def _figure(runs: dict[str, list[dict]], lines: list[tuple[str, str, str]], title: str, xlabel: str, ylabel: str, out: str) -> bool:
    """One figure; `lines` are (y key, x key, label suffix) drawn for every run that has them.
    Returns False (nothing written) when no run has any of the keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for j, (key, x_key, suffix) in enumerate(lines):
            key = reward_key(records) if key == "reward" else key
            x, y = series(records, key, x_key) if key else ([], [])
            if not x:
                continue
            style = {"linestyle": "-" if j == 0 else "--", "marker": "o" if len(x) <= 30 else None, "markersize": 3}
            ax.plot(x, y, color=color, label=f"{name}{suffix}", linewidth=1.6, **style)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if lines[0][1] == TOTAL_TOKENS_KEY:
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter())  # 50k, 1.2M
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


# (file, title, x label, y label, [(y key, x key, legend suffix)]); "reward" = reward/mean or verl's key.
FIGURES = [
    ("reward.png", "Training reward", "step", "mean reward", [("reward", "step", "")]),
    ("accuracy.png", "Accuracy", "step", "accuracy", [("reward/acc", "step", " train"), ("val/acc", "step", " val")]),
    ("response_length.png", "Response length", "step", "mean response tokens", [("response/length_mean", "step", "")]),
    ("reward_vs_tokens.png", "Reward vs generated tokens", "total generated tokens", "mean reward",
     [("reward", TOTAL_TOKENS_KEY, "")]),
    ("val_acc_vs_tokens.png", "Validation accuracy vs generated tokens", "total generated tokens", "val accuracy",
     [("val/acc", TOTAL_TOKENS_KEY, "")]),
]


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """Write the figures for these runs into out_dir; returns the paths written."""
    runs: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(run_dir)) or run_dir
        runs[name if name not in runs else run_dir] = with_total_tokens(read_metrics(run_dir))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for filename, title, xlabel, ylabel, lines in FIGURES:
        out = os.path.join(out_dir, filename)
        if _figure(runs, lines, title, xlabel, ylabel, out):
            written.append(out)
        else:
            wanted = " or ".join("reward/mean" if key == "reward" else key for key, _, _ in lines)
            x_key = lines[0][1]
            against = "" if x_key == "step" else f" together with {x_key} (or {STEP_TOKENS_KEY})"
            print(f"rlx plot: skipped {filename}: no run has {wanted}{against}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlx plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories with metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots for one run, ./plots for several)")
    args = parser.parse_args(argv)
    out_dir = args.out or (os.path.join(args.run_dirs[0], "plots") if len(args.run_dirs) == 1 else "plots")
    for path in plot_runs(args.run_dirs, out_dir):
        print(f"wrote {path}")
    return 0
