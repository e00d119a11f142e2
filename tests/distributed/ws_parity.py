"""torchrun worker for the weight-sync parity test: trainer shards -> colocated vLLM engines.

Every rank builds one engine (generator TP = --gen-tp), then for each trainer layout in --layouts
(e.g. "2x1,1x2" = dp_shard x tp) builds the sharded rlx model, takes one AdamW step, checks that
the engine is stale, pushes, and checks greedy tokens (argmax under teacher forcing) and
sampled-token logprobs against the sharded model. Prints one JSON line per layout on rank 0 and
exits non-zero on a mismatch. Run with PYTHONPATH at the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from rlx import distributed
from rlx.config import GeneratorConfig
from rlx.generator import build_generator
from rlx.parallel import ParallelDims, build_parallel_model
from rlx.types import GenerationRequest
from rlx.weight_sync import WeightSync
from rlx.weight_sync.check import compare_with_model

MAX_TOKENS = 32
TEMPERATURE = 0.7


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def optimizer_step(model: torch.nn.Module, vocab: int, seed: int) -> None:
    """One AdamW step on random tokens (the same batch on every rank)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits = _full(model(ids[:, :-1])).float()
    loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check(generator, model, prompts) -> dict[str, float]:
    greedy = generator.generate([GenerationRequest(p, temperature=0.0) for p in prompts])
    sampled = generator.generate([GenerationRequest(p, temperature=TEMPERATURE, seed=5) for p in prompts])
    g = compare_with_model(model, prompts, [c[0] for c in greedy], temperature=0.0)
    s = compare_with_model(model, prompts, [c[0] for c in sampled], temperature=TEMPERATURE)
    return {"greedy_tokens": g["tokens"], "argmax_mismatches": g["argmax_mismatches"],
            "sampled_tokens": s["tokens"], "max_logprob_diff": s["max_logprob_diff"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--gen-tp", type=int, default=1)
    p.add_argument("--layouts", default="2x1,1x2", help="comma-separated dp_shard x tp")
    a = p.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    device = distributed.init_distributed("gloo")
    world, rank = distributed.world_size(), distributed.rank()
    cfg = GeneratorConfig(tp=a.gen_tp, dtype="float32", max_tokens=MAX_TOKENS, kv_cache_space_gib=0.25)
    generator = build_generator(cfg, a.model, max_prompt_length=192)
    g = torch.Generator().manual_seed(0)
    # 8 short prompts and one longer than a 128-token KV block (prefix-cache path).
    prompts = [torch.randint(7, 500, (4 + 3 * i,), generator=g).tolist() for i in range(8)]
    prompts.append(torch.randint(7, 500, (140,), generator=g).tolist())
    pcfg = SimpleNamespace(activation_checkpoint="none", ac_every=1, compile=False, reshard_after_forward=True,
                           param_dtype="float32", reduce_dtype="float32")
    ok = True
    for index, layout in enumerate(a.layouts.split(",")):
        dp_shard, tp = (int(x) for x in layout.split("x"))
        dims = ParallelDims(1, dp_shard, tp, world)
        dims.build_mesh(device.type)
        model = build_parallel_model(a.model, dims, pcfg, device=device)
        generator.generate([GenerationRequest(q, temperature=0.0) for q in prompts])  # warm the prefix cache
        optimizer_step(model, model.args.vocab_size, seed=100 + index)  # differs per layout
        stale = check(generator, model, prompts)
        push = WeightSync(generator).push(model, version=1)
        fresh = check(generator, model, prompts)
        passed = (stale["argmax_mismatches"] > 0 and fresh["argmax_mismatches"] == 0
                  and fresh["max_logprob_diff"] < 1e-4 and fresh["greedy_tokens"] >= 8 * MAX_TOKENS)
        ok &= passed
        if rank == 0:
            print(json.dumps({"gen_tp": a.gen_tp, "dp_shard": dp_shard, "tp": tp, "passed": passed,
                              "stale": stale, "fresh": fresh, **push}), flush=True)
        del model  # the next layout starts from the checkpoint; the engine holds this one's step
    generator.shutdown()  # before the process group goes away (vLLM's teardown destroys it)
    distributed.teardown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
