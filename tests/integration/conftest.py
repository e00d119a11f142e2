"""Shared fixtures for the integration tests: tiny models per architecture (made once per session),
tiny prompt datasets in the formats the TOMLs read, and a reward with variance for tiny models.

The tiny models are random and char-level; they almost never solve a task, so tests that need a
mix of rewards (the filtered sampler keeps only groups whose reward varies, the adaptive sampler
stops at a positive) score with `parity_reward` instead of the task's reward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Environment for subprocesses that run the trainer: in-process vLLM engine (FINDINGS.md), one
# OpenMP thread per process (2 shared cores), quiet warnings.
TRAIN_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    "WANDB_MODE": "disabled",
}

# Addition prompts: the tiny char-level tokenizer spells them, so every prompt is ~20 tokens.
TINY_PROMPTS = [(f"{a}+{b}=", str(a + b)) for a, b in [(12, 34), (7, 8), (20, 22), (3, 4), (15, 15), (9, 1),
                                                         (40, 2), (11, 11)]]  # fmt: skip

PARITY_REWARD = '''\
"""Test reward with variance for random tiny models: 1 for an even response length, else 0."""


def score(response, ground_truth, **kwargs):
    value = 1.0 if len(response) % 2 == 0 else 0.0
    return {"score": value, "acc": value}
'''


# What torchrun (or an in-process init_distributed) puts in the environment; never passed to a new launch.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RLX_ROLE")


def train_env(*pythonpath: str | Path) -> dict[str, str]:
    """os.environ plus TRAIN_ENV, with the repo and `pythonpath` entries on PYTHONPATH, without the
    launcher's variables (RANK, MASTER_PORT, ...) that an in-process test's init_distributed leaves
    in os.environ: each run is a fresh launch (a stale RANK would send it to a TCP rendezvous)."""
    paths = [str(p) for p in pythonpath] + [str(REPO)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, **TRAIN_ENV, "PYTHONPATH": os.pathsep.join(paths)}



@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch)` -> directory of a tiny random char-level HF model (llama, qwen2, qwen3),
    made once per session per architecture (hidden 128, 2 layers, head_dim 32, tied embeddings)."""
    from rlx.models.tiny import make_tiny

    made: dict[str, Path] = {}

    def get(arch: str = "qwen3") -> Path:
        if arch not in made:
            made[arch] = make_tiny(tmp_path_factory.mktemp(f"tiny_{arch}"), arch=arch, char_level=True)
        return made[arch]

    return get


def _nested(key: str, value) -> dict:
    """'reward_model.ground_truth', v -> {'reward_model': {'ground_truth': v}}."""
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _merge(into: dict, other: dict) -> dict:
    for k, v in other.items():
        into[k] = _merge(into.get(k, {}), v) if isinstance(v, dict) and isinstance(into.get(k), dict) else v
    return into


def tiny_records(prompt_key: str = "prompt", answer_key: str = "answer", chat: bool = True) -> list[dict]:
    """TINY_PROMPTS as records with the given (dotted) keys; the prompt is chat messages when `chat`,
    like verl's parquet files, else a plain string."""
    records = []
    for question, answer in TINY_PROMPTS:
        prompt = [{"role": "user", "content": question}] if chat else question
        record = _merge(_nested(prompt_key, prompt), _nested(answer_key, answer))
        records.append(_merge(record, {"data_source": "tiny_addition"}))
    return records


def write_records(records: list[dict], path: Path) -> Path:
    """Write records as .jsonl or .parquet (by the suffix of `path`); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory) -> Path:
    """The addition prompts as JSONL `{"prompt": "12+34=", "answer": "46"}` (quickstart format)."""
    return write_records(tiny_records(chat=False), tmp_path_factory.mktemp("data") / "tiny.jsonl")


@pytest.fixture(scope="session")
def parity_reward_dir(tmp_path_factory) -> Path:
    """A directory to put on PYTHONPATH holding `qs_reward.py`; use `reward.fn="qs_reward:score"`."""
    out = tmp_path_factory.mktemp("reward")
    (out / "qs_reward.py").write_text(PARITY_REWARD)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl (fail if it is missing)."""
    path = run_dir / "metrics.jsonl"
    listing = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else "no run dir"
    assert path.exists(), f"no metrics.jsonl in {run_dir}: {listing}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

