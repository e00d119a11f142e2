"""rlx.models against HF transformers: logits parity, save/load round trips, packing, errors.

Checkpoints come from tests/unit/conftest.py (written by transformers with random weights).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlx.errors import UserError
from rlx.models import (
    ModelArgs,
    build_model,
    from_pretrained,
    iter_hf_tensors,
    load_hf_weights,
    read_hf_config,
    save_pretrained,
)

transformers = pytest.importorskip("transformers")

CASES = [(f, t) for f in ("llama", "qwen2", "qwen3") for t in (False, True)]
CASE_IDS = [f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]
LENGTHS = [13, 8, 3]


def _padded_batch(vocab: int, lengths=LENGTHS, seed: int = 1):
    """Right-padded input_ids [B, T] and the HF attention mask for sequences of `lengths`."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def _max_valid_diff(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("family,tied", CASES, ids=CASE_IDS)
def test_logits_match_hf(hf_checkpoints, family, tied):
    path, hf_model = hf_checkpoints(family, tied)
    model = from_pretrained(path)
    assert model.args.tie_word_embeddings == tied
    assert (model.output_weight() is model.model.embed_tokens.weight) == tied
    ids, mask = _padded_batch(model.args.vocab_size)
    with torch.no_grad():
        ours = model(ids)
        ref = hf_model(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == ref.shape
    assert _max_valid_diff(ours, ref, mask) <= 1e-4


def test_gradients_match_hf(hf_checkpoints):
    """Every parameter's gradient of a token loss equals HF's (Qwen3: RMSNorm's hand-written backward
    on the layer norms and on q_norm / k_norm)."""
    path, hf_model = hf_checkpoints("qwen3", False)
    model = from_pretrained(path)
    ids, mask = _padded_batch(model.args.vocab_size)
    weights = mask.float()[..., None]
    (model(ids).log_softmax(-1) * weights).sum().backward()
    hf_model.zero_grad()
    (hf_model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1) * weights).sum().backward()
    hf_grads = dict(hf_model.named_parameters())
    for name, p in model.named_parameters():
        ref = hf_grads[name].grad
        assert (p.grad - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), name
    hf_model.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 3, 4, 8)], ids=["hidden", "heads"])
def test_rms_norm_backward_matches_autograd(dtype, shape):
    """RMSNorm under autograd: the same forward numbers as its no-grad path, and input / weight
    gradients equal to autograd's through the same ops (float64 for the reference)."""
    from rlx.models.transformer import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=g).to(dtype)
    out = norm(x)
    with torch.no_grad():
        assert torch.equal(out, norm(x))
    out.backward(grad)

    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for ours, want in ((x.grad, x64.grad), (norm.weight.grad, w64.grad)):
        assert ours.dtype == dtype
        assert (ours.double() - want).abs().max().item() <= tol * want.abs().max().item()


def test_return_hidden_projects_to_logits(hf_checkpoints):
    path, _ = hf_checkpoints("qwen3", True)
    model = from_pretrained(path)
    ids, _ = _padded_batch(model.args.vocab_size)
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        logits = model(ids)
    assert hidden.shape == (*ids.shape, model.args.hidden_size)
    torch.testing.assert_close(hidden @ model.output_weight().T, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)])
def test_save_load_round_trip_and_hf_loads_it(hf_checkpoints, tmp_path, family, tied):
    path, hf_model = hf_checkpoints(family, tied)
    model = from_pretrained(path)
    save_pretrained(model, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not tied)  # tied matrix stored once, as HF does
    again = from_pretrained(tmp_path / "out")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ours_cfg, hf_cfg = read_hf_config(tmp_path / "out"), read_hf_config(path)
    assert ModelArgs.from_hf_config(ours_cfg) == ModelArgs.from_hf_config(hf_cfg)

    hf_again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = _padded_batch(model.args.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
        ref = hf_model(input_ids=ids, attention_mask=mask).logits
        got = hf_again(input_ids=ids, attention_mask=mask).logits
    assert _max_valid_diff(got, ref, mask) == 0.0


def test_sharded_save_and_bf16(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("qwen3", False)
    model = from_pretrained(path)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    again = from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    names = [n for n, _ in iter_hf_tensors(tmp_path / "sharded")]
    assert sorted(names) == sorted(index["weight_map"])

    save_pretrained(model, tmp_path / "sharded", dtype=torch.bfloat16)  # overwrite: stale shards go
    assert sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors")) == ["model.safetensors"]
    assert read_hf_config(tmp_path / "sharded")["torch_dtype"] == "bfloat16"
    bf16 = from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert bf16.output_weight().dtype == torch.bfloat16
    assert torch.equal(bf16.model.norm.weight, model.model.norm.weight.bfloat16())


def _random_model(family="qwen3", tied=False, seed=0):
    args = ModelArgs.from_hf_config(
        {"architectures": [f"{family.capitalize()}ForCausalLM"], "vocab_size": 64,
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": tied, "attention_bias": True}
    )
    model = build_model(args)
    model.init_weights(seed=seed)
    return model


@pytest.mark.parametrize("use_cu_seqlens", [False, True], ids=["position_ids", "cu_seqlens"])
def test_packed_equals_separate_and_backward(use_cu_seqlens):
    model = _random_model("qwen3")
    lengths = [5, 3, 7]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 64, (n,), generator=g) for n in lengths]
    packed = torch.cat(seqs)[None]
    if use_cu_seqlens:
        out = model(packed, cu_seqlens=torch.tensor([0, 5, 8, 15]))
    else:
        out = model(packed, position_ids=torch.cat([torch.arange(n) for n in lengths])[None])
    with torch.no_grad():
        separate = torch.cat([model(s[None])[0] for s in seqs])
    assert (out[0] - separate).abs().max().item() <= 1e-5

    out.float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_packed_batch_rows_and_positions():
    """Two rows packed differently; a row without restarts takes the plain causal path."""
    model = _random_model("llama", tied=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    pos = torch.stack([torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1]), torch.arange(9)])
    with torch.no_grad():
        out = model(ids, position_ids=pos)
        assert (out[1] - model(ids[1:])[0]).abs().max() <= 1e-5
        for a, b in [(0, 4), (4, 7), (7, 9)]:
            assert (out[0, a:b] - model(ids[:1, a:b])[0]).abs().max() <= 1e-5


