"""The torch generator backend against a full (no-cache) forward of the same rlx model, fp32.

Greedy tokens equal an argmax loop, sampled logprobs equal log_softmax(logits / T) (after the
top-k / top-p / min_tokens masks), stop rules and seeding follow the vLLM backend's contract.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlx.types import GenerationRequest

MAX_PROMPT = 24
EOS = 2  # make_tiny's <|eos|>


def _config(**overrides):
    from rlx.config import GeneratorConfig

    base = dict(backend="torch", dtype="float32", max_tokens=10, seed=0, temperature=1.0)
    return GeneratorConfig(**{**base, **overrides})


def _generator(path, **overrides):
    from rlx.generator import build_generator

    return build_generator(_config(**overrides), str(path), max_prompt_length=MAX_PROMPT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, rlx model) of a tiny untied Llama (rope scaling, GQA); vocabulary 512."""
    from rlx.models import from_pretrained
    from rlx.models.tiny import make_tiny

    path = make_tiny(tmp_path_factory.mktemp("torch_gen") / "llama", arch="llama", hidden_size=64, num_heads=4,
                     num_kv_heads=2, intermediate_size=128, tie=False, seed=3)  # fmt: skip
    return path, from_pretrained(path).eval()


@pytest.fixture(scope="module")
def many_stops(tiny, tmp_path_factory):
    """The same model with 60 stop token ids (generation_config.json): sampled rollouts end early."""
    import shutil

    path = tmp_path_factory.mktemp("torch_gen_stops") / "llama"
    shutil.copytree(tiny[0], path)
    stops = [EOS, *range(100, 159)]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return path, set(stops)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 500, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _logits(model, prompt, response):
    """Full-forward logits [len(response), V] that predicted each response token."""
    ids = torch.tensor([list(prompt) + list(response)])
    return model(ids)[0, len(prompt) - 1 : -1].float()


@torch.no_grad()
def _greedy_reference(model, prompt, max_tokens, stops):
    out = []
    for _ in range(max_tokens):
        tok = int(model(torch.tensor([list(prompt) + out]))[0, -1].argmax())
        out.append(tok)
        if tok in stops:
            break
    return out


def test_greedy_equals_full_forward_argmax_with_mixed_prompt_lengths(tiny):
    path, model = tiny
    g = _generator(path)
    prompts = _prompts([3, 9, 1, 17, 6])
    out = g.generate([GenerationRequest(p, n=2) for p in prompts], validation=True)  # val_temperature 0
    for p, completions in zip(prompts, out):
        assert len(completions) == 2 and completions[0].token_ids == completions[1].token_ids
        ref = _greedy_reference(model, p, 10, {EOS})
        assert completions[0].token_ids == ref
        # greedy logprobs: log_softmax of the raw logits
        lp = torch.log_softmax(_logits(model, p, ref), -1).gather(-1, torch.tensor(ref)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(completions[0].logprobs), lp, atol=1e-5)


def test_sampled_logprobs_are_those_of_the_tempered_distribution(tiny):
    path, model = tiny
    g = _generator(path, temperature=0.7, max_tokens=12)
    prompts = _prompts([5, 11, 2])
    out = g.generate([GenerationRequest(p, n=3) for p in prompts])
    for p, completions in zip(prompts, out):
        assert len(completions) == 3
        for c in completions:
            lp = torch.log_softmax(_logits(model, p, c.token_ids) / 0.7, -1)
            ref = lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert (torch.tensor(c.logprobs) - ref).abs().max() < 1e-5
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # the n samples differ


