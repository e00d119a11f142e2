"""GAE, the clipped value loss, the KL-in-reward penalty and KL controllers against hand-computed values and
independent float64 loop re-derivations of the formulas (verl 0.9.1 quirks included)."""

import math
import statistics

import pytest
import torch

from rlx.algorithms import (
    KL_CONTROLLERS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    build_kl_controller,
    gae_advantages,
    value_loss,
)

B, T = 9, 11
# Masks exercising every layout: full, empty, right-padded, token-adaptive prefix, interior gaps (tool turns).
SPECIAL_MASKS = [
    [1] * T,
    [0] * T,
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0],
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
]


def make(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B - len(SPECIAL_MASKS),), generator=g)
    random_rows = (torch.arange(T)[None] < lengths[:, None]).float()
    mask = torch.cat([torch.tensor(SPECIAL_MASKS, dtype=torch.float32), random_rows])
    # dense rewards and values everywhere, padding included: GAE must ignore the padded ones
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    return rewards, values, mask


# ---- independent float64 references, written from the formulas ---------------------------------------------


def ref_gae(rewards, values, mask, gamma, lam):
    r, v, m = rewards.double().tolist(), values.double().tolist(), mask.tolist()
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        next_v, a = 0.0, 0.0
        for t in reversed(range(T)):
            if m[i][t]:  # a valid token: one TD step; masked tokens are skipped (carry V_next and A)
                a = r[i][t] + gamma * next_v - v[i][t] + gamma * lam * a
                next_v = v[i][t]
            adv[i][t] = a
    returns = [[adv[i][t] + v[i][t] for t in range(T)] for i in range(B)]
    valid = [adv[i][t] for i in range(B) for t in range(T) if m[i][t]]
    mu, var = statistics.fmean(valid), statistics.variance(valid)  # unbiased
    whitened = [[(adv[i][t] - mu) / math.sqrt(var + 1e-8) for t in range(T)] for i in range(B)]
    return torch.tensor(whitened, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def ref_kl(lp, ref, kind):
    d = lp - ref
    kind = kind.rstrip("+")
    if kind in ("kl", "k1"):
        return d
    if kind == "abs":
        return abs(d)
    if kind in ("mse", "k2"):
        return 0.5 * d * d
    x = min(max(-d, -20.0), 20.0)
    return min(max(math.exp(x) - x - 1, -10.0), 10.0)


# ---- GAE ----------------------------------------------------------------------------------------------------


def test_gae_hand_computed_outcome_reward():
    # gamma = lam = 1: A_t = R - V_t (sum of future rewards minus the value), returns = R everywhere valid.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.0], [0.0, 0.0, 1.5, 0.4]])
    mask = torch.tensor([[1.0, 1, 1, 0], [0, 0, 1, 1]])  # right padding; token-adaptive prefix [0,0,1,1]
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    raw = torch.tensor([[0.5, 0.4, 0.3, 0.0], [9.5, 9.5, 9.5, 8.6]])  # row 1: 2+9-1.5, then 9-0.4
    assert torch.allclose(ret, raw + values)
    assert torch.allclose(ret[0, :3], torch.ones(3)) and torch.allclose(ret[1, 2:], torch.tensor([11.0, 9.0]))
    valid = torch.tensor([0.5, 0.4, 0.3, 9.5, 8.6])
    mu, sd = valid.mean(), valid.std()
    # verl quirk: padding is *not* re-masked; it holds the whitened carried advantage (0 past the end,
    # the first valid token's A in the leading padding).
    assert torch.allclose(adv, (raw - mu) / torch.sqrt(sd**2 + 1e-8), atol=1e-6)


def test_gae_discounting_skips_masked_positions_and_drops_their_rewards():
    gamma, lam = 0.5, 0.8
    rewards = torch.tensor([[0.0, 7.0, 7.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 5.0, 5.0, 0.4], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 0, 1], [1, 1, 0, 0]])  # row 0: a two-token tool gap
    _, ret = gae_advantages(rewards, values, mask, gamma, lam)
    a3 = 1.0 - 0.4
    a0 = 0.0 + gamma * 0.4 - 0.2 + gamma * lam * a3  # one gamma across the gap; rewards 7 in it are ignored
    assert ret[0, 3] - values[0, 3] == pytest.approx(a3, abs=1e-12)
    assert ret[0, 0] - values[0, 0] == pytest.approx(a0, abs=1e-12)
    assert ret[0, 1] - values[0, 1] == pytest.approx(a3, abs=1e-12)  # the gap carries A of the token after it
    assert ret[1, 0] == pytest.approx(1.0 + gamma * lam * 1.0, abs=1e-12)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.7, 0.5)])
