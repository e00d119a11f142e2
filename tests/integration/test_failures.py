"""The failure matrix: bad inputs to `rlx train` and `rlx export` (config, model directory, tokenizer,
data, reward, sampler, checkpoint, output directory), each a fixture and one parametrized case.

Each case must end with exit status 2, exactly one stderr line starting `rlx: error:` (the last
line), no traceback, and no process left behind. Every case fails before a model or an engine is
built, so the whole matrix runs in ONE driver process that calls the CLI's `main` per case with
stderr redirected (seconds, not one interpreter start per case); a few cases also run as real
`rlx` subprocesses to check the process exit status end to end.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.integration.conftest import TINY_PROMPTS, train_env, write_records

# Train cases fail in rlx.preflight.check_run_inputs, which rl_setup.build_stages calls first. Until
# it does, the driver runs those cases through the config loader and check_run_inputs directly.


# ---- processes left behind (Linux /proc) -----------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid`: everything a command started with start_new_session=True
    started in turn, even after they were orphaned."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(entry))
    return sorted(found)


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait until none of `pids` is alive; return those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


# ---- fixtures: one directory of bad inputs ---------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import json, os, sys, time, traceback
    from rlx.cli import main
    from rlx.lifecycle import descendants


    cases = json.load(open(sys.argv[1]))
    results = {}
    before = descendants(os.getpid())
    for case in cases:
        sys.path[:0] = case["sys_path"]
        err = open(case["stderr"], "w")
        os.dup2(err.fileno(), 2)
        try:
            status = main(case["argv"])
        except BaseException:
            traceback.print_exc()
            status = "raised"
        sys.stderr.flush()
        for _ in range(50):  # a short-lived helper (ldconfig, a compiler probe) may still be exiting
            left = sorted(descendants(os.getpid()) - before)
            if not left:
                break
            time.sleep(0.1)
        results[case["id"]] = {"status": status, "left": left}
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


class _Crafted:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rlx-pwned-by-checkpoint",))


def _save_checkpoint(model_dir: Path, root: Path, nan: bool = False) -> Path:
    """A real one-process DCP checkpoint of `model_dir` (step-1), as the trainer writes it."""
    import torch

    from rlx.checkpoint import Checkpointer
    from rlx.models import from_pretrained

    model = from_pretrained(model_dir)
    if nan:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    cfg = SimpleNamespace(enable=True, interval=1, keep_last=0, async_save=False, dir=str(root), resume="auto",
                          init_from="")  # fmt: skip
    return Checkpointer(cfg, model=model, hf_dir=model_dir).save(1)


@pytest.fixture(scope="module")
def bad(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """Every bad input of the matrix, next to good ones."""
    from rlx.checkpoint_manifest import MANIFEST
    from rlx.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("bad")
    model = tiny_model("qwen3")
    good = [{"prompt": q, "answer": a} for q, a in TINY_PROMPTS]
    data = SimpleNamespace(
        good=write_records(good, root / "good.jsonl"),
        empty_prompt=write_records(good[:3] + [{"prompt": "", "answer": "0"}] + good[3:], root / "empty.jsonl"),
        missing_key=write_records(good[:2] + [{"question": "1+1=", "answer": "2"}], root / "missing_key.jsonl"),
        small=write_records(good[:3], root / "small.jsonl"),
    )
    data.latin1 = root / "latin1.jsonl"
    data.latin1.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    data.bad_json = root / "bad_json.jsonl"
    data.bad_json.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')

    def cut(path: Path, keep: float) -> None:
        blob = path.read_bytes()
        path.write_bytes(blob[: int(len(blob) * keep)])

    models = SimpleNamespace(
        truncated=_damaged_copy(model, root / "m_trunc", lambda d: cut(d / "model.safetensors", 0.5)),
        garbage=_damaged_copy(model, root / "m_garbage", lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096))),
        bpe_tokenizer=make_tiny(root / "m_bpe", "qwen3", hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                                head_dim=32, intermediate_size=32),  # 512 tokens > the char model's vocab  # fmt: skip
    )
    reward = root / "reward"
    reward.mkdir()
    (reward / "broken_reward.py").write_text("def score(response, ground_truth):\n    return 1.0 +\n")
    blocker = root / "a_file"
    blocker.write_text("")

    ckpt = _save_checkpoint(model, root / "ckpt")
    bad_ckpt = root / "bad_ckpt"

    def corrupt(name: str, damage) -> Path:
        return _damaged_copy(ckpt, bad_ckpt / name / "step-1", damage)

    def flip(d: Path) -> None:
        shard = next(d.glob("*.distcp"))
        blob = bytearray(shard.read_bytes())
        blob[len(blob) // 2] ^= 0x40
        shard.write_bytes(bytes(blob))

    def no_manifest(d: Path) -> None:
        (d / MANIFEST).unlink()

    ckpts = SimpleNamespace(
        good=ckpt,
        bit_flip=corrupt("bit_flip", flip),
        truncated=corrupt("truncated", lambda d: cut(next(d.glob("*.distcp")), 0.3)),
        crafted=corrupt("crafted", lambda d: (no_manifest(d), (d / ".metadata").write_bytes(pickle.dumps(_Crafted())))),
        bad_state=corrupt("bad_state", lambda d: (no_manifest(d), (d / "trainer_state.json").write_text('{"step": '))),
        no_rng=corrupt("no_rng", lambda d: (no_manifest(d), shutil.rmtree(d / "rng"))),
        nan=_save_checkpoint(model, bad_ckpt / "nan", nan=True),
    )
    return SimpleNamespace(root=root, model=model, data=data, models=models, reward=reward, blocker=blocker,
                           ckpts=ckpts)  # fmt: skip


def train_argv(b: SimpleNamespace, *extra: str, data: Path | None = None) -> list[str]:
    return ["train", f"--model.path={b.model}", f"--data.train_files={json.dumps([str(data or b.data.good)])}",
            f"--job.output_dir={b.root / 'runs'}", "--job.name=matrix", "--train.steps=2", "--data.train_batch_size=4",
            "--generator.n=2", "--reward.fn=qs_reward:score", "--reward.backend=inline",
            "--logging.progress_bar=false", *extra]  # fmt: skip


# id -> (argv from the fixtures, a fragment the error line must contain, needs the preflight wiring)
CASES = {
    "config_unknown_key": (lambda b: train_argv(b, "--train.stepz=3"), "stepz"),
    "config_bad_value": (lambda b: train_argv(b, "--train.steps=many"), "steps"),
    "model_path_empty": (lambda b: train_argv(b, "--model.path="), "no model directory given"),
    "model_path_missing": (lambda b: train_argv(b, f"--model.path={b.root / 'nope'}"), "not an HF model directory"),
    "safetensors_truncated": (lambda b: train_argv(b, f"--model.path={b.models.truncated}"), "not a valid safetensors file"),
    "safetensors_garbage": (lambda b: train_argv(b, f"--model.path={b.models.garbage}"), "not a valid safetensors file"),
    "tokenizer_too_big": (lambda b: train_argv(b, f"--model.tokenizer_path={b.models.bpe_tokenizer}"), "do not fit its embedding"),
    "data_empty_prompt": (lambda b: train_argv(b, data=b.data.empty_prompt), "empty.jsonl line 4: 'prompt' is empty"),
    "data_non_utf8": (lambda b: train_argv(b, data=b.data.latin1), "latin1.jsonl line 2: not valid UTF-8"),
    "data_bad_json": (lambda b: train_argv(b, data=b.data.bad_json), "bad_json.jsonl line 2: invalid JSON"),
    "data_missing_key": (lambda b: train_argv(b, data=b.data.missing_key), "missing_key.jsonl line 3: no key 'prompt'"),
    "data_smaller_than_batch": (lambda b: train_argv(b, data=b.data.small), "data.train_batch_size=4 is larger"),
    "data_missing_file": (lambda b: train_argv(b, data=b.root / "nope.jsonl"), "does not exist"),
    "output_dir_unwritable": (lambda b: train_argv(b, f"--job.output_dir={b.blocker / 'runs'}"), "job.output_dir"),
    "reward_missing_module": (lambda b: train_argv(b, "--reward.fn=no_such_rlx_module:score"), "cannot import module"),
    "reward_syntax_error": (lambda b: train_argv(b, "--reward.fn=broken_reward:score"), "broken_reward.py:2"),
    "sampler_bad_import": (lambda b: train_argv(b, "--sampler.type=no_such_rlx_module:Sampler"), "sampler.type"),
    "sampler_filtered_n1": (lambda b: train_argv(b, "--sampler.type=filtered", "--generator.n=1"), "n"),
    "resume_missing": (lambda b: train_argv(b, f"--checkpoint.resume={b.root / 'nope'}"), "checkpoint.resume"),
    "resume_bad_state": (lambda b: train_argv(b, f"--checkpoint.resume={b.ckpts.bad_state}"), "trainer_state.json is not valid JSON"),
    "resume_no_rng": (lambda b: train_argv(b, f"--checkpoint.resume={b.ckpts.no_rng}"), "has no rng/rank-00000.pt"),
    "resume_crafted_pickle": (lambda b: train_argv(b, f"--checkpoint.resume={b.ckpts.crafted}"), "refusing to load 'posix.system'"),
    "export_bit_flip": (lambda b: ["export", str(b.ckpts.bit_flip), str(b.root / "out_a")], "changed since it was saved"),
    "export_truncated": (lambda b: ["export", str(b.ckpts.truncated), str(b.root / "out_b")], "truncated"),
    "export_crafted_pickle": (lambda b: ["export", str(b.ckpts.crafted), str(b.root / "out_c")], "refusing to load 'posix.system'"),
    "export_nan": (lambda b: ["export", str(b.ckpts.nan), str(b.root / "out_d")], "NaN/inf values"),
    "export_unwritable": (lambda b: ["export", str(b.ckpts.good), str(b.blocker / "out")], "not a writable directory"),
    "export_not_a_checkpoint": (lambda b: ["export", str(b.model), str(b.root / "out_e")], "no complete checkpoint"),
}  # fmt: skip
# Also run as real `python -m rlx.cli` subprocesses: the exit status of the process itself.
SUBPROCESS_CASES = ("config_unknown_key", "data_empty_prompt", "export_crafted_pickle")


@pytest.fixture(scope="module")
def matrix(bad, parity_reward_dir, tmp_path_factory) -> dict:
    """Runs every case in one driver process; id -> {status, left, stderr}."""
    work = tmp_path_factory.mktemp("matrix")
    cases = [{"id": cid, "argv": [str(a) for a in argv(bad)], "stderr": str(work / f"{cid}.err"),
              "sys_path": [str(parity_reward_dir), str(bad.reward)]}
             for cid, (argv, _) in CASES.items()]  # fmt: skip
    (work / "cases.json").write_text(json.dumps(cases))
    (work / "driver.py").write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(work / "driver.py"), str(work / "cases.json"), str(work / "out.json")],
                          env=train_env(parity_reward_dir, bad.reward), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "out.json").read_text())
    for cid, result in results.items():
        result["stderr"] = (work / f"{cid}.err").read_text()
    return results


def assert_one_error_line(stderr: str, fragment: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("rlx: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(matrix, case):
    _, fragment = CASES[case]
    result = matrix[case]
    assert result["status"] == 2, result["stderr"][-3000:]
    assert_one_error_line(result["stderr"], fragment)
    assert result["left"] == [], f"processes left behind: {result['left']}"
    assert not Path("/tmp/rlx-pwned-by-checkpoint").exists()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_as_a_real_process(bad, parity_reward_dir, case):
    argv, fragment = CASES[case]
    proc = subprocess.Popen([sys.executable, "-m", "rlx.cli", *map(str, argv(bad))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=train_env(parity_reward_dir, bad.reward),
                            start_new_session=True)  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert_one_error_line(stderr, fragment)
    # With start_new_session the run's pid is its session id: nothing of that session may remain.
    assert wait_gone(session_processes(proc.pid), 5.0) == []
