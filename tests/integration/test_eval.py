"""`rlx eval` end to end with a tiny char-level model and the real vLLM engine (CPU).

One DCP checkpoint is written the way `rlx train` writes them (Checkpointer, weights moved far from
model.path) and exported with `rlx export`. Two evals: the export (an HF directory given as
--checkpoint, one process) and the DCP checkpoint (given as its run directory, torchrun with two
ranks). Requests are seeded per prompt, so both must produce the same samples, which proves the DCP
weights reached the engines and that sharding the prompts over ranks changes nothing. The first
eval's JSON line is checked against metrics recomputed from its samples.jsonl. The user-error tests
stop before any engine is built.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_PROMPTS, train_env

N = 4  # samples per prompt
STEP = 3  # the step the fake training run saved at
SUMMARY_KEYS = {"num_prompts", "num_samples", "n", "reward_mean", "acc", "pass@1", "pass@2", "pass@4", "mean@4",
                "response_length_mean", "clip_ratio", "dropped_prompts", "temperature", "model", "checkpoint", "step",
                "split", "files", "samples", "seconds"}  # fmt: skip
SAMPLE_KEYS = {"uid", "sample", "prompt", "response", "answer", "reward", "acc", "finish_reason", "response_tokens"}

CONFIG = """\
[job]
name = "tiny-eval"
output_dir = "{runs}"

[model]
path = "{model}"

[data]
val_files = ["{data}"]
max_prompt_length = 32
val_batch_size = 3   # 8 prompts -> 3 batches, 3 progress lines

[generator]
max_tokens = 8
val_n = {n}
val_temperature = 1.0
kv_cache_space_gib = 0.25

