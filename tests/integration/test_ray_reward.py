"""Reward scoring on a local Ray cluster: one remote call per chunk, failures scored 0 and counted."""

from __future__ import annotations

import sys
import textwrap
from types import SimpleNamespace

import pytest

from rlx.reward import build_reward
from rlx.types import Prompt, Rollout

ray = pytest.importorskip("ray")

USER_MODULE = textwrap.dedent(
    """
    import time

    def score(response, ground_truth):
        if response == "raise":
            raise RuntimeError("ray boom")
        if response == "hang":
            time.sleep(60)
        return float(response == ground_truth)
    """
)


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def rollout(text: str, answer: str) -> Rollout:
    ids = [ord(c) for c in text]
    prompt = Prompt(prompt_ids=[1], uid=0, ground_truth=answer)
    return Rollout(prompt_ids=[1], response_ids=ids, rollout_logprobs=[0.0] * len(ids), group_id=0, prompt=prompt)


@pytest.mark.slow
def test_ray_scores_chunks_and_counts_failures(tmp_path, monkeypatch):
    (tmp_path / "rlx_ray_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # sent to the Ray workers with every call
    cfg = SimpleNamespace(
        fn="rlx_ray_rewards:score", backend="ray", num_workers=2, timeout_s=2.0, ray_address="", kwargs={}
    )
    scorer = build_reward(cfg, CharTokenizer())
    try:
        batch = [rollout("42", "42")] * 30 + [rollout("raise", "42"), rollout("hang", "42"), rollout("7", "42")]
        results = scorer.score(batch)
        assert [r.score for r in results] == [1.0] * 30 + [0.0, 0.0, 0.0]
        assert results[0].extras == {"acc": 1.0}
        assert scorer.num_remote_calls == 2  # one call per chunk, not one per rollout
        m = scorer.metrics()
        assert (m["reward/errors"], m["reward/timeouts"], m["reward/failures"]) == (1.0, 1.0, 2.0)
        assert m["reward/num_scored"] == 33.0
    finally:
        scorer.close()
        ray.shutdown()
