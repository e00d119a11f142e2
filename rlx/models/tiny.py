"""`rlx make-tiny`: a tiny random-weight HF model directory with its own small tokenizer.

Used by tests, benchmarks and the CPU quickstart; the output loads in rlx, transformers and vLLM.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import torch

from rlx.errors import UserError
from rlx.models.args import ModelArgs
from rlx.models.hf_io import save_pretrained
from rlx.models.transformer import build_model

ARCH_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
ROLES = ("system", "user", "assistant")
# Specials get ids 0..6 in this order. Role markers are single tokens, so the chat template
# works for the char-level tokenizer too (its alphabet has no '<' '|' sequences to spell them).
SPECIALS = [PAD, BOS, EOS, UNK, *(f"<|{r}|>" for r in ROLES)]
DEFAULT_ALPHABET = string.digits + string.ascii_letters + " \n+-*/=().,:;?!'\"%#_"
# vLLM's CPU attention supports these head sizes only.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Chat format: <|bos|><|user|>text<|eos|><|assistant|>reply<|eos|>. The reply ends with eos, which
# is also the generation stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

BUILTIN_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model learns to answer questions step by step.
What is the sum of 12 and 34? The answer is 46. Compute 7 + 8 = 15 and 100 - 1 = 99.
Reinforcement learning rewards the policy when the final answer is correct.
She said that the numbers 0 1 2 3 4 5 6 7 8 9 are digits, and 10, 20, 30 are tens.
Question: how many apples are left if you have 5 and eat 2? Answer: 3.
The training loop samples prompts, generates completions, scores them and updates the weights.
In the morning the sun rises in the east; in the evening it sets in the west.
Let x = 3 and y = 4, then x * y = 12 and x + y = 7. The square of 9 is 81.
"""


def make_tiny(
    out_dir: str | Path,
    arch: str = "qwen3",
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 256,
    vocab_size: int | None = None,
    tie: bool = True,
    seed: int = 0,
    max_position: int = 2048,
    char_level: bool = False,
    alphabet: str = DEFAULT_ALPHABET,
    vocab_text: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json to out_dir; return it. vocab_size None means 512 for BPE and the
    tokenizer size rounded up to 64 for char_level. Llama gets Llama-3.1-style rope scaling."""
    if arch not in ARCH_NAMES:
        raise UserError(f"unknown --arch '{arch}'; valid: {', '.join(ARCH_NAMES)}")
    tokenizer = _char_tokenizer(alphabet) if char_level else _bpe_tokenizer(vocab_size or 512, vocab_text)
    n_tok = tokenizer.get_vocab_size()
    vocab_size = vocab_size or (-(-n_tok // 64) * 64 if char_level else 512)
    if vocab_size < n_tok:
        raise UserError(f"--vocab-size {vocab_size} is smaller than the tokenizer ({n_tok} tokens)")
    head_dim = head_dim or hidden_size // num_heads
    if arch == "qwen2" and head_dim * num_heads != hidden_size:
        raise UserError(f"qwen2 needs head_dim * heads == hidden_size; got {head_dim} * {num_heads} != {hidden_size}")
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        print(f"rlx make-tiny: warning: head_dim={head_dim} is not one vLLM's CPU backend supports "
              f"({', '.join(map(str, VLLM_CPU_HEAD_DIMS))})", file=sys.stderr)
    ids = {t: tokenizer.token_to_id(t) for t in (PAD, BOS, EOS)}
    args = ModelArgs(
        arch=ARCH_NAMES[arch], vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=max_position,
        tie_word_embeddings=tie, attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        rope_theta=500000.0 if arch == "llama" else 10000.0,
        rope_scaling=_llama3_scaling(max_position) if arch == "llama" else None,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
    )
    model = build_model(args)
    model.init_weights(seed=seed)
    out = save_pretrained(model, out_dir, dtype=dtype)
    _save_tokenizer(tokenizer, out, max_position)
    return out


def _llama3_scaling(max_position: int) -> dict:
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(1, max_position // 4)}


def _bpe_tokenizer(vocab_size: int, vocab_text: str | Path | None):
    """Byte-level BPE (every string encodes, no unknowns) trained on vocab_text or BUILTIN_CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIALS):
        raise UserError(f"a byte-level BPE needs --vocab-size >= {256 + len(SPECIALS)}; use --char-level for less")
    if vocab_text is not None:
        if not Path(vocab_text).is_file():
            raise UserError(f"--vocab-text {vocab_text}: no such file")
        text = Path(vocab_text).read_text()
    else:
        text = BUILTIN_CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tok


def _char_tokenizer(alphabet: str):
    """One token per character of `alphabet` (others map to <|unk|>); decode concatenates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = list(dict.fromkeys(alphabet))  # dedupe, keep order
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


def _save_tokenizer(tok, out: Path, max_position: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": SPECIALS[4:],
        "model_max_length": max_position,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlx make-tiny",
        description="Write a tiny random-weight HF model directory (config.json, model.safetensors, "
        "tokenizer.json, tokenizer_config.json with a chat template, special_tokens_map.json). "
        f"Special tokens: {', '.join(SPECIALS)} (ids 0..{len(SPECIALS) - 1}). "
        "It loads in rlx, HF transformers and vLLM.",
    )
    p.add_argument("--arch", required=True, choices=sorted(ARCH_NAMES), help="model family")
    p.add_argument("--out", required=True, help="output directory (created; weight files replaced)")
    p.add_argument("--vocab-text", help="text file to train the byte-level BPE on (default: a built-in corpus)")
    p.add_argument("--char-level", action="store_true", help="one token per character of --alphabet instead of BPE")
    p.add_argument("--alphabet", default=DEFAULT_ALPHABET,
                   help="characters of the char-level tokenizer (default: digits, letters, space, newline, +-*/=().,:;?!'\"%%#_)")
    p.add_argument("--hidden-size", type=int, default=128, help="model width (default 128)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads, GQA when < heads (default 2)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="per-head size (default hidden-size / heads; vLLM CPU needs 32, 64, ...; qwen2 needs hidden/heads)")
    p.add_argument("--intermediate-size", type=int, default=256, help="SwiGLU width (default 256)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows (default 512 for BPE, tokenizer size rounded up to 64 for --char-level)")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True,
                   help="tie lm_head to the embeddings (default: --tie)")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    p.add_argument("--max-position", type=int, default=2048, help="max_position_embeddings (default 2048)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="saved weight dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return the status, do not exit
        return int(e.code or 0)
    out = make_tiny(
        a.out, a.arch, hidden_size=a.hidden_size, num_layers=a.layers, num_heads=a.heads,
        num_kv_heads=a.kv_heads, head_dim=a.head_dim, intermediate_size=a.intermediate_size,
        vocab_size=a.vocab_size, tie=a.tie, seed=a.seed, max_position=a.max_position,
        char_level=a.char_level, alphabet=a.alphabet, vocab_text=a.vocab_text,
        dtype=getattr(torch, a.dtype),
    )
    cfg = json.loads((out / "config.json").read_text())
    print(f"rlx make-tiny: wrote {cfg['architectures'][0]} to {out} "
          f"(hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']})")
    return 0
