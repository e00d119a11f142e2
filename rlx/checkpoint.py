"""Distributed checkpoints (DCP): save / resume / reshard the trainer's state, and `rlx export`
(checkpoint -> HF safetensors directory).

Layout of one checkpoint, <dir>/step-N/:
    .metadata, *.distcp     model and optimizer, sharded as trained (DCP reshards on load)
    trainer_state.json      step, the caller's data position, LR scheduler, world size
    rng/rank-R.pt           trainer generator + torch RNG states of rank R
    hf/                     config.json + tokenizer files of the model (what `rlx export` needs)
    MANIFEST.json           size + sha256 of every file above (checkpoint_manifest.py)
    COMPLETE                written last: a checkpoint counts only once it has this
A save writes step-N.tmp/ and renames it to step-N/ after every rank finished and COMPLETE is in.
A load verifies the manifest, reads DCP metadata without arbitrary unpickling, and refuses NaN/inf
values; `resume = "auto"` falls back to the newest checkpoint that passes, moving the others aside.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rlx import distributed
from rlx.checkpoint_manifest import agree, check_finite, load_dcp_metadata, safe_dcp_load, verify_files, write_manifest
from rlx.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
HF_SUBDIR = "hf"
CRITIC_HF_SUBDIR = "critic_hf"
# Files of an HF model directory that describe it without weights (copied into every checkpoint).
HF_META_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja",
)  # fmt: skip
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
DAMAGED_SUFFIX = ".damaged"
_MAX_NAMES = 10
# Optimizer state keyed by parameter name (not by param-group index), so a checkpoint loads into an
# optimizer whose groups differ (build_optimizer groups parameters by mesh, which depends on TP).
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class TrainState:
    """What a resumed run continues from."""

    step: int
    """Optimizer steps done when the checkpoint was saved."""
    data: dict[str, Any] = field(default_factory=dict)
    """The caller's data position, as given to save()."""
    path: Path | None = None
    skipped: list[str] = field(default_factory=list)
    """Newer checkpoints that `resume = "auto"` skipped, each "step-N: why" (log or count them)."""


# One process without a process group (tests, `rlx export`) is an intended DCP mode, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _no_dist() -> bool:
    """DCP without collectives when there is no process group (one process, e.g. tests)."""
    return not dist.is_initialized()


# ---- finding checkpoints -----------------------------------------------------------------------


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step}"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(root: str | os.PathLike, *, warn: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first. Incomplete ones (a save that was
    interrupted: step-N.tmp, or step-N without COMPLETE) are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        match, tmp = _STEP_DIR.match(entry.name), _TMP_DIR.match(entry.name)
        if match and is_complete(entry):
            found.append((int(match.group(1)), entry))
        elif (match or tmp) and warn:
            warnings.warn(f"skipping incomplete checkpoint {entry} (no {COMPLETE} marker: its save was interrupted)",
                          stacklevel=2)  # fmt: skip
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint given either as one step-N directory or as the directory that holds them."""
    path = Path(path)
    if is_complete(path):
        return path
    if _STEP_DIR.match(path.name) or _TMP_DIR.match(path.name):
        raise UserError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: its save was interrupted)")
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"no complete checkpoint (step-N/ with a {COMPLETE} marker) in {path}")
    return latest


# ---- model / optimizer state -------------------------------------------------------------------


def _model_shapes(model: nn.Module, key: str = "model") -> dict[str, tuple[int, ...]]:
    return {f"{key}.{k}": tuple(v.shape) for k, v in get_model_state_dict(model).items()}


def check_model_matches(path: str | os.PathLike, model: nn.Module, key: str = "model") -> None:
    """Raise a UserError naming the tensors whose names or shapes differ between `model` and the
    checkpoint at `path` under `key` ("model": the policy, "critic": the value model)."""
    meta = load_dcp_metadata(path).state_dict_metadata
    n = len(key) + 1
    saved = {k: tuple(v.size) for k, v in meta.items() if k.startswith(f"{key}.") and hasattr(v, "size")}
    if not saved and key == "critic":
        raise UserError(f"checkpoint {path} has no critic (it was saved by a run without "
                        "algorithm.adv_estimator = \"gae\"); to start a critic run from its policy, use "
                        f"checkpoint.init_from={path} with checkpoint.resume=none")  # fmt: skip
    expected = _model_shapes(model, key)
    missing = [k[n:] for k in expected if k not in saved]
    extra = [k[n:] for k in saved if k not in expected]
    wrong = [f"{k[n:]} {list(saved[k])} (model has {list(v)})" for k, v in expected.items()
             if k in saved and saved[k] != v]  # fmt: skip
    problems = []
    for label, items in (("missing from the checkpoint", missing), ("not in the model", extra),
                         ("with another shape", wrong)):  # fmt: skip
        if items:
            more = f", ... ({len(items) - _MAX_NAMES} more)" if len(items) > _MAX_NAMES else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_MAX_NAMES])}{more}")
    if problems:
        what = "model" if key == "model" else "value model"
        raise UserError(f"checkpoint {path} is from a different {what}: " + "; ".join(problems))


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Weights only, into a (possibly sharded) model: from an HF directory (config.json +
    safetensors) or from a DCP checkpoint (a step-N directory or a directory of them)."""
    from rlx.parallel import load_hf_weights_sharded

    path = Path(path)
    if (path / "config.json").is_file():
        load_hf_weights_sharded(model, path)
        return
    path = resolve_checkpoint(path)
    _warn_if_unverified(path, verify_files(path))
    check_model_matches(path, model)
    state = {"model": get_model_state_dict(model)}
    safe_dcp_load(state, path, no_dist=_no_dist())
    check_finite(state, path)
    set_model_state_dict(model, state["model"])


