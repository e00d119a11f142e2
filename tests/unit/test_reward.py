"""Reward stage: built-in functions, the return-value contract, and the process pool's failure
handling (raise, hang, signal-proof hang, crash, garbage -> 0 and counted, pool keeps working)."""

from __future__ import annotations

import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from rlx.errors import UserError
from rlx.reward import RewardFailureError, RewardFailureGuard, build_reward, normalize_reward
from rlx.reward.builtins import exact_match_reward, math_reward, quickstart_reward
from rlx.reward.scorer import _split
from rlx.types import Prompt, Rollout

# A user reward module: the response text selects the behaviour, so one batch mixes cases.
USER_MODULE = textwrap.dedent(
    '''
    import asyncio, math, os, signal, time

    def score(response, ground_truth):
        if response == "raise":
            raise ValueError("boom")
        if response in ("kbint", "cancel", "exit0", "genexit"):  # BaseExceptions: still the function's failure
            raise {"kbint": KeyboardInterrupt, "cancel": asyncio.CancelledError, "exit0": SystemExit,
                   "genexit": GeneratorExit}[response]("from the reward")
        if response == "alloc":
            return float(len(bytearray(200 * 1024 * 1024)) > 0)
        if response == "spin":
            while True:
                pass
        if response == "hang":
            time.sleep(60)
        if response == "stubborn":  # ignores SIGALRM: only killing the worker stops it
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            time.sleep(60)
        if response == "exit":
            os._exit(3)
        garbage = {"none": None, "nan": math.nan, "inf": math.inf, "str": "1.0", "nodict": {"acc": 1.0}}
        if response in garbage:
            return garbage[response]
        return {"score": float(response == ground_truth), "pred": response, "len": len(response)}

    def with_prompt(response, ground_truth, prompt, scale=1.0):
        return scale * float(prompt.startswith("Q:"))

    not_callable = 3
    '''
)
TIMEOUT_S = 1.0


