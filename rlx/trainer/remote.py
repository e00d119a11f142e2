"""The trainer's end of separate generator ranks (`generator.placement = "separate"`).

Schedule (fixed lag k = train.max_staleness): step t trains on rollouts generated with policy version
v(t) = max(start, t - 1 - k), the weights after step v(t). The generator ranks therefore produce step
t + 1's batch (needing version t - k) while the trainer trains step t whenever k >= 1; k = 0 is the
synchronous schedule (numerically the colocated run). A fixed lag, rather than "the newest version
available", makes runs reproducible: the rollouts of a step do not depend on timing.

Messages from generator rank 0 to every trainer rank, in order: {"kind": "val"} results of a
validated version, {"kind": "batch"} one step's global batch (rollouts, sampler / reward metrics,
timings, the version used, the generator's wait for weights, every generator rank's data-stream
state after the batch), and {"kind": "done"} after the last version. Trainer ranks send every
version's shards (rlx.weight_sync.transfer) with flags `validate` / `stop`.

Checkpoints: after step t the batches of steps t + 1 .. t + k already exist (they were generated with
versions <= t - 1). The checkpoint keeps them, with the data-stream states after the last of them,
so a resumed run trains on exactly the rollouts an uninterrupted one would, and the generator
ranks continue at step t + k + 1 with version t, the checkpoint's weights.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from rlx.placement import ChannelClosed, Placement
from rlx.types import Rollout
from rlx.weight_sync.transfer import send_weights

logger = logging.getLogger("rlx.train")


def encode_rollout(r: Rollout) -> dict[str, Any]:
    """A rollout as JSON data (the prompt object stays behind: the reward is already computed)."""
    return {"prompt_ids": list(r.prompt_ids), "response_ids": list(r.response_ids),
            "rollout_logprobs": list(r.rollout_logprobs), "group_id": _encode_id(r.group_id), "reward": r.reward,
            "extras": dict(r.extras), "finish_reason": r.finish_reason, "response_mask": r.response_mask}  # fmt: skip


def decode_rollout(d: dict[str, Any]) -> Rollout:
    return Rollout(d["prompt_ids"], d["response_ids"], d["rollout_logprobs"], _decode_id(d["group_id"]), d["reward"],
                   d["extras"], d["finish_reason"], d["response_mask"])  # fmt: skip


def _encode_id(x: Any) -> Any:
    return {"tuple": [_encode_id(v) for v in x]} if isinstance(x, tuple) else x


def _decode_id(x: Any) -> Any:
    return tuple(_decode_id(v) for v in x["tuple"]) if isinstance(x, dict) else x


class RemoteGenerator:
    """Receives batches and validation results from the generator ranks; sends them weights."""

    def __init__(self, placement: Placement, cfg: Any):
        self.p, self.cfg = placement, cfg
        self.k = cfg.train.max_staleness
        self.src = placement.generator_ranks[0]
        self.pending: dict[int, dict] = {}
        self.results: list[dict[str, float]] = []
        self.requested = self.received = 0
        self.done = self.stop_sent = False
        self.last_streams: Any = None

    # ---- messages ---------------------------------------------------------------------------------

    def _receive(self) -> float:
        """Handle the next message from generator rank 0; returns the seconds spent waiting for it."""
        start = time.perf_counter()
        msg = self.p.rollouts.recv_object(self.src)
        waited = time.perf_counter() - start
        if msg["kind"] == "batch":
            self.pending[msg["step"]] = msg
        elif msg["kind"] == "val":
            self.received += 1
            self.results.append({**msg["metrics"], "val/version": float(msg["version"])})
        elif msg["kind"] == "done":
            self.done = True
        return waited

    def start(self, model: nn.Module, start_step: int, resume: dict[str, Any], kl_coef: float | None = None) -> None:
        """Tell the generator ranks where the run starts and send them its weights (version start_step)."""
        for msg in resume.get("async_pending", []):
            self.pending[msg["step"]] = msg
        validate = start_step == 0 and self.cfg.train.val_before_train
        init = {"start_step": start_step, "next_step": start_step + 1 + len(self.pending), "steps": self.cfg.train.steps,
                "max_staleness": self.k, "streams": resume.get("async_streams")}  # fmt: skip
        if self.p.global_rank == self.p.trainer_ranks[0]:
            for g in self.p.generator_ranks:
                self.p.rollouts.send_object(init, g)
        self.push(model, start_step, validate=validate, kl_coef=kl_coef)
        logger.info("separate generator ranks %s: step t trains on policy version t - 1 - %d", self.p.generator_ranks,
                    self.k)  # fmt: skip

    def next_batch(self, step: int):
        from rlx.trainer.rl import SampledBatch

        waited = 0.0
        while step not in self.pending:
            waited += self._receive()
        msg = self.pending.pop(step)
        self.last_streams = msg["streams"]
        staleness = float(step - 1 - msg["version"])
        metrics = {**msg["metrics"], "async/staleness_mean": staleness, "async/staleness_max": staleness,
                   "async/trainer_wait_s": waited, "async/generator_wait_s": msg["generator_wait_s"],
                   "async/policy_version": float(msg["version"])}  # fmt: skip
        return SampledBatch([decode_rollout(r) for r in msg["rollouts"]], metrics, msg["seconds"],
                            msg["generated_tokens"])  # fmt: skip

    def push(self, model: nn.Module, version: int, *, validate: bool, kl_coef: float | None = None) -> dict[str, float]:
        """Send version `version` (the weights after that step) to every generator rank, with the in-reward
        KL coefficient to use from then on (seq_final_reward) when there is one."""
        self.requested += int(validate)
        stop = version >= self.cfg.train.steps
        self.stop_sent = stop
        flags = {"validate": validate, "stop": stop, **({"kl_coef": kl_coef} if kl_coef is not None else {})}
        return send_weights(model, self.p.weights, self.p.generator_ranks, version, flags=flags)

    def confirm_alive(self, step: int) -> None:
        """Before a signal stop without a checkpoint: wait for the batch generated from the weights pushed
        after `step` (generator ranks keep serving after a first signal). When a generator rank has died,
        torchrun signals the trainer too, and this reports the death as what stopped the run
        (ChannelClosed: one `rlx: error:` line naming the rank) instead of a clean stop."""
        target = min(step + 1 + self.k, self.cfg.train.steps)
        while target > step and target not in self.pending:
            self._receive()

    def take_validation(self, wait: bool = True) -> list[dict[str, float]]:
        """The validation results that have arrived since the last call, oldest first (each with
        `val/version`, the step whose weights it measured); with `wait`, every requested one."""
        while wait and self.received < self.requested:
            self._receive()
        results, self.results = self.results, []
        return results

    def state_dict(self, step: int) -> dict[str, Any]:
        """What a checkpoint after `step` needs: the batches of steps step+1 .. step+k (waiting for them)
        and every generator rank's data-stream state after the last of them."""
        ahead = [s for s in range(step + 1, min(step + self.k, self.cfg.train.steps) + 1)]
        try:
            while any(s not in self.pending for s in ahead):
                self._receive()
        except ChannelClosed as e:  # (e.g. stopped by a second signal) keep what arrived; resume regenerates
            logger.warning("saving without the batches of steps %s: %s. The resumed run regenerates them from "
                           "this checkpoint's weights (not bit-identical to an uninterrupted run)",
                           [s for s in ahead if s not in self.pending], e)  # fmt: skip
            ahead = [s for s in ahead if s in self.pending and all(a in self.pending for a in range(step + 1, s))]
        pending = [self.pending[s] for s in ahead]
        streams = pending[-1]["streams"] if pending else self.last_streams
        return {"async_pending": pending, "async_streams": streams}

    def close(self) -> None:
        """After the last version went out: take the generator ranks' last messages (a final validation,
        the goodbye), so none is left sending to a trainer that has gone."""
        while self.stop_sent and not self.done:
            try:
                self._receive()
            except Exception:  # a generator that already went is fine at this point
                return
