"""`rlx make-tiny` directories: load in rlx and HF transformers alike; tokenizers and chat template.

Small sizes keep every case under a second; head_dim 32 is what vLLM's CPU backend accepts.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlx.errors import UserError
from rlx.models import apply_chat_template, from_pretrained, load_tokenizer
from rlx.models.tiny import SPECIALS, main, make_tiny

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96, vocab_size=320)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_loads_in_rlx_and_hf_with_equal_logits(tmp_path, arch):
    out = make_tiny(tmp_path / arch, arch, tie=arch != "qwen2", **SMALL)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    model = from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == model.args.arch
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([apply_chat_template(tok, "What is 12 + 34?")])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_bpe_tokenizer_round_trips_text(tmp_path):
    out = make_tiny(tmp_path / "m", "qwen3", **SMALL)
    tok = load_tokenizer(out)
    text = "The answer is 46.\nQuestion: what is 7 * 8? Ünïcödé → 56"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(tok) <= SMALL["vocab_size"]
    assert len(tok.encode("The answer is")) < len("The answer is")  # merges were learned


def test_bpe_from_vocab_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("banana bandana " * 200 + "\n")
    out = make_tiny(tmp_path / "m", "llama", vocab_text=corpus, **SMALL)
    tok = load_tokenizer(out)
    assert len(tok.encode("banana bandana", add_special_tokens=False)) <= 3


def test_char_level_one_token_per_char(tmp_path):
    out = make_tiny(tmp_path / "c", "qwen3", char_level=True, **{**SMALL, "vocab_size": None})
    tok = load_tokenizer(out)
    ids = tok.encode("12+34=", add_special_tokens=False)
    assert len(ids) == 6 and tok.convert_ids_to_tokens(ids) == list("12+34=")
    assert tok.decode(tok.encode("46\n7 + 8 = 15")) == "46\n7 + 8 = 15"
    assert tok.convert_ids_to_tokens(tok.encode("~")) == ["<|unk|>"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] >= len(tok)

    chat = apply_chat_template(tok, "12+34=")
    assert tok.convert_ids_to_tokens(chat) == ["<|bos|>", "<|user|>", *"12+34=", "<|eos|>", "<|assistant|>"]
    convo = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}]
    no_prompt = apply_chat_template(tok, convo, add_generation_prompt=False)
    assert tok.decode(no_prompt) == "<|bos|><|system|>add<|eos|><|user|>1+1=<|eos|>"


def test_plain_encoding_without_chat_template(tmp_path):
    out = make_tiny(tmp_path / "c", "llama", char_level=True, **{**SMALL, "vocab_size": None})
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(out)
    assert not tok.chat_template
    assert apply_chat_template(tok, "1+2=") == [tok.bos_token_id, *tok.encode("1+2=", add_special_tokens=False)]
    assert apply_chat_template(tok, [{"role": "user", "content": "1+2="}]) == apply_chat_template(tok, "1+2=")
    with pytest.raises(UserError, match="no chat template"):
        apply_chat_template(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_cli_writes_directory_and_help(tmp_path, capsys):
    assert main(["--arch", "llama", "--out", str(tmp_path / "cli"), "--char-level", "--hidden-size", "64",
                 "--heads", "2", "--kv-heads", "1", "--intermediate-size", "64", "--no-tie", "--seed", "3"]) == 0
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["head_dim"] == 32
    assert from_pretrained(tmp_path / "cli").args.num_key_value_heads == 1

    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--arch", "--out", "--vocab-text", "--char-level", "--alphabet", "--hidden-size", "--layers",
                   "--heads", "--kv-heads", "--head-dim", "--intermediate-size", "--vocab-size", "--tie",
                   "--seed", "--max-position", "--dtype", SPECIALS[0]):
        assert option in help_text, option
    assert main(["--arch", "gpt2", "--out", str(tmp_path / "x")]) == 2


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown --arch 'mistral'"):
        make_tiny(tmp_path / "a", "mistral")
    with pytest.raises(UserError, match="qwen2 needs head_dim"):
        make_tiny(tmp_path / "b", "qwen2", hidden_size=64, num_heads=4, head_dim=32)
    with pytest.raises(UserError, match="vocab-size >= 263"):
        make_tiny(tmp_path / "c", "qwen3", vocab_size=100)
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        make_tiny(tmp_path / "d", "qwen3", char_level=True, vocab_size=16)