def test_gae_matches_float64_reference(gamma, lam):
    for seed in range(4):
        rewards, values, mask = make(seed)
        exp_adv, exp_ret = ref_gae(rewards, values, mask, gamma, lam)
        adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
        assert torch.allclose(ret, exp_ret, rtol=0, atol=1e-10)
        assert torch.allclose(adv, exp_adv, rtol=0, atol=1e-10)
        adv32, ret32 = gae_advantages(rewards.float(), values.float(), mask.long(), gamma, lam)  # int mask too
        assert adv32.dtype == torch.float32
        assert torch.allclose(ret32.double(), exp_ret, rtol=0, atol=1e-5)
        assert torch.allclose(adv32.double(), exp_adv, rtol=0, atol=1e-5)


def test_gae_errors():
    rewards, values, mask = make(0)
    with pytest.raises(ValueError, match="one shape"):
        gae_advantages(rewards, values[:, :-1], mask, 1.0, 1.0)  # e.g. the critic's values not sliced to T
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(rewards, values, mask, 1.5, 1.0)
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        gae_advantages(rewards, values, torch.zeros_like(mask), 1.0, 1.0)


# ---- value loss ---------------------------------------------------------------------------------------------


def value_case():
    values = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    vpreds = torch.tensor([[0.5, -0.1, 1.1], [0.5, 2.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    return vpreds, values, returns, mask


def test_value_loss_hand_computed():
    vpreds, values, returns, mask = value_case()
    # c = 0.2. Per token (unclipped err, clipped err) -> max:
    # (0,0): v .5 -> clip .2: (.25, .64) -> .64, the clip binds (counted in clipfrac)
    # (0,1): inside the band: (.01, .01) -> .01     (0,2): inside: (1.21, 1.21) -> 1.21
    # (1,0): v .5 -> .2, closer to R=0: (.25, .04) -> .25, not counted
    # (1,1): v 2 -> 1.2: (1, .04) -> 1, not counted    (1,2): masked (81 must not leak)
    loss, metrics = value_loss(vpreds, values, returns, mask, 0.2, "token-mean")
    assert loss.item() == pytest.approx(0.5 * 3.11 / 5, abs=1e-6)
    assert metrics == pytest.approx({"critic/vf_loss": 0.311, "critic/vf_clipfrac": 0.2, "critic/vpred_mean": 0.8})
    assert set(metrics) == {"critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean"}
    loss.backward()
    # d/dv 0.5 * err / 5 = (v - R) / 5 where the unclipped error is the max; 0 where the clip binds or masked.
    expect = torch.tensor([[0.0, -0.1, 1.1], [0.5, 1.0, 0.0]]) / 5
    assert torch.allclose(vpreds.grad, expect, atol=1e-6)


def test_value_loss_agg_modes_and_global_batch_info():
    vpreds, values, returns, mask = value_case()
    loss, _ = value_loss(vpreds, values, returns, mask, 0.2, "seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.5 * (1.86 / 3 + 1.25 / 2) / 2, abs=1e-6)
    loss, metrics = value_loss(vpreds, values, returns, mask, 0.2, "token-mean", batch_num_tokens=10)
    assert loss.item() == pytest.approx(0.5 * 3.11 / 10, abs=1e-6)  # this micro-batch's share of a 10-token batch
    assert metrics["critic/vf_loss"] == pytest.approx(0.1555, abs=1e-6)
    loss, metrics = value_loss(vpreds, values, returns, mask, 100.0)  # a huge clip range: plain 0.5 MSE
    assert metrics["critic/vf_clipfrac"] == 0.0
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.01 + 1.21 + 0.25 + 1.0) / 5, abs=1e-6)
    with pytest.raises(ValueError, match="cliprange_value must be >= 0"):
        value_loss(vpreds, values, returns, mask, -0.1)
    with pytest.raises(ValueError, match="valid modes"):
        value_loss(vpreds, values, returns, mask, 0.2, "token_mean")


@pytest.mark.parametrize("seed", range(3))
def test_value_loss_matches_float64_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    _, values, mask = make(seed)
    vpreds = values + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    c = 0.3
    errs, clipped, seq_means = [], 0, []
    for i in range(B):
        row = []
        for t in range(T):
            if not mask[i, t]:
                continue
            v, old, ret = vpreds[i, t].item(), values[i, t].item(), returns[i, t].item()
            e1, e2 = (v - ret) ** 2, (min(max(v, old - c), old + c) - ret) ** 2
            row.append(max(e1, e2))
            clipped += e2 > e1
        errs += row
        if row:
            seq_means.append(sum(row) / (len(row) + 1e-8))  # agg_loss's seq-mean-token-mean eps
    for mode, expect in [("token-mean", sum(errs) / len(errs)), ("seq-mean-token-mean", statistics.fmean(seq_means))]:
        loss, metrics = value_loss(vpreds, values, returns, mask, c, mode)
        assert loss.item() == pytest.approx(0.5 * expect, abs=1e-10)
        assert metrics["critic/vf_clipfrac"] == pytest.approx(clipped / len(errs), abs=1e-7)  # a float32 fraction
        loss32, _ = value_loss(vpreds.float(), values.float(), returns.float(), mask, c, mode)
        assert loss32.item() == pytest.approx(0.5 * expect, abs=1e-5)


# ---- KL penalty ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+"])
def test_kl_penalty_matches_reference(estimator):
    g = torch.Generator().manual_seed(7)
    scores, _, mask = make(3)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64)
    ref[2, 1] = lp[2, 1] + 30.0  # k3 clamps: exp(30) would be huge
    lp.requires_grad_(True)
    beta = 0.05
    rewards, metrics = apply_kl_penalty(scores, lp, ref, mask, beta, estimator)
    assert not rewards.requires_grad  # rewards are data, whatever the estimator's straight-through gradient
    expect = scores.clone()
    row_means = []
    for i in range(B):
        kls = [ref_kl(lp[i, t].item(), ref[i, t].item(), estimator) for t in range(T) if mask[i, t]]
        for t in range(T):
            if mask[i, t]:
                expect[i, t] -= beta * ref_kl(lp[i, t].item(), ref[i, t].item(), estimator)
        # masked_mean's +1e-8 is below float32 resolution of the (float32) token count: it only turns 0/0 into 0
        row_means.append(sum(kls) / len(kls) if kls else 0.0)  # an empty row gives 0 and still counts
    assert torch.allclose(rewards, expect, rtol=0, atol=1e-10)
    assert metrics == pytest.approx({"actor/reward_kl_penalty": statistics.fmean(row_means),
                                     "actor/reward_kl_penalty_coeff": beta}, abs=1e-10)  # fmt: skip
    rewards32, metrics32 = apply_kl_penalty(scores.float(), lp.detach().float(), ref.float(), mask, beta, estimator)
    assert torch.allclose(rewards32.double(), expect, rtol=0, atol=1e-5)
    assert metrics32["actor/reward_kl_penalty"] == pytest.approx(statistics.fmean(row_means), abs=1e-5)


def test_kl_penalty_padding_untouched_and_non_finite_padding_does_not_leak():
    scores = torch.tensor([[0.0, 1.0, 5.0]])
    lp = torch.tensor([[-1.0, -2.0, float("-inf")]])  # -inf / NaN in padding: rlx keeps them out of the rewards
    ref = torch.tensor([[-1.5, -1.0, float("nan")]])
    rewards, metrics = apply_kl_penalty(scores, lp, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.1, kl_penalty="kl")
    assert torch.allclose(rewards, torch.tensor([[-0.05, 1.1, 5.0]]))  # k1 = .5 and -1; padding keeps its score
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="unknown kl estimator"):
        apply_kl_penalty(scores, lp, ref, torch.ones(1, 3), 0.1, "k4")