def test_meta_build_to_empty_load_matches_from_pretrained(hf_checkpoints):
    path, _ = hf_checkpoints("llama", True)
    reference = from_pretrained(path)
    args = ModelArgs.from_hf_config(read_hf_config(path))
    model = build_model(args, device=torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert model.output_weight() is model.model.embed_tokens.weight  # to_empty keeps the tie
    load_hf_weights(model, path)
    model.init_rope()
    ids, _ = _padded_batch(args.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))

    # The trainer's path: stream tensors one by one (lazy slices) into a to_empty model.
    manual = build_model(args, device="meta")
    manual.to_empty(device="cpu")
    params = manual.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, handle in iter_hf_tensors(path, lazy=True):
            params[name].copy_(handle[:])
    with torch.no_grad():
        assert torch.equal(manual(ids), reference(ids))


def test_init_weights_seeded_and_distributions():
    a, b = _random_model(seed=3), _random_model(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    sd = a.state_dict()
    assert torch.equal(sd["model.layers.0.self_attn.q_norm.weight"], torch.ones(16))
    assert torch.equal(sd["model.layers.1.post_attention_layernorm.weight"], torch.ones(64))
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.bias"], torch.zeros(64))
    assert abs(sd["model.embed_tokens.weight"].std().item() - 0.02) < 0.002


def test_hf_parameter_names():
    names = set(_random_model("qwen3").state_dict())
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.bias",
              "model.layers.1.self_attn.o_proj.bias", "model.layers.0.self_attn.q_norm.weight",
              "model.layers.0.self_attn.k_norm.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert n in names, n


def test_attention_infers_local_heads():
    """A TP-style column shard of q/k/v (half the heads) runs without touching the config."""
    model = _random_model("qwen3")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 64)
    cos, sin = torch.ones(1, 5, 1, 16), torch.zeros(1, 5, 1, 16)
    for proj, rows in ((attn.q_proj, 32), (attn.k_proj, 16), (attn.v_proj, 16)):
        proj.weight = torch.nn.Parameter(proj.weight[:rows])
        proj.bias = torch.nn.Parameter(proj.bias[:rows])
    attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, :32])
    assert attn(x, cos, sin, None).shape == (1, 5, 64)


# ---- bad model directories -------------------------------------------------------------------


@pytest.fixture
def bad_dir(hf_checkpoints, tmp_path):
    """A writable copy of a Qwen2 checkpoint and its tensors, for corrupting."""
    path, _ = hf_checkpoints("qwen2", False)
    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    return out, load_file(path / "model.safetensors")


def _write(out, tensors):
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(bad_dir):
    out, tensors = bad_dir
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    _write(out, tensors)
    with pytest.raises(UserError, match=r"1 missing: model\.layers\.1\.self_attn\.k_proj\.bias"):
        from_pretrained(out)


def test_extra_and_many_missing_tensors(bad_dir):
    out, tensors = bad_dir
    tensors["model.layers.9.mlp.extra.weight"] = torch.zeros(2)
    for k in [k for k in tensors if k.startswith("model.layers.2.")]:
        del tensors[k]
    _write(out, tensors)
    with pytest.raises(UserError) as e:
        from_pretrained(out)
    msg = str(e.value)
    assert "12 missing" in msg and "(2 more)" in msg and "1 unexpected: model.layers.9.mlp.extra.weight" in msg


def test_wrong_shape(bad_dir):
    out, tensors = bad_dir
    tensors["model.norm.weight"] = torch.ones(65)
    _write(out, tensors)
    with pytest.raises(UserError, match=r"wrong shape: model\.norm\.weight \[65\] \(expected \[64\]\)"):
        from_pretrained(out)


def test_unsupported_architecture(bad_dir):
    out, tensors = bad_dir
    _write(out, tensors)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="MistralForCausalLM.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        from_pretrained(out)


def test_missing_config_and_weights(bad_dir, tmp_path):
    out, _ = bad_dir
    with pytest.raises(UserError, match="no \\*.safetensors"):
        from_pretrained(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        from_pretrained(tmp_path / "empty")


def test_unsupported_options_are_loud():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1}
    with pytest.raises(UserError, match="rope_type 'yarn'"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UserError, match="mlp_bias"):
        ModelArgs.from_hf_config({**base, "mlp_bias": True})
    with pytest.raises(UserError, match="lacks required keys: hidden_size"):
        ModelArgs.from_hf_config({k: v for k, v in base.items() if k != "hidden_size"})


def test_tied_checkpoint_with_lm_head_is_accepted(hf_checkpoints, tmp_path, caplog):
    path, _ = hf_checkpoints("qwen3", True)
    tensors = load_file(path / "model.safetensors")
    out = tmp_path / "with_head"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    _write(out, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()})
    reference = from_pretrained(path)
    model = from_pretrained(out)
    assert torch.equal(model.output_weight(), reference.output_weight()) and not caplog.records
    _write(out, {**tensors, "lm_head.weight": torch.zeros_like(tensors["model.embed_tokens.weight"])})
    model = from_pretrained(out)
    assert torch.equal(model.output_weight(), reference.output_weight())
    assert "differs from embed_tokens" in caplog.text
