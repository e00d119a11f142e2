"""The decoder-only transformer (Llama 3.x, Qwen2, Qwen3) as plain nn.Modules with HF names.

Parallelism is applied from outside (TP, FSDP, compile); attention supports packed sequences.
"""

from __future__ import annotations

import math

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from rlx.models.args import ModelArgs

INIT_STD = 0.02


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, exactly as HF does."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not _is_dtensor(x, self.weight) and not torch.compiler.is_compiling():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return _rms_norm(x, self.weight, self.eps)[0]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalized x, the fp32 1 / rms [..., 1]): normalized in fp32, cast back before the weight."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """`_rms_norm` (the same forward numbers) with a hand-written backward: autograd's backward of those
    elementwise ops makes about twice as many passes over the activations (measured fwd+bwd on CPU,
    [4448, 512] fp32: 11.5 ms autograd, 7.8 ms this). dx = rstd * (g - xhat * mean(g * xhat)),
    g = grad * weight, in fp32; dweight = sum over tokens of grad * xhat in the input's dtype. Plain
    tensors only (DTensor inputs under TP take the autograd path: their weight gradients are partial
    sums to reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()
            grad_x = (g - xhat * (g * xhat).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _is_dtensor(*tensors: torch.Tensor) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with Llama-3 scaling when configured.

    Computed on the fly (it is tiny), so no buffer can be left uninitialized by `to_empty`."""
    dim = args.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponent)
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band in
    # between is interpolated smoothly (Llama 3.1 paper; same expressions as transformers).
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, 1, head_dim] (fp32) for positions [B, T]."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, D] by the half-split convention HF checkpoints use."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """GQA self-attention. Head counts are read from projection outputs at runtime, so the
    module works unchanged after TP shards q/k/v column-wise and o_proj row-wise."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        h, d = args.hidden_size, args.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(h, args.num_attention_heads * d, bias=args.attention_bias, **kw)
        self.k_proj = nn.Linear(h, args.num_key_value_heads * d, bias=args.attention_bias, **kw)
        self.v_proj = nn.Linear(h, args.num_key_value_heads * d, bias=args.attention_bias, **kw)
        self.o_proj = nn.Linear(args.num_attention_heads * d, h, bias=args.o_proj_bias, **kw)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(d, args.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, **kw)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, **kw)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.self_attn = Attention(args, device, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.mlp = MLP(args, device, dtype)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """The `model.` prefix of HF names: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(args, device, dtype) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)


class Transformer(nn.Module):
    """Causal LM. `forward` returns logits [B, T, V], or final-normed hidden states [B, T, H]
    with `return_hidden=True`; the output projection is `output_weight()` (= lm_head.weight,
    the same Parameter as model.embed_tokens.weight when embeddings are tied)."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args, device, dtype)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device=device, dtype=dtype)
        if args.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head.weight the embedding Parameter (no-op for untied models)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty, then re-tie: moving off the meta device makes new Parameters,
        which silently unties lm_head from the embedding."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def output_weight(self) -> torch.Tensor:
        """The [V, H] output projection, tied or not (the loss stage projects hidden states)."""
        return self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        return_hidden: bool = False,
        output_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """input_ids [B, T]; position_ids [B, T] (restarting at 0 where a packed sequence
        starts) or None for 0..T-1; cu_seqlens [n+1] cumulative lengths of one packed row (B=1).
        Tokens of different packed sequences never attend to each other.

        Returns logits [B, T, V]; the final-normed hidden states [B, T, H] with return_hidden;
        or `output_fn(hidden, output_weight)` when given. output_fn runs inside forward so that
        parallel wrappers present the output weight as in a normal forward (FSDP has gathered
        it; under TP it is a DTensor sharded on the vocabulary): the loss stage computes
        logprobs chunk by chunk from it without materializing [T, V] logits."""
        B, T = input_ids.shape
        position_ids, mask = packing_mask(B, T, input_ids.device, position_ids, cu_seqlens)
        cos, sin = rope_cos_sin(rope_inv_freq(self.args, input_ids.device), position_ids)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        x = self.model.norm(x)
        if output_fn is not None:
            return output_fn(x, self.lm_head.weight)
        return x if return_hidden else self.lm_head(x)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialize every parameter in place (e.g. after `to_empty`): normal(0, 0.02) for
        linears and embeddings, ones for norms, zeros for biases. `seed` makes it reproducible
        without touching the global RNG."""
        device = next(iter(self.parameters())).device
        assert device.type != "meta", "call model.to_empty(device=...) before init_weights"
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        self.tie_weights()
        for name, p in self.named_parameters():  # tied weights appear once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, INIT_STD, generator=gen)

    def init_rope(self) -> None:
        """Nothing to do: RoPE tables are computed on the fly from `args` (no buffers), so a
        `to_empty` model is correct as soon as its parameters are loaded. Kept for callers
        that follow the meta-init recipe."""


def packing_mask(
    B: int,
    T: int,
    device: torch.device,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position_ids [B, T], attention mask [B, 1, T, T] bool or None for plain causal).

    Document boundaries come from cu_seqlens, else from position_ids restarting at 0 within a
    row. The mask is causal and block-diagonal over documents (True = may attend)."""
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(B, T)
    if cu_seqlens is not None:
        doc_ids = _doc_ids_from_cu_seqlens(cu_seqlens.to(device), B, T)
        if position_ids is None:
            starts = cu_seqlens.to(device)[doc_ids]
            position_ids = (torch.arange(T, device=device) - starts).unsqueeze(0)
        return position_ids, _block_causal(doc_ids.unsqueeze(0), T)
    if position_ids is None:
        return torch.arange(T, device=device).unsqueeze(0).expand(B, T), None
    if position_ids.shape != (B, T):
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {(B, T)}")
    restarts = position_ids[:, 1:] == 0
    # One host sync: an unpacked batch keeps SDPA's mask-free causal (flash) path.
    if not bool(restarts.any()):
        return position_ids, None
    doc_ids = (position_ids == 0).cumsum(dim=-1)
    return position_ids, _block_causal(doc_ids, T)


def _doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    if B != 1:
        raise ValueError(f"cu_seqlens describes one packed row, but the batch has {B} rows")
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}; got {cu_seqlens.tolist()}")
    # Token t belongs to document i where cu[i] <= t < cu[i+1].
    return torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=cu_seqlens.device), right=True)


def _block_causal(doc_ids: torch.Tensor, T: int) -> torch.Tensor:
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal).unsqueeze(1)


def build_model(args: ModelArgs, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """A `Transformer` for `args`. On torch.device("meta") nothing is allocated; follow with
    `to_empty(device=...)`, then `init_weights()` or loading a checkpoint (hf_io)."""
    return Transformer(args, device=device, dtype=dtype)
