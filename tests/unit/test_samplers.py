"""Sampler stage: exact behaviour of fixed, adaptive, filtered and token_adaptive with scripted fakes."""

from __future__ import annotations

import dataclasses
import math
import random
from types import SimpleNamespace

import pytest

from rlx.sampler import SAMPLERS, SamplerContext, build_sampler
from rlx.sampler.filtered import has_variance
from rlx.types import RewardResult, Rollout
from tests.fakes import (
    CORRECT,
    FILLER,
    HIGH_ENTROPY,
    LOW_PROB,
    WRONG,
    FakeReward,
    FakeTokenStats,
    ScriptedGenerator,
    ThreadedAllReduce,
    make_prompts,
    position_logprob,
    run_ranks,
    uid_of,
)


def sampler_cfg(type_: str, **sections) -> SimpleNamespace:
    """A duck-typed `[sampler]` section: the config defaults, with per-section overrides."""
    defaults = {
        "adaptive": dict(max_n=128, rollouts_per_batch=8, positive_threshold=0.5, min_rollouts=2),
        "filtered": dict(metric="acc", max_num_gen_batches=10),
        "token_adaptive": dict(uncertainty_threshold=0.7, entropy_threshold=2.0, min_prefix_length=15,
                               max_resamples_per_prefix=3, adaptive_temperature_scale=1.2, target_rollouts=1,
                               resample_from="latest_piece"),
    }
    merged = {k: SimpleNamespace(**{**v, **sections.get(k, {})}) for k, v in defaults.items()}
    return SimpleNamespace(type=type_, **merged)


def groups_of(batch) -> dict:
    out: dict = {}
    for r in batch.rollouts:
        out.setdefault(r.group_id, []).append(r)
    return out


# ------------------------------------------------------------------------------------------ registry


def test_registry_matches_config_types_and_real_config_builds():
    from rlx.config import SAMPLER_TYPES, AdaptiveSamplerConfig, SamplerConfig

    assert set(SAMPLERS) == set(SAMPLER_TYPES)
    cfg = SamplerConfig(type="adaptive", adaptive=AdaptiveSamplerConfig(max_n=6, rollouts_per_batch=3))
    sampler = build_sampler(cfg, n=5, temperature=1.0, train_batch_size=2)
    gen = ScriptedGenerator(lambda req, k: [WRONG])
    batch, metrics = sampler.sample(make_prompts(2), SamplerContext(gen, FakeReward()))
    assert len(batch) == 12 and metrics["adaptive_rollout/iterations"] == 2


def test_unknown_type_lists_valid_names_and_import_path_works():
    with pytest.raises(ValueError, match=r"'adaptive', 'filtered', 'fixed', 'token_adaptive'"):
        build_sampler(sampler_cfg("fixd"), n=2, temperature=1.0, train_batch_size=1)
    custom = build_sampler(sampler_cfg("rlx.sampler.fixed:FixedSampler"), n=2, temperature=1.0, train_batch_size=1)
    assert type(custom).__name__ == "FixedSampler"
    with pytest.raises(ValueError, match="subclass of rlx.sampler.Sampler"):
        build_sampler(sampler_cfg("collections:OrderedDict"), n=2, temperature=1.0, train_batch_size=1)
    with pytest.raises(ValueError, match="cannot import"):
        build_sampler(sampler_cfg("no_such_pkg.mod:X"), n=2, temperature=1.0, train_batch_size=1)


# ------------------------------------------------------------------------------------------ fixed


def test_fixed_one_call_n_per_prompt():
    gen = ScriptedGenerator(lambda req, k: [FILLER, CORRECT if k % 2 else WRONG])
    reward = FakeReward()
    sampler = build_sampler(sampler_cfg("fixed"), n=4, temperature=0.8, train_batch_size=3)
    batch, metrics = sampler.sample(make_prompts(3), SamplerContext(gen, reward))
    assert len(gen.calls) == 1 and [(r.n, r.temperature) for r in gen.calls[0]] == [(4, 0.8)] * 3
    assert len(reward.calls) == 1 and len(reward.calls[0]) == 12
    assert {g: len(rs) for g, rs in groups_of(batch).items()} == {0: 4, 1: 4, 2: 4}
    assert [r.reward for r in batch.rollouts[:4]] == [0.0, 1.0, 0.0, 1.0]
    assert metrics == {"sampler/num_rollouts": 12.0, "sampler/num_groups": 3.0}


