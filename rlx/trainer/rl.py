"""The RL loop: `rlx train --config X.toml` (also `python -m rlx.train` under torchrun).

One step (DESIGN.md section 2): sample rollouts (generate + reward) -> gather the global batch ->
old/ref logprobs -> critic values (gae) -> KL in the reward (use_kl_in_reward) -> advantages ->
rollout correction -> critic update -> policy update (after critic.warmup) -> weight sync -> log.
Setup of the stages lives in `rl_setup.py`; the update in `rl_update.py`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rlx.algorithms.critic import apply_kl_penalty
from rlx.config import Config, parse_args
from rlx.lifecycle import Lifecycle
from rlx.trainer.policy import compute_logprobs, forward_options
from rlx.trainer.rl_setup import Stages, build_stages, gather_rollouts
from rlx.trainer.rl_update import GlobalBatch, balance_by_tokens, gather_rows, seq_lengths
from rlx.types import Rollout, RolloutBatch

logger = logging.getLogger("rlx.train")


class Timer:
    """Named wall-clock spans of one step: `with timer("generate"): ...` -> `timing/generate`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"timing/{name}"] = self.seconds.get(f"timing/{name}", 0.0) + time.perf_counter() - start


@dataclass
class SampledBatch:
    """One step's global batch from the sampling side, with its metrics and phase timings."""

    rollouts: list[Rollout]
    metrics: dict[str, float]
    seconds: dict[str, float]
    generated_tokens: float


def sample_batch(s: Any, step: int) -> SampledBatch:
    """Generate, score and gather one step's global batch on the sampling side `s` (a `Stages` or a
    `Sampling`: engine, generator_tokens, reward, stream, sampler, sampler_ctx). Collective over the
    default process group (the ranks that generate)."""
    timer = Timer()
    s.engine.reseed(step)  # sampling depends on (seed, step), not on how the run got here
    with timer("generate"):  # sampler: generation + reward (reward timed separately below)
        local, metrics = s.sampler.sample(s.stream.take(s.sampler.num_prompts), s.sampler_ctx)
    timer.seconds["timing/reward"] = s.reward.pop_seconds()
    timer.seconds["timing/generate"] -= timer.seconds["timing/reward"]
    # Reward failures of this step over all ranks: a reward that keeps failing stops the run here,
    # before the update trains on its zeros (reward.max_failure_fraction / max_failed_steps).
    reward_metrics = s.reward.metrics()
    failures, scored = s.sampler_ctx.global_sum(reward_metrics.get("reward/failures", 0.0),
                                                reward_metrics.get("reward/num_scored", 0.0))  # fmt: skip
    reward_metrics.update(s.reward.end_step(failures, scored))
    rollouts = gather_rollouts(local.rollouts, s)
    metrics = s.sampler.global_metrics(rollouts, metrics)
    metrics.update(reward_metrics)
    metrics["generator/dropped_prompts"] = s.engine.metrics().get("generator/dropped_prompts", 0.0)
    return SampledBatch(rollouts, metrics, timer.seconds, s.generator_tokens.pop())


def validate(cfg: Config, s: Any) -> dict[str, float]:
    """Mean reward and accuracy on the held-out prompts on the sampling side `s` (collective)."""
    if s.val_prompts is None:
        return {}
    from rlx.data import batches, shard
    from rlx.types import GenerationRequest

    layout = s.engine.layout
    mine = shard(s.val_prompts.prompts, layout.dp_index, layout.dp_size)
    num_batches = math.ceil(math.ceil(len(s.val_prompts) / layout.dp_size) / cfg.data.val_batch_size)
    sums = torch.zeros(3, dtype=torch.float64)  # score, acc, count
    chunks = list(batches(mine, cfg.data.val_batch_size))
    for k in range(num_batches):  # every rank makes the same number of (possibly collective) calls
        prompts = chunks[k] if k < len(chunks) else []
        requests = [GenerationRequest(p.prompt_ids, n=cfg.generator.val_n) for p in prompts]
        outputs = s.generator_tokens.generate(requests, validation=True)
        rollouts = [Rollout(p.prompt_ids, c.token_ids, c.logprobs, p.uid, finish_reason=c.finish_reason, prompt=p)
                    for p, outs in zip(prompts, outputs) for c in outs]  # fmt: skip
        results = s.reward.score(rollouts) if rollouts else []
        if layout.tp_group_rank == 0:  # one engine replica counts once
            for res in results:
                sums += torch.tensor([res.score, res.extras.get("acc", float(res.score >= 1.0)), 1.0], dtype=torch.float64)
    s.generator_tokens.pop()  # validation tokens are not training compute
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    score, acc, count = sums.tolist()
    return {"val/reward": score / max(count, 1), "val/acc": acc / max(count, 1), "val/num_samples": count}


