"""Checkpoint integrity and safety: the manifest is written before COMPLETE and verified on load,
`resume = "auto"` falls back past damaged checkpoints (bit flip, truncation, NaN, malformed
trainer_state.json, missing rng/), and crafted pickles in DCP metadata or values never run."""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from rlx.checkpoint import COMPLETE, Checkpointer, load_model_weights
from rlx.checkpoint_manifest import MANIFEST, SafeLoadPlanner, load_dcp_metadata, verify_files
from rlx.errors import CheckpointError, UserError
from rlx.models import from_pretrained
from rlx.models.tiny import make_tiny
from tests.unit.test_checkpoint import Run, ckpt_cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(model dir, checkpoint root with step-2 and step-4, the step-4 weights)."""
    root = tmp_path_factory.mktemp("ck")
    model_dir = make_tiny(root / "m", "qwen3", hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                          head_dim=32, intermediate_size=32, vocab_size=320, tie=False)  # fmt: skip
    run = Run(model_dir, ckpt_cfg(root / "ckpt"))
    for step in range(4):
        run.step(step)
        if step + 1 in (2, 4):
            run.ckpt.save(step + 1, data_state={"at": step + 1})
    return model_dir, root / "ckpt", {k: v.clone() for k, v in run.model.state_dict().items()}


@pytest.fixture
def ckpts(saved, tmp_path) -> Path:
    """A private copy of the saved checkpoints, to damage."""
    return Path(shutil.copytree(saved[1], tmp_path / "ckpt"))


def fresh(saved, ckpts: Path, **kw) -> Checkpointer:
    return Run(saved[0], ckpt_cfg(ckpts, **kw)).ckpt


def shard(ckpt: Path) -> Path:
    return next(ckpt.glob("*.distcp"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_and_verifies(ckpts):
    step4 = ckpts / "step-4"
    files = json.loads((step4 / MANIFEST).read_text())["files"]
    assert {".metadata", "trainer_state.json", "rng/rank-00000.pt", "hf/config.json", shard(step4).name} <= set(files)
    assert COMPLETE not in files and all(len(e["sha256"]) == 64 for e in files.values())
    assert verify_files(step4) is True


@pytest.mark.parametrize("damage", ["bit_flip", "truncate", "truncate_no_manifest", "nan_weights",
                                    "bad_state_json", "no_rng", "bad_manifest"])  # fmt: skip
def test_auto_resume_falls_back_past_a_damaged_checkpoint(saved, ckpts, damage, caplog):
    step4 = ckpts / "step-4"
    if damage == "bit_flip":  # inside the tensor data, not the header
        flip_byte(shard(step4), shard(step4).stat().st_size // 2)
    elif damage.startswith("truncate"):
        if damage == "truncate_no_manifest":  # DCP's own read fails: still one CheckpointError
            (step4 / MANIFEST).unlink()
        data = shard(step4).read_bytes()
        shard(step4).write_bytes(data[: len(data) // 3])
    elif damage == "nan_weights":  # a diverged run: the files match their manifest, the values do not
        _save_nan_checkpoint(saved, ckpts)
    elif damage == "bad_state_json":
        (step4 / MANIFEST).unlink()  # an older checkpoint without a manifest: the parse itself must fail well
        (step4 / "trainer_state.json").write_text('{"step": 4, "data": ')
    elif damage == "no_rng":
        (step4 / MANIFEST).unlink()
        shutil.rmtree(step4 / "rng")
    elif damage == "bad_manifest":
        (step4 / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        fresh(saved, ckpts, resume=str(step4)).maybe_resume()  # a named checkpoint: its problem is the error
    assert "\n" not in str(e.value) and "step-4" in str(e.value)

    with caplog.at_level(logging.WARNING, logger="rlx.checkpoint"):
        state = fresh(saved, ckpts).maybe_resume()
    assert state.step == 2 and state.data == {"at": 2}
    assert len(state.skipped) == 1 and state.skipped[0].startswith("step-4: ")
    assert any("skipping checkpoint" in r.getMessage() and "step-4" in r.getMessage() for r in caplog.records)
    assert (ckpts / "step-4.damaged").is_dir() and not step4.exists()  # set aside, not deleted, not resumed again
    assert fresh(saved, ckpts).maybe_resume().skipped == []


def _save_nan_checkpoint(saved, ckpts: Path) -> None:
    run = Run(saved[0], ckpt_cfg(ckpts))
    with torch.no_grad():
        run.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    run.ckpt.save(4)


def test_messages_name_the_problem(saved, ckpts):
    step4 = ckpts / "step-4"
    flip_byte(shard(step4), shard(step4).stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp changed since it was saved \(sha256 mismatch"):
        verify_files(step4)
    shard(step4).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"has 1 bytes, \d+ when saved \(truncated"):
        verify_files(step4)
    (step4 / MANIFEST).unlink()
    (step4 / "trainer_state.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: holds a list, not an object"):
        fresh(saved, ckpts).load(step4)


def test_every_checkpoint_damaged_is_one_error_listing_why(saved, ckpts):
    for step in (2, 4):
        flip_byte(ckpts / f"step-{step}" / ".metadata", 40)
    with pytest.raises(CheckpointError) as e:
        fresh(saved, ckpts).maybe_resume()
    message = str(e.value)
    assert message.startswith(f"no checkpoint in {ckpts} can be loaded (step-4: ")
    assert "step-2: " in message and 'checkpoint.resume = "none"' in message and "\n" not in message
    assert (ckpts / "step-4").is_dir()  # nothing is moved when nothing could be loaded


def test_legacy_checkpoint_without_manifest_loads_with_a_warning(saved, ckpts, caplog):
    (ckpts / "step-4" / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="rlx.checkpoint"):
        state = fresh(saved, ckpts).maybe_resume()
    assert state.step == 4 and any("no MANIFEST.json" in r.getMessage() for r in caplog.records)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_metadata_pickle_is_refused_without_running(saved, ckpts, tmp_path):
    step4, marker = ckpts / "step-4", tmp_path / "pwned"
    (step4 / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    (step4 / MANIFEST).unlink()  # an attacker rewrites the manifest too: the unpickler is the defence
    for load in (lambda: load_dcp_metadata(step4), lambda: fresh(saved, ckpts).load(step4),
                 lambda: load_model_weights(step4, from_pretrained(saved[0]))):  # fmt: skip
        with pytest.raises(CheckpointError, match=r"refusing to load 'pathlib.Path.touch'|refusing to load 'pathlib"):
            load()
    assert not marker.exists()


def test_crafted_value_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    planner = SafeLoadPlanner()
    item = type("Item", (), {"dest_index": type("I", (), {"fqn": "optim.param_groups.x.lr"})()})()
    buffer = io.BytesIO()
    torch.save(_RunsCode(marker), buffer)
    buffer.seek(0)
    with pytest.raises(CheckpointError, match="optim.param_groups.x.lr.*refused to unpickle"):
        planner.load_bytes(item, buffer)
    assert not marker.exists()


def test_weights_only_load_and_export_refuse_nan(saved, ckpts, tmp_path):
    from rlx.checkpoint import export_checkpoint

    _save_nan_checkpoint(saved, ckpts)
    with pytest.raises(CheckpointError, match=r"NaN/inf values in model.model.layers.0.mlp.up_proj.weight"):
        load_model_weights(ckpts / "step-4", from_pretrained(saved[0]))
    with pytest.raises(CheckpointError, match="NaN/inf"):
        export_checkpoint(ckpts / "step-4", tmp_path / "hf")
    model = from_pretrained(saved[0])
    load_model_weights(ckpts / "step-2", model)  # the good one loads
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_export_to_an_unwritable_directory_fails_before_loading(ckpts, tmp_path):
    from rlx.checkpoint import export_checkpoint

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"the export directory '.*a_file/out' is not a writable directory"):
        export_checkpoint(ckpts / "step-4", blocker / "out")