# ------------------------------------------------------------------------------------------ adaptive


def adaptive_script(first_positive: dict):
    """Rollout k of prompt uid is positive iff k == first_positive[uid]."""
    return lambda req, k: [FILLER, CORRECT if k == first_positive.get(uid_of(req)) else WRONG]


def test_adaptive_scripted_scenario_exact_metrics_and_calls():
    # max_n=10, 4 per iteration: sizes 4 | 8 | 10 (4+4+2, never positive) | 10 (positive is the last) | 4
    first_positive = {0: 0, 1: 5, 3: 9, 4: 2}
    gen, reward = ScriptedGenerator(adaptive_script(first_positive)), FakeReward()
    cfg = sampler_cfg("adaptive", adaptive=dict(max_n=10, rollouts_per_batch=4, min_rollouts=2))
    sampler = build_sampler(cfg, n=99, temperature=0.7, train_batch_size=5)
    batch, metrics = sampler.sample(make_prompts(5), SamplerContext(gen, reward))

    assert [[(uid_of(r), r.n) for r in call] for call in gen.calls] == [
        [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)],
        [(1, 4), (2, 4), (3, 4)],
        [(2, 2), (3, 2)],  # the last batch is cut to the remainder: never more than max_n
    ]
    assert all(t == 0.7 for call in gen.temperatures for t in call)
    assert {g: len(rs) for g, rs in groups_of(batch).items()} == {0: 4, 1: 8, 2: 10, 3: 10, 4: 4}
    # Each rollout scored exactly once, only new rollouts per iteration, and the rewards reused.
    assert [len(c) for c in reward.calls] == [20, 12, 4]
    assert sorted(map(id, reward.scored)) == sorted(map(id, batch.rollouts))
    assert sum(r.reward for r in batch.rollouts) == 4.0
    assert metrics == {
        "sampler/num_rollouts": 36.0,
        "sampler/num_groups": 5.0,
        "adaptive_rollout/iterations": 3.0,
        "adaptive_rollout/total_rollouts": 36.0,
        "adaptive_rollout/avg_rollouts_per_sample": 36 / 5,
        "adaptive_rollout/min_rollouts_per_sample": 4.0,
        "adaptive_rollout/max_rollouts_per_sample": 10.0,
        "adaptive_rollout/samples_with_positive": 4.0,
        "adaptive_rollout/samples_without_positive": 1.0,
        "adaptive_rollout/positive_rate": 0.8,
        "adaptive_rollout/efficiency": 5 / 36,
    }
    # The trainer recomputes the metrics over every rank's rollouts: one rank gives the same values,
    # and a second rank's batch (here: the same groups under other ids) doubles the counts.
    assert sampler.global_metrics(batch.rollouts, metrics) == metrics
    other = [dataclasses.replace(r, group_id=("other", r.group_id)) for r in batch.rollouts]
    both = sampler.global_metrics(batch.rollouts + other, metrics)
    assert both["adaptive_rollout/total_rollouts"] == 72 and both["adaptive_rollout/samples_with_positive"] == 8
    assert both["adaptive_rollout/positive_rate"] == 0.8 and both["adaptive_rollout/iterations"] == 3
    assert both["sampler/num_groups"] == 10


def test_adaptive_respects_min_rollouts_and_max_n():
    # One rollout per iteration: a positive first rollout still waits for min_rollouts=3.
    gen = ScriptedGenerator(adaptive_script({0: 0, 1: 4}))
    cfg = sampler_cfg("adaptive", adaptive=dict(max_n=7, rollouts_per_batch=1, min_rollouts=3))
    batch, metrics = build_sampler(cfg, n=1, temperature=1.0, train_batch_size=3).sample(
        make_prompts(3), SamplerContext(gen, FakeReward()))
    assert {g: len(rs) for g, rs in groups_of(batch).items()} == {0: 3, 1: 5, 2: 7}
    assert metrics["adaptive_rollout/iterations"] == 7


