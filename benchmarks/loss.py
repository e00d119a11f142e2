"""Cost of rollout correction relative to the plain policy loss and to the whole per-micro-batch loss stage.

Median wall time over many repetitions on B=64, T=1024 fp32 log-probs, one thread; one JSON line per
configuration. The configurations are timed interleaved (one repetition of each in turn), so load from other
processes on a shared machine hits them alike; every line records the 1-minute load average.

Two denominators:
* `overhead_vs_plain_pct`: vs the bare PPO-clip loss forward+backward on log-probs (a lower bound on the stage),
  end to end (correction + loss with its weights and mask); `correction_only_*`: the correction timed alone,
  which is less noisy on a loaded machine;
* `overhead_vs_loss_stage_pct` (last line): vs what rlx runs per micro-batch, `logprobs_from_hidden`
  forward+backward (H=1024, V=32000, chunk 1024) plus the loss. That stage is linear in tokens (chunked
  matmuls), so it is measured on STAGE_B x STAGE_T tokens and scaled to B x T (a single thread would need
  minutes per B x T batch); the line also gives the overhead measured directly at STAGE_B x STAGE_T.
"""

import json
import os
import statistics
import time

import torch

from rlx.algorithms import logprobs_from_hidden, policy_loss, rollout_correction

B, T, REPS = 64, 1024, 40
H, V, CHUNK = 1024, 32000, 1024
STAGE_B, STAGE_T, STAGE_REPS = 4, 256, 3

CONFIGS = {
    "is_token": dict(rollout_is="token", rollout_is_threshold=2.0),
    "is_sequence_bn": dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True),
    "is_token+rs_token_k1,seq_max_k2": dict(rollout_is="token", rollout_rs="token_k1,seq_max_k2",
                                           rollout_rs_threshold="0.6_1.6,2.5"),
    "diagnostics_only": dict(),
}  # fmt: skip


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed_interleaved(fns: dict, reps: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per function; each repetition runs every function once, in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def loss_fns(b: int, t: int, seed: int = 0) -> dict:
    """The bare loss ("plain"), the loss behind each rollout-correction config and ("only:<config>") the
    correction alone, on a [b, t] batch."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    rollout = -torch.rand(b, t, generator=g) * 3
    old = rollout + 0.05 * torch.randn(b, t, generator=g)
    log_prob = (old + 0.01 * torch.randn(b, t, generator=g)).requires_grad_()
    adv = torch.randn(b, 1, generator=g).expand(b, t) * mask

    def plain():
        loss, _ = policy_loss(old, log_prob, adv, mask, loss_type="ppo_clip", loss_agg_mode="token-mean")
        loss.backward()
        log_prob.grad = None

    def corrected(kwargs):
        def run():
            w, rs_mask, _ = rollout_correction(old, rollout, mask, **kwargs)
            loss, _ = policy_loss(old, log_prob, adv, rs_mask, loss_type="ppo_clip", loss_agg_mode="token-mean",
                                  rollout_is_weights=w)  # fmt: skip
            loss.backward()
            log_prob.grad = None

        return run

    def correction_only(kwargs):
        return lambda: rollout_correction(old, rollout, mask, **kwargs)

    return {
        "plain": plain,
        **{name: corrected(kwargs) for name, kwargs in CONFIGS.items()},
        **{"only:" + name: correction_only(kwargs) for name, kwargs in CONFIGS.items()},
    }


def logprob_stage_seconds(n_tokens: int) -> float:
    """Median seconds of `logprobs_from_hidden` forward+backward over n_tokens (grads for hidden and weight)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n_tokens, H, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(V, H, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (n_tokens,), generator=g)

    def step():
        logprobs_from_hidden(hidden, weight, labels, chunk_size=CHUNK).sum().backward()
        hidden.grad = weight.grad = None

    return timed_interleaved({"stage": step}, STAGE_REPS, warmup=1)["stage"]


def main() -> None:
    t = timed_interleaved(loss_fns(B, T), REPS)
    base = t["plain"]
    print(json.dumps({"benchmark": "loss", "config": "plain_ppo_clip_fwd_bwd", "B": B, "T": T,
                      "median_ms": round(base * 1e3, 3), "load_avg_1m": load()}))  # fmt: skip
    for name in CONFIGS:
        print(json.dumps({
            "benchmark": "loss", "config": name, "B": B, "T": T, "median_ms": round(t[name] * 1e3, 3),
            "overhead_vs_plain_pct": round(100 * (t[name] - base) / base, 1),
            "correction_only_ms": round(t["only:" + name] * 1e3, 3),
            "correction_only_vs_plain_pct": round(100 * t["only:" + name] / base, 1), "load_avg_1m": load(),
        }))  # fmt: skip

    # The realistic denominator: log-probs from hidden states (forward + backward) plus the loss.
    small = timed_interleaved(loss_fns(STAGE_B, STAGE_T), REPS)
    stage_small = logprob_stage_seconds(STAGE_B * STAGE_T) + small["plain"]
    stage_full = stage_small * (B * T) / (STAGE_B * STAGE_T)  # linear in tokens: chunked matmuls dominate

    def pct(extra: float, stage: float) -> float:
        return round(100 * extra / stage, 4)

    print(json.dumps({
        "benchmark": "loss", "config": "overhead_vs_loss_stage",
        "loss_stage": f"logprobs_from_hidden fwd+bwd (H={H}, V={V}, chunk={CHUNK}) + ppo_clip loss fwd+bwd",
        "B": B, "T": T, "stage_ms_scaled": round(stage_full * 1e3, 1),
        "overhead_vs_loss_stage_pct": {name: pct(t[name] - base, stage_full) for name in CONFIGS},
        "measured_at": {"B": STAGE_B, "T": STAGE_T, "stage_ms": round(stage_small * 1e3, 1),
                        "overhead_vs_loss_stage_pct": {name: pct(small[name] - small["plain"], stage_small)
                                                       for name in CONFIGS}},
        "load_avg_1m": load(),
    }))  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)  # single thread: stable timings on a shared 2-core machine
    main()
