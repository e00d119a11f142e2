"""Benchmark: one trainer optimizer step (forward, backward, clip, AdamW) of a ~100M-parameter
Qwen3-like model, against the torch matmul throughput measured in the same run.

Prints JSON lines: the matmul FLOP/s, then tokens/s, achieved FLOP/s and their ratio (`mfu`).
Training FLOPs per token = 6 * (matmul parameters, lm_head included) + 12 * layers * hidden * seq
(attention scores and values, forward + backward; PaLM appendix B convention, causal masking not
discounted). Usage: python benchmarks/train_step.py [--device cuda --dtype bfloat16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlx.models import ModelArgs, build_model
from rlx.trainer.train_step import build_optimizer, build_lr_scheduler, make_generator, pack_micro_batches, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` throughput of an n^3 matmul: the roofline the train step is compared to."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    h, d, L = args.hidden_size, args.head_dim, args.num_hidden_layers
    attn = h * d * (2 * args.num_attention_heads + 2 * args.num_key_value_heads)  # q, o + k, v
    mlp = 3 * h * args.intermediate_size
    matmul_params = L * (attn + mlp) + args.vocab_size * h  # lm_head is a matmul even when tied
    return 6 * matmul_params + 12 * L * h * seq_len


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="sequences per step (one micro-batch each)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (bfloat16 runs under autocast; master weights stay fp32)")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)

    peak = matmul_flops_per_s(device, dtype)
    print(json.dumps({"bench": "matmul", "device": str(device), "dtype": a.dtype, "n": 2048,
                      "flops_per_s": round(peak), "threads": torch.get_num_threads()}), flush=True)

    args = ModelArgs(arch="Qwen3ForCausalLM", vocab_size=a.vocab, hidden_size=a.hidden,
                     intermediate_size=a.intermediate, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                     num_key_value_heads=a.kv_heads,
                     qk_norm=True, tie_word_embeddings=True)  # fmt: skip
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    model.init_weights(seed=0)
    optim_cfg = argparse.Namespace(lr=1e-4, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, lr_schedule="constant",
                                   warmup_steps=0, min_lr_ratio=0.0)  # fmt: skip
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_lr_scheduler(optimizer, optim_cfg, total_steps=a.steps + 1)
    gen = make_generator(0)
    docs = [(torch.randint(0, a.vocab, (a.seq,), generator=gen).tolist(), [1] * a.seq) for _ in range(a.batch)]
    micro_batches = pack_micro_batches(docs, a.seq)

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            train_step(model, optimizer, scheduler, micro_batches, device=device, grad_clip=1.0)
        sync(device)
        return time.perf_counter() - start

    step()  # warm-up: allocator, optimizer state
    seconds = sorted(step() for _ in range(a.steps))
    median = seconds[len(seconds) // 2]
    tokens = a.batch * a.seq
    achieved = flops_per_token(args, a.seq) * tokens / median
    print(json.dumps({
        "bench": "train_step", "device": str(device), "dtype": a.dtype,
        "params": sum(p.numel() for p in model.parameters()), "layers": a.layers, "hidden": a.hidden,
        "vocab": a.vocab, "seq_len": a.seq, "tokens_per_step": tokens, "step_s": round(median, 4),
        "tokens_per_s": round(tokens / median, 1), "flops_per_token": flops_per_token(args, a.seq),
        "achieved_flops_per_s": round(achieved), "matmul_flops_per_s": round(peak), "mfu": round(achieved / peak, 4),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