def test_adaptive_many_prompts_batches_every_active_prompt_into_one_call():
    rng = random.Random(0)
    max_n, per_batch = 16, 4
    first_positive = {i: rng.choice([None, *range(20)]) for i in range(64)}
    gen, reward = ScriptedGenerator(adaptive_script(first_positive)), FakeReward()
    cfg = sampler_cfg("adaptive", adaptive=dict(max_n=max_n, rollouts_per_batch=per_batch, min_rollouts=2))
    batch, _ = build_sampler(cfg, n=8, temperature=1.0, train_batch_size=64).sample(
        make_prompts(64), SamplerContext(gen, reward))

    def expected_size(fp):
        return max_n if fp is None or fp >= max_n else per_batch * math.ceil((fp + 1) / per_batch)

    sizes = {i: expected_size(fp) for i, fp in first_positive.items()}
    assert {g: len(rs) for g, rs in groups_of(batch).items()} == sizes
    assert len(gen.calls) <= math.ceil(max_n / per_batch)
    for j, call in enumerate(gen.calls):  # call j holds exactly the prompts still active
        assert [uid_of(r) for r in call] == [i for i in range(64) if sizes[i] > per_batch * j]
    assert len(reward.scored) == len(batch) and len(reward.calls) == len(gen.calls)


def test_adaptive_two_ranks_run_the_same_number_of_rounds():
    reducer = ThreadedAllReduce(2)
    gens = [ScriptedGenerator(adaptive_script({0: 0, 1: 0})), ScriptedGenerator(adaptive_script({2: 0}))]
    cfg = sampler_cfg("adaptive", adaptive=dict(max_n=12, rollouts_per_batch=4))
    prompts = [make_prompts(2, start=0), make_prompts(2, start=2)]  # rank 1's uid 3 never succeeds

    def rank(r):
        ctx = SamplerContext(gens[r], FakeReward(), all_reduce_sum=reducer.for_rank(r))
        return build_sampler(cfg, n=4, temperature=1.0, train_batch_size=2).sample(prompts[r], ctx)

    (b0, m0), (b1, m1) = run_ranks(reducer, [lambda: rank(0), lambda: rank(1)])
    assert m0["adaptive_rollout/iterations"] == m1["adaptive_rollout/iterations"] == 3
    assert [len(c) for c in gens[0].calls] == [2, 0, 0]  # done rank joins the rounds with empty calls
    assert [len(c) for c in gens[1].calls] == [2, 1, 1]
    assert (len(b0), len(b1)) == (8, 16)


# ------------------------------------------------------------------------------------------ filtered


def filtered_script(good_uids):
    """Prompts in good_uids get mixed rollouts (kept); others alternate all-correct / all-wrong (dropped)."""
    def script(req, k):
        uid = uid_of(req)
        if good_uids(uid):
            return [FILLER, CORRECT if k % 2 else WRONG]
        return [FILLER, CORRECT if uid % 2 else WRONG]
    return script


def prompt_stream(start: int):
    state = {"next": start, "calls": []}

    def next_prompts(k):
        state["calls"].append(k)
        out = make_prompts(k, start=state["next"])
        state["next"] += k
        return out

    return next_prompts, state


def build_filtered(train=2, gen=4, n=4, **filtered):
    return build_sampler(sampler_cfg("filtered", filtered=filtered), n=n, temperature=1.0,
                         train_batch_size=train, gen_batch_size=gen)


