"""DCP checkpoints in one process: exact resume (weights, optimizer, scheduler, RNG, data position),
atomicity (incomplete checkpoints are skipped), retention, async save, errors for a checkpoint of
another model, and `rlx export` to an HF directory that transformers loads with the same logits."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlx.checkpoint import COMPLETE, Checkpointer, export_main, latest_checkpoint, list_checkpoints, resolve_checkpoint
from rlx.errors import UserError
from rlx.models import from_pretrained
from rlx.models.tiny import make_tiny
from rlx.trainer.train_step import build_lr_scheduler, build_optimizer, make_generator, pack_micro_batches, train_step

OPTIM = SimpleNamespace(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, lr_schedule="cosine",
                        warmup_steps=2, min_lr_ratio=0.1)  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("m"), "qwen3", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=32, intermediate_size=64, vocab_size=320, tie=False)  # fmt: skip


def ckpt_cfg(path: Path, **kw) -> SimpleNamespace:
    base = dict(enable=True, interval=2, keep_last=0, async_save=False, dir=str(path), resume="auto", init_from="")
    return SimpleNamespace(**{**base, **kw})


class Run:
    """A tiny single-process trainer with everything a checkpoint must restore."""

    def __init__(self, model_dir: Path, cfg: SimpleNamespace):
        self.model = from_pretrained(model_dir)
        self.opt = build_optimizer(self.model, OPTIM)
        self.sched = build_lr_scheduler(self.opt, OPTIM, total_steps=8)
        self.gen = make_generator(0)
        self.ckpt = Checkpointer(cfg, model=self.model, optimizer=self.opt, scheduler=self.sched,
                                 generator=self.gen, hf_dir=model_dir)  # fmt: skip

    def step(self, step: int) -> tuple[float, float]:
        ids = torch.randint(0, 320, (24,), generator=make_generator(step)).tolist()
        mbs = pack_micro_batches([(ids, [0] * 4 + [1] * 20)], 64)
        loss = train_step(self.model, self.opt, self.sched, mbs, device=CPU, grad_clip=1.0)["loss"]
        return loss, torch.rand((), generator=self.gen).item()  # the trainer RNG moves on too


def test_resume_continues_exactly(model_dir, tmp_path):
    full = Run(model_dir, ckpt_cfg(tmp_path / "a"))
    expected = []
    for step in range(6):
        expected.append(full.step(step))
        if step + 1 == 3:
            full.ckpt.save(3, data_state={"epoch": 0, "offset": 3})
    resumed = Run(model_dir, ckpt_cfg(tmp_path / "a"))
    state = resumed.ckpt.maybe_resume()
    assert (state.step, state.data) == (3, {"epoch": 0, "offset": 3})
    assert resumed.opt.param_groups[0]["lr"] == pytest.approx(_lr_after(3))
    assert [resumed.step(s) for s in range(3, 6)] == expected[3:]
    assert (tmp_path / "a" / "step-3" / "hf" / "config.json").is_file()
    assert Run(model_dir, ckpt_cfg(tmp_path / "a", resume="none")).ckpt.maybe_resume() is None


def _lr_after(steps: int) -> float:
    from rlx.trainer.train_step import lr_factor

    return OPTIM.lr * lr_factor(steps, schedule="cosine", warmup_steps=2, total_steps=8, min_lr_ratio=0.1)


def test_incomplete_checkpoints_are_skipped_with_a_warning(model_dir, tmp_path):
    run = Run(model_dir, ckpt_cfg(tmp_path))
    run.step(0)
    run.ckpt.save(2)
    (tmp_path / "step-4.tmp").mkdir()  # a stale partial save: removed once a newer one completes
    run.ckpt.save(6)
    assert not (tmp_path / "step-4.tmp").exists()
    # A save killed mid-way leaves step-N.tmp; a step dir without COMPLETE is not trusted either.
    (tmp_path / "step-8.tmp").mkdir()
    (tmp_path / "step-8.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "step-6" / COMPLETE).unlink()
    with pytest.warns(UserWarning, match="incomplete checkpoint .*step-8.tmp") as record:
        assert latest_checkpoint(tmp_path) == tmp_path / "step-2"
    assert any("step-6 " in str(w.message) for w in record)
    with pytest.raises(UserError, match="incomplete"):
        resolve_checkpoint(tmp_path / "step-6")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Run(model_dir, ckpt_cfg(tmp_path)).ckpt.maybe_resume().step == 2


def test_keep_last_and_async_save(model_dir, tmp_path):
    run = Run(model_dir, ckpt_cfg(tmp_path, keep_last=2, async_save=True))
    for step in (2, 4, 6):
        run.step(step)
        run.ckpt.save(step)
    run.ckpt.close()  # finishes the pending async save
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_of_another_model_is_a_clear_error(model_dir, tmp_path):
    run = Run(model_dir, ckpt_cfg(tmp_path / "ckpt"))
    run.ckpt.save(1)
    other_dir = make_tiny(tmp_path / "other", "qwen3", hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1,
                          head_dim=32, intermediate_size=96, vocab_size=320, tie=False)  # fmt: skip
    other = Run(other_dir, ckpt_cfg(tmp_path / "ckpt"))
    with pytest.raises(UserError, match="different model") as e:
        other.ckpt.maybe_resume()
    message = str(e.value)
    assert "model.layers.2.mlp.up_proj.weight" in message  # missing from the checkpoint
    assert "model.layers.0.mlp.up_proj.weight [64, 32] (model has [96, 32])" in message


def test_export_loads_in_transformers_with_the_same_logits(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = Run(model_dir, ckpt_cfg(tmp_path / "ckpt"))
    for step in range(2):
        run.step(step)
    run.ckpt.save(2)
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 16), generator=make_generator(9))
    with torch.no_grad():
        ours, theirs = run.model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    with pytest.raises(UserError, match="no complete checkpoint"):
        export_main([str(tmp_path / "hf"), str(tmp_path / "x")])
