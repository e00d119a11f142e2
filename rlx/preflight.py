"""Checks of everything an RL run reads that need no model, engine or process group.

`check_run_inputs(cfg)` runs first: a wrong path, a damaged file, a bad record, a reward or sampler
that does not import fails in seconds with one `rlx: error:` line, not after minutes of building
the policy and the vLLM engine. It returns what it loaded (tokenizer, datasets) for the run to use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlx.checkpoint import check_checkpoint_files, is_complete, resolve_checkpoint
from rlx.data import PromptDataset, build_val_data, load_train_set
from rlx.errors import UserError, ensure_writable_dir
from rlx.models.hf_io import hf_tensor_shapes, read_hf_config
from rlx.models.tokenizer import apply_chat_template, check_tokenizer_fits, load_tokenizer
from rlx.reward import check_reward

logger = logging.getLogger(__name__)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Advantage estimators whose baseline is the other rollouts of the same prompt.
_GROUP_BASELINES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


@dataclass
class RunInputs:
    """What the checks loaded, for the run to reuse (nothing is read twice)."""

    tokenizer: Any
    encode: Callable[[Any], list[int]]
    train: PromptDataset
    val: PromptDataset | None


def make_encode(tokenizer: Any, use_chat_template: bool) -> Callable[[Any], list[int]]:
    """Prompt (str or chat messages) -> token ids, the way the run tokenizes its prompts."""

    def encode(prompt):
        if use_chat_template or not isinstance(prompt, str):
            return apply_chat_template(tokenizer, prompt)
        return tokenizer.encode(prompt)

    return encode


def weights_dir(cfg: Any) -> str:
    """The HF directory the policy is built from: checkpoint.init_from when it is one, else model.path."""
    init = cfg.checkpoint.init_from
    if init and (Path(init) / "config.json").exists() and not is_complete(init):
        return init
    return cfg.model.path


def check_run_inputs(cfg: Any) -> RunInputs:
    """`cfg` is the resolved Config (`Config.resolved()`). Check, in order of cost: the run directory is writable, the model directories describe a
    model and their safetensors headers read, the tokenizer fits the model, the reward function and
    the sampler import and accept their options, a named checkpoint exists, every training and
    validation record is valid. Raises a UserError naming the key, file or line."""
    ensure_writable_dir(Path(cfg.job.output_dir) / cfg.job.name, "job.output_dir (with job.name)")
    hf_dir = weights_dir(cfg)
    config = read_hf_config(hf_dir)
    hf_tensor_shapes(hf_dir)  # every weight file's header: truncated or garbage files fail here
    if cfg.loss.kl_coef > 0 and cfg.model.ref_path and cfg.model.ref_path != hf_dir:
        read_hf_config(cfg.model.ref_path)
        hf_tensor_shapes(cfg.model.ref_path)

    tokenizer = _check_tokenizer(cfg, hf_dir, config)
    check_reward(cfg.reward)
    _check_sampler(cfg)
    _check_checkpoint(cfg.checkpoint)
    _warn_on_degenerate_groups(cfg)

    encode = make_encode(tokenizer, cfg.model.use_chat_template)
    train = load_train_set(cfg.data, encode, decode=tokenizer.decode)
    val = build_val_data(cfg.data, encode, decode=tokenizer.decode)
    return RunInputs(tokenizer, encode, train, val)


def _check_tokenizer(cfg: Any, hf_dir: str, config: dict) -> Any:
    tokenizer_dir = cfg.model.tokenizer_path or hf_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise UserError(f"{Path(hf_dir) / 'config.json'} has no integer vocab_size")
    own = None  # the model directory's own tokenizer, when the run uses another one
    if Path(tokenizer_dir).resolve() != Path(hf_dir).resolve() and any(
        (Path(hf_dir) / name).is_file() for name in _TOKENIZER_FILES
    ):
        own = load_tokenizer(hf_dir)
    check_tokenizer_fits(tokenizer, vocab_size, tokenizer_dir=tokenizer_dir, model_dir=hf_dir, model_tokenizer=own)
    return tokenizer


def _check_sampler(cfg: Any) -> None:
    """Resolve the sampler (a user `pkg.module:Class` must import) and construct it once: its
    constructor validates its options (e.g. the filtered sampler needs generator.n >= 2)."""
    from rlx.sampler import build_sampler, resolve_sampler_class

    try:
        resolve_sampler_class(cfg.sampler.type)
        build_sampler(cfg.sampler, n=cfg.generator.n, temperature=cfg.generator.temperature,
                      train_batch_size=cfg.data.train_batch_size,
                      gen_batch_size=cfg.data.gen_batch_size or cfg.data.train_batch_size,
                      max_tokens=cfg.generator.max_tokens)  # fmt: skip
    except UserError:
        raise
    except Exception as e:  # samplers report option mistakes as ValueError; user modules may raise anything
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"sampler.type={cfg.sampler.type!r}: {text}") from None


def _check_checkpoint(cfg: Any) -> None:
    """A checkpoint named by path must exist; one named step-N directory must have sound small
    files (a directory of checkpoints falls back past damaged ones when loaded, so it is not judged here)."""
    if cfg.resume not in ("auto", "none"):
        if not Path(cfg.resume).exists():
            raise UserError(f"checkpoint.resume={cfg.resume!r}: no such checkpoint directory (or use 'auto' / 'none')")
        if is_complete(cfg.resume) or re.match(r"^step-\d+(\.tmp)?$", Path(cfg.resume).name):
            check_checkpoint_files(cfg.resume)
        else:
            resolve_checkpoint(cfg.resume)
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise UserError(f"checkpoint.init_from={cfg.init_from!r}: no such directory")


def _warn_on_degenerate_groups(cfg: Any) -> None:
    if cfg.generator.n == 1 and cfg.sampler.type == "fixed" and cfg.algorithm.adv_estimator in _GROUP_BASELINES:
        logger.warning("generator.n = 1 with algorithm.adv_estimator = %r: each group holds one rollout, so there "
                       "is no baseline (the advantage is 0 or the raw reward); use generator.n >= 2",
                       cfg.algorithm.adv_estimator)  # fmt: skip
