"""Torch-native generator: batched decoding with rlx's own model code and a static KV cache.

For colocated CPU and small-model runs, where vLLM's per-step engine overhead dominates. Same
contract as the vLLM backend (vllm_backend.py): processed logprobs, EOS / min_tokens / stop rules.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlx.errors import UserError
from rlx.generator.base import EngineLayoutMixin, GeneratorLayout
from rlx.generator.decode import KVCache, decode_attention, fuse_layer
from rlx.generator.sampling import GREEDY_EPS, StopStrings, sample
from rlx.models import ModelArgs, build_model, load_hf_weights, load_tokenizer, read_hf_config
from rlx.models.transformer import Transformer, rope_cos_sin, rope_inv_freq
from rlx.types import Completion, GenerationRequest

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# GeneratorConfig fields only the vLLM engine reads: set to anything but their default, a warning.
VLLM_ONLY = ("gpu_memory_utilization", "kv_cache_space_gib", "enforce_eager", "enable_prefix_caching",
             "max_num_batched_tokens")  # fmt: skip
PREFILL_TOKENS = 8192  # prompt tokens per prefill forward (bounds the prefill activations)
COMPACT_FRACTION = 0.75  # drop finished rows from the batch once this few of them are alive


@dataclass
class Wave:
    """Per-row (one row = one sample) settings of a batch decoded together. Rows of a request
    are contiguous, in request order."""

    requests: list[GenerationRequest]
    n: list[int]  # samples per request (1 for greedy requests)
    temperature: torch.Tensor  # [B] fp32, 0 for greedy rows
    max_tokens: torch.Tensor  # [B] long
    min_tokens: torch.Tensor  # [B] long
    request_index: torch.Tensor  # [B] long: position of the row's request in `requests`
    first: int  # position of requests[0] among the call's kept requests


class TorchGenerator(EngineLayoutMixin):
    """`Generator` that decodes with an `rlx.models.Transformer` in the trainer's process.

    Builds its own copy of the model (from the HF directory, in `generator.dtype`) on the
    trainer's device, and decodes all sequences of a call together: one prefill per prompt (its
    n samples copy the prompt's KV), then one batched forward per generated token over a
    preallocated KV cache. No tensor parallelism (generator.tp must be 1); `max_num_seqs` bounds
    the sequences decoded at once (0: all of a call). Sampling never touches the process-global
    RNGs: it draws from the engine's own `torch.Generator`, reseeded from (seed, step, replica).
    """

    def __init__(
        self,
        cfg: Any,
        model_path: str,
        *,
        max_prompt_length: int,
        layout: GeneratorLayout,
        device: torch.device | str | None = None,
    ):
        if cfg.backend != "torch":
            raise UserError(f"generator.backend={cfg.backend!r} is not the torch backend")
        if cfg.tp != 1:
            raise UserError(f"generator.backend='torch' has no tensor parallelism: set generator.tp = 1 (got {cfg.tp})")
        self._set_limits(cfg, layout, max_prompt_length)
        self.device = torch.device(device) if device is not None else _default_device()
        _warn_ignored(cfg)
        hf_config = read_hf_config(model_path)
        args = ModelArgs.from_hf_config(hf_config)
        if self.max_model_len > args.max_position_embeddings:
            raise UserError(
                f"the generator's context ({self.max_model_len} tokens) exceeds the model's "
                f"max_position_embeddings={args.max_position_embeddings}; lower generator.max_model_len or the limits"
            )
        self.engine_dtype = _resolve_dtype(cfg.dtype, hf_config)
        self.tie_word_embeddings = args.tie_word_embeddings
        self.model = _load_model(args, model_path, self.device, self.engine_dtype)
        self.inv_freq = rope_inv_freq(args, self.device)
        self._fuse()

        tokenizer = load_tokenizer(model_path)
        stop_ids = _stop_token_ids(model_path, hf_config, tokenizer)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        self.is_stop = torch.zeros(args.vocab_size, dtype=torch.bool, device=self.device)
        self.is_stop[self.stop_ids[self.stop_ids < args.vocab_size]] = True
        self.stop_strings = StopStrings(tokenizer, list(cfg.stop)) if cfg.stop else None

        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(cfg.seed + layout.dp_index)
        self.sleep_enabled = self.device.type == "cuda" and cfg.enable_sleep_mode
        self.is_sleeping = False
        self._counters = {"dropped_prompts": 0, "prompts": 0, "completions": 0, "tokens": 0, "seconds": 0.0}
        self._last_tokens_per_second = 0.0
        logger.info("generator: torch backend on %s (%s), stop token ids %s",
                    self.device, self.engine_dtype, sorted(stop_ids))  # fmt: skip

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], *, validation: bool = False
    ) -> list[list[Completion]]:
        """One list of `request.n` completions per request, in request order (vLLM backend's
        contract: greedy requests are decoded once and repeated n times; empty or over-long
        prompts get an empty list and count in `generator/dropped_prompts`)."""
        keep, results = self._admit(requests)
        if not keep:
            return results

        start = time.perf_counter()
        num_tokens = 0
        for wave in self._waves([requests[i] for i in keep], validation):
            completions = self._decode(wave)
            for j, r in enumerate(wave.requests):
                outs = completions[j]
                num_tokens += sum(len(c.token_ids) for c in outs)
                if len(outs) < r.n:  # greedy: one sample stands for all n
                    outs = [copy.deepcopy(outs[0]) for _ in range(r.n)]
                results[keep[wave.first + j]] = outs
        seconds = time.perf_counter() - start
        self._count(keep, results, num_tokens, seconds)
        return results

    def _waves(self, requests: list[GenerationRequest], validation: bool):
        """Consecutive groups of requests with at most `max_num_seqs` samples each (0: one group)."""
        cfg = self.cfg
        default_temperature = cfg.val_temperature if validation else cfg.temperature
        limit = getattr(cfg, "max_num_seqs", 0) or 0
        settings: list[tuple[int, float, int, int]] = []  # (n, temperature, max_tokens, min_tokens) per request
        for r in requests:
            temperature = default_temperature if r.temperature is None else r.temperature
            max_tokens = cfg.max_tokens if r.max_tokens is None else r.max_tokens
            max_tokens = max(1, min(max_tokens, self.max_model_len - len(r.prompt_ids)))
            min_tokens = min(getattr(cfg, "min_tokens", 0), max_tokens)
            settings.append((1 if temperature < GREEDY_EPS else r.n, temperature, max_tokens, min_tokens))
        start = 0
        while start < len(requests):
            end, seqs = start, 0
            while end < len(requests) and (end == start or not limit or seqs + settings[end][0] <= limit):
                seqs += settings[end][0]
                end += 1
            yield self._wave(requests[start:end], settings[start:end], start)
            start = end

    def _wave(self, requests, settings, first: int) -> Wave:
        n = [s[0] for s in settings]
        per_row = lambda values, dtype: torch.tensor(values, dtype=dtype).repeat_interleave(  # noqa: E731
            torch.tensor(n)).to(self.device)
        return Wave(
            requests, n,
            temperature=per_row([s[1] for s in settings], torch.float32),
            max_tokens=per_row([s[2] for s in settings], torch.long),
            min_tokens=per_row([s[3] for s in settings], torch.long),
            request_index=per_row(list(range(len(requests))), torch.long),
            first=first,
        )  # fmt: skip

    @torch.inference_mode()
    def _decode(self, wave: Wave) -> list[list[Completion]]:
        """Sample every row of `wave` to its end; completions grouped per request."""
        B = int(wave.temperature.numel())
        T = int(wave.max_tokens.max())
        prompt_lens = torch.tensor([len(r.prompt_ids) for r in wave.requests], device=self.device)
        P = int(prompt_lens.max())
        cache = KVCache.allocate(self.model, B, P + T, self.device, self.engine_dtype)
        n = torch.tensor(wave.n, device=self.device)
        logits = self._prefill(wave.requests, n, P, cache)  # [B, V]
        positions = prompt_lens.repeat_interleave(n)  # where each row's next token goes (RoPE)
        # Cache slots: [0, P) holds the right-padded prompt, P + t the t-th generated token.
        key_bias = torch.zeros(B, P + T, dtype=self.engine_dtype, device=self.device)
        key_bias[:, :P].masked_fill_(torch.arange(P, device=self.device) >= positions[:, None], float("-inf"))
        seeded = [(j, _request_rng(r.seed, self.device)) for j, r in enumerate(wave.requests) if r.seed is not None]

        tokens = torch.zeros(B, T, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(B, T, dtype=torch.float32, device=self.device)
        lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        stopped = torch.zeros(B, dtype=torch.bool, device=self.device)
        rows = torch.arange(B, device=self.device)  # wave row of each batch row (changes on compaction)
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        temperature, max_tokens, min_tokens = wave.temperature, wave.max_tokens, wave.min_tokens
        request_index = wave.request_index
        most_min_tokens = int(min_tokens.max())
        greedy = temperature < GREEDY_EPS
        all_greedy, any_greedy = bool(greedy.all()), bool(greedy.any())
        for t in range(T):
            suppress = (t < min_tokens) if t < most_min_tokens else None
            noise = None if all_greedy else self._noise(logits, request_index, seeded)
            tok, lp = sample(logits, temperature, noise, top_k=self.cfg.top_k, top_p=self.cfg.top_p,
                             suppress=suppress, is_stop=self.is_stop, any_greedy=any_greedy)  # fmt: skip
            tokens[rows, t], logprobs[rows, t] = tok, lp
            stop = self.is_stop[tok]  # EOS / stop token ids (banned before min_tokens)
            if self.stop_strings is not None:
                stop |= self.stop_strings.hit(tokens[rows, : t + 1], t + 1 > min_tokens)
            done = alive & (stop | (t + 1 >= max_tokens))
            lengths[rows[done]] = t + 1
            stopped[rows[done]] = stop[done]
            alive &= ~done
            num_alive = int(alive.sum())
            if num_alive == 0:
                break
            if num_alive <= COMPACT_FRACTION * alive.numel():  # stop computing finished rows
                keep = alive.nonzero()[:, 0]
                cache.select(keep)
                rows, alive, tok, positions = rows[keep], alive[keep], tok[keep], positions[keep]
                temperature, max_tokens, min_tokens = temperature[keep], max_tokens[keep], min_tokens[keep]
                key_bias, request_index = key_bias[keep], request_index[keep]
            logits = self._decode_step(tok, positions + t, P + t, key_bias[:, : P + t + 1], cache)
        return self._completions(wave, tokens, logprobs, lengths, stopped)

    def _noise(self, logits: torch.Tensor, request_index: torch.Tensor, seeded) -> torch.Tensor:
        """Exponential(1) noise for the Gumbel-max (exponential race) draw: the engine's stream,
        with rows of seeded requests redrawn from their own generators."""
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=self.rng)
        for j, gen in seeded:
            mine = (request_index == j).nonzero()[:, 0]
            if mine.numel():
                noise[mine] = torch.empty_like(noise[mine]).exponential_(generator=gen)
        return noise

    def _completions(self, wave, tokens, logprobs, lengths, stopped) -> list[list[Completion]]:
        tokens, logprobs, lengths, stopped = tokens.tolist(), logprobs.tolist(), lengths.tolist(), stopped.tolist()
        out: list[list[Completion]] = []
        row = 0
        for n in wave.n:
            out.append([
                Completion(tokens[i][: lengths[i]], logprobs[i][: lengths[i]], "stop" if stopped[i] else "length")
                for i in range(row, row + n)
            ])  # fmt: skip
            row += n
        return out

    # -- the forward with a KV cache --------------------------------------------------------------

    def _prefill(self, requests, n: torch.Tensor, P: int, cache: KVCache) -> torch.Tensor:
        """Run the prompts (right-padded to P) in chunks, write each prompt's KV into the cache
        rows of its n samples, and return the next-token logits of every row [B, V] fp32."""
        out, row = [], 0
        chunk = max(1, PREFILL_TOKENS // P)
        for start in range(0, len(requests), chunk):
            part = requests[start : start + chunk]
            ids = torch.zeros(len(part), P, dtype=torch.long)
            for i, r in enumerate(part):
                ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            last = torch.tensor([len(r.prompt_ids) - 1 for r in part], device=self.device)
            reps = n[start : start + chunk]
            hidden = self._prefill_chunk(ids.to(self.device), cache, slice(row, row + int(reps.sum())), reps)
            last_hidden = hidden[torch.arange(len(part), device=self.device), last]
            out.append(self._logits(last_hidden).repeat_interleave(reps, 0))
            row += int(reps.sum())
        return torch.cat(out)

    def _prefill_chunk(self, ids: torch.Tensor, cache: KVCache, rows: slice, reps: torch.Tensor) -> torch.Tensor:
        R, P = ids.shape
        positions = torch.arange(P, device=self.device).unsqueeze(0)
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        x = self.model.model.embed_tokens(ids)
        for i, (layer, fused) in enumerate(zip(self.model.model.layers, self.fused)):
            q, k, v = fused.qkv(layer, layer.input_layernorm(x), cos, sin)
            cache.k[i][rows, :, :P] = k.repeat_interleave(reps, 0)
            cache.v[i][rows, :, :P] = v.repeat_interleave(reps, 0)
            # Right padding: a real query only sees keys at or before itself, all real tokens.
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            x = x + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(R, P, -1))
            x = x + fused.mlp(layer.post_attention_layernorm(x))
        return x

    def _decode_step(self, tok, positions, slot: int, key_bias, cache: KVCache) -> torch.Tensor:
        """Feed one token per row (at RoPE position `positions`, cache slot `slot`); next logits.
        key_bias [B, slot + 1]: 0 for keys a row may attend to, -inf for its prompt padding."""
        B = tok.shape[0]
        cos, sin = rope_cos_sin(self.inv_freq, positions[:, None])
        x = self.model.model.embed_tokens(tok[:, None])
        for i, (layer, fused) in enumerate(zip(self.model.model.layers, self.fused)):
            q, k, v = fused.qkv(layer, layer.input_layernorm(x), cos, sin)
            cache.k[i][:, :, slot] = k[:, :, 0]
            cache.v[i][:, :, slot] = v[:, :, 0]
            attn = decode_attention(q, cache.k[i][:, :, : slot + 1], cache.v[i][:, :, : slot + 1], key_bias)
            x = x + layer.self_attn.o_proj(attn.reshape(B, 1, -1))
            x = x + fused.mlp(layer.post_attention_layernorm(x))
        return self._logits(x[:, 0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden)).float()

    # -- seeding, metrics -------------------------------------------------------------------------

    def reseed(self, step: int) -> None:
        """Sampling from here on depends on (generator.seed, step, engine replica) only, as in
        the vLLM backend (a resumed run draws what an uninterrupted one would)."""
        self.rng.manual_seed(self.cfg.seed + 1_000_003 * step + self.layout.dp_index)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters since creation, plus the last call's throughput."""
        out = {f"generator/{k}": v for k, v in self._counters.items()}
        out["generator/tokens_per_second"] = self._last_tokens_per_second
        return out

    # -- weights, memory, lifetime --------------------------------------------------------------

    @torch.no_grad()
    def reload_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy full (unsharded) HF-named tensors into the engine's model, in place (weight_sync
        sends these names; `lm_head.weight` of a tied model is the embedding, copied twice)."""
        unknown = [name for name, _ in named_tensors if name not in self.params]
        if unknown:
            raise KeyError(f"the torch generator's model has no parameters named {unknown[:5]}")
        for name, tensor in named_tensors:
            self.params[name].copy_(tensor)

    def reset_prefix_cache(self) -> None:
        """Nothing to forget: the KV cache lives for one `generate` call."""

    def sleep(self) -> None:
        """GPU with enable_sleep_mode: move the weights to host memory while the trainer works
        (no-op on CPU)."""
        if self.sleep_enabled and not self.is_sleeping:
            self.fused = []  # the fused matrices hold the device copy of q/k/v and gate/up
            self.model.to("cpu")
            torch.cuda.empty_cache()
            self.is_sleeping = True

    def wake_up(self) -> None:
        """Bring the weights back to the device (no-op on CPU)."""
        if self.sleep_enabled and self.is_sleeping:
            self.model.to(self.device)
            self._fuse()  # moving made new storage for every Parameter
            self.is_sleeping = False

    def shutdown(self) -> None:
        """Free the engine's model."""
        self.model = None
        self.params, self.fused = {}, []

    def _fuse(self) -> None:
        self.fused = [fuse_layer(layer) for layer in self.model.model.layers]
        self.params = dict(self.model.named_parameters(remove_duplicate=False))


