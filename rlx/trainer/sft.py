"""`rlx sft --config X.toml`: supervised fine-tuning, the warm start of RL.

Packed next-token training on JSONL records ({"prompt", "response"} or chat {"messages"}) with the
loss on response (assistant) tokens only; validation loss; DCP checkpoints with resume; an HF
directory <run dir>/hf at the end, usable as `model.path` of an RL run. Works under torchrun.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlx import distributed
from rlx.errors import UserError

log = logging.getLogger(__name__)

Doc = tuple[list[int], list[int]]  # (token ids, loss mask: 1 where the token is a target)


# ---- records -> token ids ----------------------------------------------------------------------


def tokenize_record(record: dict, tokenizer: Any, cfg: Any, use_chat_template: bool) -> Doc:
    """(ids, loss mask) of one record; `cfg` is an `SFTConfig`-like object. A record with
    `messages_key` trains on its assistant turns; otherwise on `response_key` given `prompt_key`."""
    from rlx.models import apply_chat_template

    if cfg.messages_key in record:
        return _tokenize_messages(record[cfg.messages_key], tokenizer)
    for key in (cfg.prompt_key, cfg.response_key):
        if key not in record:
            raise UserError(f"SFT record lacks '{key}' (and has no '{cfg.messages_key}'); keys: {', '.join(record)}")
    prompt = record[cfg.prompt_key]
    if use_chat_template:
        prompt_ids = apply_chat_template(tokenizer, prompt)
    else:
        bos = tokenizer.bos_token_id
        prompt_ids = ([bos] if bos is not None else []) + tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(record[cfg.response_key], add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)  # the model learns to stop
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _tokenize_messages(messages: list[dict], tokenizer: Any) -> Doc:
    """Render with the chat template turn by turn; assistant turns (with their end markers) are
    the targets, everything the template adds before them is context."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("SFT chat records need a tokenizer with a chat template (tokenizer_config.json chat_template)")

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise UserError("the chat template does not render conversations prefix by prefix, "
                            "which SFT on messages needs")  # fmt: skip
        for text, target in ((prefix[len(done) :], 0), (full[len(prefix) :], 1)):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            mask += [target] * len(piece)
        done = full
    return ids, mask


def load_docs(files: Sequence[str], tokenizer: Any, cfg: Any, use_chat_template: bool) -> list[Doc]:
    """Tokenized documents of `files`, truncated to max_seq_len; documents left with no target
    token are dropped (with a warning)."""
    from rlx.data.prompts import read_records

    docs, dropped = [], 0
    for path in files:
        for _, record in read_records(path):
            ids, mask = tokenize_record(record, tokenizer, cfg, use_chat_template)
            ids, mask = ids[: cfg.max_seq_len], mask[: cfg.max_seq_len]
            if sum(mask[1:]) == 0:  # token 0 is never predicted
                dropped += 1
                continue
            docs.append((ids, mask))
    if dropped:
        log.warning("sft: dropped %d records with no response tokens within max_seq_len=%d", dropped, cfg.max_seq_len)
    return docs


# ---- the data stream ---------------------------------------------------------------------------


@dataclass
class SFTStream:
    """Epochs over `docs` in a seeded order, cut into global batches of at most `batch_tokens`
    tokens (whole documents; at least one). The position {"epoch", "offset"} is global, so a
    checkpoint resumes at any world size."""

    docs: list[Doc]
    batch_tokens: int
    seed: int

    def order(self, epoch: int) -> list[int]:
        from rlx.trainer.train_step import make_generator

        return torch.randperm(len(self.docs), generator=make_generator(self.seed + epoch)).tolist()

    def _cut(self, order: list[int], offset: int) -> int:
        """End offset of the batch that starts at `offset`."""
        end, used = offset, 0
        while end < len(order) and (end == offset or used + len(self.docs[order[end]][0]) <= self.batch_tokens):
            used += len(self.docs[order[end]][0])
            end += 1
        return end

    def steps_per_epoch(self) -> int:
        order, offset, steps = self.order(0), 0, 0
        while offset < len(order):
            offset, steps = self._cut(order, offset), steps + 1
        return steps

    def next_batch(self, position: dict[str, int]) -> tuple[list[Doc], dict[str, int]]:
        epoch, offset = position["epoch"], position["offset"]
        order = self.order(epoch)
        if offset >= len(order):
            epoch, offset, order = epoch + 1, 0, self.order(epoch + 1)
        end = self._cut(order, offset)
        return [self.docs[i] for i in order[offset:end]], {"epoch": epoch, "offset": end}


def split_validation(docs: list[Doc], fraction: float, seed: int) -> tuple[list[Doc], list[Doc]]:
    """(train, val): a seeded random `fraction` of docs held out (at least one when fraction > 0)."""
    if fraction <= 0 or len(docs) < 2:
        return docs, []
    from rlx.trainer.train_step import make_generator

    perm = torch.randperm(len(docs), generator=make_generator(seed)).tolist()
    n_val = max(1, int(len(docs) * fraction))
    return [docs[i] for i in perm[n_val:]], [docs[i] for i in perm[:n_val]]


# ---- the loop ----------------------------------------------------------------------------------


