"""`rlx export` (DCP checkpoint -> HF safetensors directory) and HF directories from a live model.

Both write what HF transformers and vLLM load: config.json, safetensors, the tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlx import distributed
from rlx.checkpoint import HF_META_FILES, HF_SUBDIR, check_model_matches, resolve_checkpoint
from rlx.checkpoint_manifest import check_finite, safe_dcp_load, verify_files
from rlx.errors import UserError, ensure_writable_dir


def _copy_hf_meta(src: Path, out: Path) -> None:
    """Tokenizer and generation files of an HF directory (config.json is written from ModelArgs)."""
    for name in HF_META_FILES:
        if name != "config.json" and (src / name).is_file():
            shutil.copy2(src / name, out / name)


def save_hf_from_sharded(
    model: nn.Module, out: str | os.PathLike, hf_src: str | os.PathLike | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a live (possibly sharded) model as an HF directory: rank 0 gathers full weights on
    CPU and writes config.json + safetensors, plus the tokenizer files of `hf_src`. Collective."""
    from rlx.models import save_hf_state_dict
    from rlx.models.hf_io import TIED_HEAD

    out = Path(out)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if distributed.is_main():
        if model.args.tie_word_embeddings:
            state.pop(TIED_HEAD, None)  # HF stores the tied matrix once
        save_hf_state_dict(state, model.args, out, dtype)
        if hf_src is not None:
            _copy_hf_meta(Path(hf_src), out)
    distributed.barrier()
    return out


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None, *,
                      critic: bool = False) -> Path:  # fmt: skip
    """Write the model of DCP checkpoint `ckpt` as an HF directory (config.json, safetensors,
    tokenizer files) to `out`; with `critic`, the value model instead (HF `<Arch>ForTokenClassification`,
    one label). Single process; the full model is materialized on CPU. The checkpoint is verified
    (manifest, finite weights) and `out` checked writable before any work."""
    from rlx.checkpoint import CRITIC_HF_SUBDIR
    from rlx.models import ModelArgs, build_model, read_hf_config, save_pretrained
    from rlx.models.value import ValueModel, value_hf_config, value_model_args

    path = resolve_checkpoint(ckpt)
    hf = path / HF_SUBDIR
    if not (hf / "config.json").is_file():
        raise UserError(f"checkpoint {path} has no {HF_SUBDIR}/config.json: it was saved without the model's HF "
                        "directory (Checkpointer(hf_dir=...))")  # fmt: skip
    config_dir = path / CRITIC_HF_SUBDIR if critic else hf
    if critic and not (config_dir / "config.json").is_file():
        raise UserError(f"checkpoint {path} has no critic ({CRITIC_HF_SUBDIR}/config.json): it was saved by a run "
                        "without algorithm.adv_estimator = \"gae\"; drop --critic to export the policy")  # fmt: skip
    ensure_writable_dir(out, "the export directory")
    verify_files(path)
    try:
        config = read_hf_config(config_dir)
        args = value_model_args(config) if critic else ModelArgs.from_hf_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_dir / 'config.json'} does not describe a supported model ({type(e).__name__}: {e})") from None
    key = "critic" if critic else "model"
    model = ValueModel(args, device="meta") if critic else build_model(args, device="meta")
    model.to_empty(device="cpu")
    check_model_matches(path, model, key)
    state = {key: model.state_dict()}
    safe_dcp_load(state, path, no_dist=True)
    check_finite(state, path)
    model.load_state_dict(state[key])
    try:
        out = save_pretrained(model, out, dtype=dtype)
        if critic:  # save_pretrained wrote the causal LM's config
            saved_dtype = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
            (Path(out) / "config.json").write_text(json.dumps(value_hf_config(args, saved_dtype), indent=2) + "\n")
        _copy_hf_meta(hf, out)
    except OSError as e:
        raise UserError(f"could not write the export to {out} ({e.strerror or e}): check free space and permissions") from None
    return out


def export_main(argv: list[str]) -> int:
    """`rlx export CKPT OUT [--dtype D]`."""
    p = argparse.ArgumentParser(prog="rlx export",
                                description="Write an HF directory (safetensors) from a DCP checkpoint.")  # fmt: skip
    p.add_argument("ckpt", help="a checkpoint step-N directory, or a directory of them (the latest complete one)")
    p.add_argument("out", help="output HF directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="saved dtype (default: as trained)")
    p.add_argument("--critic", action="store_true",
                   help="export the value model (PPO with a critic) as <Arch>ForTokenClassification instead of the policy")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out = export_checkpoint(a.ckpt, a.out, getattr(torch, a.dtype) if a.dtype else None, critic=a.critic)
    print(f"rlx export: wrote {out}")
    return 0
