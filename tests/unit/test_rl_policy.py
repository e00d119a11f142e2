"""The trainer's policy forwards and update: logprobs from packed micro-batches equal a naive
per-sequence computation, token stats are exact, and the update does not depend on how the batch
is cut into micro-batches."""

import copy
import math

import pytest
import torch

from rlx.algorithms import grpo_advantages
from rlx.config.train_sections import LossConfig, RolloutCorrectionConfig
from rlx.models import ModelArgs, build_model
from rlx.trainer.loss_stage import LossStage
from rlx.trainer.policy import compute_logprobs, compute_token_stats, pack_rollouts
from rlx.trainer.rl_update import GlobalBatch, PolicyUpdater, balance_by_tokens
from rlx.types import Rollout, RolloutBatch


def tiny_model(seed=0):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=128)  # fmt: skip
    model = build_model(args, device="cpu")
    model.init_weights(seed=seed)
    return model


def make_rollouts(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, L = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(0, 12, (1,), generator=g))
        ids = torch.randint(0, 64, (P + L,), generator=g).tolist()
        out.append(Rollout(ids[:P], ids[P:], [-1.0] * L, group_id=f"g{i % 3}", reward=float(i % 2)))
    return out


def naive_logprobs(model, r: Rollout, temperature: float) -> torch.Tensor:
    ids = torch.tensor([r.prompt_ids + r.response_ids])
    logits = model(ids)[0].float() / temperature
    P = len(r.prompt_ids)
    logp = torch.log_softmax(logits[P - 1 : P - 1 + len(r.response_ids)], dim=-1)
    return logp.gather(-1, torch.tensor(r.response_ids).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("budget", [1, 16, 4096])
def test_compute_logprobs_matches_naive(budget):
    torch.manual_seed(0)
    model, rollouts = tiny_model(), make_rollouts()
    out = compute_logprobs(model, rollouts, device=torch.device("cpu"), token_budget=budget, temperature=0.7,
                           chunk_size=5, dp_group=None)  # fmt: skip
    assert out.shape == (len(rollouts), max(len(r.response_ids) for r in rollouts))
    for i, r in enumerate(rollouts):
        L = len(r.response_ids)
        torch.testing.assert_close(out[i, :L], naive_logprobs(model, r, 0.7), atol=1e-5, rtol=0)
        assert (out[i, L:] == 0).all()


def test_token_stats_are_exact():
    model, rollouts = tiny_model(), make_rollouts()
    stats = compute_token_stats(model, rollouts, device=torch.device("cpu"), token_budget=20, temperature=1.3,
                                chunk_size=3, dp_group=None)  # fmt: skip
    for r, (max_prob, entropy) in zip(rollouts, stats):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        P, L = len(r.prompt_ids), len(r.response_ids)
        p = torch.softmax(model(ids)[0, P - 1 : P - 1 + L].float() / 1.3, dim=-1)
        assert len(max_prob) == len(entropy) == L
        torch.testing.assert_close(torch.tensor(max_prob), p.max(-1).values, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(entropy), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)


def test_packs_respect_budget_and_cover_every_rollout():
    rollouts = make_rollouts(20)
    packs = pack_rollouts(rollouts, token_budget=24)
    assert sorted(i for p in packs for i in p.rows) == list(range(20))
    for p in packs:
        assert p.num_tokens <= 24 or len(p.rows) == 1


def test_balance_by_tokens_is_even_and_complete():
    parts = balance_by_tokens([10, 1, 1, 8, 2, 7, 3], 3)
    assert sorted(i for p in parts for i in p) == list(range(7))
    loads = [sum([10, 1, 1, 8, 2, 7, 3][i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 2


def make_updater(model, opt, *, grad_clip=0.0, **loss_options):
    """A PolicyUpdater over the loss stage built from a real `[loss]` section (decoupled mode)."""
    options = dict(micro_batch_tokens=4096, logprob_chunk_size=7, loss_scale_factor=16.0)
    cfg = LossConfig(**{**options, **loss_options})
    stage = LossStage(cfg, RolloutCorrectionConfig())
    return PolicyUpdater(model, opt, cfg, stage, device=torch.device("cpu"), dp_rank=0, dp_size=1, dp_group=None,
                         temperature=1.0, grad_clip=grad_clip, rng=torch.Generator().manual_seed(0))  # fmt: skip


def update(updater, g):
    return updater.update(g, updater.loss.plan(updater.num_mini_batches(g)))


def run_update(budget, agg_mode="token-mean", kl_coef=0.0, entropy_coef=0.0):
    model = tiny_model()
    rollouts = [r for r in make_rollouts(9) if r.response_ids]
    t = RolloutBatch(rollouts).to_tensors()
    old = compute_logprobs(model, rollouts, device=torch.device("cpu"), token_budget=4096, temperature=1.0,
                           chunk_size=7, dp_group=None) - 0.05  # fmt: skip
    g = GlobalBatch(rollouts, t["response_mask"], grpo_advantages(t["token_level_rewards"], t["response_mask"],
                    t["group_ids"]), t["rollout_log_probs"], old_log_probs=old,
                    ref_log_probs=old + 0.1)  # fmt: skip
    updater = make_updater(model, torch.optim.SGD(model.parameters(), lr=1.0), micro_batch_tokens=budget,
                           agg_mode=agg_mode, kl_coef=kl_coef, entropy_coef=entropy_coef)  # fmt: skip
    return model, update(updater, g)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_does_not_depend_on_micro_batching(agg_mode):
    whole, m1 = run_update(4096, agg_mode, kl_coef=0.1, entropy_coef=0.01)
    split, m2 = run_update(10, agg_mode, kl_coef=0.1, entropy_coef=0.01)
    assert math.isclose(m1["actor/pg_loss"], m2["actor/pg_loss"], rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(m1["actor/kl_loss"], m2["actor/kl_loss"], rel_tol=1e-5, abs_tol=1e-7)
    assert m1["actor/grad_norm"] > 0
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_non_finite_loss_stops_before_the_step():
    from rlx.trainer.train_step import NonFiniteError

    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    rollouts = [r for r in make_rollouts(5) if r.response_ids]
    t = RolloutBatch(rollouts).to_tensors()
    adv = torch.full_like(t["response_mask"], float("nan"))
    g = GlobalBatch(rollouts, t["response_mask"], adv, t["rollout_log_probs"], old_log_probs=t["rollout_log_probs"])
    updater = make_updater(model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=1.0, loss_scale_factor=1.0)
    with pytest.raises(NonFiniteError, match="actor/pg_loss"):
        update(updater, g)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