def test_filtered_keeps_varied_groups_and_trims_to_train_batch_size():
    sampler = build_filtered(train=2, gen=4)
    assert sampler.num_prompts == 4
    gen = ScriptedGenerator(filtered_script(lambda uid: uid % 3 == 1))  # good: 1 | 4, 7 | ...
    next_prompts, stream = prompt_stream(start=4)
    batch, metrics = sampler.sample(make_prompts(4), SamplerContext(gen, FakeReward(), next_prompts=next_prompts))
    assert list(groups_of(batch)) == [1, 4]  # 7 also passed; trimmed to exactly train_batch_size
    assert all(len(rs) == 4 and has_variance(rs, "acc") for rs in groups_of(batch).values())
    assert stream["calls"] == [4] and len(gen.calls) == 2
    assert metrics == {"sampler/num_rollouts": 8.0, "sampler/num_groups": 2.0, "train/num_gen_batches": 2.0,
                       "train/num_kept_groups": 3.0, "train/num_dropped_groups": 5.0}
    batch.to_tensors()


def test_filtered_variance_rule_and_metric_mapping():
    def rollout(score, acc):
        return Rollout([1], [2], [-0.1], group_id=0, reward=score, extras={"acc": acc})

    assert not has_variance([rollout(1.0, 1.0)], "score")  # a group of one is dropped
    assert not has_variance([rollout(0.1 * 3, 1.0)] * 3, "score")
    same_acc = [rollout(0.2, 1.0), rollout(0.9, 1.0)]
    assert not has_variance(same_acc, "acc")
    assert all(has_variance(same_acc, m) for m in ("score", "seq_reward", "seq_final_reward"))
    with pytest.raises(ValueError, match="'acc' extra"):
        has_variance([Rollout([1], [2], [-0.1], group_id=0)], "acc")
    with pytest.raises(ValueError, match="n >= 2"):
        build_filtered(n=1)


def test_filtered_seq_final_reward_reads_the_kl_penalized_reward():
    # Every rollout scores the same, so seq_reward drops every group; the KL penalty (the context's
    # final_rewards, here: score - 0.1 * token count) differs between a group's 1- and 2-token rollouts.
    def script(req, k):
        return [WRONG] * (1 + k % 2)

    calls = []

    def final_rewards(rollouts):
        calls.append(len(rollouts))
        return [r.reward - 0.1 * len(r.response_ids) for r in rollouts]

    sampler = build_filtered(train=2, gen=2, n=2, metric="seq_final_reward")
    ctx = SamplerContext(ScriptedGenerator(script), FakeReward(), final_rewards=final_rewards)
    batch, metrics = sampler.sample(make_prompts(2), ctx)
    assert metrics["train/num_kept_groups"] == 2 and calls == [4]
    assert [r.extras["seq_final_reward"] for r in batch.rollouts] == pytest.approx([-0.1, -0.2, -0.1, -0.2])
    # Without KL in the reward (no final_rewards) the final reward is the reward: nothing varies.
    with pytest.raises(RuntimeError, match="max_num_gen_batches=1"):
        build_filtered(train=2, gen=2, n=2, metric="seq_final_reward", max_num_gen_batches=1).sample(
            make_prompts(2), SamplerContext(ScriptedGenerator(script), FakeReward()))


def test_filtered_raises_the_documented_error_at_the_cap():
    gen = ScriptedGenerator(filtered_script(lambda uid: False))
    next_prompts, _ = prompt_stream(start=4)
    sampler = build_filtered(max_num_gen_batches=3)
    expected = ("num_gen_batches=3 >= max_num_gen_batches=3. Generated too many batches. "
                "Please check if your data are too difficult.")
    with pytest.raises(RuntimeError) as err:
        sampler.sample(make_prompts(4), SamplerContext(gen, FakeReward(), next_prompts=next_prompts))
    assert str(err.value) == expected and len(gen.calls) == 3


