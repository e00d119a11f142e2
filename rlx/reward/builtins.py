"""Built-in reward functions (`math` via math-verify, `exact_match`, `quickstart`) and their lookup.

Each follows the reward-function contract of `rlx.reward`: `fn(response, ground_truth, **kwargs)`
returns a float or a dict with `score` and numeric extras; these return `{"score", "acc"}` (1/0).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from rlx.errors import UserError

_WHITESPACE = re.compile(r"\s+")


def _import_math_verify():
    """Import math-verify (sympy: about a second) with its signal-based timeouts' warnings muted:
    the reward pool enforces `reward.timeout_s` around every call instead."""
    import math_verify
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify


def math_reward(response: str, ground_truth, **_: object) -> dict[str, float]:
    """1.0 if the response's final answer equals the ground truth mathematically, else 0.0.

    The answer is extracted by math-verify: the last `\\boxed{...}` when there is one, otherwise
    the last LaTeX or plain expression (a final number). The ground truth may be a number, a plain
    string (`"0.5"`, `"x+1"`) or LaTeX (`"\\frac{1}{2}"`, `"$\\{1,2\\}$"`); so `\\boxed{1/2}`
    matches `0.5`.
    """
    math_verify = _import_math_verify()
    gold_text = str(ground_truth).strip()
    if "\\boxed" not in gold_text and "$" not in gold_text:
        gold_text = "\\boxed{" + gold_text + "}"  # plain "x+1" is only extracted inside a box
    # timeouts None: math-verify's SIGALRM timeouts would clobber the pool's per-rollout timer.
    gold = math_verify.parse(gold_text, parsing_timeout=None)
    answer = math_verify.parse(response, parsing_timeout=None)
    correct = bool(gold) and bool(answer) and math_verify.verify(gold, answer, timeout_seconds=None)
    score = 1.0 if correct else 0.0
    return {"score": score, "acc": score}


# Pool workers call a reward function's `warmup()` once when they start, outside the per-rollout
# timeout, so slow imports are not charged to the first rollouts. User functions may set one too.
math_reward.warmup = _import_math_verify


def normalize_answer(text) -> str:
    """Lowercase, trim, collapse inner whitespace and drop one trailing period: `" 42. "` -> `"42"`."""
    text = _WHITESPACE.sub(" ", str(text).strip().lower())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match_reward(response: str, ground_truth, **_: object) -> dict[str, float]:
    """1.0 if the normalized response equals the normalized ground truth (`normalize_answer`)."""
    score = 1.0 if normalize_answer(response) == normalize_answer(ground_truth) else 0.0
    return {"score": score, "acc": score}


def quickstart_reward(response: str, ground_truth, **_: object) -> dict[str, float]:
    """The CPU quickstart's addition task: `"12+34="` -> `"46"`.

    The response up to its first newline (EOS is already stripped by decoding with
    `skip_special_tokens`) must equal the answer string, surrounding spaces ignored.
    """
    answer = response.split("\n", 1)[0].strip()
    score = 1.0 if answer == str(ground_truth).strip() else 0.0
    return {"score": score, "acc": score}


# Built-in reward functions by name; `reward.fn` is one of these or a 'pkg.module:function' path.
# Values are import paths, so spawn and Ray workers resolve a name the same way the trainer does.
REWARD_FNS: dict[str, str] = {
    "math": "rlx.reward.builtins:math_reward",
    "exact_match": "rlx.reward.builtins:exact_match_reward",
    "quickstart": "rlx.reward.builtins:quickstart_reward",
}


def resolve_reward_fn(spec) -> Callable:
    """The reward function for a built-in name, a 'pkg.module:function' path, or a callable.

    Raises `UserError` naming the path when the module does not import, the attribute is missing
    or it is not callable.
    """
    if callable(spec):
        return spec
    path = REWARD_FNS.get(spec, spec)
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise UserError(
            f"reward.fn={spec!r} is neither a built-in ({', '.join(REWARD_FNS)}) nor an import path "
            "'pkg.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"reward.fn={spec!r}: cannot import module '{module_name}' ({type(e).__name__}: {e}); "
            "is it installed or on PYTHONPATH?"
        ) from None
    except Exception as e:  # the module itself is broken: SyntaxError, an error at import time
        where = f" at {e.filename}:{e.lineno}" if isinstance(e, SyntaxError) else ""
        raise UserError(f"reward.fn={spec!r}: importing module '{module_name}' failed{where} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None  # fmt: skip
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"reward.fn={spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise UserError(f"reward.fn={spec!r}: '{attr}' is a {type(fn).__name__}, not a function")
    return fn
