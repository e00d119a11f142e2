"""torchrun script for the critic's parity tests: PPO-with-a-critic steps on a fixed global batch.

Each step does what `RLTrainer.step` does after sampling, with the real stages: old and reference
logprobs (each DP rank its token-balanced share, gathered), the critic's values, the KL penalty in the
reward, GAE, two critic epochs over two mini-batches (`CriticUpdater`), one policy update
(`PolicyUpdater` + `LossStage`). The batch (prompts, responses, rewards, rollout logprobs) is the same
on every rank and at every mesh, so the numbers must not depend on the mesh.

Output (rank 0, torch.save to --out): {"metrics": [per step], "critic": full params, "policy": full params}.
Run with PYTHONPATH at the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace

import torch

from rlx import distributed
from rlx.algorithms.critic import apply_kl_penalty
from rlx.config.train_sections import CriticConfig, LossConfig, OptimConfig, RolloutCorrectionConfig
from rlx.parallel import ParallelDims, build_parallel_model
from rlx.trainer.critic_update import CriticUpdater
from rlx.trainer.loss_stage import GlobalBatch, LossStage, build_advantage
from rlx.trainer.policy import compute_logprobs
from rlx.trainer.rl_update import PolicyUpdater, balance_by_tokens, gather_rows, seq_lengths
from rlx.trainer.train_step import build_lr_scheduler, build_optimizer, make_generator
from rlx.types import Rollout, RolloutBatch
from tests.distributed.run_trainer import full_params


def global_batch(step: int, vocab: int, groups: int = 4, n: int = 2) -> list[Rollout]:
    gen = make_generator(2000 + step)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    rollouts = []
    for g in range(groups):
        prompt = torch.randint(0, vocab, (rand(3, 7),), generator=gen).tolist()
        for _ in range(n):
            L = rand(1, 9)
            response = torch.randint(0, vocab, (L,), generator=gen).tolist()
            logprobs = (-torch.rand(L, generator=gen) * 3).tolist()
            rollouts.append(Rollout(prompt, response, logprobs, group_id=(step, g), reward=float(rand(0, 2))))
    return rollouts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dp-shard", type=int, default=-1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()

    device = distributed.init_distributed("gloo")
    pcfg = SimpleNamespace(dp_replicate=1, dp_shard=a.dp_shard, tp=a.tp, activation_checkpoint="none", ac_every=1,
                           compile=False, reshard_after_forward=True, param_dtype="float32", reduce_dtype="float32")  # fmt: skip
    dims = ParallelDims.from_config(pcfg, distributed.world_size())
    dims.build_mesh(device.type)
    dp_group = dims.get_mesh("dp").get_group()
    policy = build_parallel_model(a.model, dims, pcfg, device=device)
    ref = build_parallel_model(a.model, dims, pcfg, device=device, reference=True)
    critic_model = build_parallel_model(a.model, dims, pcfg, device=device, value_head_seed=3)
    # Adam eps 1e-4: see run_trainer.py (fp32 reduction-order noise near g = 0 at eps 1e-8).
    optim = OptimConfig(lr=1e-3, eps=1e-4, grad_clip=0.5)
    critic_cfg = CriticConfig(optim=OptimConfig(lr=3e-3, eps=1e-4, grad_clip=0.5), ppo_epochs=2, mini_batch_size=2,
                              micro_batch_tokens=24, cliprange_value=0.2, loss_agg_mode="token-mean")  # fmt: skip
    loss_cfg = dataclasses.replace(LossConfig(), micro_batch_tokens=24, logprob_chunk_size=7, loss_scale_factor=8.0)
    rng = make_generator(7)
    critic_opt = build_optimizer(critic_model, critic_cfg.optim)
    critic = CriticUpdater(critic_model, critic_opt, build_lr_scheduler(critic_opt, critic_cfg.optim, 10), critic_cfg,
                           loss_scale_factor=8.0, device=device, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                           dp_group=dp_group, rng=rng)  # fmt: skip
    optimizer = build_optimizer(policy, optim)
    loss = LossStage(loss_cfg, RolloutCorrectionConfig())
    updater = PolicyUpdater(policy, optimizer, loss_cfg, loss, device=device, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                            dp_group=dp_group, temperature=1.0, grad_clip=0.5, rng=rng)  # fmt: skip
    advantage = build_advantage(SimpleNamespace(adv_estimator="gae", gamma=0.95, lam=0.9))

    def logprobs(model, rollouts):
        shares = balance_by_tokens(seq_lengths(rollouts), dims.dp_size)
        local = compute_logprobs(model, [rollouts[i] for i in shares[dims.dp_rank]], device=device, token_budget=24,
                                 temperature=1.0, chunk_size=7, dp_group=dp_group)  # fmt: skip
        return gather_rows(local, shares, len(rollouts), dp_group)

    history = []
    for step in range(a.steps):
        rollouts = global_batch(step, policy.args.vocab_size)
        t = RolloutBatch(rollouts).to_tensors()
        g = GlobalBatch(rollouts, t["response_mask"], torch.zeros(0), t["rollout_log_probs"])
        g.old_log_probs = logprobs(policy, rollouts)
        ref_lp = logprobs(ref, rollouts)
        values = critic.values(rollouts)
        rewards, metrics = apply_kl_penalty(t["token_level_rewards"], g.old_log_probs, ref_lp, g.response_mask, 0.1, "k3")
        g.advantages, returns = advantage(rewards, g.response_mask, t["group_ids"], values=values)
        metrics.update(critic.update(rollouts, values, returns, g.response_mask))
        metrics.update(updater.update(g, loss.plan(updater.num_mini_batches(g))))
        metrics["values_sum"] = float(values.sum())
        history.append(metrics)
    out = {"metrics": history, "critic": full_params(critic_model), "policy": full_params(policy)}
    if distributed.is_main():
        torch.save(out, a.out)
    distributed.teardown_distributed()


if __name__ == "__main__":
    main()
    distributed.exit_now()  # no interpreter finalization racing gloo's worker threads (see exit_now)
