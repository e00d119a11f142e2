"""Peak memory and time of chunked vs naive log-prob + entropy (forward and backward) from hidden states.

Each variant runs in its own subprocess; peak = RSS high-water (getrusage) minus the RSS after inputs exist.
"""

import json
import resource
import subprocess
import sys
import time

import torch

T, H, V = 4096, 512, 32000


def run(variant: str, chunk_size: int) -> None:
    from rlx.algorithms import entropy_from_logits, logprobs_from_hidden, logprobs_from_logits

    torch.manual_seed(0)
    hidden = torch.randn(T, H, requires_grad=True)
    weight = (0.02 * torch.randn(V, H)).requires_grad_()
    labels = torch.randint(0, V, (T,))
    # Warm up the same code path on tiny inputs so library/thread-pool start-up is not counted as peak.
    tiny_h, tiny_w = torch.randn(8, H, requires_grad=True), torch.randn(64, H, requires_grad=True)
    lp0, ent0 = logprobs_from_hidden(tiny_h, tiny_w, labels[:8] % 64, chunk_size=4, return_entropy=True)
    (lp0.sum() + ent0.sum() + entropy_from_logits(tiny_h @ tiny_w.t()).sum()).backward()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "naive":
        logits = hidden @ weight.t()
        lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    else:
        lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size, return_entropy=True)
    (lp.sum() + 0.1 * ent.sum()).backward()
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "benchmark": "logprobs_from_hidden", "variant": variant, "chunk_size": chunk_size if variant != "naive" else None,
        "T": T, "H": H, "V": V, "fwd_bwd_s": round(seconds, 3), "peak_extra_MiB": round((peak_kb - base_kb) / 1024, 1),
        "full_logits_fp32_MiB": round(T * V * 4 / 2**20, 1), "weight_grad_fp32_MiB": round(V * H * 4 / 2**20, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1], int(sys.argv[2]))
    else:
        for variant, chunk in (("naive", 0), ("chunked", 1024), ("chunked", 256)):
            subprocess.run([sys.executable, __file__, variant, str(chunk)], check=True)