@pytest.mark.parametrize("cap, ok", [(0, True), (15, True), (10, False)])
def test_filtered_unlimited_cap_keeps_going_while_data_allow(cap, ok):
    # Only prompts of the 15th generation batch (uids 56..59) have mixed rollouts.
    gen = ScriptedGenerator(filtered_script(lambda uid: uid >= 56))
    next_prompts, _ = prompt_stream(start=4)
    sampler = build_filtered(train=2, gen=4, max_num_gen_batches=cap)
    ctx = SamplerContext(gen, FakeReward(), next_prompts=next_prompts)
    if not ok:
        with pytest.raises(RuntimeError, match="num_gen_batches=10 >= max_num_gen_batches=10"):
            sampler.sample(make_prompts(4), ctx)
        return
    batch, metrics = sampler.sample(make_prompts(4), ctx)
    assert metrics["train/num_gen_batches"] == 15 and list(groups_of(batch)) == [56, 57]


def test_filtered_a_prompt_drawn_twice_in_a_step_makes_two_groups():
    # The stream hands the same prompts again (an epoch end between two generation batches). Prompt 0
    # varies in both draws, prompt 1 only in the second: the kept groups are prompt 0's two draws.
    def script(req, k):
        return [CORRECT] if (uid_of(req), k) in {(0, 1), (0, 2), (1, 2)} else [WRONG]

    sampler = build_sampler(sampler_cfg("filtered"), n=2, temperature=1.0, train_batch_size=2, gen_batch_size=2)
    ctx = SamplerContext(ScriptedGenerator(script), FakeReward(), next_prompts=lambda k: make_prompts(k))
    batch, metrics = sampler.sample(make_prompts(2), ctx)
    groups = groups_of(batch)
    assert metrics["train/num_gen_batches"] == 2
    assert set(groups) == {0, (0, 2)} and all(len(g) == 2 for g in groups.values())  # not one group of 4


def test_filtered_two_ranks_agree_through_all_reduce():
    # Rank 0 fills its share at once; rank 1 only in its 3rd batch. Both run 3 rounds, each
    # returns exactly its share, and the global counts agree.
    reducer = ThreadedAllReduce(2)
    goods = [lambda uid: True, lambda uid: uid >= 208]
    starts = [0, 200]

    def rank(r):
        next_prompts, _ = prompt_stream(start=starts[r] + 4)
        ctx = SamplerContext(ScriptedGenerator(filtered_script(goods[r])), FakeReward(),
                             all_reduce_sum=reducer.for_rank(r), next_prompts=next_prompts)
        return build_filtered(train=2, gen=4).sample(make_prompts(4, start=starts[r]), ctx)

    (b0, m0), (b1, m1) = run_ranks(reducer, [lambda: rank(0), lambda: rank(1)])
    assert list(groups_of(b0)) == [0, 1] and list(groups_of(b1)) == [208, 209]
    assert m0 == m1 == {"sampler/num_rollouts": 8.0, "sampler/num_groups": 2.0, "train/num_gen_batches": 3.0,
                        "train/num_kept_groups": 16.0, "train/num_dropped_groups": 8.0}


# ------------------------------------------------------------------------------------------ token_adaptive

F = FILLER
INITIAL_0 = [F, LOW_PROB, F, F, F, F, F, HIGH_ENTROPY, F, F, WRONG]  # failure at 7 (LOW at 1 < min prefix)
INITIAL_1 = [F] * 10 + [WRONG]  # confident: complete
ROUND_1 = [LOW_PROB, F, F, LOW_PROB, F, F]  # from prefix 7: first token exempt, failure at 7 + 3 = 10
ROUND_2 = [HIGH_ENTROPY, F, CORRECT]  # from prefix 10: first token exempt, complete and correct


def token_script(req, k):
    prefix_len = len(req.prompt_ids) - 1
    return {0: [INITIAL_0, INITIAL_1][k % 2], 7: ROUND_1, 10: ROUND_2}[prefix_len]


def run_token_adaptive(n=2, prompts=1, max_tokens=None, script=token_script, **section):
    section = {"min_prefix_length": 5, "adaptive_temperature_scale": 1.5, "target_rollouts": n, **section}
    sampler = build_sampler(sampler_cfg("token_adaptive", token_adaptive=section), n=n, temperature=1.0,
                            train_batch_size=prompts, max_tokens=max_tokens)
    gen, reward, stats = ScriptedGenerator(script), FakeReward(), FakeTokenStats()
    batch, metrics = sampler.sample(make_prompts(prompts), SamplerContext(gen, reward, token_stats=stats))
    return batch, metrics, gen, reward, stats


