"""Metrics: reduction, the JSONL sink, the console line, a wandb offline run, and `rlx plot`."""

from __future__ import annotations

import json
import math
import os
import random
import time
from types import SimpleNamespace

import pytest

from rlx.metrics import MetricLogger
from rlx.plot import main as plot_main
from rlx.plot import read_metrics, with_total_tokens


def logging_cfg(**overrides):
    cfg = dict(console=False, progress_bar=False, jsonl=True, wandb=False, wandb_project="rlx-test",
               wandb_mode="offline", tensorboard=False)
    return SimpleNamespace(**{**cfg, **overrides})


def test_jsonl_has_one_object_per_step_with_nan_as_null(tmp_path):
    with MetricLogger(str(tmp_path / "run"), logging_cfg()) as logger:
        logger.log({"reward/mean": 0.5, "reward/acc": 1, "loss": math.nan, "x": math.inf, "tag": "a", "obj": object()}, step=1)
        logger.log({"reward/mean": 0.75}, step=2)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "reward/mean": 0.5, "reward/acc": 1.0, "loss": None, "x": None, "tag": "a"},
        {"step": 2, "reward/mean": 0.75},
    ]


def test_only_rank_zero_writes(tmp_path):
    logger = MetricLogger(str(tmp_path / "run"), logging_cfg(console=True), rank=1)
    logger.log({"reward/mean": 1.0}, step=1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_console_prints_a_plain_line_per_step_when_not_a_tty(tmp_path, capsys):
    logger = MetricLogger(str(tmp_path), logging_cfg(console=True, progress_bar=True, jsonl=False), total_steps=10)
    logger.log({"reward/mean": 0.25, "reward/acc": 0.5}, step=1)
    logger._last_time -= 2.0  # pretend the step took 2 s
    logger.log({"reward/mean": 0.5, "reward/acc": 0.75}, step=2)
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 1/10 | reward 0.250 | acc 0.500"
    assert lines[1].startswith("step 2/10 | reward 0.500 | acc 0.750 | 2.0 s/step | ETA 0m1")  # 8 x 2 s


def test_wandb_offline_run_is_written_under_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    logger = MetricLogger(str(run_dir), logging_cfg(wandb=True), config_dict={"sampler": {"type": "fixed"}})
    for step in range(1, 4):
        logger.log({"reward/mean": step / 4, "reward/acc": step / 4}, step=step)
    logger.close()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")  # offline: config and history live in this binary log
    # wandb's service process may still be flushing the log when finish() returns (seen on a
    # loaded machine): wait for it, boundedly.
    deadline = time.monotonic() + 30
    while not (b"sampler" in (data := log.read_bytes()) and b"reward/mean" in data) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"sampler" in data and b"reward/mean" in data


def write_run(run_dir, steps, slope, tokens_key):
    rng = random.Random(slope)
    logger = MetricLogger(str(run_dir), logging_cfg())
    total = 0
    for step in range(1, steps + 1):
        generated = 1000 + rng.randint(0, 500)
        total += generated
        m = {"reward/mean": min(1.0, slope * step + rng.random() * 0.05), "reward/acc": slope * step,
             "response/length_mean": 20 + step}
        m.update({"perf/total_generated_tokens": total} if tokens_key == "total" else {"sampler/num_response_tokens": generated})
        if step % 5 == 0:
            m["val/acc"] = slope * step
        logger.log(m, step=step)
    logger.close()


def test_plot_writes_pngs_for_two_runs(tmp_path, capsys):
    write_run(tmp_path / "fixed_n8", 20, 0.02, "total")
    write_run(tmp_path / "adaptive", 20, 0.04, "per_step")
    out = tmp_path / "plots"
    assert plot_main([str(tmp_path / "fixed_n8"), str(tmp_path / "adaptive"), "--out", str(out)]) == 0
    names = {"reward.png", "accuracy.png", "response_length.png", "reward_vs_tokens.png", "val_acc_vs_tokens.png"}
    assert set(os.listdir(out)) == names
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokens = [r["perf/total_generated_tokens"] for r in with_total_tokens(read_metrics(str(tmp_path / "adaptive")))]
    assert tokens == sorted(tokens) and tokens[0] >= 1000  # cumulated from the per-step key


def test_plot_skips_figures_without_their_keys(tmp_path, capsys):
    logger = MetricLogger(str(tmp_path / "bare"), logging_cfg())
    logger.log({"reward/mean": 0.1}, step=1)
    logger.log({"reward/mean": 0.3}, step=1)  # a resumed run repeats a step: the last line wins
    logger.close()
    assert read_metrics(str(tmp_path / "bare")) == [{"step": 1, "reward/mean": 0.3}]
    assert plot_main([str(tmp_path / "bare")]) == 0
    assert os.listdir(tmp_path / "bare" / "plots") == ["reward.png"]
    out = capsys.readouterr().out
    assert "skipped accuracy.png: no run has reward/acc or val/acc" in out
    assert "skipped reward_vs_tokens.png" in out
