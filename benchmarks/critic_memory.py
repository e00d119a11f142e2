"""Peak memory of a PPO step with and without the critic: the critic should add one model's parameters,
gradients and AdamW state, nothing more.

Each variant runs in its own process on the same fixed rollout batch: build the policy (and, with
--critic, the value model from the same directory), then --steps steps of the trainer's own pieces
(old logprobs, critic values + GAE + critic update, policy update). Peak = VmHWM (peak RSS). One JSON
line per variant, then one comparing them: `extra_mb` (critic - policy-only peak), `critic_state_mb`
(3 x the critic's fp32 parameter bytes: weights, exp_avg, exp_avg_sq; its gradients are freed after
each optimizer step, before the policy's peak), the bound with gradients, and extra / state.

    python benchmarks/critic_memory.py [--hidden 512] [--layers 8] [--vocab 32000] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}  # big buffers via mmap: RSS follows the live tensors


def _vm_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) / 1024


def worker(a: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from rlx.config.train_sections import CriticConfig, LossConfig, OptimConfig, RolloutCorrectionConfig
    from rlx.parallel import ParallelDims, build_parallel_model
    from rlx.trainer.critic_update import CriticUpdater
    from rlx.trainer.loss_stage import GlobalBatch, LossStage, build_advantage
    from rlx.trainer.policy import compute_logprobs
    from rlx.trainer.rl_update import PolicyUpdater
    from rlx.trainer.train_step import build_lr_scheduler, build_optimizer, make_generator
    from rlx.types import Rollout, RolloutBatch

    torch.set_num_threads(os.cpu_count() or 1)
    cpu = torch.device("cpu")
    pcfg = SimpleNamespace(dp_replicate=1, dp_shard=-1, tp=1, activation_checkpoint="none", ac_every=1, compile=False,
                           reshard_after_forward=True, param_dtype="float32", reduce_dtype="float32")  # fmt: skip
    dims = ParallelDims.from_config(pcfg, 1)
    policy = build_parallel_model(a.model, dims, pcfg, device=cpu)
    loss_cfg = dataclasses.replace(LossConfig(), micro_batch_tokens=a.micro_tokens, logprob_chunk_size=256,
                                   loss_scale_factor=float(a.response))  # fmt: skip
    rng = make_generator(0)
    optimizer = build_optimizer(policy, OptimConfig(lr=1e-6))
    loss = LossStage(loss_cfg, RolloutCorrectionConfig())
    updater = PolicyUpdater(policy, optimizer, loss_cfg, loss, device=cpu, dp_rank=0, dp_size=1, dp_group=None,
                            temperature=1.0, grad_clip=1.0, rng=rng)  # fmt: skip
    critic = None
    critic_params = 0
    if a.critic:
        model = build_parallel_model(a.model, dims, pcfg, device=cpu, value_head_seed=0)
        critic_params = sum(p.numel() for p in model.parameters())
        ccfg = CriticConfig(ppo_epochs=1, mini_batch_size=0, micro_batch_tokens=a.micro_tokens, loss_agg_mode="token-mean")
        copt = build_optimizer(model, ccfg.optim)
        critic = CriticUpdater(model, copt, build_lr_scheduler(copt, ccfg.optim, 10), ccfg, loss_scale_factor=1.0,
                               device=cpu, dp_rank=0, dp_size=1, dp_group=None, rng=rng)  # fmt: skip
    gen = make_generator(1)
    vocab = policy.args.vocab_size
    rollouts = [Rollout(torch.randint(0, vocab, (16,), generator=gen).tolist(),
                        torch.randint(0, vocab, (a.response,), generator=gen).tolist(), [-1.0] * a.response,
                        group_id=i // 4, reward=float(i % 2)) for i in range(a.rollouts)]  # fmt: skip
    advantage = build_advantage(SimpleNamespace(adv_estimator="gae" if a.critic else "grpo", gamma=1.0, lam=1.0,
                                                norm_adv_by_std=True))  # fmt: skip
    for _ in range(a.steps):
        t = RolloutBatch(rollouts).to_tensors()
        g = GlobalBatch(rollouts, t["response_mask"], torch.zeros(0), t["rollout_log_probs"])
        g.old_log_probs = compute_logprobs(policy, rollouts, device=cpu, token_budget=a.micro_tokens, temperature=1.0,
                                           chunk_size=256, dp_group=None)  # fmt: skip
        values = critic.values(rollouts) if critic else None
        g.advantages, returns = advantage(t["token_level_rewards"], g.response_mask, t["group_ids"], values=values)
        if critic:
            critic.update(rollouts, values, returns, g.response_mask)
        updater.update(g, loss.plan(1))
    policy_params = sum(p.numel() for p in policy.parameters())
    print(json.dumps({"variant": "critic" if a.critic else "policy_only", "peak_rss_mb": round(_vm_mb("VmHWM"), 1),
                      "policy_params": policy_params, "critic_params": critic_params}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rollouts", type=int, default=32)
    p.add_argument("--response", type=int, default=128)
    p.add_argument("--micro-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default="")
    p.add_argument("--critic", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        from rlx.models.tiny import make_tiny

        model = make_tiny(Path(tmp) / "m", "qwen3", hidden_size=a.hidden, num_layers=a.layers, num_heads=8,
                          num_kv_heads=4, head_dim=a.hidden // 8, intermediate_size=int(a.hidden * 2.6875),
                          vocab_size=a.vocab, tie=False)  # fmt: skip
        results = {}
        for critic in (False, True):
            cmd = [sys.executable, __file__, "--worker", "--model", str(model), *sum(
                ([f"--{k.replace('_', '-')}", str(getattr(a, k))] for k in
                 ("rollouts", "response", "micro_tokens", "steps")), [])] + (["--critic"] if critic else [])  # fmt: skip
            out = subprocess.run(cmd, env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True, check=True)
            line = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(line), flush=True)
            results[line["variant"]] = line
    extra = results["critic"]["peak_rss_mb"] - results["policy_only"]["peak_rss_mb"]
    param_mb = 4 * results["critic"]["critic_params"] / 2**20  # fp32
    # Held between steps: weights, exp_avg, exp_avg_sq (gradients are freed after each optimizer step,
    # so they never coexist with the policy's peak); with gradients: the bound if they did.
    held, with_grads = 3 * param_mb, 4 * param_mb
    print(json.dumps({"extra_mb": round(extra, 1), "critic_state_mb": round(held, 1),
                      "critic_state_with_grads_mb": round(with_grads, 1), "extra_over_state": round(extra / held, 3),
                      "load": round(os.getloadavg()[0], 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