def same_prefix_script(req, k):
    """Round 0 as token_script; every retry starts at prefix 7: attempt 0 fails again, attempt 1 completes."""
    prefix_len = len(req.prompt_ids) - 1
    if prefix_len == 0:
        return [INITIAL_0, INITIAL_1][k % 2]
    assert prefix_len == 7, "failure_prefix retries always restart from the first failure point"
    return ROUND_1 if k == 0 else ROUND_2


def test_token_adaptive_failure_prefix_retries_the_same_prefix():
    batch, metrics, gen, reward, _ = run_token_adaptive(max_tokens=32, script=same_prefix_script,
                                                        resample_from="failure_prefix")
    assert gen.temperatures == [[1.0], [1.5], [2.25]]
    assert [r.prompt_ids for call in gen.calls[1:] for r in call] == [[1000, *INITIAL_0[:7]]] * 2
    assert [r.max_tokens for call in gen.calls[1:] for r in call] == [32 - 7, 32 - 7]
    piece1, complete, attempt1, end = batch.rollouts
    assert piece1.response_ids == INITIAL_0[:7] and piece1.finish_reason == "truncated"
    # The failed attempt is kept (its new tokens trained), the successful one ends the family.
    assert attempt1.response_ids == INITIAL_0[:7] + ROUND_1[:3] and attempt1.response_mask == [0] * 7 + [1] * 3
    assert end.response_ids == INITIAL_0[:7] + ROUND_2 and end.response_mask == [0] * 7 + [1] * 3
    assert [[id(r) for r in c] for c in reward.calls] == [[id(complete), id(end)]]
    assert [r.reward for r in batch.rollouts] == [1.0, 0.0, 1.0, 1.0]
    assert metrics["adaptive/truncation_rate"] == 0.5 and metrics["adaptive/resample_rate"] == 0.5


def test_token_adaptive_failure_prefix_budget_counts_attempts_at_one_prefix():
    def always_fails(req, k):
        return [INITIAL_0, INITIAL_1][k % 2] if len(req.prompt_ids) == 1 else ROUND_1

    batch, metrics, gen, reward, _ = run_token_adaptive(script=always_fails, resample_from="failure_prefix",
                                                        max_resamples_per_prefix=3)
    assert [len(c) for c in gen.calls] == [1, 1, 1, 1]  # R = 3 attempts, all from prefix 7
    assert all(r.prompt_ids == [1000, *INITIAL_0[:7]] for call in gen.calls[1:] for r in call)
    pieces = [r for r in batch.rollouts if r.finish_reason == "truncated"]
    assert len(pieces) == 4 and metrics["adaptive/resample_rate"] == 3 / 5
    # Never completed: the family is scored once, on its longest piece, and every piece shares that score.
    assert [len(r.response_ids) for r in reward.calls[0]] == [11, 10]