# ---- KL controllers -----------------------------------------------------------------------------------------


def test_adaptive_controller_sequence_hand_computed():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target_kl=0.05, horizon=100)
    steps = [  # (current_kl, n_steps, expected beta after the update)
        (0.06, 10, 0.1 * 1.02),  # error +0.2 (at the clip)
        (0.5, 10, 0.1 * 1.02 * 1.02),  # error 9 -> clipped to +0.2
        (0.0, 20, 0.1 * 1.02 * 1.02 * 0.96),  # error -1 -> -0.2, times 20/100
        (-0.01, 5, 0.1 * 1.02 * 1.02 * 0.96 * 0.99),  # k1 can be negative: -1.2 -> -0.2
        (0.045, 50, 0.1 * 1.02 * 1.02 * 0.96 * 0.99 * 0.95),  # error -0.1, unclipped
    ]
    for kl, n, expect in steps:
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        ctl.update(float("nan"), 10)


def test_fixed_controller_and_builder():
    ctl = build_kl_controller("fixed", kl_coef=0.02, target_kl=0.1, horizon=10)
    assert isinstance(ctl, FixedKLController)
    for kl in (0.0, 5.0, -1.0):
        ctl.update(kl, 64)
    assert ctl.value == 0.02
    adaptive = build_kl_controller("adaptive", kl_coef=0.02, target_kl=0.1, horizon=10)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.02
    assert set(KL_CONTROLLERS) == {"fixed", "adaptive"}
    with pytest.raises(ValueError, match=r"valid types: \['adaptive', 'fixed'\]"):
        build_kl_controller("pid", kl_coef=0.1)
    with pytest.raises(ValueError, match="horizon > 0"):
        build_kl_controller("adaptive", kl_coef=0.1, horizon=0)
    with pytest.raises(ValueError, match="target_kl > 0"):
        build_kl_controller("adaptive", kl_coef=0.1, target_kl=0.0)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        build_kl_controller("fixed", kl_coef=-0.1)


def test_controller_state_dict_resume_continues_the_same_beta():
    run = AdaptiveKLController(0.1, 0.05, 100)
    for kl in (0.2, 0.1, 0.07):
        run.update(kl, 16)
    state = run.state_dict()
    resumed = build_kl_controller("adaptive", kl_coef=0.1, target_kl=0.05, horizon=100)
    resumed.load_state_dict(state)
    assert resumed.value == run.value != 0.1
    run.update(0.01, 16)
    resumed.update(0.01, 16)
    assert resumed.value == run.value
    fixed = FixedKLController(0.3)
    with pytest.warns(UserWarning, match="type changed on resume"):
        fixed.load_state_dict(state)  # an adaptive beta is not loaded into a fixed controller
    assert fixed.value == 0.3
    with pytest.warns(UserWarning, match="using the configured 0.3"):
        fixed.load_state_dict({"type": "fixed", "value": 0.2})
    assert fixed.value == 0.3
    with pytest.raises(ValueError, match="not a KL controller state"):
        resumed.load_state_dict({"beta": 0.1})