def _warn_if_unverified(path: Path, verified: bool) -> None:
    if not verified and distributed.is_main():
        logger.warning("checkpoint %s has no MANIFEST.json (saved by an older rlx): loading it without "
                       "verifying its files", path)  # fmt: skip


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, checked: a CheckpointError naming the file otherwise."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}: it is damaged") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): the checkpoint is damaged") from None
    problem = None
    if not isinstance(state, dict):
        problem = f"holds a {type(state).__name__}, not an object"
    elif not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
        problem = f"'step' must be a non-negative integer, got {state.get('step')!r}"
    elif not isinstance(state.get("data", {}), dict):
        problem = "'data' must be an object"
    elif not isinstance(state.get("scheduler"), (dict, type(None))):
        problem = "'scheduler' must be an object or null"
    if problem:
        raise CheckpointError(f"{file}: {problem}; the checkpoint is damaged")
    return state


# ---- the checkpointer --------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the trainer: model, optimizer, LR scheduler, RNGs, step, data position, and
    the critic (value model, its optimizer and LR scheduler) when there is one.

    `cfg` is a `CheckpointConfig`-like object (enable, interval, keep_last, async_save, dir,
    resume). `hf_dir` is the model's HF directory; its config and tokenizer files are copied into
    every checkpoint so that `rlx export` needs nothing else (the critic's config.json goes to
    `critic_hf/`, for `rlx export --critic`). `critic` is (value model, optimizer, scheduler), saved
    under the DCP keys "critic" and "critic_optim". Collective: every rank calls every method in the
    same order."""

    def __init__(
        self,
        cfg: Any,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        generator: torch.Generator | None = None,
        hf_dir: str | os.PathLike | None = None,
        run_dir: str | os.PathLike | None = None,
        critic: tuple[nn.Module, torch.optim.Optimizer, Any] | None = None,
    ):
        if not cfg.dir and run_dir is None:
            raise ValueError("Checkpointer needs cfg.dir or run_dir")
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.model, self.optimizer, self.scheduler, self.generator = model, optimizer, scheduler, generator
        self.hf_dir = Path(hf_dir) if hf_dir else None
        self.critic = critic
        self._pending: tuple[Future, Path, Path] | None = None
        # Async saves coordinate in a background thread: give them their own gloo group so they
        # never interleave with the training step's collectives.
        self._async_group = dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None

    def should_save(self, step: int, last_step: int) -> bool:
        return bool(self.cfg.enable) and (step % self.cfg.interval == 0 or step == last_step)

    # ---- save ----

    def save(self, step: int, data_state: dict[str, Any] | None = None) -> Path:
        """Save the state after `step` optimizer steps as <dir>/step-<step>. `data_state` must be
        JSON-serializable. With async_save the tensors are staged now and written in the
        background; the checkpoint becomes complete at the next save() or close()."""
        self.wait()
        final, tmp = step_dir(self.dir, step), self.dir / f"step-{step}.tmp"
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
            tmp.mkdir(parents=True)
        distributed.barrier()
        state = self._state()
        self._save_small_files(tmp, step, data_state or {})
        if self.cfg.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group, no_dist=_no_dist())
            self._pending = (future, tmp, final)
        else:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=_no_dist())
            self._finalize(tmp, final)
        return final

    def wait(self) -> None:
        """Finish a pending async save (collective)."""
        if self._pending is not None:
            future, tmp, final = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, final)

    def close(self) -> None:
        self.wait()

    def _save_small_files(self, tmp: Path, step: int, data_state: dict[str, Any]) -> None:
        rng = {"torch": torch.get_rng_state()}
        if self.generator is not None:
            rng["generator"] = self.generator.get_state()
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng, tmp / "rng" / f"rank-{distributed.rank():05d}.pt")
        if not distributed.is_main():
            return
        sched = self.scheduler.state_dict() if self.scheduler is not None else None
        trainer_state = {"step": step, "data": data_state, "scheduler": sched, "world_size": distributed.world_size()}
        if self.critic is not None:
            trainer_state["critic_scheduler"] = self.critic[2].state_dict()
            from rlx.models.value import value_hf_config

            (tmp / CRITIC_HF_SUBDIR).mkdir(exist_ok=True)
            config = value_hf_config(self.critic[0].args, str(next(self.critic[0].parameters()).dtype).removeprefix("torch."))
            (tmp / CRITIC_HF_SUBDIR / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            text = json.dumps(trainer_state, indent=2)
        except TypeError as e:
            raise TypeError(f"checkpoint data_state must be JSON-serializable: {e}") from e
        (tmp / STATE_FILE).write_text(text + "\n")
        if self.hf_dir is not None:
            (tmp / HF_SUBDIR).mkdir(exist_ok=True)
            for name in HF_META_FILES:
                if (self.hf_dir / name).is_file():
                    shutil.copy2(self.hf_dir / name, tmp / HF_SUBDIR / name)

    def _finalize(self, tmp: Path, final: Path) -> None:
        distributed.barrier()  # every rank's shards and RNG file are written
        write_manifest(tmp)  # collective: each rank hashes the files it wrote
        if distributed.is_main():
            (tmp / COMPLETE).write_text("")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune(int(_STEP_DIR.match(final.name).group(1)))
        distributed.barrier()

    def _prune(self, newest: int) -> None:
        """Keep the newest keep_last complete checkpoints; drop stale partial saves older than newest."""
        for entry in self.dir.iterdir():
            match = _TMP_DIR.match(entry.name)
            if match and int(match.group(1)) < newest:
                shutil.rmtree(entry, ignore_errors=True)
        if self.cfg.keep_last > 0:
            for _, path in list_checkpoints(self.dir, warn=False)[: -self.cfg.keep_last]:
                shutil.rmtree(path, ignore_errors=True)

    # ---- load ----

    def maybe_resume(self) -> TrainState | None:
        """Resume per cfg.resume: "auto" (the newest complete checkpoint in dir that verifies, if
        any), "none", or a checkpoint path (a step-N directory, or a directory of them: the newest
        that verifies). Returns None when starting fresh. Checkpoints that fail verification are
        skipped with a warning (and, under "auto", renamed step-N.damaged so that later resumes
        and pruning ignore them); when none verifies, a CheckpointError lists why."""
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            candidates, where = [p for _, p in reversed(list_checkpoints(self.dir))], self.dir
            if not candidates:
                return None
        else:
            where = Path(resume)
            if is_complete(where) or _STEP_DIR.match(where.name) or _TMP_DIR.match(where.name):
                return self.load(where)  # one named checkpoint: its problems are the error
            candidates = [p for _, p in reversed(list_checkpoints(where))]
            if not candidates:
                raise UserError(f"no complete checkpoint (step-N/ with a {COMPLETE} marker) in {where}")
        skipped = []
        for path in candidates:
            try:
                state = self.load(path)
            except CheckpointError as e:
                if distributed.is_main():
                    logger.warning("skipping checkpoint %s: %s", path, e)
                skipped.append((path, str(e)))
                continue
            state.skipped = [f"{p.name}: {why}" for p, why in skipped]
            if skipped and resume == "auto":
                self._set_aside([p for p, _ in skipped])
            return state
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"no checkpoint in {where} can be loaded ({reasons}); move the damaged ones away, or set "
                              "checkpoint.resume = \"none\" to start over")  # fmt: skip

    def _set_aside(self, paths: list[Path]) -> None:
        """Rename damaged checkpoints step-N -> step-N.damaged (kept for inspection, never pruned
        or resumed from, and no longer shadowing the checkpoints saved after the resume)."""
        if distributed.is_main():
            for path in paths:
                target = path.with_name(path.name + DAMAGED_SUFFIX)
                shutil.rmtree(target, ignore_errors=True)
                path.rename(target)
                logger.warning("moved damaged checkpoint %s to %s", path, target)
        distributed.barrier()

    def load(self, path: str | os.PathLike) -> TrainState:
        """Restore everything from checkpoint `path`, at any world size or mesh (DCP reshards).
        Verifies the manifest first and refuses NaN/inf weights or optimizer state: any problem is a
        CheckpointError, raised on every rank. Collective."""
        path = resolve_checkpoint(path)
        _warn_if_unverified(path, verify_files(path))
        trainer_state, rng, problem = None, None, None
        try:  # the small files, checked on every rank before any tensor is touched
            trainer_state = read_trainer_state(path)
            rng = _read_rng(path)
            check_model_matches(path, self.model)
            if self.critic is not None:
                check_model_matches(path, self.critic[0], "critic")
        except CheckpointError as e:
            problem = str(e)
        except UserError as e:  # another model: not a damaged checkpoint, but no use either
            problem = str(e)
        problem = agree(problem)
        if problem:
            raise CheckpointError(problem)
        state = self._state()
        safe_dcp_load(state, path, no_dist=_no_dist())
        check_finite(state, path)
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=_OPTIM_OPTIONS)
        _load_scheduler(self.scheduler, self.optimizer, trainer_state.get("scheduler"))
        if self.critic is not None:
            critic, critic_optim, critic_sched = self.critic
            set_model_state_dict(critic, state["critic"])
            set_optimizer_state_dict(critic, critic_optim, state["critic_optim"], options=_OPTIM_OPTIONS)
            _load_scheduler(critic_sched, critic_optim, trainer_state.get("critic_scheduler"))
        self._set_rng(rng)
        return TrainState(step=trainer_state["step"], data=trainer_state.get("data", {}), path=path)

    def _state(self) -> dict[str, Any]:
        """The DCP state of everything saved (sharded tensors; DCP reshards on load)."""
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIM_OPTIONS)
        if self.critic is not None:
            critic, critic_optim, _ = self.critic
            state["critic"] = get_model_state_dict(critic)
            state["critic_optim"] = get_optimizer_state_dict(critic, critic_optim, options=_OPTIM_OPTIONS)
        return state

    def _set_rng(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        if self.generator is not None and "generator" in rng:
            self.generator.set_state(rng["generator"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def _load_scheduler(scheduler, optimizer, saved: dict | None) -> None:
    """Restore an LR scheduler. base_lrs/_last_lr are per param group, and the grouping may differ at
    another mesh; the optimizer state already restored each group's current lr."""
    if scheduler is None or not saved:
        return
    scheduler.load_state_dict({k: v for k, v in saved.items() if k not in ("base_lrs", "_last_lr")})
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def check_checkpoint_files(path: str | os.PathLike) -> Path:
    """The small files of one checkpoint (trainer_state.json, rng/, DCP metadata), checked without
    reading tensors or hashing: lets a run fail in seconds, before it builds its models."""
    path = resolve_checkpoint(path)
    read_trainer_state(path)
    _read_rng(path)
    load_dcp_metadata(path)
    return path