def test_token_adaptive_truncates_resamples_and_masks():
    batch, metrics, gen, reward, stats = run_token_adaptive(max_tokens=32)
    assert gen.temperatures == [[1.0], [1.5], [2.25]]  # t0 * scale**retry
    assert [r.max_tokens for call in gen.calls[1:] for r in call] == [32 - 7, 32 - 10]
    assert [len(c) for c in stats.calls] == [2, 1, 1]
    piece1, complete, piece2, end = batch.rollouts
    assert piece1.response_ids == INITIAL_0[:7] and piece1.finish_reason == "truncated"
    assert piece2.response_ids == INITIAL_0[:7] + ROUND_1[:3] and piece2.response_mask == [0] * 7 + [1] * 3
    assert end.response_ids == piece2.response_ids + ROUND_2 and end.response_mask == [0] * 10 + [1] * 3
    assert complete.response_ids == INITIAL_1 and complete.response_mask is None
    assert all(r.prompt_ids == [1000] and r.group_id == 0 for r in batch.rollouts)
    # One reward call on complete rollouts only; the chain's pieces inherit its outcome.
    assert [[id(r) for r in c] for c in reward.calls] == [[id(complete), id(end)]]
    assert [r.reward for r in batch.rollouts] == [1.0, 0.0, 1.0, 1.0]
    assert metrics == {"sampler/num_rollouts": 4.0, "sampler/num_groups": 1.0, "adaptive/truncation_rate": 0.5,
                       "adaptive/resample_rate": 0.5, "adaptive/avg_failure_point": 8.5,
                       "adaptive/total_rollouts": 4.0}
    assert batch_global_metrics_match(run_token_adaptive)

    t = batch.to_tensors()
    assert t["response_mask"].tolist() == [
        [1.0] * 7 + [0.0] * 6, [1.0] * 11 + [0.0] * 2, [0.0] * 7 + [1.0] * 3 + [0.0] * 3, [0.0] * 10 + [1.0] * 3]
    assert t["token_level_rewards"].nonzero().tolist() == [[0, 6], [2, 9], [3, 12]]
    # The stitched rollout's logprobs are the prefix's plus the continuation's, position by position.
    assert t["rollout_log_probs"][3].tolist() == pytest.approx([position_logprob(1 + q) for q in range(13)])
    assert batch.rollouts[3].prompt_ids + batch.rollouts[3].response_ids == [1000, *end.response_ids]


def batch_global_metrics_match(run) -> bool:
    """token_adaptive's metrics recomputed from the rollouts alone equal the sampler's own."""
    for kwargs in ({"max_tokens": 32}, {"max_resamples_per_prefix": 1}, {"n": 4, "target_rollouts": 3}):
        batch, metrics, *_ = run(**kwargs)
        sampler = build_sampler(sampler_cfg("token_adaptive"), n=1, temperature=1.0, train_batch_size=1)
        if sampler.global_metrics(batch.rollouts, metrics) != metrics:
            return False
    return True


def test_token_adaptive_retry_budget_scores_unfinished_chain_as_is():
    batch, metrics, gen, reward, _ = run_token_adaptive(max_resamples_per_prefix=1)
    assert gen.temperatures == [[1.0], [1.5]]
    piece1, complete, piece2 = batch.rollouts
    assert [id(r) for r in reward.calls[0]] == [id(complete), id(piece2)]  # the longest piece is scored
    assert [r.reward for r in batch.rollouts] == [0.0, 0.0, 0.0]
    assert metrics["adaptive/truncation_rate"] == 2 / 3 and metrics["adaptive/resample_rate"] == 1 / 3


@pytest.mark.parametrize("min_prefix, cut", [(0, 1), (1, 1), (2, 7), (7, 7), (8, None)])
def test_token_adaptive_respects_min_prefix_length(min_prefix, cut):
    batch, metrics, gen, _, _ = run_token_adaptive(min_prefix_length=min_prefix, max_resamples_per_prefix=0)
    assert len(gen.calls) == 1
    first = batch.rollouts[0]
    assert len(first.response_ids) == (cut if cut is not None else len(INITIAL_0))
    assert metrics["adaptive/avg_failure_point"] == (cut or 0)


def test_token_adaptive_never_cuts_at_position_zero():
    sampler = build_sampler(sampler_cfg("token_adaptive", token_adaptive=dict(min_prefix_length=0)),
                            n=1, temperature=1.0, train_batch_size=1)
    gen = ScriptedGenerator(lambda req, k: [LOW_PROB, F, HIGH_ENTROPY, F])
    batch, _ = sampler.sample(make_prompts(1), SamplerContext(gen, FakeReward(), token_stats=FakeTokenStats()))
    assert batch.rollouts[0].response_ids == [LOW_PROB, F]