def run_sft(cfg: Any, stop_fn: Callable[[int, torch.nn.Module], bool] | None = None) -> Path:
    """Train per a resolved `Config`; returns the HF directory written at the end (rank 0).

    `stop_fn(step, model)`, called after every step, ends training early when it returns True
    (e.g. the quickstart stops its warm start at a target accuracy). It must answer the same on
    every rank."""
    from rlx.checkpoint import Checkpointer, load_model_weights, save_hf_from_sharded
    from rlx.config import save_resolved
    from rlx.metrics import MetricLogger
    from rlx.models import load_tokenizer
    from rlx.parallel import ParallelDims, build_parallel_model, num_params
    from rlx.parallel.parallelize import DTYPES
    from rlx.trainer.train_step import (
        build_lr_scheduler, build_optimizer, eval_loss, make_generator, pack_micro_batches, train_step,
    )  # fmt: skip

    if not cfg.model.path:
        raise UserError("model.path is empty: set it to the HF directory of the model to fine-tune")
    if not cfg.sft.train_files:
        raise UserError("sft.train_files is empty: give one or more JSONL files of prompt/response records")
    device = distributed.init_distributed(cfg.parallel.backend)
    torch.manual_seed(cfg.job.seed)
    dims = ParallelDims.from_config(cfg.parallel, distributed.world_size())
    dims.build_mesh(device.type)
    dp_group = dims.get_mesh("dp").get_group()
    main = distributed.is_main()

    tokenizer = load_tokenizer(cfg.model.tokenizer_path)  # (resolved: model.path when empty)
    docs = load_docs(cfg.sft.train_files, tokenizer, cfg.sft, cfg.model.use_chat_template)
    if cfg.sft.val_files:
        val_docs = load_docs(cfg.sft.val_files, tokenizer, cfg.sft, cfg.model.use_chat_template)
    else:
        docs, val_docs = split_validation(docs, cfg.sft.val_fraction, cfg.job.seed)
    if not docs:
        raise UserError(f"no SFT training records with response tokens in {', '.join(cfg.sft.train_files)}")
    stream = SFTStream(docs, cfg.sft.batch_tokens * dims.dp_size, cfg.job.seed)
    total_steps = min(cfg.sft.steps, cfg.sft.epochs * stream.steps_per_epoch())
    micro_tokens = cfg.loss.micro_batch_tokens
    val_mbs = pack_micro_batches(val_docs[dims.dp_rank :: dims.dp_size], micro_tokens) if val_docs else []

    model = build_parallel_model(cfg.model.path, dims, cfg.parallel, device=device, dtype=DTYPES[cfg.model.dtype])
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps)
    generator = make_generator(cfg.job.seed)
    ckpt = Checkpointer(cfg.checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                        generator=generator, hf_dir=cfg.model.path, run_dir=cfg.run_dir)  # fmt: skip
    resumed = ckpt.maybe_resume()
    step, position = (resumed.step, resumed.data) if resumed else (0, {"epoch": 0, "offset": 0})
    if resumed is None and cfg.checkpoint.init_from:
        load_model_weights(cfg.checkpoint.init_from, model)
    if main:
        save_resolved(cfg, cfg.run_dir)
        print(f"rlx sft: {num_params(model) / 1e6:.1f}M params, {len(docs)} train / {len(val_docs)} val docs, "
              f"{total_steps} steps, mesh {dims.dp_replicate}x{dims.dp_shard}x{dims.tp}"
              + (f", resumed at step {step}" if resumed else ""), flush=True)  # fmt: skip

    # The shared MetricLogger writes the sinks; the console line (loss, not rewards) is printed here.
    logger = MetricLogger(str(cfg.run_dir), dataclasses.replace(cfg.logging, console=False),
                          config_dict=cfg.to_dict(), rank=distributed.rank(), total_steps=total_steps)  # fmt: skip
    with logger:
        if val_mbs and resumed is None:  # the baseline that training should improve on
            logger.log({"val/loss": eval_loss(model, val_mbs, device=device, dp_group=dp_group)}, 0)
        while step < total_steps:
            start = time.perf_counter()
            batch, position = stream.next_batch(position)
            mbs = pack_micro_batches(batch[dims.dp_rank :: dims.dp_size], micro_tokens)
            m = train_step(model, optimizer, scheduler, mbs, device=device, dp_group=dp_group,
                           grad_clip=cfg.optim.grad_clip)  # fmt: skip
            step += 1
            elapsed = time.perf_counter() - start
            metrics = {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"], "train/lr": m["lr"],
                       "train/num_tokens": m["num_tokens"], "train/tokens_per_s": m["num_tokens"] / elapsed,
                       "train/epoch": position["epoch"]}  # fmt: skip
            if val_mbs and (step == total_steps or (cfg.sft.val_every and step % cfg.sft.val_every == 0)):
                metrics["val/loss"] = eval_loss(model, val_mbs, device=device, dp_group=dp_group)
            logger.log(metrics, step)
            if main and cfg.logging.console:
                val = f" | val_loss {metrics['val/loss']:.4f}" if "val/loss" in metrics else ""
                print(f"sft step {step}/{total_steps} | loss {m['loss']:.4f}{val} | lr {m['lr']:.2e} "
                      f"| {metrics['train/tokens_per_s']:.0f} tok/s", flush=True)  # fmt: skip
            stop = stop_fn is not None and stop_fn(step, model)
            if ckpt.should_save(step, total_steps) or (stop and cfg.checkpoint.enable):
                ckpt.save(step, data_state=position)
            if stop:
                if main:
                    print(f"rlx sft: stopped early at step {step}", flush=True)
                break
    ckpt.close()
    out = Path(cfg.run_dir) / "hf"
    save_hf_from_sharded(model, out, cfg.model.path)
    if main:
        print(f"rlx sft: wrote {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """`rlx sft --config X.toml [--section.key=value ...]` (also under torchrun)."""
    from rlx.config import parse_args

    try:
        cfg, _ = parse_args(argv, prog="rlx sft")
    except SystemExit as e:  # --help, --dry-run
        return int(e.code or 0)
    try:
        run_sft(cfg.resolved())
    finally:
        distributed.teardown_distributed()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
