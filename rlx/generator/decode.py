"""The decoding pieces of the torch generator backend (torch_backend.py): the preallocated KV cache,
decoder layers with fused q/k/v and gate/up matmuls (views of the layer's own Parameters, so weight
updates land), and single-query attention over the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlx.models.transformer import Transformer, apply_rope


@dataclass
class KVCache:
    """Per layer, keys and values [B, kv_heads, slots, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, model: Transformer, B: int, slots: int, device, dtype) -> KVCache:
        a = model.args
        shape = (B, a.num_key_value_heads, slots, a.head_dim)
        new = lambda: [torch.empty(shape, device=device, dtype=dtype) for _ in range(a.num_hidden_layers)]  # noqa: E731
        return cls(new(), new())

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


@dataclass
class FusedLayer:
    """One decoder layer's q/k/v and gate/up weights as single matrices, one matmul each.

    The layer's own q/k/v and gate/up Parameters are made views into these (`fuse_layer`), so a
    weight update copied into them (reload_weights) updates the fused matrices too."""

    qkv_weight: torch.Tensor  # [q + k + v, H]
    qkv_bias: torch.Tensor | None
    qkv_sizes: list[int]
    gate_up_weight: torch.Tensor  # [2 * I, H]
    down_proj: torch.nn.Module

    def qkv(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projected, normed and rotated q, k, v [B, heads, T, head_dim] (as Attention.forward)."""
        attn, (B, T, _) = layer.self_attn, x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).split(self.qkv_sizes, dim=-1)
        q, k, v = (t.view(B, T, -1, attn.head_dim) for t in qkv)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse_layer(layer) -> FusedLayer:
    """Concatenate a layer's q/k/v and gate/up weights and point its Parameters into the result."""
    attn, mlp = layer.self_attn, layer.mlp

    def fuse(modules, name):
        parts = [getattr(m, name) for m in modules]
        if parts[0] is None:
            return None
        fused = torch.cat([p.detach() for p in parts])
        start = 0
        for m, p in zip(modules, parts):
            setattr(m, name, torch.nn.Parameter(fused[start : start + p.shape[0]], requires_grad=False))
            start += p.shape[0]
        return fused

    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    return FusedLayer(
        qkv_weight=fuse(projections, "weight"),
        qkv_bias=fuse(projections, "bias"),
        qkv_sizes=[m.out_features for m in projections],
        gate_up_weight=fuse((mlp.gate_proj, mlp.up_proj), "weight"),
        down_proj=mlp.down_proj,
    )


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """One query per row against its cached keys: q [B, H, 1, D], k/v [B, KV, L, D] (GQA: query
    head h reads KV head h // (H / KV)), key_bias [B, L] added to the scores -> [B, H, D].

    Plain matmuls: SDPA's CPU kernel is several times slower for a single query with a mask."""
    B, H, _, D = q.shape
    KV = k.shape[1]
    q = q.reshape(B, KV, H // KV, D)  # query heads grouped by the KV head they read
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(D**-0.5)  # [B, KV, G, L]
    scores = scores.float().add_(key_bias[:, None, None, :]).softmax(dim=-1).to(v.dtype)
    return torch.matmul(scores, v).reshape(B, H, D)
