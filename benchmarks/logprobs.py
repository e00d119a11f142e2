"""Peak extra memory and time of logprob + entropy (forward and backward) from hidden states: naive full
logits vs the rlx.kernels backends (torch chunked, Triton on CUDA) and vocabulary-parallel TP=2 (torchrun).

Each variant runs in its own process. Peak extra = high-water mark minus what exists once the inputs are
built (CPU: RSS, VmHWM reset through /proc/self/clear_refs; CUDA: max_memory_allocated), so it counts the
logits, their gradients and the fp32 weight gradient. Time: median of --reps forward+backward passes after
a warm-up pass. One JSON line per (variant, vocabulary), with ratios to naive.
Usage: python benchmarks/logprobs.py [--reps 3] [--vocabs 32000,152064]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

T, H = 1024, 256  # tokens per micro-batch, hidden size: small H keeps the [T, V] logits the dominant cost
VOCABS = (32000, 152064)  # Llama-2 / Qwen2.5 vocabularies
# (variant, token chunk): the torch backend at a chunk that fits 152k vocabularies and at the config default.
VARIANTS = (("naive", None), ("torch", 128), ("torch", 1024), ("triton", 128), ("vocab_parallel_tp2", 128))
# Large buffers from mmap, returned to the OS when freed, so RSS follows the live tensors: glibc's default
# dynamic threshold keeps freed buffers in the heap and makes the measured peak depend on history.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def _vm_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1])


def reset_peak(device: torch.device) -> int:
    """Start a fresh high-water mark; returns the bytes in use now. On Linux, writing 5 to clear_refs
    resets VmHWM to the current RSS (so memory freed before the measurement cannot hide a peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_kib("VmRSS") * 1024
    except OSError:  # not Linux: the process-lifetime maximum is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _vm_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inputs(v: int, device: torch.device, rows: slice | None = None):
    """hidden [T, H], labels [T] and the weight [V, H] (or only `rows` of it, generated row-block-wise so
    that a TP rank never builds the full weight), the same values in every process."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    labels = torch.randint(0, v, (T,), generator=g)
    rows = rows or slice(0, v)
    weight = torch.empty(rows.stop - rows.start, H)
    for start in range(rows.start, rows.stop, 4096):  # seeded per block of 4096 rows
        stop = min(start + 4096, rows.stop)
        block = torch.randn(4096, H, generator=torch.Generator().manual_seed(1 + start // 4096))
        weight[start - rows.start : stop - rows.start] = 0.02 * block[: stop - start]
    return hidden.to(device).requires_grad_(), weight.to(device).requires_grad_(), labels.to(device)


def fwd_bwd(variant: str, hidden, weight, labels, chunk: int) -> None:
    from rlx.algorithms.logprobs import entropy_from_logits, logprobs_from_hidden, logprobs_from_logits

    if variant == "naive":
        logits = (hidden @ weight.t()).float()
        lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    else:
        backend = "torch" if variant == "vocab_parallel_tp2" else variant
        lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk, return_entropy=True, backend=backend)
    (lp.sum() + 0.1 * ent.sum()).backward()
    hidden.grad = weight.grad = None


def measure(variant: str, hidden, weight, labels, chunk: int, reps: int, device: torch.device) -> dict:
    # Warm up the same code path on tiny inputs so library/thread-pool start-up is not counted as peak.
    tiny = (hidden[:4].detach().requires_grad_(), weight[:64].detach().requires_grad_(), labels[:4] % 64)
    fwd_bwd(variant, *tiny, chunk)
    base = reset_peak(device)
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fwd_bwd(variant, hidden, weight, labels, chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    peak = (peak_bytes(device) - base) / 2**20
    return {"fwd_bwd_s": round(statistics.median(seconds), 3), "peak_extra_MiB": round(peak, 1)}


def worker(variant: str, v: int, chunk: int, reps: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if variant != "vocab_parallel_tp2":
        result = measure(variant, *inputs(v, device), chunk, reps, device)
        print(json.dumps({**result, "threads": torch.get_num_threads()}))
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    per = -(-v // world)  # torch's Shard(0) layout: ceil(V / world) rows per rank, the last one shorter
    hidden, local, labels = inputs(v, device, slice(rank * per, min(v, (rank + 1) * per)))
    weight = DTensor.from_local(local.detach(), mesh, [Shard(0)], shape=(v, H), stride=(H, 1)).requires_grad_()
    result = measure(variant, hidden, weight, labels, chunk, reps, device)
    worst = torch.tensor([result["fwd_bwd_s"], result["peak_extra_MiB"]], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the slowest rank and the largest peak
    if rank == 0:
        print(json.dumps({"fwd_bwd_s": worst[0].item(), "peak_extra_MiB": worst[1].item(), "per_rank": True,
                          "threads": f"{torch.get_num_threads()} per rank"}))  # fmt: skip
    dist.destroy_process_group()


def launch(variant: str, v: int, chunk: int, reps: int) -> dict:
    here = os.path.abspath(__file__)
    args = ["--worker", variant, "--vocab", str(v), "--chunk", str(chunk), "--reps", str(reps)]
    if variant == "vocab_parallel_tp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", here, *args]
    else:
        cmd = [sys.executable, here, *args]
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.path.dirname(os.path.dirname(here)), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", default="")
    p.add_argument("--vocab", type=int, default=0)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.vocab, a.chunk, a.reps)
    cuda = torch.cuda.is_available()
    for v in map(int, a.vocabs.split(",")):
        naive = None
        for variant, chunk in VARIANTS:
            line = {"benchmark": "logprobs", "variant": variant, "device": "cuda" if cuda else "cpu", "T": T, "H": H,
                    "V": v, "chunk_size": chunk}  # fmt: skip
            if variant == "triton" and not cuda:
                print(json.dumps({**line, "skipped": "no CUDA device (the Triton kernels are tested on CPU "
                                  "under TRITON_INTERPRET=1 for correctness only)"}))  # fmt: skip
                continue
            line.update(launch(variant, v, chunk or 0, a.reps))
            naive = naive or line
            line["mem_vs_naive"] = round(naive["peak_extra_MiB"] / max(line["peak_extra_MiB"], 1e-9), 2)
            line["time_vs_naive"] = round(line["fwd_bwd_s"] / naive["fwd_bwd_s"], 2)
            line["full_logits_fp32_MiB"] = round(T * v * 4 / 2**20, 1)
            line["weight_grad_fp32_MiB"] = round(v * H * 4 / 2**20, 1)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