# ---- helpers ---------------------------------------------------------------------------------------


def _warn_ignored(cfg: Any) -> None:
    defaults = {f.name: f for f in dataclasses.fields(type(cfg))} if dataclasses.is_dataclass(cfg) else {}
    changed = [name for name in VLLM_ONLY if name in defaults and getattr(cfg, name) != defaults[name].default]
    if changed:
        logger.warning("generator.backend = 'torch' ignores the vLLM-only options %s", ", ".join(changed))


def _default_device() -> torch.device:
    """The trainer's device: this process's current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _resolve_dtype(name: str, hf_config: dict) -> torch.dtype:
    """generator.dtype; 'auto' (an unresolved config) falls back to config.json's dtype."""
    if name == "auto":
        name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    if name not in DTYPES:
        raise UserError(f"generator.dtype={name!r} is not supported by the torch backend; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def _load_model(args: ModelArgs, path: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    model = build_model(args, device="meta", dtype=dtype)
    model.to_empty(device=device)
    load_hf_weights(model, path)
    return model.eval().requires_grad_(False)


def _stop_token_ids(path: str, hf_config: dict, tokenizer: Any) -> set[int]:
    """What vLLM stops on: the tokenizer's EOS plus the generation config's eos_token_id (from
    generation_config.json, else config.json; an int or a list)."""
    gen_file = Path(path) / "generation_config.json"
    gen_config = json.loads(gen_file.read_text()) if gen_file.is_file() else hf_config
    eos = gen_config.get("eos_token_id")
    ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _request_rng(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