def critic_batch_metrics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Masked means of the critic's pre-update values and GAE's returns over the batch."""
    count = mask.sum().clamp(min=1)
    return {"critic/values_mean": float((values * mask).sum() / count),
            "critic/returns_mean": float((returns * mask).sum() / count)}  # fmt: skip


class RLTrainer:
    """Runs steps, validation and checkpoints over the stages of a run (`build_stages(cfg)`, or fakes
    in tests: a scripted generator and reward stand in for vLLM and the reward pool)."""

    def __init__(self, cfg: Config, stages: Stages, life: Lifecycle | None = None):
        self.cfg = cfg
        self.s = stages
        self.life = life if life is not None else Lifecycle()  # not entered: no handlers, never stops
        self.total_generated_tokens = float(self.s.resume_data.get("total_generated_tokens", 0.0))

    # ---- one step --------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        s, timer = self.s, Timer()
        start = time.perf_counter()

        if s.remote is None:
            sampled = sample_batch(s, step)
            s.engine.sleep()  # GPU: free the engine's memory for the update (no-op on CPU)
        else:  # generated on the generator ranks (with policy version step - 1 - max_staleness)
            sampled = s.remote.next_batch(step)
        rollouts, metrics = sampled.rollouts, dict(sampled.metrics)
        timer.seconds.update(sampled.seconds)

        # Every rank holds the global batch; each DP rank trains on a token-balanced share.
        batch = RolloutBatch(rollouts).to_tensors()
        shares = balance_by_tokens(seq_lengths(rollouts), s.dims.dp_size)
        mine = [rollouts[i] for i in shares[s.dims.dp_rank]]
        g = GlobalBatch(rollouts, batch["response_mask"], torch.zeros(0), batch["rollout_log_probs"])

        # The plan says which no-grad passes this step needs: pi_old is skipped in bypass mode and when
        # the single update's own forward provides it (one epoch, one mini-batch).
        plan = s.loss.plan(s.updater.num_mini_batches(g), reward_kl=s.kl_ctrl is not None)
        with timer("old_logprob"):
            if plan.old_logprob_pass:
                g.old_log_probs = self._logprobs(s.model, mine, shares, len(rollouts))
            if plan.ref_pass:
                g.ref_log_probs = self._logprobs(s.ref_model, mine, shares, len(rollouts))
        values = returns = None
        if s.critic is not None:
            with timer("values"):
                values = s.critic.values(rollouts)
        with timer("advantage"):
            rewards = batch["token_level_rewards"]
            if s.kl_ctrl is not None:  # verl order: penalize with the current beta, then update beta
                old = g.rollout_log_probs if s.loss.bypass else g.old_log_probs
                rewards, kl_metrics = apply_kl_penalty(rewards, old, g.ref_log_probs, g.response_mask, s.kl_ctrl.value,
                                                       self.cfg.algorithm.kl_penalty)  # fmt: skip
                s.kl_ctrl.update(kl_metrics["actor/reward_kl_penalty"], n_steps=len(rollouts))
                metrics.update(kl_metrics)
            # GAE and the critic see the response mask; rollout correction's RS mask (below) is the actor's.
            response_mask = g.response_mask
            g.advantages, returns = s.advantage(rewards, response_mask, batch["group_ids"], values=values)
            if plan.correction == "batch" and g.response_mask.any():
                metrics.update(s.loss.correct_batch(g))

        if s.critic is not None:
            with timer("critic"):
                metrics.update(s.critic.update(rollouts, values, returns, response_mask))
                metrics.update(critic_batch_metrics(values, returns, response_mask))
        # critic_warmup (verl's rule): the policy first updates at step critic.warmup.
        update_actor = s.critic is None or step >= self.cfg.critic.warmup
        with timer("train"):
            if update_actor:
                metrics.update(s.updater.update(g, plan))
                s.scheduler.step()
        with timer("weight_sync"):
            if s.remote is not None:  # every version goes out: the generator ranks follow the step count
                beta = s.kl_ctrl.value if s.kl_ctrl is not None else None
                metrics.update(s.remote.push(s.model, step, validate=self._validates(step), kl_coef=beta))
            else:
                s.engine.wake_up()
                if update_actor:  # (a frozen policy has nothing new to send)
                    metrics.update(s.weight_sync.push(s.model, version=step))

        metrics.update(self._batch_metrics(rollouts, g, sampled.generated_tokens))
        metrics.update(timer.seconds)
        metrics["timing/step"] = time.perf_counter() - start
        metrics["perf/tokens_per_s"] = metrics["perf/num_tokens"] / max(metrics["timing/step"], 1e-9)
        return metrics

    def _logprobs(self, model, mine, shares, total) -> torch.Tensor:
        s = self.s
        local = compute_logprobs(model, mine, **forward_options(self.cfg, s.device, s.dp_group))
        return gather_rows(local, shares, total, s.dp_group)

    def _batch_metrics(self, rollouts, g: GlobalBatch, generated_tokens: float) -> dict[str, float]:
        self.total_generated_tokens += generated_tokens
        rewards = torch.tensor([r.reward for r in rollouts] or [0.0])
        lengths = torch.tensor([float(len(r.response_ids)) for r in rollouts] or [0.0])
        accs = [r.extras["acc"] for r in rollouts if "acc" in r.extras]
        valid = g.response_mask.sum(-1) > 0
        adv = g.advantages[:, 0][valid] if g.advantages.numel() else torch.zeros(1)
        out = {
            "reward/mean": rewards.mean().item(),
            "reward/max": rewards.max().item(),
            "reward/min": rewards.min().item(),
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/clip_ratio": sum(r.finish_reason == "length" for r in rollouts) / max(len(rollouts), 1),
            "critic/advantages_mean": adv.mean().item() if adv.numel() else 0.0,
            "critic/advantages_abs_mean": adv.abs().mean().item() if adv.numel() else 0.0,
            "perf/num_rollouts": float(len(rollouts)),
            "perf/num_tokens": float(sum(seq_lengths(rollouts))),
            "perf/generated_tokens": generated_tokens,
            "perf/total_generated_tokens": self.total_generated_tokens,
        }
        if accs:
            out["reward/acc"] = sum(accs) / len(accs)
        return out

    # ---- validation --------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Mean reward and accuracy on the held-out prompts (`generator.val_temperature`, `val_n`). With
        separate generator ranks: the results that have arrived (see RemoteGenerator.take_validation)."""
        if self.s.remote is not None:
            results = self.s.remote.take_validation(wait=True)
            return results[-1] if results else {}
        return validate(self.cfg, self.s)

    def _validates(self, step: int) -> bool:
        every = self.cfg.train.val_every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        s, cfg, life = self.s, self.cfg, self.life
        last = cfg.train.steps
        final: dict[str, float] = {}
        if life.should_stop():  # a signal while the stages were built: nothing new to save
            raise life.stopped(s.start_step, None, "no step ran")
        if s.start_step == 0 and cfg.train.val_before_train:
            final = self.validate()
            if final:
                s.logger.log(final, step=0)
        for step in range(s.start_step + 1, last + 1):
            metrics = self.step(step)
            if s.remote is not None:  # results of earlier versions, as they arrive (val/version says which)
                results = s.remote.take_validation(wait=step == last and self._validates(step))
                for older in results[:-1]:  # (rare: val_every <= max_staleness + 1) a record of their own
                    s.logger.log(older, step=step)
                metrics.update(results[-1] if results else {})
            elif self._validates(step):
                metrics.update(self.validate())
            if step % cfg.train.log_every == 0 or step == last:
                s.logger.log(metrics, step=step)
            final = metrics
            # SIGTERM/SIGINT: stop after this step (all ranks agree), with a checkpoint of it.
            stopping = life.should_stop()
            save_now = stopping and cfg.checkpoint.enable and cfg.checkpoint.save_on_signal
            saved = None
            if s.checkpointer.should_save(step, last) or save_now:
                data = {"total_generated_tokens": self.total_generated_tokens}
                data.update(s.remote.state_dict(step) if s.remote is not None else {"stream": s.stream.state_dict()})
                if s.kl_ctrl is not None:
                    data["kl_ctrl"] = s.kl_ctrl.state_dict()
                saved = s.checkpointer.save(step, data)
            if stopping:
                if step % cfg.train.log_every and step != last:
                    s.logger.log(metrics, step=step)  # the last step's metrics are never lost
                s.checkpointer.wait()  # an async save completes before the exit
                if s.remote is not None and saved is None:
                    s.remote.confirm_alive(step)
                why = "checkpoint.enable = false" if not cfg.checkpoint.enable else "checkpoint.save_on_signal = false"
                raise life.stopped(step, saved, why)
        return final

    def close(self) -> None:
        self.s.close()


def run(cfg: Config, life: Lifecycle | None = None) -> dict[str, float]:
    """Train with an already resolved config; returns the last step's metrics. With an entered
    `Lifecycle`, SIGTERM/SIGINT stop the run after a step and raise `RunStopped`."""
    placement = None
    if cfg.generator.placement == "separate":  # this rank trains or generates, by its place in the world
        from rlx.placement import split_world

        placement = split_world(cfg.generator.num_ranks, cfg.parallel.backend)
        if placement.role == "generator":
            from rlx.trainer.generator_worker import run_generator

            return run_generator(cfg, placement, life)
    trainer = RLTrainer(cfg, build_stages(cfg, placement=placement), life)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_args(argv, prog="rlx train")
    # Rank 0 reports progress; other ranks only warnings (RANK is set by torchrun before init).
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.captureWarnings(True)
    with Lifecycle() as life:  # signal handlers for the run; leftover child processes stopped at the end
        run(cfg.resolved(), life)
    return 0
