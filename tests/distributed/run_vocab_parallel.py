"""torchrun script for test_vocab_parallel.py: vocabulary-parallel logprobs/entropy on a TP mesh equal
one process's, gradients land in each rank's lm_head shard, and the full weight is never gathered.

Rank 0 writes JSON to --out: {"kernels": {case: max abs diff}, "policy": {...}, "guard": {...}}, each
diff the max over ranks. Run with PYTHONPATH at the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.tensor._dispatch as dtensor_dispatch
import torch.distributed.tensor._redistribute as dtensor_redistribute
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rlx import distributed
from rlx.algorithms.logprobs import logprobs_from_hidden, token_stats_from_hidden
from rlx.models import from_pretrained
from rlx.parallel import ParallelDims, build_parallel_model
from rlx.trainer import policy
from rlx.trainer.policy import compute_logprobs, compute_token_stats, pack_logprobs, pack_rollouts
from rlx.types import Rollout


class FullVocabGuard(TorchDispatchMode):
    """Watches a region on one rank: every tensor an op creates (a DTensor's local shard) and every
    DTensor redistribution. `violations`: any all-gather collective, any gathering redistribution (to
    Replicate) of a vocabulary-sized tensor, `DTensor.full_tensor` (raises), and any tensor with the full
    vocabulary as a dimension or as many bytes as the full lm_head weight. The one exception, kept apart in
    `embedding`, is the tied input embedding's backward: DTensor's embedding_dense_backward builds a dense
    [V, H] gradient on each rank and then slices it to the shard (Replicate -> Shard, no communication)."""

    def __init__(self, vocab: int, weight_bytes: int, fsdp: bool = False):
        super().__init__()
        self.vocab, self.limit, self.violations, self.embedding, self.ops = vocab, weight_bytes, [], [], 0
        # FSDP all-gathers parameters over data-parallel ranks (back to each rank's TP shard): allowed,
        # with the size check still bounding what they produce.
        self.fsdp = fsdp

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = str(func)
        if not self.fsdp and ("all_gather" in name or "allgather" in name):
            self.violations.append(f"collective {name}")
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                local = t._local_tensor if isinstance(t, DTensor) else t
                if self.vocab in local.shape or local.numel() * local.element_size() >= self.limit:
                    found = self.embedding if "embedding_dense_backward" in name else self.violations
                    found.append(f"{name} made {tuple(local.shape)}")
        return out

    @contextlib.contextmanager
    def watching(self):
        original = dtensor_redistribute.redistribute_local_tensor

        def redistribute(local, current, target, **kw):  # implicit redistributions inside DTensor ops
            if self.vocab in tuple(current.shape):
                gathers = any(t.is_replicate() and not c.is_replicate()
                              for c, t in zip(current.placements, target.placements))  # fmt: skip
                found = self.violations if gathers else self.embedding
                found.append(f"redistribute {current.placements}->{target.placements} {tuple(current.shape)}")
            return original(local, current, target, **kw)

        def no_full_tensor(*_a, **_k):
            raise AssertionError("DTensor.full_tensor() called inside the vocabulary-parallel region")

        saved = DTensor.full_tensor
        dtensor_dispatch.redistribute_local_tensor = dtensor_redistribute.redistribute_local_tensor = redistribute
        DTensor.full_tensor = no_full_tensor
        try:
            with self:
                yield self
        finally:
            dtensor_dispatch.redistribute_local_tensor = dtensor_redistribute.redistribute_local_tensor = original
            DTensor.full_tensor = saved


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0


def kernel_cases(tp_mesh, impls: list[str], guards: list) -> dict[str, float]:
    """Function level: odd vocabulary (uneven shards), 1 token, masked tokens, temperature, entropy on/off."""
    out = {}
    for impl in impls:
        for n, v, temperature, entropy in ((13, 97, 0.7, True), (1, 97, 1.0, False), (9, 64, 1.3, True)):
            g = torch.Generator().manual_seed(n * 1000 + v)  # the same inputs on every rank
            full = 0.5 * torch.randn(v, 16, generator=g)
            hidden = torch.randn(n, 16, generator=g)
            labels = torch.randint(0, v, (n,), generator=g)
            labels[0] = v - 1  # the last row of the last shard
            g_lp = torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.3)  # masked tokens: 0
            g_ent = torch.randn(n, generator=g)
            results = []
            for weight in (full.clone(), distribute_tensor(full.clone(), tp_mesh, [Shard(0)])):
                weight.requires_grad_()
                h = hidden.clone().requires_grad_()
                guard = FullVocabGuard(v, v * 16 * 4)
                region = guard.watching() if isinstance(weight, DTensor) else contextlib.nullcontext()
                with region:
                    lp, ent = logprobs_from_hidden(h, weight, labels, chunk_size=4, temperature=temperature,
                                                   return_entropy=True, backend=impl)  # fmt: skip
                    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
                    loss.backward()
                    max_prob, token_ent = token_stats_from_hidden(h.detach(), weight.detach(), chunk_size=4,
                                                                  temperature=temperature, backend=impl)  # fmt: skip
                if isinstance(weight, DTensor):
                    guards.append((f"{impl}/n{n}v{v}", guard))
                    # This rank's rows of the single-process gradient: compare the local shard only.
                    (chunk,) = weight.__create_chunk_list__()
                    rows = slice(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0])
                    wgrad = weight.grad.to_local()
                else:
                    wgrad = weight.grad
                results.append((lp, ent, h.grad, wgrad, max_prob, token_ent))
            single, parallel = results
            single = (*single[:3], single[3][rows], *single[4:])
            name = f"{impl}/n{n}v{v}t{temperature}{'/entropy' if entropy else ''}"
            out[name] = max(diff(a, b) for a, b in zip(parallel, single))
        # A rank's dummy micro-batch (no response tokens) still meets its TP peers in the all-reduces.
        weight = distribute_tensor(torch.randn(97, 16), tp_mesh, [Shard(0)]).requires_grad_()
        h = torch.randn(0, 16, requires_grad=True)
        lp, ent = logprobs_from_hidden(h, weight, torch.zeros(0, dtype=torch.long), return_entropy=True, backend=impl)
        (lp.sum() + ent.sum()).backward()
        stats = token_stats_from_hidden(h.detach(), weight.detach(), backend=impl)
        out[f"{impl}/no_tokens"] = float(lp.shape != (0,) or stats[0].shape != (0,) or weight.grad.to_local().any())
    return out


def guard_controls(tp_mesh) -> dict[str, float]:
    """The guard is not blind: the old path (gather the weight, then compute) trips it both ways."""
    weight = distribute_tensor(torch.randn(97, 16), tp_mesh, [Shard(0)])
    caught = {}
    guard = FullVocabGuard(97, 97 * 16 * 4)
    try:
        with guard.watching():
            weight.full_tensor()
        caught["full_tensor"] = 0.0
    except AssertionError:
        caught["full_tensor"] = 1.0
    guard = FullVocabGuard(97, 97 * 16 * 4)
    with guard.watching():
        weight.redistribute(tp_mesh, [Replicate()])
    caught["redistribute_to_replicate"] = float(len(guard.violations) > 0)
    return caught


def make_rollouts(vocab: int, n: int = 6) -> list[Rollout]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        P, L = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        ids = torch.randint(0, vocab, (P + L,), generator=g).tolist()
        out.append(Rollout(ids[:P], ids[P:], [-1.0] * L, group_id=f"g{i % 2}", reward=float(i % 2)))
    return out


def grads_after_update(model, rollouts, guard=None) -> torch.Tensor:
    """One micro-batch's differentiable logprobs + entropy through the policy path, then backward."""
    (pack,) = pack_rollouts(rollouts, 10_000)
    region = guard.watching() if guard is not None else contextlib.nullcontext()
    with region:
        lp, ent = pack_logprobs(model, pack, torch.device("cpu"), temperature=0.8, chunk_size=5, with_entropy=True)
        weights = torch.linspace(-1.0, 1.0, lp.numel())
        ((lp * weights).sum() + 0.3 * ent.sum()).backward()
    return lp.detach()


def policy_case(path: str, dims: ParallelDims, a, guards: list) -> dict[str, float]:
    """The real policy path: a tiny Qwen3 (tied embeddings) under the mesh vs the same weights in one process."""
    pcfg = SimpleNamespace(activation_checkpoint="none", ac_every=1, compile=False, reshard_after_forward=True,
                           param_dtype="float32", reduce_dtype="float32")  # fmt: skip
    model = build_parallel_model(path, dims, pcfg, device=torch.device("cpu"))
    plain = from_pretrained(path)
    vocab, hidden = model.args.vocab_size, model.args.hidden_size
    rollouts = make_rollouts(vocab)
    kw = dict(device=torch.device("cpu"), token_budget=40, temperature=0.8, chunk_size=5, dp_group=None)
    out = {}
    guard = FullVocabGuard(vocab, vocab * hidden * 4, fsdp=dims.fsdp_enabled)
    with guard.watching():
        lp_tp = compute_logprobs(model, rollouts, **kw)
        stats_tp = compute_token_stats(model, rollouts, **kw)
    guards.append(("policy/no_grad", guard))
    out["compute_logprobs"] = diff(lp_tp, compute_logprobs(plain, rollouts, **kw))
    stats_plain = compute_token_stats(plain, rollouts, **kw)
    out["token_stats"] = max(diff(torch.tensor(a_), torch.tensor(b_))
                             for x, y in zip(stats_tp, stats_plain) for a_, b_ in zip(x, y))  # fmt: skip
    guard = FullVocabGuard(vocab, vocab * hidden * 4, fsdp=dims.fsdp_enabled)
    lp_tp = grads_after_update(model, rollouts, guard)
    guards.append(("policy/update", guard))
    out["pack_logprobs"] = diff(lp_tp, grads_after_update(plain, rollouts))
    # FSDP sums gradients over data-parallel ranks that all computed the same loss here.
    grads = {n: p.grad for n, p in model.named_parameters()}
    plain_grads = dict(plain.named_parameters())
    worst = 0.0
    for name, grad in grads.items():
        full = grad.full_tensor() if isinstance(grad, DTensor) else grad
        key = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        worst = max(worst, diff(full / dims.dp_size, plain_grads[key].grad))
    out["param_grads"] = worst
    out["lm_head_is_dtensor"] = float(isinstance(model.lm_head.weight, DTensor))
    # The update's dummy backward (a zero loss through every parameter, rl_update) uses `local_weight`,
    # which now hands over the local shard: it must run without gathering either.
    guard = FullVocabGuard(vocab, vocab * hidden * 4, fsdp=dims.fsdp_enabled)
    with guard.watching():
        pack = policy.dummy_pack()
        zero_loss = lambda h, w: (h.sum() + policy.local_weight(w).sum()) * 0.0  # noqa: E731
        model(pack.input_ids, pack.position_ids, output_fn=zero_loss).backward()
    guards.append(("policy/dummy_backward", guard))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dp-shard", type=int, default=1)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--impls", default="torch", help="comma-separated kernel implementations for the function cases")
    a = p.parse_args()
    if "triton" in a.impls and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels in the CPU interpreter
    device = distributed.init_distributed("gloo")
    dims = ParallelDims(1, a.dp_shard, a.tp, distributed.world_size())
    dims.build_mesh(device.type)
    guards: list = []
    result = {"kernels": kernel_cases(dims.get_mesh("tp"), a.impls.split(","), guards) if a.dp_shard == 1 else {}}
    result["policy"] = policy_case(a.model, dims, a, guards)
    result["controls"] = guard_controls(dims.get_mesh("tp"))
    result = {k: {n: max_over_ranks(v) for n, v in d.items()} for k, d in result.items()}
    violations = [f"{name}: {v}" for name, g in guards for v in g.violations[:3]]
    embedding = sorted({f"{name}: {v}" for name, g in guards for v in g.embedding})
    result["guard"] = {"violations": violations, "violations_any_rank": max_over_ranks(len(violations)),
                       "embedding_backward": embedding, "regions": len(guards),
                       "min_ops_seen": min(g.ops for _, g in guards)}  # fmt: skip
    if distributed.is_main():
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    distributed.teardown_distributed()


if __name__ == "__main__":
    main()
    distributed.exit_now()  # no interpreter finalization racing gloo's worker threads (see exit_now)
