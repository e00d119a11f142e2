"""Cost of rollout correction relative to the plain policy loss (forward + backward) on a realistic batch.

Median wall time over many repetitions on B=64, T=1024 fp32 log-probs; one JSON line per configuration.
"""

import json
import statistics
import time

import torch

from rlx.algorithms import policy_loss, rollout_correction

B, T, REPS = 64, 1024, 40


def timed(fn) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rollout = -torch.rand(B, T, generator=g) * 3
    old = rollout + 0.05 * torch.randn(B, T, generator=g)
    log_prob = (old + 0.01 * torch.randn(B, T, generator=g)).requires_grad_()
    adv = torch.randn(B, 1, generator=g).expand(B, T) * mask

    def plain():
        loss, _ = policy_loss(old, log_prob, adv, mask, loss_type="ppo_clip", loss_agg_mode="token-mean")
        loss.backward()
        log_prob.grad = None

    configs = {
        "is_token": dict(rollout_is="token", rollout_is_threshold=2.0),
        "is_sequence_bn": dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True),
        "is_token+rs_token_k1,seq_max_k2": dict(rollout_is="token", rollout_rs="token_k1,seq_max_k2",
                                               rollout_rs_threshold="0.6_1.6,2.5"),
        "diagnostics_only": dict(),
    }  # fmt: skip
    base = timed(plain)
    print(json.dumps({"benchmark": "loss", "config": "plain_ppo_clip_fwd_bwd", "B": B, "T": T, "median_ms": round(base * 1e3, 3)}))
    for name, kwargs in configs.items():

        def corrected(kwargs=kwargs):
            w, rs_mask, _ = rollout_correction(old, rollout, mask, **kwargs)
            loss, _ = policy_loss(old, log_prob, adv, rs_mask, loss_type="ppo_clip", loss_agg_mode="token-mean",
                                  rollout_is_weights=w)  # fmt: skip
            loss.backward()
            log_prob.grad = None

        t = timed(corrected)
        print(json.dumps({
            "benchmark": "loss", "config": name, "B": B, "T": T, "median_ms": round(t * 1e3, 3),
            "overhead_vs_plain_pct": round(100 * (t - base) / base, 1),
        }))  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)  # single thread: stable timings on a shared 2-core machine
    main()
