"""torchrun script for the weight-transfer parity test: trainer ranks (FSDP or TP over all but the last
rank) perturb their shards of a tiny model and send them (`send_weights`); the last rank, a generator
rank, receives them (`ShardReceiver`), pushes them into a torch-backend engine, and compares with the
same perturbation applied to a plain copy of the model: every tensor, greedy tokens, and the sampled
tokens' logprobs against a full forward of that copy.

Output (generator rank, JSON to --out): {"max_weight_diff", "greedy_equal", "max_logprob_diff", "names",
"device"} (`device`: where the received version was assembled). Run with PYTHONPATH at the repository
root, nproc = trainer ranks + 1. `--backend nccl` (one GPU per rank): the trainer's shards live on its
GPU and go GPU to GPU over the channel's NCCL group; the engine check then runs on CPU copies.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from rlx import distributed
from rlx.config.sections import GeneratorConfig
from rlx.generator import build_generator
from rlx.models import from_pretrained
from rlx.parallel import ParallelDims, build_parallel_model
from rlx.parallel.parallelize import local_slice
from rlx.placement import split_world
from rlx.types import GenerationRequest
from rlx.weight_sync import WeightSync
from rlx.weight_sync.transfer import ShardReceiver, send_weights


def delta(name: str, shape) -> torch.Tensor:
    """The same perturbation of a named tensor on every rank (seeded by the name)."""
    gen = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(name)))
    return torch.randn(shape, generator=gen) * 0.05


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    a = p.parse_args()
    placement = split_world(1, a.backend, timeout_s=300)
    device = placement.weights.device
    if placement.role == "trainer":
        pcfg = SimpleNamespace(dp_replicate=1, dp_shard=-1, tp=a.tp, activation_checkpoint="none", ac_every=1,
                               compile=False, reshard_after_forward=True, param_dtype="float32", reduce_dtype="float32")  # fmt: skip
        dims = ParallelDims.from_config(pcfg, placement.num_trainers)
        dims.build_mesh(device.type)
        model = build_parallel_model(a.model, dims, pcfg, device=device)
        with torch.no_grad():
            for name, param in model.state_dict(keep_vars=True).items():
                if name == "lm_head.weight" and model.args.tie_word_embeddings:
                    continue
                local, index = local_slice(param)
                local.add_(delta(name, param.shape)[index].to(local.device))
        send_weights(model, placement.weights, placement.generator_ranks, 1, flags={"stop": True}, bucket_mb=0.05)
        return
    received = ShardReceiver(placement.weights, placement.trainer_ranks).get(timeout=300)
    arrived_on = sorted({str(t.device) for t in received.tensors.values()})
    received.tensors = {n: t.cpu() for n, t in received.tensors.items()}
    expected = from_pretrained(a.model)
    with torch.no_grad():
        for name, t in expected.state_dict().items():
            if not (name == "lm_head.weight" and expected.args.tie_word_embeddings):
                t.add_(delta(name, t.shape))
    state = expected.state_dict()
    worst = max((received.tensors[n] - state[n]).abs().max().item() for n in received.tensors)
    shadow = from_pretrained(a.model)
    shadow.load_state_dict(received.tensors, strict=False)
    engine = build_generator(GeneratorConfig(backend="torch", max_tokens=6, temperature=1.0, val_temperature=0.0),
                             a.model, max_prompt_length=16)  # fmt: skip
    WeightSync(engine).push(shadow, version=1)
    prompts = [[5, 9, 11], [7, 3], [20, 21, 22, 23]]
    greedy = engine.generate([GenerationRequest(ids) for ids in prompts], validation=True)
    sampled = engine.generate([GenerationRequest(ids, n=2, seed=3) for ids in prompts])
    greedy_equal, lp_diff = True, 0.0
    with torch.no_grad():
        for ids, outs in zip(prompts, greedy):
            seq = list(ids)
            for tok in outs[0].token_ids:
                greedy_equal &= int(expected(torch.tensor([seq]))[0, -1].argmax()) == tok
                seq.append(tok)
        for ids, outs in zip(prompts, sampled):
            for c in outs:
                logits = expected(torch.tensor([ids + c.token_ids]))[0, len(ids) - 1 : -1]
                want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
                lp_diff = max(lp_diff, (want - torch.tensor(c.logprobs)).abs().max().item())
    with open(a.out, "w") as f:
        json.dump({"max_weight_diff": worst, "greedy_equal": bool(greedy_equal), "max_logprob_diff": lp_diff,
                   "names": sorted(received.tensors), "device": arrived_on}, f)  # fmt: skip
    engine.shutdown()


if __name__ == "__main__":
    main()
    distributed.exit_now()  # no interpreter finalization racing gloo's worker threads (see exit_now)
