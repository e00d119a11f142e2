"""Generator-side checks that need no engine: which prompts are dropped before vLLM."""

from rlx.generator.base import split_by_prompt_length
from rlx.types import GenerationRequest


def test_over_long_and_empty_prompts_are_dropped():
    reqs = [GenerationRequest([1] * 4), GenerationRequest([]), GenerationRequest([1] * 5), GenerationRequest([1] * 6)]
    assert split_by_prompt_length(reqs, max_prompt_length=5) == ([0, 2], [1, 3])


def test_continuations_may_exceed_the_prompt_limit_within_the_context():
    # prompt + kept prefix of a truncated rollout, with what remains of max_tokens
    fits = GenerationRequest([1] * 9, max_tokens=3)
    too_long = GenerationRequest([1] * 9, max_tokens=4)
    assert split_by_prompt_length([fits, too_long], max_prompt_length=5, max_model_len=12) == ([0], [1])