def _reference_mask(logits, top_k, top_p):
    """Support of top-k then top-p, written independently of the backend (descending order: keep a
    token while the mass before it is below top_p)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k > 0:
        keep &= logits >= logits.topk(top_k, -1).values[:, -1:]
    masked = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1:
        probs, order = masked.softmax(-1).sort(-1, descending=True)
        before = probs.cumsum(-1) - probs
        keep &= torch.zeros_like(keep).scatter(-1, order, before < top_p)
    return keep


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (-1, 0.6), (20, 0.5)])
def test_top_k_top_p_restrict_the_support_and_renormalize(tiny, top_k, top_p):
    path, model = tiny
    g = _generator(path, temperature=1.3, top_k=top_k, top_p=top_p, max_tokens=8)
    prompts = _prompts([4, 7])
    out = g.generate([GenerationRequest(p, n=4) for p in prompts])
    for p, completions in zip(prompts, out):
        for c in completions:
            logits = _logits(model, p, c.token_ids) / 1.3
            keep = _reference_mask(logits, top_k, top_p)
            tokens = torch.tensor(c.token_ids)
            assert keep.gather(-1, tokens[:, None]).all()
            ref = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1).gather(-1, tokens[:, None])[:, 0]
            assert (torch.tensor(c.logprobs) - ref).abs().max() < 1e-5
            if top_k > 0:
                assert int(keep.sum(-1).max()) <= top_k


def test_stop_ids_eos_and_min_tokens(many_stops):
    from rlx.models import from_pretrained

    path, stops = many_stops
    model = from_pretrained(path).eval()
    prompts = _prompts([3, 8, 5, 12])
    for min_tokens in (0, 4):
        g = _generator(path, temperature=1.5, max_tokens=12, min_tokens=min_tokens)
        out = [c for cs in g.generate([GenerationRequest(p, n=8) for p in prompts]) for c in cs]
        reasons = {c.finish_reason for c in out}
        assert reasons == {"stop", "length"}, reasons  # ~12% stop mass per token: both happen
        for c in out:
            assert len(c.token_ids) == len(c.logprobs) >= min_tokens
            assert not stops & set(c.token_ids[:-1])  # a stop token ends the sequence
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in stops and len(c.token_ids) > min_tokens
            else:
                assert len(c.token_ids) == 12
        # logprobs of the distribution sampled from: stop tokens banned before min_tokens
        p, c = prompts[0], out[0]
        logits = _logits(model, p, c.token_ids) / 1.5
        logits[:min_tokens, sorted(stops)] = float("-inf")
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert (torch.tensor(c.logprobs) - ref).abs().max() < 1e-5


def test_per_request_max_tokens_and_context_limit(tiny):
    g = _generator(tiny[0], max_tokens=10)
    short, long_prompt = _prompts([4, MAX_PROMPT])
    out = g.generate([GenerationRequest(short, n=2, max_tokens=3), GenerationRequest(long_prompt, n=1)])
    assert [len(c.token_ids) for c in out[0]] == [3, 3] and len(out[1][0].token_ids) == 10
    assert {c.finish_reason for cs in out for c in cs} == {"length"}


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(tiny):
    g = _generator(tiny[0], max_tokens=8)
    reqs = [GenerationRequest(p, n=4) for p in _prompts([6, 3])]
    tokens = lambda out: [c.token_ids for cs in out for c in cs]  # noqa: E731

    torch.manual_seed(123)
    state = torch.get_rng_state()
    g.reseed(3)
    first = tokens(g.generate(reqs))
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's stream is untouched
    torch.manual_seed(999)  # ... and does not steer the engine
    g.reseed(3)
    assert tokens(g.generate(reqs)) == first
    g.reseed(4)
    assert tokens(g.generate(reqs)) != first
    # a request's own seed fixes its samples whatever the engine stream
    seeded = [GenerationRequest(reqs[0].prompt_ids, n=4, seed=7)]
    g.reseed(5)
    a = tokens(g.generate(seeded))
    g.reseed(6)
    assert tokens(g.generate(seeded)) == a


def test_waves_of_max_num_seqs_give_the_same_greedy_tokens(tiny):
    reqs = [GenerationRequest(p, n=3, temperature=0.0) for p in _prompts([2, 9, 4, 7])]
    whole = _generator(tiny[0]).generate(reqs)
    waves = _generator(tiny[0], max_num_seqs=2).generate(reqs)
    assert [[c.token_ids for c in cs] for cs in whole] == [[c.token_ids for c in cs] for cs in waves]


def test_reload_weights_switches_to_the_new_weights(tiny):
    from rlx.weight_sync import WeightSync
    from rlx.weight_sync.check import compare_with_model

    path, model = tiny
    g = _generator(path, temperature=0.8)
    prompts = _prompts([5, 9])
    reqs = [GenerationRequest(p, n=1) for p in prompts]
    new = type(model)(model.args)
    new.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    before = compare_with_model(new, prompts, [cs[0] for cs in g.generate(reqs)], temperature=0.8)
    assert before["max_logprob_diff"] > 1e-2  # stale: sampled from the old weights
    WeightSync(g).push(new, version=1)
    after = compare_with_model(new, prompts, [cs[0] for cs in g.generate(reqs)], temperature=0.8)
    assert after["max_logprob_diff"] < 1e-5
    greedy = g.generate(reqs, validation=True)
    assert compare_with_model(new, prompts, [cs[0] for cs in greedy], temperature=0.0)["argmax_mismatches"] == 0
    with pytest.raises(KeyError):
        g.reload_weights([("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(1))])


def test_over_long_and_empty_prompts_are_dropped_and_counted(tiny):
    g = _generator(tiny[0])
    ok, too_long = _prompts([4, MAX_PROMPT + 1])
    out = g.generate([GenerationRequest(ok, n=2), GenerationRequest(too_long, n=2), GenerationRequest([], n=2)])
    assert [len(x) for x in out] == [2, 0, 0]
    m = g.metrics()
    assert m["generator/dropped_prompts"] == 2 and m["generator/completions"] == 2 and m["generator/prompts"] == 1


def test_stop_strings_end_at_the_completing_token(tiny):
    from rlx.models import load_tokenizer

    tok = load_tokenizer(tiny[0])
    req = [GenerationRequest(_prompts([6])[0], n=1)]
    g = _generator(tiny[0], max_tokens=10)
    g.reseed(1)
    full = g.generate(req)[0][0].token_ids
    stop = tok.decode(full[5:7])  # the text of tokens 5-6: the string first completes at token 6 or before
    assert stop
    g = _generator(tiny[0], max_tokens=10, stop=[stop])
    g.reseed(1)
    c = g.generate(req)[0][0]
    assert c.finish_reason == "stop" and c.token_ids == full[: len(c.token_ids)] and len(c.token_ids) <= 7
    assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])


def test_tensor_parallel_and_vllm_only_options_are_not_silently_accepted(tiny, caplog):
    from rlx.config.fields import ConfigError
    from rlx.errors import UserError
    from rlx.generator.base import GeneratorLayout
    from rlx.generator.torch_backend import TorchGenerator

    with pytest.raises(ConfigError, match="tp = 1"):
        _config(tp=2).validate()
    with pytest.raises(UserError, match="tp = 1"):
        TorchGenerator(_config(tp=2), str(tiny[0]), max_prompt_length=MAX_PROMPT, layout=GeneratorLayout(0, 2, 2))
    with caplog.at_level("WARNING", logger="rlx.generator.torch_backend"):
        _generator(tiny[0], kv_cache_space_gib=3.0, enforce_eager=False)
    assert "ignores the vLLM-only options kv_cache_space_gib, enforce_eager" in caplog.text


def test_sleep_and_wake_up_keep_the_weights_and_refuse_while_asleep(tiny):
    """The GPU sleep path (weights to host memory and back, fused matrices rebuilt), run on CPU."""
    from rlx.weight_sync.check import compare_with_model

    path, model = tiny
    g = _generator(path)
    g.sleep_enabled = True  # what enable_sleep_mode does on a GPU
    reqs = [GenerationRequest(p, n=1) for p in _prompts([4, 6])]
    before = g.generate(reqs, validation=True)
    g.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        g.generate(reqs)
    g.wake_up()
    assert [c.token_ids for cs in g.generate(reqs, validation=True) for c in cs] == [c.token_ids for cs in before for c in cs]
    new = type(model)(model.args)
    new.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})
    g.reload_weights(list(new.state_dict().items()))  # lands in the rebuilt fused matrices
    out = [cs[0] for cs in g.generate(reqs, validation=True)]
    assert compare_with_model(new, [r.prompt_ids for r in reqs], out, temperature=0.0)["argmax_mismatches"] == 0