class CharTokenizer:
    """Token id = character code; id 0 is a special token (EOS) dropped by skip_special_tokens."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def rollout(text: str, answer, prompt_text: str = "Q: 1+1=") -> Rollout:
    ids = [ord(c) for c in text] + [0]
    prompt = Prompt(prompt_ids=[1, 2], uid=0, ground_truth=answer, text=prompt_text)
    return Rollout(prompt_ids=[1, 2], response_ids=ids, rollout_logprobs=[0.0] * len(ids), group_id=0, prompt=prompt)


def reward_cfg(fn, backend="process", limits=None, **kw):
    return SimpleNamespace(fn=fn, backend=backend, num_workers=2, timeout_s=TIMEOUT_S, ray_address="", kwargs=kw,
                           **(limits or {}))  # fmt: skip


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("user_rewards")
    (path / "rlx_test_rewards.py").write_text(USER_MODULE)
    sys.path.insert(0, str(path))  # spawn workers copy the trainer's sys.path
    yield "rlx_test_rewards"
    sys.path.remove(str(path))
    sys.modules.pop("rlx_test_rewards", None)


@pytest.fixture(scope="module")
def pool(user_module):
    scorer = build_reward(reward_cfg(f"{user_module}:score"), CharTokenizer())
    yield scorer
    scorer.close()


def scores(results):
    return [r.score for r in results]


# --- built-in functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        (r"so the answer is \boxed{1/2}", "0.5", 1.0),
        ("The answer is 0.5", "1/2", 1.0),
        (r"\boxed{\frac12}", r"\frac{1}{2}", 1.0),
        (r"\boxed{1+x}", "x+1", 1.0),
        (r"first 2, finally \boxed{3}", 3, 1.0),
        (r"\boxed{3}", "4", 0.0),
        ("I do not know", "7", 0.0),
    ],
)
def test_math_reward(response, answer, expected):
    assert math_reward(response, answer) == {"score": expected, "acc": expected}


def test_exact_match_normalizes():
    assert exact_match_reward("  Paris. ", "paris")["score"] == 1.0
    assert exact_match_reward("New   York", "new york")["score"] == 1.0
    assert exact_match_reward("Paris", "London") == {"score": 0.0, "acc": 0.0}


def test_quickstart_reads_up_to_the_first_newline():
    assert quickstart_reward("46\n12+1=13", "46")["score"] == 1.0
    assert quickstart_reward("46", 46)["acc"] == 1.0
    assert quickstart_reward("467", "46")["score"] == 0.0
    assert quickstart_reward("\n46", "46")["score"] == 0.0


# --- return-value contract ---------------------------------------------------------------------


def test_normalize_reward_rules():
    assert normalize_reward(1.0) == ("ok", 1.0, {"acc": 1.0}, "")
    assert normalize_reward(0.5) == ("ok", 0.5, {"acc": 0.0}, "")  # acc = score >= 1.0 by default
    assert normalize_reward(True)[1] == 1.0
    status, score, extras, _ = normalize_reward({"score": 0.2, "acc": 1, "pred": "x", "len": 3, "bad": float("nan")})
    assert (status, score, extras) == ("ok", 0.2, {"acc": 1.0, "len": 3.0})
    for garbage in (None, float("nan"), float("inf"), "1.0", {"acc": 1.0}, {"score": None}, [1.0]):
        assert normalize_reward(garbage)[0] == "invalid", garbage


# --- process pool ------------------------------------------------------------------------------


def test_pool_scores_and_decodes_without_special_tokens(pool):
    results = pool.score([rollout("42", "42"), rollout("41", "42")])
    assert scores(results) == [1.0, 0.0]
    assert results[0].extras == {"acc": 1.0, "len": 2.0}  # "pred" (a string) dropped, EOS skipped
    assert pool.metrics()["reward/failures"] == 0.0


def test_raise_and_garbage_score_zero_and_are_counted(pool, caplog):
    texts = ["42", "raise", "none", "nan", "inf", "str", "nodict", "7"]
    with caplog.at_level("WARNING", logger="rlx.reward.scorer"):
        results = pool.score([rollout(t, "42") for t in texts])
    assert scores(results) == [1.0, 0, 0, 0, 0, 0, 0, 0]
    assert all(r.extras["acc"] == 0.0 for r in results[1:])
    m = pool.metrics()
    assert m == {
        "reward/failures": 6.0,
        "reward/errors": 1.0,
        "reward/timeouts": 0.0,
        "reward/invalid": 5.0,
        "reward/num_scored": 8.0,
    }
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "rlx_test_rewards:score" in warnings[0] and "ValueError: boom" in warnings[0]
    assert pool.metrics()["reward/failures"] == 0.0  # metrics() resets


def test_hang_times_out_within_the_limit(pool):
    start = time.monotonic()
    results = pool.score([rollout("hang", "42")] + [rollout("42", "42")] * 5)
    elapsed = time.monotonic() - start
    assert scores(results) == [0.0] + [1.0] * 5
    assert pool.metrics()["reward/timeouts"] == 1.0
    assert elapsed < TIMEOUT_S + 2.0, elapsed
    assert scores(pool.score([rollout("42", "42")])) == [1.0]


def test_signal_proof_hang_kills_the_worker_and_rebuilds_the_pool(pool):
    start = time.monotonic()
    results = pool.score([rollout("stubborn", "42")] + [rollout("42", "42")] * 5)
    elapsed = time.monotonic() - start
    assert scores(results) == [0.0] + [1.0] * 5  # the hung worker's other rollouts are re-run
    m = pool.metrics()
    assert (m["reward/timeouts"], m["reward/failures"]) == (1.0, 1.0)
    assert elapsed < TIMEOUT_S + 2.0 + 8.0, elapsed  # limit + kill grace + respawn on 2 busy cores
    assert scores(pool.score([rollout("42", "42"), rollout("1", "42")])) == [1.0, 0.0]


def test_crashing_worker_is_an_error_and_pool_recovers(pool):
    results = pool.score([rollout("42", "42"), rollout("exit", "42"), rollout("42", "42"), rollout("42", "42")])
    assert scores(results) == [1.0, 0.0, 1.0, 1.0]
    m = pool.metrics()
    assert (m["reward/errors"], m["reward/failures"]) == (1.0, 1.0)
    assert scores(pool.score([rollout("42", "42")])) == [1.0]


def test_work_is_batched_one_task_per_chunk(pool, monkeypatch):
    submitted = []
    real_submit = pool._pool.submit
    monkeypatch.setattr(pool._pool, "submit", lambda fn, *a: submitted.append(len(a[0])) or real_submit(fn, *a))
    assert sum(scores(pool.score([rollout("42", "42")] * 101))) == 101
    assert submitted == [51, 50]
    assert _split(list(range(5)), 8) == [[0], [1], [2], [3], [4]]


# --- building ----------------------------------------------------------------------------------


def test_bad_import_paths_are_user_errors(user_module):
    for spec, needle in [
        ("no_such_rlx_module:score", "no_such_rlx_module"),
        (f"{user_module}:missing", "missing"),
        (f"{user_module}:not_callable", "not_callable"),
        ("not a path", "not a path"),
    ]:
        with pytest.raises(UserError, match=needle):
            build_reward(reward_cfg(spec, backend="inline"), CharTokenizer())
    with pytest.raises(UserError, match="backend"):
        build_reward(reward_cfg("math", backend="gpu"), CharTokenizer())


def test_inline_backend_passes_prompt_and_kwargs(user_module):
    scorer = build_reward(reward_cfg(f"{user_module}:with_prompt", backend="inline", scale=0.5), CharTokenizer())
    results = scorer.score([rollout("x", None), rollout("x", None, prompt_text="no")])
    assert scores(results) == [0.5, 0.0]
    assert scorer.score([]) == []


def test_inline_hang_is_cut_by_the_alarm(user_module):
    scorer = build_reward(reward_cfg(f"{user_module}:score", backend="inline"), CharTokenizer())
    start = time.monotonic()
    assert scores(scorer.score([rollout("hang", "42"), rollout("42", "42")])) == [0.0, 1.0]
    assert time.monotonic() - start < TIMEOUT_S + 1.0
    assert scorer.metrics()["reward/timeouts"] == 1.0


def test_math_through_the_process_pool():
    with build_reward(reward_cfg("math"), CharTokenizer()) as scorer:
        results = scorer.score([rollout(r"\boxed{1/2}", "0.5"), rollout("It is 46", "46"), rollout("none", "7")])
    assert scores(results) == [1.0, 1.0, 0.0]


# --- the scorer never raises; the failure guard stops a run that keeps failing -----------------


@pytest.mark.parametrize("backend", ["inline", "process"])
def test_base_exceptions_from_the_function_are_counted_failures(user_module, pool, backend):
    scorer = pool if backend == "process" else build_reward(reward_cfg(f"{user_module}:score", backend="inline"),
                                                             CharTokenizer())  # fmt: skip
    texts = ["kbint", "cancel", "exit0", "genexit", "42"]
    assert scores(scorer.score([rollout(t, "42") for t in texts])) == [0, 0, 0, 0, 1.0]
    m = scorer.metrics()
    assert (m["reward/errors"], m["reward/failures"]) == (4.0, 4.0)
    assert scores(scorer.score([rollout("42", "42")])) == [1.0]  # the pool is intact


def test_failure_guard_counts_consecutive_steps_and_names_the_first_error():
    guard = RewardFailureGuard("pkg.mod:fn", max_failure_fraction=0.5, max_failed_steps=3)
    guard.observe(3, 4, "ValueError: first")
    assert guard.end_step(3, 4) == {"reward/failure_fraction": 0.75, "reward/failed_steps": 1.0}
    guard.observe(1, 4, "KeyError: x")  # a good call and a good step end the streak
    assert guard.end_step(2, 4)["reward/failed_steps"] == 0.0  # exactly 0.5 is not "more than"
    for i in range(2):
        guard.observe(4, 4, f"ZeroDivisionError: step {i}\nsecond line")
        guard.observe(0, 4, None)
        guard.end_step(5, 8 if i else 6)
    guard.observe(4, 4, "later")
    with pytest.raises(RewardFailureError) as e:
        guard.end_step(4, 4)
    message = str(e.value)
    assert "'pkg.mod:fn'" in message and "3 steps in a row" in message and "\n" not in message
    assert "first error: ZeroDivisionError: step 0 second line" in message


def test_failure_guard_stops_a_step_that_never_ends():
    guard = RewardFailureGuard("f", max_failure_fraction=0.5, max_failed_steps=3)
    guard.observe(8, 8, "E: 1")
    guard.observe(8, 8, "E: 2")
    with pytest.raises(RewardFailureError, match=r"3 reward calls in a row .*first error: E: 1"):
        guard.observe(8, 8, "E: 3")  # e.g. the filtered sampler with max_num_gen_batches = 0


def test_scorer_with_an_always_failing_function_stops_the_run(user_module):
    cfg = reward_cfg(f"{user_module}:score", backend="inline", limits={"max_failure_fraction": 0.5, "max_failed_steps": 2})
    scorer = build_reward(cfg, CharTokenizer())
    scorer.score([rollout("raise", "42")] * 3)
    m = scorer.metrics()
    assert scorer.end_step(m["reward/failures"], m["reward/num_scored"])["reward/failed_steps"] == 1.0
    with pytest.raises(RewardFailureError, match=r"rlx_test_rewards:score.*first error: ValueError: boom"):
        scorer.score([rollout("raise", "42")] * 3)


def test_worker_memory_limit_fails_the_rollout_not_the_pool(user_module):
    cfg = reward_cfg(f"{user_module}:score", limits={"worker_memory_mb": 128})
    cfg.timeout_s = 20.0
    with build_reward(cfg, CharTokenizer()) as scorer:
        results = scorer.score([rollout("alloc", "42"), rollout("42", "42")])
        assert scores(results) == [0.0, 1.0]
        assert scorer.metrics()["reward/errors"] == 1.0
    cfg.worker_memory_mb = 0
    with build_reward(cfg, CharTokenizer()) as unlimited:
        assert scores(unlimited.score([rollout("alloc", "42")])) == [1.0]


def test_worker_cpu_limit_is_per_reward_call(user_module, caplog):
    cfg = reward_cfg(f"{user_module}:score", limits={"worker_cpu_seconds": 1})
    cfg.timeout_s = 30.0  # the CPU limit, not the wall-clock timeout, must stop the spin
    with build_reward(cfg, CharTokenizer()) as scorer, caplog.at_level("WARNING", logger="rlx.reward.scorer"):
        start = time.monotonic()
        assert scores(scorer.score([rollout("spin", "42"), rollout("42", "42")])) == [0.0, 1.0]
        assert time.monotonic() - start < 10.0
        assert scorer.metrics()["reward/timeouts"] == 1.0
        assert "reward.worker_cpu_seconds=1" in caplog.records[-1].getMessage()
        for _ in range(3):  # a lifetime limit would have run out by now; a per-call one does not
            assert scores(scorer.score([rollout("42", "42")] * 4)) == [1.0] * 4
