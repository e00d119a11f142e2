"""The trainer's step machinery in one process: packing, global-token loss normalization,
grad-norm clipping, LR schedules, the trainer RNG, and ParallelDims validation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlx.errors import UserError
from rlx.models import ModelArgs, build_model
from rlx.parallel import ParallelDims
from rlx.trainer.train_step import (
    IGNORE_INDEX, NonFiniteError, build_lr_scheduler, build_optimizer, clip_grad_norm_, eval_loss,
    forward_backward, grad_norm, lr_factor, make_generator, pack_micro_batches, train_step,
)  # fmt: skip

OPTIM = SimpleNamespace(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, lr_schedule="constant",
                        warmup_steps=0, min_lr_ratio=0.0)  # fmt: skip


def tiny_model(seed: int = 0):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, qk_norm=True)  # fmt: skip
    model = build_model(args)
    model.init_weights(seed=seed)
    return model


def docs(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    gen = make_generator(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=gen))
        ids = torch.randint(0, 64, (length,), generator=gen).tolist()
        out.append((ids, [0, 0] + [1] * (length - 2)))
    return out


def test_pack_micro_batches_respects_budget_and_documents():
    batch = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9, 10, 11], [0, 0, 0, 1, 1, 1])]
    mbs = pack_micro_batches(batch, token_budget=6)
    # one document per row, shortest first, rows right-padded; a micro-batch holds rows x width <= budget
    assert [mb.input_ids.tolist() for mb in mbs] == [[[4, 5, 0], [1, 2, 3]], [[6, 7, 8, 9, 10, 11]]]
    assert mbs[0].position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    # position i predicts token i+1 of the same document, only where that token is a target
    assert mbs[0].labels.tolist() == [[5, IGNORE_INDEX, IGNORE_INDEX], [2, 3, IGNORE_INDEX]]
    assert mbs[1].labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11, IGNORE_INDEX]]
    assert [mb.num_loss_tokens for mb in mbs] == [3, 3]
    assert [mb.num_tokens for mb in mbs] == [5, 6]  # padding is not counted
    assert len(pack_micro_batches(batch, token_budget=5)) == 3  # the long document alone, over budget


def test_micro_batching_gives_the_gradient_of_the_global_token_mean():
    """Splitting a batch into micro-batches changes nothing: each micro-batch's token-loss sum is
    divided by the total token count and the gradients add up."""
    batch = docs(6)
    grads = []
    for budget in (1000, 16):
        model = tiny_model()
        mbs = pack_micro_batches(batch, budget)
        m = forward_backward(model, mbs, lambda mod, mb: _ce_sum(mod, mb), device=torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert m["num_loss_tokens"] == sum(sum(mask[1:]) for _, mask in batch)
    assert len(pack_micro_batches(batch, 16)) > 1
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def _ce_sum(model, mb):
    logits = model(mb.input_ids, mb.position_ids)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), mb.labels.flatten(), reduction="sum"), {}


def test_eval_loss_is_the_token_mean():
    model = tiny_model()
    mbs = pack_micro_batches(docs(4), 20)
    total = sum(_ce_sum(model, mb)[0].item() for mb in mbs)
    count = sum(mb.num_loss_tokens for mb in mbs)
    assert eval_loss(model, mbs, device=torch.device("cpu")) == pytest.approx(total / count, rel=1e-6)


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(copies, 1.0)
    assert grad_norm(params).item() == pytest.approx(expected.item(), rel=1e-6)
    norm = clip_grad_norm_(params, 1.0)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for c, p in zip(copies, params):
        torch.testing.assert_close(p.grad, c.grad)
    assert grad_norm(params).item() == pytest.approx(1.0, rel=1e-5)


def test_train_step_updates_and_stops_on_non_finite_loss():
    model = tiny_model()
    opt = build_optimizer(model, OPTIM)
    sched = build_lr_scheduler(opt, OPTIM, total_steps=10)
    mbs = pack_micro_batches(docs(4), 32)
    cpu = torch.device("cpu")
    first = train_step(model, opt, sched, mbs, device=cpu, grad_clip=1.0)
    second = train_step(model, opt, sched, mbs, device=cpu, grad_clip=1.0)
    assert second["loss"] < first["loss"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nan_loss = lambda mod, mb: (_ce_sum(mod, mb)[0] * float("nan"), {})  # noqa: E731
    with pytest.raises(NonFiniteError):
        train_step(model, opt, sched, mbs, nan_loss, device=cpu, grad_clip=1.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a non-finite step"


def test_weight_decay_only_on_matrices():
    opt = build_optimizer(tiny_model(), OPTIM)
    for group in opt.param_groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_lr_schedules():
    kw = dict(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_factor(s, schedule="constant", **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, schedule="cosine", **kw) for s in range(16)]
    assert cosine[3] == 1.0 and cosine[4] == 1.0
    assert cosine[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine[14] == pytest.approx(0.1) and cosine[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:]))
    with pytest.raises(ValueError, match="linear"):
        lr_factor(0, schedule="linear", **kw)


def test_trainer_generator_is_independent_of_the_global_rng():
    a, b = make_generator(3), make_generator(3)
    x = torch.rand(4, generator=a)
    torch.manual_seed(123)  # what the vLLM engine does to the global RNG
    torch.rand(10)
    assert torch.equal(x, torch.rand(4, generator=b))


# ---- ParallelDims (no process group needed) ----------------------------------------------------


def test_parallel_dims_fill_and_validate():
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, tp=2, world_size=8)
    assert (dims.dp_shard, dims.dp_size) == (4, 4)
    with pytest.raises(UserError, match=r"dp_replicate\*dp_shard\*tp = 1\*3\*2 = 6 does not equal world size 4"):
        ParallelDims(1, 3, 2, world_size=4)
    with pytest.raises(UserError, match=r"dp_replicate\*tp = 1\*3 = 3 does not divide world size 4"):
        ParallelDims(1, -1, 3, world_size=4)
    with pytest.raises(UserError, match="tp must be >= 1"):
        ParallelDims(1, 1, 0, world_size=1)


def test_parallel_dims_tp_must_divide_the_model():
    args = ModelArgs(vocab_size=96, hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=3)
    ParallelDims(1, 1, 3, world_size=3).validate_model(args)
    with pytest.raises(UserError) as e:
        ParallelDims(1, 1, 2, world_size=2).validate_model(args)
    assert "num_key_value_heads=3" in str(e.value) and "num_attention_heads" not in str(e.value)
    with pytest.raises(UserError, match="num_attention_heads=6, num_key_value_heads=3"):
        ParallelDims(1, 1, 4, world_size=4).validate_model(args)
