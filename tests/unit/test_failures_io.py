"""Damaged model directories and tokenizers fail as one-line UserErrors (never a traceback from
safetensors or transformers), a tokenizer that does not fit the model is refused, and a
single-process run listens on loopback only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlx.errors import UserError
from rlx.models import from_pretrained, load_tokenizer
from rlx.models.hf_io import read_hf_config
from rlx.models.tiny import make_tiny
from rlx.models.tokenizer import check_tokenizer_fits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("m"), "qwen3", hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                     head_dim=32, intermediate_size=32, vocab_size=128, tie=True, char_level=True)  # fmt: skip


@pytest.fixture
def copy(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "m"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_one_line(copy, damage):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(UserError, match=r"model.safetensors is not a valid safetensors file \(.*\): it is truncated"):
        from_pretrained(copy)


def test_damaged_shard_index_and_config(copy):
    (copy / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(UserError, match="model.safetensors.index.json is damaged"):
        from_pretrained(copy)
    (copy / "config.json").write_text("[]")
    with pytest.raises(UserError, match="config.json holds a list, not a JSON object"):
        read_hf_config(copy)


def test_empty_model_path_names_the_key():
    with pytest.raises(UserError, match=r"^no model directory given \(an empty path\): set model.path"):
        read_hf_config("")


def test_damaged_tokenizer_is_one_line(copy):
    (copy / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(UserError, match=r"the tokenizer in .* does not load") as e:
        load_tokenizer(copy)
    assert "\n" not in str(e.value)


def test_tokenizer_must_fit_the_model(model_dir, caplog):
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(tokenizer, 128, tokenizer_dir=model_dir, model_dir=model_dir)  # fits
    with pytest.raises(UserError, match=rf"has {len(tokenizer)} tokens but the model m has vocab_size=10: .*model.tokenizer_path"):
        check_tokenizer_fits(tokenizer, 10, tokenizer_dir=model_dir, model_dir="m")
    other = load_tokenizer(model_dir)
    other.add_tokens(["<extra_a>", "<extra_b>"])
    with caplog.at_level("WARNING", logger="rlx.models.tokenizer"):
        check_tokenizer_fits(tokenizer, 128, model_tokenizer=other)  # fits, same ids: silent
        assert not caplog.records
        check_tokenizer_fits(other, 128, model_tokenizer=tokenizer)
    assert "maps 2 of its" in caplog.records[0].getMessage()


LISTENERS = textwrap.dedent(
    """
    import os, psutil, torch, torch.distributed as dist
    from rlx.distributed import init_distributed
    init_distributed("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.all_reduce(t, group=dist.new_group(backend="gloo"))  # what async checkpoints add
    print([c.laddr.ip for c in psutil.net_connections(kind="inet") if c.pid == os.getpid() and c.status == "LISTEN"])
    """
)


def test_single_process_world_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "GLOO_SOCKET_IFNAME")}  # fmt: skip
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", LISTENERS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    addresses = json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert addresses and all(a in ("127.0.0.1", "::1") for a in addresses), addresses