[reward]
fn = "qs_reward:score"   # parity reward: a mix of correct and wrong samples from a random model
backend = "inline"
"""


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_jsonl, tmp_path_factory) -> dict[str, Path]:
    """A TOML config, a complete DCP checkpoint step-3 under <runs>/trained/checkpoints, and its
    `rlx export` HF directory."""
    import torch

    from rlx.checkpoint import Checkpointer, export_checkpoint
    from rlx.config import CheckpointConfig
    from rlx.models import from_pretrained

    root = tmp_path_factory.mktemp("eval")
    base = tiny_model("qwen3")
    model = from_pretrained(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # far from model.path: evaluating the base weights by mistake cannot match
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    trained = root / "runs" / "trained"
    Checkpointer(CheckpointConfig(), model=model, hf_dir=base, run_dir=trained).save(STEP, {"stream": {}})
    export = export_checkpoint(trained / "checkpoints", root / "exported")
    config = root / "eval.toml"
    config.write_text(CONFIG.format(runs=root / "runs", model=base, data=tiny_jsonl, n=N))
    return {"root": root, "config": config, "trained": trained, "export": export, "base": base}


def rlx_eval(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rlx.cli", "eval", *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def exported_eval(setup, parity_reward_dir) -> tuple[subprocess.CompletedProcess, Path]:
    out = setup["root"] / "exported_eval"
    proc = rlx_eval(f"--config={setup['config']}", "--checkpoint", str(setup["export"]), "--output-dir", str(out),
                    env=train_env(parity_reward_dir))  # fmt: skip
    return proc, out


@pytest.mark.slow
@pytest.mark.vllm
def test_eval_prints_one_summary_line_consistent_with_samples(setup, exported_eval, tiny_jsonl):
    from rlx.trainer.eval_metrics import pass_at_k

    proc, out = exported_eval
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]  # logs (ours and vLLM's) go to stderr
    summary = json.loads(lines[0])
    assert set(summary) == SUMMARY_KEYS
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (summary["num_prompts"], summary["num_samples"], summary["n"]) == (len(TINY_PROMPTS), len(TINY_PROMPTS) * N, N)
    assert summary["model"] == str(setup["export"]) and summary["checkpoint"] is None and summary["step"] is None
    assert (summary["split"], summary["files"], summary["temperature"]) == ("val", [str(tiny_jsonl)], 1.0)
    assert summary["samples"] == str(out / "samples.jsonl") and summary["dropped_prompts"] == 0
    for b in (1, 2, 3):
        assert f"eval batch {b}/3" in proc.stderr

    samples = read_jsonl(out / "samples.jsonl")
    assert [(s["uid"], s["sample"]) for s in samples] == [(u, i) for u in range(len(TINY_PROMPTS)) for i in range(N)]
    for s in samples:
        assert set(s) == SAMPLE_KEYS
        question, answer = TINY_PROMPTS[s["uid"]]
        assert question in s["prompt"] and s["answer"] == answer
        # the parity reward scored the decoded response text written here
        assert s["reward"] == s["acc"] == float(len(s["response"]) % 2 == 0)
        assert 1 <= s["response_tokens"] <= 8 and s["finish_reason"] in ("stop", "length")

    correct = [sum(s["acc"] for s in samples if s["uid"] == u) for u in range(len(TINY_PROMPTS))]
    assert 0 < sum(correct) < len(samples), "the parity reward should give a mix of correct and wrong samples"
    assert summary["acc"] == pytest.approx(sum(correct) / len(samples))
    assert summary["reward_mean"] == pytest.approx(sum(s["reward"] for s in samples) / len(samples))
    assert summary["mean@4"] == pytest.approx(sum(c / N for c in correct) / len(correct))
    for k in (1, 2, 4):
        expected = sum(pass_at_k(N, int(c), k) for c in correct) / len(correct)
        assert summary[f"pass@{k}"] == pytest.approx(expected), k
    assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"]
    assert summary["response_length_mean"] == pytest.approx(sum(s["response_tokens"] for s in samples) / len(samples))
    assert summary["clip_ratio"] == pytest.approx(sum(s["finish_reason"] == "length" for s in samples) / len(samples))


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.distributed
def test_eval_of_dcp_checkpoint_under_torchrun_matches_its_hf_export(setup, exported_eval, parity_reward_dir):
    # Two ranks: the policy is FSDP-sharded over both, DCP reshards the checkpoint onto it, weight
    # sync gathers it into each rank's engine, each engine evaluates every other prompt, rank 0
    # gathers. Seeded requests make the samples independent of the world size. The run directory
    # resolves to its latest complete checkpoint; model.path (the base model) gives the architecture
    # and the engines' starting weights, which the checkpoint's replace.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlx.cli", "eval",
           f"--config={setup['config']}", f"--checkpoint={setup['trained']}"]  # fmt: skip
    proc = subprocess.run(cmd, env=train_env(parity_reward_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]  # rank 0 prints, other ranks stay quiet
    summary = json.loads(lines[0])
    assert summary["checkpoint"] == str(setup["trained"] / "checkpoints" / f"step-{STEP}")
    assert summary["step"] == STEP and summary["model"] == str(setup["base"])
    default_out = setup["root"] / "runs" / "tiny-eval" / "eval"  # <job.output_dir>/<job.name>/eval
    assert summary["samples"] == str(default_out / "samples.jsonl")

    reference = json.loads(exported_eval[0].stdout)
    for key in SUMMARY_KEYS - {"model", "checkpoint", "step", "samples", "seconds"}:
        if isinstance(reference[key], float):  # sums all-reduced in another order: last-bit differences
            assert summary[key] == pytest.approx(reference[key], rel=1e-12), key
        else:
            assert summary[key] == reference[key], key
    fields = lambda rows: [(r["uid"], r["sample"], r["response"], r["reward"]) for r in rows]  # noqa: E731
    assert fields(read_jsonl(default_out / "samples.jsonl")) == fields(read_jsonl(exported_eval[1] / "samples.jsonl"))


# ---- command line and user errors (no engine) ----------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from rlx.cli import main

    status = main(["eval", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_eval_help_lists_its_options(capsys):
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    for flag in ("--config", "--checkpoint", "--split", "--output-dir", "--help-config", "--section.key=value"):
        assert flag in out, flag


def test_eval_options_and_config_overrides_are_separated(tmp_path):
    from rlx.trainer.evaluate import parse_eval_args

    opts, cfg = parse_eval_args(["--checkpoint", "ckpt", "--checkpoint.dir", "ignored", "--split=train",
                                 "--data.val_files", '["a.jsonl"]', "--generator.val_n=4", "--output-dir", "out"])  # fmt: skip
    assert (opts.checkpoint, opts.split, opts.output_dir) == ("ckpt", "train", "out")
    assert (cfg.data.val_files, cfg.generator.val_n, cfg.checkpoint.dir) == (["a.jsonl"], 4, "ignored")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint={root}/nope"], "--checkpoint {root}/nope does not exist"),
        (["--checkpoint={root}"], "no complete checkpoint"),
        (["--checkpoint={root}/runs/trained", "--model.path="], "holds no HF weights to start the engine from"),
        (["--model.path={root}"], "is not an HF model directory"),
        (["--data.val_files=[]"], "data.val_files is empty"),
        (["--split=train"], "data.train_files is empty"),
        (["--data.val_files={root}/missing.jsonl"], "missing.jsonl does not exist"),
        (["--split=test"], "rlx eval: argument --split: invalid choice: 'test'"),
        (["--output-dir={root}/eval.toml/out"], "--output-dir '{root}/eval.toml/out' is not a writable directory"),
    ],
)
def test_eval_user_errors_are_one_line(setup, capsys, args, message):
    root = setup["root"]
    status, out, err = run_cli(capsys, f"--config={setup['config']}", *(a.format(root=root) for a in args))
    assert status == 2 and out == ""
    assert err.startswith("rlx: error: ") and err.count("\n") == 1, err
    assert message.format(root=root) in err
