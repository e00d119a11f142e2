"""`rlx eval --config X.toml [--checkpoint DIR]`: reward, accuracy, pass@k and mean@n of a model, an
HF directory or a DCP checkpoint on a prompt set; samples to JSONL, one summary JSON line on stdout.

It reads the TOML of `rlx train` and uses the same stages: data (`data.val_files`, prompt/answer
keys), the vLLM generator (`generator.val_n` samples per prompt at `generator.val_temperature`) and
the reward function. A DCP checkpoint is loaded the way `checkpoint.init_from` is in training: the
engine starts from `model.path`, a policy model built (sharded) like the trainer's loads the
checkpoint, and weight sync pushes it into the engine. Under torchrun each engine replica evaluates
a strided shard of the prompts; sums are all-reduced and rank 0 writes the files and the line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlx.config import Config, parse_args
from rlx.errors import UserError, ensure_writable_dir
from rlx.trainer.eval_metrics import add_prompt, empty_sums, summarize

logger = logging.getLogger("rlx.eval")

DESCRIPTION = """\
Evaluate a model on a prompt set with the config of `rlx train`: generator.val_n samples per prompt at
generator.val_temperature, scored by reward.fn. Prints one JSON line (reward_mean, acc, pass@k,
mean@n, counts) on stdout; logs go to stderr. Every sample goes to <output-dir>/samples.jsonl and the
summary to <output-dir>/summary.json. Other settings: --section.key=value, as for rlx train
(e.g. --generator.val_n=8 --generator.val_temperature=0.6 --data.val_max_samples=100)."""


@dataclasses.dataclass
class EvalOptions:
    """The options of `rlx eval` itself (everything else is the run's Config)."""

    checkpoint: str | None = None
    """DCP checkpoint (step-N, a directory of them, or a run dir) or HF directory; None: model.path."""
    split: str = "val"
    """Which files of [data] to evaluate: val (data.val_files) or train (data.train_files)."""
    output_dir: str | None = None
    """Where samples.jsonl and summary.json go; None: <job.output_dir>/<job.name>/eval."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line `rlx: error:` messages (as the config loader's)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def build_eval_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="rlx eval", description=DESCRIPTION, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", metavar="PATH", help="TOML experiment file, as for rlx train (a run's config.toml works)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="DCP checkpoint to evaluate: a step-N directory, a directory of them (the latest complete "
                        "one) or a run directory; or an HF model directory. Default: model.path. A DCP checkpoint "
                        "needs model.path (the HF model it was trained from) for the architecture and engine")  # fmt: skip
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="prompt set: data.val_files (default) or data.train_files; data.val_max_samples caps either")  # fmt: skip
    p.add_argument("--output-dir", metavar="DIR", help="where samples.jsonl and summary.json go (default: <run dir>/eval)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with type, default and doc")
    return p


def parse_eval_args(argv: Sequence[str]) -> tuple[EvalOptions, Config]:
    """Split a command line into the eval options and the run's Config (`--section.key=value`
    overrides go to the config loader). The Config is resolved."""
    parser = build_eval_parser()
    args, rest = parser.parse_known_args(list(argv))
    forwarded = ([f"--config={args.config}"] if args.config else []) + ["--dry-run"] * args.dry_run
    forwarded += ["--help-config"] * args.help_config
    cfg, _ = parse_args(forwarded + rest, prog="rlx eval")
    return EvalOptions(args.checkpoint, args.split, args.output_dir), cfg.resolved()


# ---- what to evaluate ----------------------------------------------------------------------------


def resolve_weights(checkpoint: str | None, model_path: str) -> tuple[str, Path | None]:
    """(HF directory the engine starts from, DCP checkpoint to load on top of it or None)."""
    from rlx.checkpoint import is_complete, resolve_checkpoint

    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise UserError(f"--checkpoint {path} does not exist")
        if (path / "config.json").is_file() and not is_complete(path):
            return str(path), None  # an HF model directory (e.g. written by rlx export)
        if (path / "checkpoints").is_dir() and not is_complete(path):
            path = path / "checkpoints"  # a run directory
        dcp = resolve_checkpoint(path)
    else:
        dcp = None
    if not model_path:
        why = f"DCP checkpoint {dcp} holds no HF weights to start the engine from" if dcp else "nothing to evaluate"
        raise UserError(f"{why}: set model.path (e.g. --config <run dir>/config.toml, or --model.path=DIR)")
    if not (Path(model_path) / "config.json").is_file():
        raise UserError(f"model.path={model_path} is not an HF model directory (no config.json)")
    return model_path, dcp


def load_prompt_set(data_cfg: Any, split: str, encode, decode):
    """The prompts of `split` in file order (at most data.val_max_samples), or a UserError."""
    from rlx.data import build_val_data

    files = data_cfg.val_files if split == "val" else data_cfg.train_files
    if not files:
        raise UserError(f"no prompts to evaluate: data.{split}_files is empty; set it in the config or with "
                        f"--data.{split}_files=PATH" + (" (or use --split=train)" if split == "val" else ""))  # fmt: skip
    return build_val_data(dataclasses.replace(data_cfg, val_files=list(files)), encode, decode=decode)


def make_encode(tokenizer: Any, use_chat_template: bool):
    """Prompt (str or chat messages) -> token ids, as the trainer encodes them (rl_setup)."""
    from rlx.models.tokenizer import apply_chat_template

    def encode(prompt):
        if use_chat_template or not isinstance(prompt, str):
            return apply_chat_template(tokenizer, prompt)
        return tokenizer.encode(prompt)

    return encode


def load_checkpoint_model(cfg: Config, hf_dir: str, dcp: Path, device: Any) -> tuple[Any, int]:
    """(policy model sharded over this world holding DCP checkpoint `dcp`, the checkpoint's step),
    built as the trainer builds it for checkpoint.init_from. Collective.

    Why not `rlx export` to a temporary HF directory: export materializes the whole model in one
    process and writes it to disk, where every node of a torchrun job would need it; DCP loading
    reshards onto any world size, and weight sync is the path training already tests for parity."""
    import torch

    from rlx import distributed
    from rlx.checkpoint import load_model_weights, read_trainer_state
    from rlx.parallel import ParallelDims, build_parallel_model

    dims = ParallelDims.from_config(cfg.parallel, distributed.world_size())
    dims.build_mesh(device.type)
    model = build_parallel_model(hf_dir, dims, cfg.parallel, device=device, dtype=getattr(torch, cfg.model.dtype),
                                 reference=True)  # fmt: skip
    load_model_weights(dcp, model)  # names or shapes that differ from model.path fail here, before the engine
    return model, read_trainer_state(dcp)["step"]


# ---- the evaluation loop -------------------------------------------------------------------------


def evaluate_prompts(prompts: Sequence[Any], engine: Any, reward: Any, tokenizer: Any, *, n: int, batch_size: int,
                     seed: int) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    """Generate n samples per prompt (this engine replica's strided shard), score them, and return
    (this rank's additive sums, this rank's sample records). Collective: every rank makes the same
    number of generate calls. Each request is seeded by (seed, prompt uid), so samples depend
    neither on the world size nor on the batch size."""
    from rlx.data import batches, shard
    from rlx.types import GenerationRequest, Rollout

    layout = engine.layout
    mine = shard(prompts, layout.dp_index, layout.dp_size)
    chunks = list(batches(mine, batch_size))
    num_batches = math.ceil(math.ceil(len(prompts) / layout.dp_size) / batch_size)
    counts = layout.tp_group_rank == 0  # ranks of one engine replica hold the same samples: count once
    sums, records, done, start = empty_sums(n), [], 0, time.perf_counter()
    for b in range(num_batches):
        batch = chunks[b] if b < len(chunks) else []
        # vLLM gives child j of a seeded request the seed `seed + j`: space the prompts n apart.
        requests = [GenerationRequest(p.prompt_ids, n=n, seed=seed + int(p.uid) * n) for p in batch]
        outputs = engine.generate(requests, validation=True)
        rollouts = [Rollout(p.prompt_ids, c.token_ids, c.logprobs, p.uid, finish_reason=c.finish_reason, prompt=p)
                    for p, outs in zip(batch, outputs) for c in outs]  # fmt: skip
        results = iter(reward.score(rollouts) if rollouts else [])
        for p, outs in zip(batch, outputs):
            scored = [(c, next(results)) for c in outs]
            accs = [r.extras.get("acc", float(r.score >= 1.0)) for _, r in scored]
            if counts:
                add_prompt(sums, [r.score for _, r in scored], accs, [len(c.token_ids) for c, _ in scored],
                           [c.finish_reason == "length" for c, _ in scored])  # fmt: skip
                records += [_record(p, i, c, r, a, tokenizer) for i, ((c, r), a) in enumerate(zip(scored, accs))]
        done += len(batch)
        seconds = time.perf_counter() - start
        logger.info("eval batch %d/%d: %d/%d prompts on this replica, acc %.4f, %.1f samples/s", b + 1, num_batches,
                    done, len(mine), sums["acc"] / max(sums["samples"], 1), done * n / max(seconds, 1e-9))  # fmt: skip
    return sums, records


def _record(prompt: Any, index: int, completion: Any, result: Any, acc: float, tokenizer: Any) -> dict:
    """One line of samples.jsonl."""
    return {
        "uid": prompt.uid, "sample": index, "prompt": prompt.text,
        "response": tokenizer.decode(completion.token_ids, skip_special_tokens=True),
        "answer": prompt.ground_truth, "reward": result.score, "acc": acc,
        "finish_reason": completion.finish_reason, "response_tokens": len(completion.token_ids),
    }  # fmt: skip


def reduce_results(sums: dict[str, float], records: list[dict]) -> tuple[dict[str, float], list[dict] | None]:
    """All-reduce the sums (every rank) and gather the records on rank 0 (None elsewhere), sorted
    by (prompt uid, sample index) so the file does not depend on the world size."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(list(sums.values()), dtype=torch.float64)
        dist.all_reduce(t)
        sums = dict(zip(sums, t.tolist()))
        pieces: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(records, pieces, dst=0)
        if dist.get_rank() != 0:
            return sums, None
        records = [r for piece in pieces for r in piece]
    return sums, sorted(records, key=lambda r: (r["uid"], r["sample"]))


def write_outputs(out_dir: Path, records: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


# ---- the command ---------------------------------------------------------------------------------


def run(cfg: Config, opts: EvalOptions) -> dict | None:
    """Evaluate per `cfg` and `opts`; returns the summary on rank 0 (None on other ranks)."""
    from rlx import distributed
    from rlx.generator import build_generator
    from rlx.models import load_tokenizer
    from rlx.reward import build_reward

    start = time.perf_counter()
    hf_dir, dcp = resolve_weights(opts.checkpoint, cfg.model.path)
    gen = cfg.generator
    if gen.val_temperature == 0 and gen.val_n > 1:
        logger.warning("generator.val_temperature=0 is greedy: the %d samples per prompt are identical, so pass@k "
                       "equals pass@1 (set --generator.val_temperature, e.g. 0.6)", gen.val_n)  # fmt: skip
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or hf_dir)
    encode = make_encode(tokenizer, cfg.model.use_chat_template)
    prompts = load_prompt_set(cfg.data, opts.split, encode, tokenizer.decode)
    out_dir = Path(opts.output_dir) if opts.output_dir else Path(cfg.job.output_dir) / cfg.job.name / "eval"
    if os.environ.get("RANK", "0") == "0":  # rank 0 writes; fail before the slow part, not after it
        ensure_writable_dir(out_dir, "--output-dir" if opts.output_dir else "the eval directory <run dir>/eval")
    logger.info("evaluating %s%s on %d prompts x %d samples (temperature %g)", hf_dir,
                f" + checkpoint {dcp}" if dcp else "", len(prompts), gen.val_n, gen.val_temperature)  # fmt: skip

    device = distributed.init_distributed(cfg.parallel.backend)
    engine = reward = None
    try:
        # Mesh and policy before the engine, in the trainer's order (rl_setup.build_stages).
        model, step = load_checkpoint_model(cfg, hf_dir, dcp, device) if dcp else (None, None)
        engine = build_generator(gen, hf_dir, max_prompt_length=cfg.data.max_prompt_length)
        if model is not None:
            from rlx.weight_sync import WeightSync

            seconds = WeightSync(engine).push(model, version=step)["weight_sync/seconds"]
            logger.info("pushed checkpoint %s (step %d) into the engine in %.2f s", dcp, step, seconds)
            del model  # the engine holds the weights now
        reward = build_reward(cfg.reward, tokenizer)
        sums, records = evaluate_prompts(prompts.prompts, engine, reward, tokenizer, n=gen.val_n,
                                         batch_size=cfg.data.val_batch_size, seed=gen.seed)  # fmt: skip
        sums, records = reduce_results(sums, records)
    finally:
        if reward is not None:
            reward.close()
        if engine is not None:
            engine.shutdown()  # before the process group goes (FINDINGS.md)
        distributed.teardown_distributed()
    if records is None:
        return None
    sums["dropped_prompts"] += prompts.num_filtered  # over max_prompt_length: dropped when loading
    files = cfg.data.val_files if opts.split == "val" else cfg.data.train_files
    summary = {**summarize(sums, gen.val_n), "temperature": gen.val_temperature, "model": os.path.abspath(hf_dir),
               "checkpoint": os.path.abspath(dcp) if dcp else None, "step": step, "split": opts.split,
               "files": list(files), "samples": str(out_dir / "samples.jsonl"),
               "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    write_outputs(out_dir, records, summary)
    logger.info("wrote %d samples to %s", len(records), out_dir / "samples.jsonl")
    return summary


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout (vLLM's log handler, native libraries) to stderr, so
    the summary is the only line on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts, cfg = parse_eval_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, --help-config, --dry-run
        return int(e.code or 0)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.captureWarnings(True)
    with stdout_to_stderr():
        summary = run(cfg, opts)
    if summary is not None:
        print(json.dumps(summary, default=str), flush=True)
    return 0
