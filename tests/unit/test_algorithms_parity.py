"""Random inputs vs independent float64, loop-based re-derivations of the ALGORITHMS.md formulas."""

import math
import statistics

import pytest
import torch

from rlx.algorithms import (
    agg_loss,
    grpo_advantages,
    kl_penalty,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    rollout_correction,
)

B, T = 12, 9


def make(seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[1] = 0  # an empty response
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rollout = -torch.rand(B, T, generator=g) * 3
    old = rollout + scale * torch.randn(B, T, generator=g)
    rewards = torch.randn(B, T, generator=g)
    groups = [f"p{int(i)}" for i in torch.randint(0, 4, (B,), generator=g)]
    groups[5] = "singleton"
    return old, rollout, mask, rewards, groups


def rows(t):
    return t.double().tolist()


def close(a, b, tol=1e-4):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ---- advantages ---------------------------------------------------------------------------------


def ref_group_adv(rewards, mask, groups, kind):
    scores = [sum(r) for r in rows(rewards)]
    members = {}
    for i, gid in enumerate(groups):
        members.setdefault(gid, []).append(scores[i])
    out = []
    for i, s in enumerate(scores):
        vals = members[groups[i]]
        n = len(vals)
        mean = statistics.fmean(vals) if n > 1 else 0.0
        if kind == "grpo":
            std = statistics.stdev(vals) if n > 1 else 1.0
            a = (s - mean) / (std + 1e-6)
        elif kind == "dr_grpo" or kind == "baseline":
            a = s - mean
        else:  # rloo
            a = s - (sum(vals) - s) / (n - 1) if n > 1 else s
        out.append([a * m for m in rows(mask)[i]])
    return out


def ref_whiten(values, mask):
    flat = [v for vr, mr in zip(values, mask) for v, m in zip(vr, mr) if m]
    mu, var = statistics.fmean(flat), statistics.variance(flat)
    return [[(v - mu) / math.sqrt(var + 1e-8) * m for v, m in zip(vr, mr)] for vr, mr in zip(values, mask)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_parity(seed):
    _, _, mask, rewards, groups = make(seed)
    got = {
        "grpo": grpo_advantages(rewards, mask, groups),
        "dr_grpo": grpo_advantages(rewards, mask, groups, norm_by_std=False),
        "rloo": rloo_advantages(rewards, mask, groups),
    }
    for kind, adv in got.items():
        want = ref_group_adv(rewards, mask, groups, kind)
        assert torch.allclose(adv.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4), kind
    base = ref_whiten(ref_group_adv(rewards, mask, groups, "baseline"), rows(mask))
    assert torch.allclose(reinforce_pp_baseline_advantages(rewards, mask, groups).double(), torch.tensor(base, dtype=torch.float64), atol=1e-4)

    gamma = 0.9
    returns = []
    for r_row, m_row in zip(rows(rewards), rows(mask)):
        running, out = 0.0, [0.0] * T
        for t in reversed(range(T)):
            if m_row[t]:
                running = r_row[t] + gamma * running
                out[t] = running
        returns.append(out)
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    assert torch.allclose(ret.double(), torch.tensor(returns, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(adv.double(), torch.tensor(ref_whiten(returns, rows(mask)), dtype=torch.float64), atol=1e-4)


# ---- aggregation and policy losses -----------------------------------------------------------------


def ref_agg(loss, mask, mode):
    L, M = rows(loss), rows(mask)
    if mode == "token-mean":
        n = sum(map(sum, M))
        return sum(l * m for lr, mr in zip(L, M) for l, m in zip(lr, mr)) / n
    if mode == "token-sum":
        return sum(l * m for lr, mr in zip(L, M) for l, m in zip(lr, mr))
    seqs = []
    for lr, mr in zip(L, M):
        if sum(mr) == 0:
            continue
        s = sum(l * m for l, m in zip(lr, mr))
        seqs.append(s / sum(mr) if mode == "seq-mean-token-mean" else s)
    out = sum(seqs) / len(seqs)
    return out / T if mode == "seq-mean-token-sum-norm" else out


def ref_ppo(old, lp, adv, mask, lo, hi, c):
    per, clip, low, kl = [], [], [], []
    for o_r, l_r, a_r in zip(rows(old), rows(lp), rows(adv)):
        pr, cr, lwr, kr = [], [], [], []
        for o, l, a in zip(o_r, l_r, a_r):
            d = min(max(l - o, -20), 20)
            r = math.exp(d)
            l1, l2 = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
            cl = max(l1, l2)
            pr.append(min(-a * c, cl) if a < 0 else cl)
            cr.append(float(l2 > l1))
            lwr.append(float(cl > -a * c and a < 0))
            kr.append(-d)
        per.append(pr), clip.append(cr), low.append(lwr), kl.append(kr)
    return per, clip, low, kl


def mmean(values, mask):
    M = rows(mask)
    return sum(v * m for vr, mr in zip(values, M) for v, m in zip(vr, mr)) / sum(map(sum, M))


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_losses_parity(mode):
    old, lp, mask, rewards, _ = make(3, scale=0.4)
    adv = rewards
    per, clip, low, kl = ref_ppo(old, lp, adv, mask, 0.2, 0.28, 3.0)
    loss, m = policy_loss(old, lp, adv, mask, loss_type="ppo_clip", loss_agg_mode=mode, clip_ratio_high=0.28)
    assert close(loss.item(), ref_agg(torch.tensor(per), mask, mode))
    assert close(m["actor/pg_clipfrac"], mmean(clip, mask)) and close(m["actor/pg_clipfrac_lower"], mmean(low, mask))
    assert close(m["actor/ppo_kl"], mmean(kl, mask))

    # GSPO: sequence-mean log-ratio, clamped above at 10, PPO-clipped
    gs = []
    for o_r, l_r, a_r, m_r in zip(rows(old), rows(lp), rows(adv), rows(mask)):
        s = sum((l - o) * m for l, o, m in zip(l_r, o_r, m_r)) / max(sum(m_r), 1)
        r = math.exp(min(s, 10))
        gs.append([max(-a * r, -a * min(max(r, 0.8), 1.2)) for a in a_r])
    loss, _ = policy_loss(old, lp, adv, mask, loss_type="gspo", loss_agg_mode=mode)
    assert close(loss.item(), ref_agg(torch.tensor(gs), mask, mode))

    # CISPO: -sg(clip(r)) * A * lp
    cs = [[-min(max(math.exp(min(max(l - o, -20), 20)), 0.8), 1.2) * a * l for o, l, a in zip(o_r, l_r, a_r)]
          for o_r, l_r, a_r in zip(rows(old), rows(lp), rows(adv))]
    loss, _ = policy_loss(old, lp, adv, mask, loss_type="cispo", loss_agg_mode=mode)
    assert close(loss.item(), ref_agg(torch.tensor(cs), mask, mode))


@pytest.mark.parametrize("name", ["k1", "abs", "k2", "k3", "k3+", "abs+"])
def test_kl_parity(name):
    old, lp, _, _, _ = make(4, scale=3.0)
    got = kl_penalty(lp, old, name).double()
    base = name.rstrip("+")
    want = []
    for l_r, o_r in zip(rows(lp), rows(old)):
        out = []
        for l, o in zip(l_r, o_r):
            d = l - o
            if base == "k1":
                out.append(d)
            elif base == "abs":
                out.append(abs(d))
            elif base == "k2":
                out.append(0.5 * d * d)
            else:
                x = min(max(-d, -20), 20)
                out.append(min(max(math.exp(x) - x - 1, -10), 10))
        want.append(out)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


# ---- rollout correction --------------------------------------------------------------------------


def ref_is_metrics(lr, M, level, upper):
    lower = 1 / upper
    valid_rows = [i for i in range(B) if sum(M[i])]
    if level == "token":
        raw = [[math.exp(min(max(x, -20), 20)) * m for x, m in zip(xr, mr)] for xr, mr in zip(lr, M)]
    else:
        S = [sum(x * m for x, m in zip(xr, mr)) for xr, mr in zip(lr, M)]
        raw = [[math.exp(min(max(S[i], -20), 20)) * m for m in M[i]] for i in range(B)]
    w = [[min(v, upper) for v in r] for r in raw]
    toks = [(i, t) for i in range(B) for t in range(T) if M[i][t]]
    mean = statistics.fmean(w[i][t] for i, t in toks)
    out = {"rollout_is_mean": mean}
    if level == "token":
        out["rollout_is_max"] = max(w[i][t] for i, t in toks)
        out["rollout_is_min"] = min(w[i][t] for i, t in toks)
        out["rollout_is_ratio_fraction_high"] = statistics.fmean(raw[i][t] > upper for i, t in toks)
        out["rollout_is_ratio_fraction_low"] = statistics.fmean(raw[i][t] < lower for i, t in toks)
    else:
        out["rollout_is_max"] = math.exp(min(max(S), 20))
        out["rollout_is_min"] = math.exp(min(S))
        out["rollout_is_ratio_fraction_high"] = statistics.fmean(s > math.log(upper) for s in S)
        out["rollout_is_ratio_fraction_low"] = statistics.fmean(s < math.log(lower) for s in S)
    out["rollout_is_std"] = statistics.pstdev(w[i][t] for i, t in toks)
    out["rollout_is_eff_sample_size"] = 1 / statistics.fmean((w[i][t] / mean) ** 2 for i, t in toks)
    q = [statistics.fmean(w[i][t] for t in range(T) if M[i][t]) if i in valid_rows else 0.0 for i in range(B)]
    q_raw = [statistics.fmean(raw[i][t] for t in range(T) if M[i][t]) if i in valid_rows else 0.0 for i in range(B)]
    out.update(rollout_is_seq_mean=statistics.fmean(q), rollout_is_seq_std=statistics.stdev(q),
               rollout_is_seq_max=max(q), rollout_is_seq_min=min(q),
               rollout_is_seq_max_deviation=max(abs(v - 1) for v in q),
               rollout_is_seq_fraction_high=statistics.fmean(v > upper for v in q_raw),
               rollout_is_seq_fraction_low=statistics.fmean(v < lower for v in q_raw))  # fmt: skip
    return out


def ref_offpolicy(old, roll, M):
    valid = [[(o, r) for o, r, m in zip(o_r, r_r, m_r) if m] for o_r, r_r, m_r in zip(old, roll, M)]
    ell = [statistics.fmean(o for o, _ in v) if v else 0.0 for v in valid]
    rho = [statistics.fmean(r for _, r in v) if v else 0.0 for v in valid]
    toks = [p for v in valid for p in v]
    diff = [r - l for r, l in zip(rho, ell)]
    S = [sum(o - r for o, r in v) for v in valid]
    return {
        "training_ppl": statistics.fmean(math.exp(-x) for x in ell), "training_log_ppl": -statistics.fmean(ell),
        "rollout_ppl": statistics.fmean(math.exp(-x) for x in rho), "rollout_log_ppl": -statistics.fmean(rho),
        "kl": statistics.fmean(r - o for o, r in toks),
        "k3_kl": statistics.fmean(math.exp(o - r) - (o - r) - 1 for o, r in toks),
        "log_ppl_diff": statistics.fmean(diff), "log_ppl_abs_diff": statistics.fmean(map(abs, diff)),
        "log_ppl_diff_max": max(diff), "log_ppl_diff_min": min(diff),
        "ppl_ratio": statistics.fmean(math.exp(d) for d in diff),
        "chi2_token": statistics.fmean(math.exp(min(max(o - r, -20), 20)) ** 2 for o, r in toks) - 1,
        "chi2_seq": statistics.fmean(math.exp(2 * min(max(s, -20), 20)) for s in S) - 1,
    }  # fmt: skip


def ref_rs(lr, M, option, lo, hi):
    """Keep mask and a few metrics for one k-criterion, by loops."""
    kind = option[-2:]
    stat = {"k1": lambda x: -x, "k2": lambda x: 0.5 * x * x, "k3": lambda x: math.exp(x) - 1 - x}[kind]
    tok = [[stat(min(max(x, -20), 20)) for x in xr] for xr in lr]
    valid = [i for i in range(B) if sum(M[i])]
    lo_l, hi_l = (math.log(lo), math.log(hi)) if kind == "k1" else (None, hi)

    def ok(v):
        return v <= hi_l and (lo_l is None or v >= lo_l)

    if option.startswith("token"):
        keep = [[ok(v) for v in r] for r in tok]
        row_vals = [statistics.fmean(v for v, m in zip(tok[i], M[i]) if m) for i in valid]
    else:
        agg = {"seq_sum": sum, "seq_mean": statistics.fmean, "seq_max": max}[option.rsplit("_", 1)[0]]
        seq = [agg([v for v, m in zip(tok[i], M[i]) if m]) if i in valid else 0.0 for i in range(B)]
        keep = [[ok(seq[i])] * T for i in range(B)]
        row_vals = [seq[i] for i in valid]
    p = f"rollout_rs_{option}"
    metrics = {f"{p}_seq_mean": statistics.fmean(row_vals), f"{p}_seq_std": statistics.stdev(row_vals),
               f"{p}_seq_max": max(row_vals), f"{p}_seq_min": min(row_vals),
               f"{p}_masked_fraction": mmean([[1.0 - k for k in r] for r in keep], torch.tensor(M))}  # fmt: skip
    return keep, metrics


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_correction_parity(seed, level):
    old, roll, mask, _, _ = make(seed, scale=0.4)
    options, thresholds = ["token_k1", "seq_mean_k3", "seq_max_k2", "seq_sum_k1"], [(0.7, 1.5), (None, 0.05), (None, 0.3), (0.2, 5.0)]
    spec = ",".join(f"{lo}_{hi}" if lo else f"{hi}" for lo, hi in thresholds)
    w, rs, m = rollout_correction(old, roll, mask, rollout_is=level, rollout_is_threshold=1.5,
                                  rollout_rs=",".join(options), rollout_rs_threshold=spec)
    O, R, M = rows(old), rows(roll), rows(mask)
    lr = [[(o - r) * mm for o, r, mm in zip(o_r, r_r, m_r)] for o_r, r_r, m_r in zip(O, R, M)]
    want = ref_is_metrics(lr, M, level, 1.5)
    want.update(ref_offpolicy(O, R, M))
    keep = [[True] * T for _ in range(B)]
    for option, (lo, hi) in zip(options, thresholds):
        k, metrics = ref_rs(lr, M, option, lo, hi)
        keep = [[a and b for a, b in zip(x, y)] for x, y in zip(keep, k)]
        want.update(metrics)
    for key, value in want.items():
        assert close(m["rollout_corr/" + key], value), (key, m["rollout_corr/" + key], value)
    assert torch.equal(rs, mask * torch.tensor(keep, dtype=torch.float32))
    assert 0.0 < m["rollout_corr/rollout_rs_masked_fraction"] < 1.0  # the thresholds actually bite
