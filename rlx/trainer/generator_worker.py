"""What a generator rank does with `generator.placement = "separate"`: sample, score and ship batches.

A generator rank builds only the sampling side (`build_sampling`: engine, reward, its data stream,
the sampler) and a CPU copy of the policy that versions arrive into; that copy (and, with KL in the
reward, a copy of the reference) also serves the samplers that need a trainer forward while they
sample: token_adaptive's exact token stats, and seq_final_reward's KL penalty at the beta the trainer
sends with every version. Then, for each step t from the
trainer's start message on: take weight versions from the background receiver, in order, until it
holds v(t) = max(start, t - 1 - max_staleness) (the engine is reloaded between generation batches,
never inside one), generate and score the step's batch exactly as a colocated run does
(`sample_batch`, reseeded by step), and send it (generator rank 0, to every trainer rank). A version
flagged `validate` is validated right after it is loaded. After the last batch it takes the
remaining versions until the one flagged `stop`, then says goodbye. See rlx/trainer/remote.py for
the trainer's side and the checkpoint contract.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from rlx import distributed
from rlx.models import from_pretrained
from rlx.placement import ChannelClosed, Placement
from rlx.preflight import check_run_inputs
from rlx.trainer.policy import compute_token_stats, forward_options, penalized_sequence_rewards
from rlx.trainer.remote import encode_rollout
from rlx.trainer.rl import sample_batch, validate
from rlx.trainer.rl_setup import DTYPES, _weights_source, build_sampling
from rlx.weight_sync import WeightSync
from rlx.weight_sync.transfer import ShardReceiver, Version

logger = logging.getLogger("rlx.generator")


class GeneratorRank:
    def __init__(self, cfg: Any, placement: Placement):
        self.cfg, self.p = cfg, placement
        inputs = check_run_inputs(cfg)
        distributed.init_distributed(cfg.parallel.backend)  # the generator ranks' group (split_world made it)
        hf_dir, _ = _weights_source(cfg)
        dtype = DTYPES[cfg.model.dtype]
        # Versions land here, then in the engine. It is also the sampling policy the samplers that need a
        # trainer forward ask (token_adaptive's token stats; seq_final_reward's KL, with a reference copy).
        self.shadow = from_pretrained(hf_dir, dtype=dtype)
        self.ref = from_pretrained(cfg.model.ref_path, dtype=dtype).eval() if cfg.algorithm.use_kl_in_reward else None
        self.kl_coef = cfg.algorithm.kl_ctrl.kl_coef  # the trainer's controller value, sent with every version
        self.sampling = build_sampling(cfg, inputs, hf_dir, token_stats=self._token_stats,
                                       final_rewards=self._final_rewards if self.ref is not None else None)  # fmt: skip
        self.sync = WeightSync(self.sampling.engine)
        self.receiver = ShardReceiver(placement.weights, placement.trainer_ranks)
        self.is_sender = placement.role_rank == 0
        self.current: Version | None = None

    def _token_stats(self, rollouts):
        return compute_token_stats(self.shadow, rollouts, **forward_options(self.cfg, torch.device("cpu"), None))

    def _final_rewards(self, rollouts) -> list[float]:
        """As the colocated run's, at the beta the trainer sent with the current version."""
        return penalized_sequence_rewards(self.shadow, self.ref, rollouts, self.kl_coef, self.cfg.algorithm.kl_penalty,
                                          **forward_options(self.cfg, torch.device("cpu"), None))  # fmt: skip

    def _send(self, msg: dict) -> None:
        if self.is_sender:
            for t in self.p.trainer_ranks:
                self.p.rollouts.send_object(msg, t)

    def _load_next(self) -> None:
        v = self.receiver.get()
        self.shadow.load_state_dict(v.tensors, strict=False)  # (a tied lm_head arrives as the embedding)
        self.sync.push(self.shadow, version=v.version)
        v.tensors = {}  # the engine has them now
        self.kl_coef = v.flags.get("kl_coef", self.kl_coef)
        self.current = v
        if v.flags.get("validate"):
            self._send({"kind": "val", "version": v.version, "metrics": validate(self.cfg, self.sampling)})

    def run(self) -> None:
        init = self.p.rollouts.recv_object(self.p.trainer_ranks[0])
        if init["streams"] is not None:
            self.sampling.stream.load_state_dict(init["streams"][self.p.role_rank])
        start, k = init["start_step"], init["max_staleness"]
        self._load_next()  # version `start`
        for step in range(init["next_step"], init["steps"] + 1):
            needed = max(start, step - 1 - k)
            waited = self.receiver.wait_seconds
            while self.current.version < needed:
                self._load_next()
            batch = sample_batch(self.sampling, step)
            streams: list[Any] = [self.sampling.stream.state_dict()]  # every generator rank's, in rank order
            if dist.is_initialized() and dist.get_world_size() > 1:
                streams = [None] * dist.get_world_size()
                dist.all_gather_object(streams, self.sampling.stream.state_dict())
            self._send({"kind": "batch", "step": step, "version": self.current.version,
                        "rollouts": [encode_rollout(r) for r in batch.rollouts], "metrics": batch.metrics,
                        "seconds": batch.seconds, "generated_tokens": batch.generated_tokens,
                        "generator_wait_s": self.receiver.wait_seconds - waited, "streams": streams})  # fmt: skip
        while not self.current.flags.get("stop"):
            self._load_next()
        self._send({"kind": "done"})

    def close(self) -> None:
        self.sampling.reward.close()
        self.sampling.engine.shutdown()
        distributed.teardown_distributed()


def run_generator(cfg: Any, placement: Placement, life: Any = None) -> dict[str, float]:
    """The generator rank's whole run (returns nothing to report: the trainer logs).

    A first SIGTERM/SIGINT (`life`, an entered Lifecycle, remembers it) does not stop a generator rank:
    it keeps serving, so the trainer ranks can finish their step and save the batches in flight. When
    the trainer ranks then exit, this rank ends quietly; without a signal, their going is an error."""
    torch.set_grad_enabled(False)
    rank = GeneratorRank(cfg, placement)
    try:
        rank.run()
    except ChannelClosed:
        if life is None or life.signum is None:
            raise
        logger.info("the trainer ranks stopped after a signal: generator rank %d exits", placement.role_rank)
    finally:
        rank.close()
    return {}
