"""The end-to-end RL step workload of `e2e_step.py`, shared by rlx and its peers (TRL).

Imports neither rlx nor TRL, so the peer's own virtual environment can import it: the model
(a random Qwen3), its character-level tokenizer, the addition prompts and the reward.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

# Two shapes of one recipe. `micro_seqs`: sequences per forward/backward micro-batch.
SHAPES: dict[str, dict[str, int]] = {
    "default": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, mlp=688, max_pos=256,
                    prompts=64, n=8, new_tokens=32, micro_seqs=64, warmup=1, measured=5),
    "large": dict(hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, mlp=1376, max_pos=256,
                  prompts=32, n=8, new_tokens=128, micro_seqs=32, warmup=1, measured=3),
}  # fmt: skip
PROMPT_TOKENS = 11  # "Add: AA+BB=", one token per character
PAD, EOS = "<pad>", "<eos>"
# ids 0 <pad>, 1 <eos>, then printable ASCII (space .. '~') as 2..96: 97 tokens.
VOCAB = {PAD: 0, EOS: 1, **{chr(c): 2 + c - 32 for c in range(32, 127)}}
_FIRST_INT = re.compile(r"\d+")


def reward(completion: str, answer) -> float:
    """1.0 if the completion's first integer is the sum, else 0.1 x its fraction of digits."""
    m = _FIRST_INT.search(completion)
    if m is not None and int(m.group()) == int(answer):
        return 1.0
    return 0.1 * sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def rlx_reward(response: str, ground_truth, **_: object) -> dict[str, float]:
    """rlx's reward contract (`reward.fn = "_e2e_task:rlx_reward"`)."""
    score = reward(response, ground_truth)
    return {"score": score, "acc": float(score == 1.0)}


def trl_reward(prompts, completions, answer, **_: object) -> list[float]:
    """TRL's reward contract: dataset columns arrive as keyword lists."""
    return [reward(c, a) for c, a in zip(completions, answer)]


def write_prompts(path: Path, num: int, seed: int = 0) -> Path:
    """`num` records {"prompt": "Add: AA+BB=", "answer": "AA+BB"} with AA, BB uniform in 10..99."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"Add: {a}+{b}=", "answer": str(a + b)}) + "\n")
    return path


def write_tokenizer(out: Path, max_pos: int) -> None:
    """A character-level fast tokenizer (WordLevel over single characters, no BOS, no template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, EOS])
    tok.save(str(out / "tokenizer.json"))
    special = {"eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_pos,
              "clean_up_tokenization_spaces": False, "padding_side": "left"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_model(out: Path, shape: str) -> int:
    """A random `Qwen3ForCausalLM` of `shape` (fp32, tied embeddings, `torch.manual_seed(0)`),
    saved with its tokenizer in HF format; returns the parameter count."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = SHAPES[shape]
    config = Qwen3Config(
        vocab_size=len(VOCAB), hidden_size=s["hidden"], intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"], hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=s["max_pos"], tie_word_embeddings=True, attention_bias=False,
        pad_token_id=VOCAB[PAD], eos_token_id=VOCAB[EOS], bos_token_id=None, dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).float()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_tokenizer(out, s["max_pos"])
    return sum(p.numel() for p in model.parameters())


def num_params(shape: str) -> int:
    """Parameters of `shape` (tied embeddings counted once): 2,927,616 for the default shape."""
    s = SHAPES[shape]
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    layer = h * q * 2 + h * kv * 2 + 3 * h * s["mlp"] + 2 * h + 2 * s["head_dim"]
    return s["layers"] * layer + len(VOCAB) * h + h


def flop_floor(shape: str, matmul_flops: float) -> float:
    """Seconds at `matmul_flops`: 2 x params per generated token + 6 x params per trained token."""
    s = SHAPES[shape]
    seqs = s["prompts"] * s["n"]
    generated, trained = seqs * s["new_tokens"], seqs * (PROMPT_TOKENS + s["new_tokens"])
    return (2 * generated + 6 * trained) * num_params(shape) / matmul_flops
