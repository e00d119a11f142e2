"""torchrun script for the distributed tests: train a tiny model for a few steps on a fixed global
batch under a given mesh, optionally saving / resuming DCP checkpoints, and write what happened.

Output (rank 0, torch.save to --out): {"losses": [...], "grad_norms": [...], "params": {name: full
tensor} after step --snapshot (default: the last), "rng": draws of the trainer generator, "start"}.
Run with PYTHONPATH at the repository root.

Adam's eps defaults to 1e-4 here: with eps=1e-8, g / sqrt(v) turns fp32 reduction-order noise on
near-zero gradients into update differences of ~1e-5 (observed with TP), which would hide real bugs
behind a loose tolerance.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from rlx import distributed
from rlx.parallel import ParallelDims, build_parallel_model
from rlx.trainer.train_step import build_lr_scheduler, build_optimizer, make_generator, pack_micro_batches, train_step


def global_batch(step: int, vocab: int, num_docs: int = 6) -> list[tuple[list[int], list[int]]]:
    """Deterministic documents (prompt tokens untrained, response tokens trained) for one step."""
    gen = make_generator(1000 + step)
    docs = []
    for _ in range(num_docs):
        n = int(torch.randint(6, 20, (1,), generator=gen))
        prompt = int(torch.randint(2, n - 2, (1,), generator=gen))
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        docs.append((ids, [0] * prompt + [1] * (n - prompt)))
    return docs


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for name, p in model.state_dict().items()}


def check_reference(model, path, dims, pcfg, device) -> None:
    """The frozen reference model: same sharding, no trainable parameter, same logits as the policy."""
    reference = build_parallel_model(path, dims, pcfg, device=device, reference=True)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    ids = torch.randint(0, model.args.vocab_size, (1, 16), generator=make_generator(5))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids), model(ids), atol=1e-5, rtol=1e-5)
    del reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dp-shard", type=int, default=-1)
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ac", default="none")
    p.add_argument("--micro-tokens", type=int, default=24)
    p.add_argument("--ckpt-dir", default="")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--check-reference", action="store_true", help="also build the frozen reference model and check it")
    p.add_argument("--eps", type=float, default=1e-4)
    p.add_argument("--snapshot", type=int, default=0, help="record full params after this step (0: the last)")
    a = p.parse_args()

    device = distributed.init_distributed("gloo")
    pcfg = SimpleNamespace(dp_replicate=a.dp_replicate, dp_shard=a.dp_shard, tp=a.tp, activation_checkpoint=a.ac,
                           ac_every=2, compile=False, reshard_after_forward=True, param_dtype="float32",
                           reduce_dtype="float32")
    ocfg = SimpleNamespace(lr=1e-3, weight_decay=0.1, betas=[0.9, 0.95], eps=a.eps, lr_schedule="cosine",
                           warmup_steps=1, min_lr_ratio=0.1)
    dims = ParallelDims.from_config(pcfg, distributed.world_size())
    dims.build_mesh(device.type)
    model = build_parallel_model(a.model, dims, pcfg, device=device)
    if a.check_reference:
        check_reference(model, a.model, dims, pcfg, device)
    optimizer = build_optimizer(model, ocfg)
    scheduler = build_lr_scheduler(optimizer, ocfg, total_steps=10)
    generator = make_generator(7)
    ckpt = None
    start = 0
    if a.ckpt_dir:
        from rlx.checkpoint import Checkpointer

        ckpt_cfg = SimpleNamespace(enable=True, interval=max(a.save_every, 1), keep_last=2, async_save=a.async_save,
                                   dir=a.ckpt_dir, resume="auto" if a.resume else "none", init_from="")
        ckpt = Checkpointer(ckpt_cfg, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator,
                            hf_dir=a.model)
        state = ckpt.maybe_resume()
        if state is not None:
            start = state.step
            assert state.data == {"next_step": start}, state.data

    losses, norms = [], []
    dp_group = dims.get_mesh("dp").get_group()
    for step in range(start, a.steps):
        docs = global_batch(step, model.args.vocab_size)[dims.dp_rank :: dims.dp_size]
        mbs = pack_micro_batches(docs, a.micro_tokens)
        m = train_step(model, optimizer, scheduler, mbs, device=device, dp_group=dp_group, grad_clip=0.5)
        torch.randint(0, 10, (3,), generator=generator)  # consume trainer RNG as a real loop would
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        if step + 1 == a.snapshot:
            params = full_params(model)
        if ckpt is not None and a.save_every and (step + 1) % a.save_every == 0:
            ckpt.save(step + 1, data_state={"next_step": step + 1})
    if ckpt is not None:
        ckpt.close()
    if not a.snapshot:
        params = full_params(model)
    if distributed.is_main():
        torch.save({"losses": losses, "grad_norms": norms, "params": params, "start": start,
                    "rng": torch.randint(0, 1000, (4,), generator=generator).tolist(),
                    "world_size": distributed.world_size()}, a.out)
    distributed.teardown_distributed()


if __name__ == "__main__":
    main()
    distributed.exit_now()  # no interpreter finalization racing gloo's worker threads (see exit_now)
