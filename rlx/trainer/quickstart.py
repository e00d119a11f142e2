"""`rlx quickstart`: the CPU demo that shows rlx learning, end to end, in a few minutes.

1. task: multi-digit addition ("37+48=" -> "85") with a verifiable answer; disjoint SFT, RL and
   held-out validation splits, written as JSONL;
2. model: a tiny Qwen3 with a character-level tokenizer (`rlx make-tiny`), random weights;
3. SFT warm start (`[sft]` of the config) on a small slice, stopped as soon as greedy accuracy on
   a probe of RL problems reaches `--sft-target-acc` (partial accuracy: RL does the rest);
4. GRPO with the config's sampler (the filtered sampler in quickstart_cpu.toml) on the colocated
   vLLM CPU engine, validation before and after;
5. curves (`rlx plot`) and one JSON line: {"val_acc_before", "val_acc_after", "minutes"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch

from rlx.errors import UserError


def write_addition_task(out: Path, *, digits: int, num_sft: int, num_val: int, seed: int) -> dict[str, Path]:
    """Split every pair (a, b) with a, b < 10**digits into disjoint val / SFT / RL sets."""
    limit = 10**digits
    pairs = [(a, b) for a in range(limit) for b in range(limit)]
    random.Random(seed).shuffle(pairs)
    if num_val + num_sft >= len(pairs):
        raise UserError(f"quickstart: {digits}-digit addition has only {len(pairs)} problems; "
                        f"ask for fewer than {num_val} val + {num_sft} SFT examples")  # fmt: skip
    splits = {"val": pairs[:num_val], "sft": pairs[num_val : num_val + num_sft], "rl": pairs[num_val + num_sft :]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in splits.items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w") as f:
            for a, b in items:
                record = {"prompt": f"{a}+{b}=", "answer": str(a + b)}
                if name == "sft":
                    record["response"] = str(a + b)
                f.write(json.dumps(record) + "\n")
    return paths


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int = 5) -> float:
    """Greedy exact-match accuracy of `model` (a plain, unsharded rlx model) on addition records,
    decoding all prompts of one length together (no padding needed, no engine start-up)."""
    from rlx.models.tokenizer import apply_chat_template
    from rlx.reward.builtins import quickstart_reward

    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for r in records:
        ids = apply_chat_template(tokenizer, r["prompt"])
        by_length.setdefault(len(ids), []).append((ids, r["answer"]))
    correct = 0
    for items in by_length.values():
        ids = torch.tensor([i for i, _ in items])
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        for row, (prompt, answer) in zip(ids.tolist(), items):
            text = tokenizer.decode(row[len(prompt) :], skip_special_tokens=False)
            text = text.split(tokenizer.eos_token)[0] if tokenizer.eos_token else text
            correct += quickstart_reward(text, answer)["acc"]
    return correct / max(len(records), 1)


def parse_quickstart_args(argv):
    p = argparse.ArgumentParser(prog="rlx quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="train_configs/quickstart_cpu.toml", help="RL + [sft] config (TOML)")
    p.add_argument("--workdir", default="runs/quickstart", help="where the model, data and runs are written")
    p.add_argument("--digits", type=int, default=2, help="digits per operand")
    p.add_argument("--sft-examples", type=int, default=1500, help="SFT examples (the rest of the problems feed RL)")
    p.add_argument("--val-examples", type=int, default=200, help="held-out problems for validation")
    p.add_argument("--sft-lr", type=float, default=3e-3,
                   help="SFT learning rate ([optim].lr and --optim.lr are the RL one)")
    p.add_argument("--sft-target-acc", type=float, default=0.35,
                   help="stop the SFT warm start once greedy accuracy on a probe of RL problems reaches this "
                        "(checked every --sft-check-every steps; [sft] steps is the cap)")
    p.add_argument("--sft-check-every", type=int, default=5)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_quickstart_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from rlx.config import load_config
    from rlx.models.tiny import make_tiny
    from rlx.trainer import rl
    from rlx.trainer.sft import run_sft

    start = time.perf_counter()
    work = Path(args.workdir).resolve()
    if (work / "runs").exists():  # a demo starts over: no resume from an earlier run
        shutil.rmtree(work / "runs")
    say = lambda msg: print(f"[quickstart {time.perf_counter() - start:5.0f}s] {msg}", flush=True)  # noqa: E731

    data = write_addition_task(work / "data", digits=args.digits, num_sft=args.sft_examples,
                               num_val=args.val_examples, seed=args.seed)  # fmt: skip
    say(f"task: {args.digits}-digit addition, data in {work / 'data'}")
    model_dir = make_tiny(work / "model", arch="qwen3", char_level=True, hidden_size=args.hidden_size,
                          num_layers=args.layers, seed=args.seed)  # fmt: skip
    say(f"model: tiny qwen3 (hidden {args.hidden_size}, {args.layers} layers), random weights, in {model_dir}")

    # Paths go in bare (a lone string is a one-element list): a JSON list whose text holds "_"
    # is read as one literal string by the override parser (rlx/config/fields.py `coerce`).
    common = [f"--job.output_dir={work / 'runs'}", f"--job.seed={args.seed}"]
    sft_cfg = load_config(args.config, [*common, f"--model.path={model_dir}", "--job.name=sft",
                                        f"--sft.train_files={data['sft']}",
                                        "--checkpoint.enable=false", *overrides,
                                        f"--optim.lr={args.sft_lr}"]).resolved()  # fmt: skip
    # SFT learns this task in a sudden jump whose step varies with the seed, so the warm start
    # stops at a target accuracy (partial: RL does the rest), not after a fixed number of steps.
    from rlx.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    probe = [json.loads(line) for line in open(data["rl"])][:200]

    def reached_target(step: int, model) -> bool:
        if step % args.sft_check_every:
            return False
        acc = greedy_accuracy(model, tokenizer, probe)
        say(f"SFT step {step}: greedy accuracy {acc:.3f} on a probe of RL problems (target {args.sft_target_acc})")
        return acc >= args.sft_target_acc

    say(f"SFT warm start: up to {sft_cfg.sft.steps} steps on {args.sft_examples} examples, "
        f"until greedy accuracy >= {args.sft_target_acc}")
    sft_dir = run_sft(sft_cfg, stop_fn=reached_target)

    rl_cfg = load_config(args.config, [*common, f"--model.path={sft_dir}", "--job.name=grpo",
                                       f"--data.train_files={data['rl']}",
                                       f"--data.val_files={data['val']}",
                                       "--train.val_before_train=true", *overrides]).resolved()  # fmt: skip
    engine = {"vllm": "vLLM CPU engine", "torch": "rlx's torch generator"}.get(rl_cfg.generator.backend,
                                                                              rl_cfg.generator.backend)
    estimator = rl_cfg.algorithm.adv_estimator.upper() if rl_cfg.algorithm.adv_estimator != "gae" else "PPO (GAE)"
    say(f"{estimator}: {rl_cfg.train.steps} steps, sampler '{rl_cfg.sampler.type}', {engine}")
    trainer = rl.RLTrainer(rl_cfg, rl.build_stages(rl_cfg))
    try:
        before = trainer.validate()
        trainer.s.logger.log(before, step=0)
        say(f"val accuracy after SFT: {before['val/acc']:.3f}")
        rl_cfg.train.val_before_train = False
        after = trainer.fit()
    finally:
        trainer.close()

    from rlx.plot import plot_runs

    run_dir = Path(rl_cfg.job.output_dir) / rl_cfg.job.name
    plot_runs([str(run_dir)], str(run_dir / "plots"))
    say(f"curves in {run_dir / 'plots'}")
    result = {"val_acc_before": round(before["val/acc"], 4), "val_acc_after": round(after["val/acc"], 4),
              "minutes": round((time.perf_counter() - start) / 60, 2)}  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0
