"""Tokenizer of an HF model directory, and prompt -> token ids through its chat template.

transformers is imported lazily: only code that tokenizes pays for it.
"""

from __future__ import annotations

import os
from typing import Any

from rlx.errors import UserError

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
    return AutoTokenizer.from_pretrained(str(path))


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
