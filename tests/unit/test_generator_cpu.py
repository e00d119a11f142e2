"""CPU engine settings that need no engine: thread count kept, scheduler limits, min_tokens."""

from types import SimpleNamespace

import torch

from rlx.generator.base import GeneratorLayout, TorchThreads
from rlx.generator.vllm_backend import CPU_MAX_NUM_SEQS, VLLMGenerator
from rlx.types import GenerationRequest


def test_building_restores_set_num_threads_and_the_count():
    before = torch.get_num_threads()
    threads = TorchThreads()
    real = torch.set_num_threads
    try:
        with threads.building():  # what vLLM's CPU worker does while the engine is built
            torch.set_num_threads(1)
            torch.set_num_threads = lambda n: None
        assert torch.set_num_threads is real
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads = real
        torch.set_num_threads(before)


def _generator(**cfg) -> VLLMGenerator:
    """A VLLMGenerator without an engine: enough for its kwargs and sampling parameters."""
    g = VLLMGenerator.__new__(VLLMGenerator)
    base = dict(dtype="auto", tp=1, seed=0, enforce_eager=True, enable_prefix_caching=True, kv_cache_space_gib=1.0,
                temperature=1.0, val_temperature=0.0, top_p=1.0, top_k=-1, max_tokens=32, stop=[])  # fmt: skip
    g.cfg, g.layout, g.max_model_len, g.on_gpu = SimpleNamespace(**{**base, **cfg}), GeneratorLayout(), 43, False
    g._sampling_params_cls = dict  # records the keyword arguments vLLM's SamplingParams would get
    return g


def test_cpu_scheduler_fits_a_whole_step_unless_configured():
    kwargs = _generator()._engine_kwargs("/model")
    assert kwargs["max_num_seqs"] == CPU_MAX_NUM_SEQS and kwargs["max_num_batched_tokens"] >= 8192
    kwargs = _generator(max_num_seqs=64, max_num_batched_tokens=512)._engine_kwargs("/model")
    assert (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (64, 512)


def test_min_tokens_reaches_the_engine_and_never_exceeds_max_tokens():
    request = GenerationRequest([1] * 11, n=8)
    assert _generator()._sampling_params(request, False)["min_tokens"] == 0
    assert _generator(min_tokens=32)._sampling_params(request, False)["min_tokens"] == 32
    assert _generator(min_tokens=99)._sampling_params(request, False)["min_tokens"] == 32
