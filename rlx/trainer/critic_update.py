"""The critic side of a PPO step: the value pass before the update and the value-model update.

Values are read where the policy reads its logprobs: the value of response token t is the critic's
output at the hidden state that predicts token t (position P + t - 1), as verl's critic slices
`values[:, -T-1:-1]`. Every data-parallel rank computes its token-balanced share; the update runs
`[critic] ppo_epochs` x mini-batches (whole groups, `mini_batch_size`) x micro-batches of verl's
clipped value loss with global-batch normalizers, so the summed gradients are the full mini-batch
loss's whatever the split over ranks and micro-batches (the actor's scheme, rl_update.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rlx.algorithms.critic import value_loss
from rlx.trainer.policy import dummy_pack, forward_packs, pack_rollouts, scatter_rows
from rlx.trainer.rl_update import balance_by_tokens, gather_rows, group_mini_batches, seq_lengths, sum_over_ranks
from rlx.trainer.train_step import checked_optimizer_step, run_micro_batches
from rlx.types import Rollout


def _score(hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    return head(hidden).squeeze(-1).float()


@torch.no_grad()
def compute_values(critic: nn.Module, rollouts: Sequence[Rollout], *, device: torch.device, token_budget: int,
                   dp_group) -> torch.Tensor:  # fmt: skip
    """`[B, T]` values of every rollout's response positions under `critic` (no grad), fp32 on CPU."""
    width = max((len(r.response_ids) for r in rollouts), default=0)
    out = torch.zeros(len(rollouts), width)
    for pack, values in forward_packs(critic, rollouts, lambda h, head, pack: _score(h, head), device=device,
                                      token_budget=token_budget, dp_group=dp_group):  # fmt: skip
        if pack.rows:
            out[pack.rows] = scatter_rows(values.cpu(), pack, width)
    return out


class CriticUpdater:
    """PPO epochs x mini-batches x micro-batches of the clipped value loss, then clip and step.

    `cfg` is the resolved `[critic]` section; `loss_scale_factor` the divisor of the
    seq-mean-token-sum-norm aggregation (loss.loss_scale_factor)."""

    def __init__(self, critic: nn.Module, optimizer, scheduler, cfg: Any, *, loss_scale_factor: float,
                 device: torch.device, dp_rank: int, dp_size: int, dp_group, rng: torch.Generator):  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.cfg = critic, optimizer, scheduler, cfg
        self.loss_scale_factor = loss_scale_factor
        self.device, self.dp_rank, self.dp_size, self.dp_group, self.rng = device, dp_rank, dp_size, dp_group, rng

    def values(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """`[B, T]` values of the global batch (each DP rank computes its share; all get the whole)."""
        shares = balance_by_tokens(seq_lengths(rollouts), self.dp_size)
        mine = [rollouts[i] for i in shares[self.dp_rank]]
        local = compute_values(self.model, mine, device=self.device, token_budget=self.cfg.micro_batch_tokens,
                               dp_group=self.dp_group)  # fmt: skip
        return gather_rows(local, shares, len(rollouts), self.dp_group)

    def update(self, rollouts: Sequence[Rollout], values: torch.Tensor, returns: torch.Tensor,
               response_mask: torch.Tensor) -> dict[str, float]:  # fmt: skip
        """Train the critic towards `returns` (GAE's targets); `values` are the pre-update predictions
        the clip is centred on. Steps the critic's LR schedule once. Returns `critic/*` metrics
        averaged over the optimizer steps."""
        sums: dict[str, float] = {}
        num_updates = 0
        for _ in range(self.cfg.ppo_epochs):
            for rows in group_mini_batches(rollouts, self.cfg.mini_batch_size, self.rng):
                step = self._mini_batch_step(rollouts, values, returns, response_mask, rows)
                for key, v in step.items():
                    sums[key] = sums.get(key, 0.0) + v
                num_updates += 1
        self.scheduler.step()
        out = {key: v / num_updates for key, v in sums.items()}
        out["critic/num_updates"] = float(num_updates)
        return out

    def _mini_batch_step(self, rollouts, values, returns, response_mask, rows: list[int]) -> dict[str, float]:
        mask = response_mask[rows]
        global_info = dict(
            dp_size=1,  # gradients are summed over ranks (FSDP sum reduction)
            batch_num_tokens=max(float(mask.sum()), 1.0),
            global_batch_size=max(float((mask.sum(-1) > 0).sum()), 1.0),
            loss_scale_factor=self.loss_scale_factor,
        )
        share = balance_by_tokens(seq_lengths([rollouts[i] for i in rows]), self.dp_size)[self.dp_rank]
        mine = [rows[j] for j in share]
        packs = pack_rollouts([rollouts[i] for i in mine], self.cfg.micro_batch_tokens)
        width = response_mask.shape[1]
        totals = torch.zeros(2, dtype=torch.float64)  # vf_loss, token weight
        metric_sums: dict[str, float] = {}

        def run(pack) -> None:
            idx = [mine[j] for j in pack.rows]
            hidden_pos = pack.hidden_pos.to(self.device)

            def head(hidden: torch.Tensor, score: nn.Linear) -> torch.Tensor:
                return _score(hidden.flatten(0, 1).index_select(0, hidden_pos), score)

            flat = self.model(pack.input_ids.to(self.device), pack.position_ids.to(self.device), output_fn=head)
            vpreds = scatter_rows(flat, pack, width)
            on = lambda t: t[idx].to(self.device)  # noqa: E731
            loss, metrics = value_loss(vpreds, on(values), on(returns), on(response_mask), self.cfg.cliprange_value,
                                       self.cfg.loss_agg_mode, **global_info)  # fmt: skip
            loss.backward()
            weight = float(response_mask[idx].sum()) / global_info["batch_num_tokens"]
            totals.add_(torch.tensor([loss.detach().item(), weight], dtype=torch.float64))
            for key in ("critic/vf_clipfrac", "critic/vpred_mean"):  # token-weighted: exact masked means
                metric_sums[key] = metric_sums.get(key, 0.0) + metrics[key] * weight

        run_micro_batches(packs, run, self._dummy_backward, self.dp_group)
        metric_sums = sum_over_ranks(totals, metric_sums, self.dp_group)
        vf_loss, weight = totals.tolist()
        grad_norm = checked_optimizer_step(self.model, self.optimizer, self.cfg.optim.grad_clip,
                                           {"critic/vf_loss": vf_loss}, norm_name="critic/grad_norm")  # fmt: skip
        out = {"critic/vf_loss": vf_loss, "critic/grad_norm": grad_norm, "critic/lr": self.optimizer.param_groups[0]["lr"]}
        out.update({key: v / max(weight, 1e-12) for key, v in metric_sums.items()})
        return out

    def _dummy_backward(self) -> None:
        """A zero loss through every parameter: FSDP's collectives need every rank's backward."""
        pack = dummy_pack()
        zero = self.model(pack.input_ids.to(self.device), pack.position_ids.to(self.device),
                          output_fn=lambda h, score: (h.sum() + score.weight.sum() + score.bias.sum()) * 0.0)  # fmt: skip
        zero.backward()
