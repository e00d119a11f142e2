"""Tokenizer of an HF model directory, and prompt -> token ids through its chat template.

transformers is imported lazily: only code that tokenizes pays for it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rlx.errors import UserError

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The HF tokenizer of a model directory (transformers `AutoTokenizer`, fast tokenizer from
    tokenizer.json). A directory without tokenizer files raises a `UserError`."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise UserError("loading a tokenizer needs transformers: pip install 'rlx[hf]'") from e
    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
        os.path.join(path, "tokenizer_config.json")
    ):
        raise UserError(f"{path} has no tokenizer.json / tokenizer_config.json")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a damaged tokenizer.json / tokenizer_config.json
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the tokenizer in {path} does not load ({type(e).__name__}: {reason[:300]})") from None


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, *, tokenizer_dir: str | os.PathLike = "",
                         model_dir: str | os.PathLike = "", model_tokenizer: Any = None) -> None:  # fmt: skip
    """Refuse a tokenizer whose token ids do not fit the model's embedding (`vocab_size` rows):
    prompts would index past it and decoded responses (rewards) would be garbage. The model's
    vocabulary may be larger than the tokenizer's (padded for speed); never smaller.

    `model_tokenizer` (the model directory's own tokenizer, when `tokenizer_dir` is another one)
    is compared too: a different vocabulary that fits is allowed, with a warning, since a
    tokenizer with added special tokens is a legitimate choice."""
    size = len(tokenizer)
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "eos", "bos")}
    too_big = {name: i for name, i in specials.items() if isinstance(i, int) and i >= vocab_size}
    where = f"the tokenizer of {tokenizer_dir}" if tokenizer_dir else "the tokenizer"
    model = f"the model {model_dir}" if model_dir else "the model"
    if size > vocab_size or too_big:
        detail = f"has {size} tokens" if size > vocab_size else f"has {', '.join(f'{k}_token_id={v}' for k, v in too_big.items())}"
        raise UserError(f"{where} {detail} but {model} has vocab_size={vocab_size}: token ids >= {vocab_size} "
                        "do not fit its embedding; use the model's own tokenizer (unset model.tokenizer_path)")  # fmt: skip
    if model_tokenizer is not None and model_tokenizer is not tokenizer:
        ours, theirs = tokenizer.get_vocab(), model_tokenizer.get_vocab()
        differ = sum(theirs.get(token) != i for token, i in ours.items())
        if differ:
            logger.warning(
                "%s maps %d of its %d tokens to other ids than %s's own tokenizer: prompts and rewards are only "
                "right if the model was trained with this tokenizer", where, differ, size, model,
            )


def apply_chat_template(tokenizer: Any, prompt: str | Messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a prompt, ready for generation.

    - With a chat template: a str becomes one user message; the messages are rendered to text by
      the template (which places bos and role markers itself) and encoded without adding special
      tokens again, so bos is never doubled.
    - Without a chat template (base models): the text is encoded as is, with bos prepended when the
      tokenizer defines one. A message list must then be a single message (its content is the text);
      several messages have no defined rendering and raise a `UserError`.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return list(tokenizer.encode(text, add_special_tokens=False))
    if len(messages) != 1:
        raise UserError(
            f"the tokenizer has no chat template, so a conversation of {len(messages)} messages cannot be "
            "rendered; give a plain prompt string or use a model whose tokenizer_config.json has a chat_template"
        )
    ids = list(tokenizer.encode(messages[0]["content"], add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos, *ids] if bos is not None else ids