def _read_rng(path: Path) -> dict[str, Any]:
    """This rank's RNG states. At another world size a rank may have no file of its own; rank 0's
    is the fallback (the trainer generator is seeded identically on every rank)."""
    own = path / "rng" / f"rank-{distributed.rank():05d}.pt"
    file = own if own.is_file() else path / "rng" / "rank-00000.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no rng/rank-00000.pt (RNG states): it is damaged; to start "
                              f"from its weights only, use checkpoint.init_from={path} with checkpoint.resume=none")  # fmt: skip
    try:
        rng = torch.load(file, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file} is damaged ({type(e).__name__})") from None
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise CheckpointError(f"{file} does not hold RNG states: the checkpoint is damaged")
    return rng


# `rlx export` and HF directories from a live model live in checkpoint_export.py; their names stay
# importable from here.
from rlx.checkpoint_export import export_checkpoint, export_main, save_hf_from_sharded  # noqa: E402

__all__ = [
    "COMPLETE", "Checkpointer", "TrainState", "check_checkpoint_files", "check_model_matches", "export_checkpoint", "export_main",
    "is_complete", "latest_checkpoint", "list_checkpoints", "load_model_weights", "read_trainer_state",
    "resolve_checkpoint", "save_hf_from_sharded", "step_dir",
]  # fmt: skip