def test_token_adaptive_stops_resampling_a_prompt_at_the_target():
    # n=4: rollouts 0 and 2 are cut, 1 and 3 complete; target 3 leaves room for ONE chain per round,
    # the oldest (rollout 0's), which needs two rounds to complete; rollout 2's piece is never resampled.
    batch, metrics, gen, reward, _ = run_token_adaptive(n=4, target_rollouts=3)
    assert [len(c) for c in gen.calls] == [1, 1, 1]
    assert gen.calls[1][0].prompt_ids == [1000, *INITIAL_0[:7]]
    assert metrics["adaptive/total_rollouts"] == 6 and metrics["adaptive/resample_rate"] == 2 / 6
    complete = [r for r in batch.rollouts if r.finish_reason != "truncated"]
    assert len(complete) == 3
    unfinished = batch.rollouts[2]  # rollout 2's piece: scored as-is, after the complete ones
    assert unfinished.finish_reason == "truncated" and unfinished.response_mask is None
    assert [id(r) for r in reward.scored] == [*map(id, complete), id(unfinished)]


def test_token_adaptive_two_ranks_run_the_same_rounds():
    reducer = ThreadedAllReduce(2)
    gens = [ScriptedGenerator(lambda req, k: INITIAL_1), ScriptedGenerator(token_script)]
    stats = [FakeTokenStats(), FakeTokenStats()]
    cfg = sampler_cfg("token_adaptive", token_adaptive=dict(min_prefix_length=5, adaptive_temperature_scale=1.5,
                                                            target_rollouts=2))

    def rank(r):
        ctx = SamplerContext(gens[r], FakeReward(), token_stats=stats[r], all_reduce_sum=reducer.for_rank(r))
        return build_sampler(cfg, n=2, temperature=1.0, train_batch_size=1).sample(make_prompts(1), ctx)

    run_ranks(reducer, [lambda: rank(0), lambda: rank(1)])
    assert [len(c) for c in gens[0].calls] == [1, 0, 0] and [len(c) for c in gens[1].calls] == [1, 1, 1]
    assert [len(c) for c in stats[0].calls] == [2, 0, 0]


# ------------------------------------------------------------------------------------------ all samplers


@pytest.mark.parametrize("type_", sorted(SAMPLERS))
def test_every_sampler_feeds_to_tensors(type_):
    def script(req, k):
        if len(req.prompt_ids) > 1:  # a token_adaptive continuation
            return [F, CORRECT]
        return [F] * 3 + [HIGH_ENTROPY if k == 0 else F, F, CORRECT if k % 2 else WRONG]

    cfg = sampler_cfg(type_, adaptive=dict(max_n=4, rollouts_per_batch=2),
                      token_adaptive=dict(min_prefix_length=2, target_rollouts=3))
    sampler = build_sampler(cfg, n=3, temperature=1.0, train_batch_size=2, gen_batch_size=2)
    ctx = SamplerContext(ScriptedGenerator(script), FakeReward(), token_stats=FakeTokenStats(),
                         next_prompts=lambda k: make_prompts(k, start=10))
    batch, metrics = sampler.sample(make_prompts(sampler.num_prompts), ctx)
    t = batch.to_tensors()
    B = len(batch)
    assert B > 0 and t["response_mask"].shape[0] == B and t["rollout_log_probs"].shape[0] == B
    assert t["response_mask"].sum().item() > 0
    assert t["token_level_rewards"].sum(dim=1).tolist() == [r.reward for r in batch.rollouts]
    assert metrics["sampler/num_rollouts"] == B and all(isinstance(v, float) for v in metrics.values())


def test_reward_result_extras_reach_rollouts():
    class Scorer:
        def score(self, rollouts):
            return [RewardResult(0.5, {"acc": 1.0, "format": 0.25}) for _ in rollouts]

    gen = ScriptedGenerator(lambda req, k: [F])
    batch, _ = build_sampler(sampler_cfg("fixed"), n=2, temperature=1.0, train_batch_size=1).sample(
        make_prompts(1), SamplerContext(gen, Scorer()))
    assert [(r.reward, r.extras) for r in batch.rollouts] == [(0.5, {"acc": 1.0, "format": 0.25})] * 2
