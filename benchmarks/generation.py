"""Generation benchmark: rlx's vLLM generator vs raw `vllm.LLM.generate` (same engine, same
requests and seeds) vs HF transformers `generate`, in tokens per second.

Prints one JSON line: `rlx_tok_s`, `vllm_tok_s`, `rlx_overhead` (1 - rlx / vllm; target <= 5%),
`hf_tok_s` and `rlx_to_hf_ratio`. rlx and raw vLLM runs alternate so both see the same load.

    python benchmarks/generation.py [--prompts 16 --n 4 --max-tokens 64 --repeats 3]
"""

from __future__ import annotations

import os

# One thread per process: the machines this runs on are shared, and multi-threaded OMP under
# contention spin-waits (times swing 5x). Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ~101M parameters, fp32 (the size FINDINGS.md measured).
MODEL = dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64,
             intermediate_size=2048, vocab_size=32768, tie=False)


def make_prompts(num: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(num)]


def rlx_run(generator, prompts, n: int, max_tokens: int) -> tuple[float, int]:
    from rlx.types import GenerationRequest

    requests = [GenerationRequest(p, n=n, max_tokens=max_tokens, seed=i) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    out = generator.generate(requests)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for group in out for c in group)


def vllm_run(llm, prompts, n: int, max_tokens: int) -> tuple[float, int]:
    from vllm import SamplingParams

    # The same sampling parameters rlx sends (see VLLMGenerator._sampling_params).
    params = [SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=i, logprobs=0,
                             flat_logprobs=True, detokenize=False) for i in range(len(prompts))]
    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for o in out for c in o.outputs)


def hf_run(model_dir: str, prompts, n: int, max_tokens: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    with torch.no_grad():
        model.generate(ids[:1], do_sample=True, max_new_tokens=4, top_k=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_tokens,
                             num_return_sequences=n, pad_token_id=model.config.pad_token_id)
        seconds = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    eos = model.config.eos_token_id
    # Tokens up to and including the first EOS of each row (HF pads after it).
    is_eos = (new == eos).int()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return seconds, int((~after_eos).sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-dir", default="")
    a = p.parse_args()

    from rlx.config import GeneratorConfig
    from rlx.generator import build_generator
    from rlx.models.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model_dir or str(make_tiny(Path(tmp) / "m100", seed=0, **MODEL))
        prompts = make_prompts(a.prompts, a.prompt_length, MODEL["vocab_size"])
        cfg = GeneratorConfig(dtype="float32", max_tokens=a.max_tokens, kv_cache_space_gib=1.0)
        generator = build_generator(cfg, model_dir, max_prompt_length=a.prompt_length)
        rlx_run(generator, prompts, a.n, a.max_tokens)  # warm-up (the first generate is slow)
        rlx_rates, vllm_rates = [], []
        for _ in range(a.repeats):
            s, t = rlx_run(generator, prompts, a.n, a.max_tokens)
            rlx_rates.append(t / s)
            s, t = vllm_run(generator.llm, prompts, a.n, a.max_tokens)
            vllm_rates.append(t / s)
        generator.shutdown()
        hf_s, hf_tokens = hf_run(model_dir, prompts, a.n, a.max_tokens)
    rlx_tok_s, vllm_tok_s, hf_tok_s = statistics.median(rlx_rates), statistics.median(vllm_rates), hf_tokens / hf_s
    print(json.dumps({
        "benchmark": "generation",
        "prompts": a.prompts, "prompt_length": a.prompt_length, "n": a.n, "max_tokens": a.max_tokens,
        "params": "~101M fp32" if not a.model_dir else a.model_dir,
        "omp_threads": torch.get_num_threads(),
        "rlx_tok_s": round(rlx_tok_s, 1),
        "vllm_tok_s": round(vllm_tok_s, 1),
        "rlx_overhead": round(1 - rlx_tok_s / vllm_tok_s, 4),
        "hf_tok_s": round(hf_tok_s, 1),
        "rlx_to_hf_ratio": round(rlx_tok_s / hf_tok_s, 2),
        "rlx_runs": [round(r, 1) for r in rlx_rates], "vllm_runs": [round(r, 1) for r in vllm_rates],
    }), flush=True)


if __name__ == "__main__":
    main()
