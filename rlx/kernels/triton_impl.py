"""Triton implementation of the fused logprob/entropy statistics (CUDA; the CPU interpreter under
TRITON_INTERPRET=1 runs the same kernels in tests).

Forward: each program owns a block of tokens and a run of vocabulary tiles; it computes each logit
tile with tl.dot (in fp32 registers, never stored) and keeps an online logsumexp, max, target logit
and E_p[z]. Programs over different vocabulary runs are merged like tensor-parallel shards
(`merge_slices`), which keeps the GPU busy when there are few tokens. Backward recomputes every tile,
writes the softmax gradient of one token chunk in the weight's dtype, and leaves the two gradient
GEMMs (dh = g W, dW = g^T h) to cuBLAS.

The kernels call only Triton builtins (tl.full, tl.reduce with the standard combine functions, not the
jit-wrapped tl.zeros / tl.sum / tl.max / tl.cdiv): those wrappers are jitted when triton is imported, so
they break the interpreter whenever triton was imported before TRITON_INTERPRET=1 was set (e.g. by vLLM).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from rlx.kernels.vocab_parallel import Stats, merge_slices


def _fwd_kernel(h_ptr, w_ptr, y_ptr, out_ptr, N, V, H, stride_h, stride_w, tiles_per_split, inv_temp,
                WITH_ENTROPY: tl.constexpr, FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.full([BLOCK_N], 0.0, tl.float32)
    t = tl.full([BLOCK_N], 0.0, tl.float32)
    target = tl.full([BLOCK_N], 0.0, tl.float32)
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, (V + BLOCK_V - 1) // BLOCK_V)
    for tile in range(first, last):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        acc = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
        for k in range(0, H, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            a = tl.load(h_ptr + offs_n[:, None].to(tl.int64) * stride_h + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            b = tl.load(w_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_k[:, None],
                        mask=mask_v[None, :] & mask_k[:, None], other=0.0)  # fmt: skip
            if FP32:  # exact fp32 products (no TF32), so fp32 results match torch within 1e-5
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        z = tl.where(mask_v[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(z, 1, tl.standard._elementwise_max))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        if WITH_ENTROPY:
            t = t * alpha + tl.reduce(p * tl.where(mask_v[None, :], z, 0.0), 1, tl.standard._sum_combine)
        target += tl.reduce(tl.where(offs_v[None, :] == y[:, None], z, 0.0), 1, tl.standard._sum_combine)
        m = m_new
    row = pid_s * N + offs_n
    plane = tl.num_programs(1) * N
    tl.store(out_ptr + row, m, mask=mask_n)
    tl.store(out_ptr + plane + row, m + tl.log(s), mask=mask_n)
    tl.store(out_ptr + 2 * plane + row, target, mask=mask_n)
    tl.store(out_ptr + 3 * plane + row, t / s, mask=mask_n)


def _grad_logits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, gz_ptr, N, V, H, stride_h,
                        stride_w, stride_gz, inv_temp, WITH_ENTROPY: tl.constexpr, FP32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n, mask_v = offs_n < N, offs_v < V
    acc = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
    for k in range(0, H, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        a = tl.load(h_ptr + offs_n[:, None].to(tl.int64) * stride_h + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        b = tl.load(w_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_k[:, None],
                    mask=mask_v[None, :] & mask_k[:, None], other=0.0)  # fmt: skip
        if FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    z = acc * inv_temp
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(glp_ptr + offs_n, mask=mask_n, other=0.0)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1)
    p = tl.exp(z - lse[:, None])
    # d lp/dz = onehot(y) - p;  d H/dz = -p (z - E_p[z]);  both times 1/tau for z = h W^T / tau.
    gz = tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY:
        ge = tl.load(gent_ptr + offs_n, mask=mask_n, other=0.0)
        ez = tl.load(ez_ptr + offs_n, mask=mask_n, other=0.0)
        gz -= ge[:, None] * p * (z - ez[:, None])
    gz = gz * inv_temp
    ptrs = gz_ptr + offs_n[:, None].to(tl.int64) * stride_gz + offs_v[None, :]
    tl.store(ptrs, gz.to(gz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


@functools.cache
def _jit(name: str, interpret: bool):
    # triton.jit decides at decoration time whether to interpret; jitting lazily per mode lets one
    # process (the test suite) use TRITON_INTERPRET=1 whatever was imported before.
    return triton.jit({"fwd": _fwd_kernel, "grad": _grad_logits_kernel}[name])


def _interpreting() -> bool:
    # Read like triton does (and at each launch): the env var works across triton 3.x versions.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel(name: str, device: torch.device):
    interpret = _interpreting()
    if device.type != "cuda" and not interpret:
        raise ValueError(f"logprob backend 'triton' needs CUDA tensors (got {device.type}); set "
                         "TRITON_INTERPRET=1 to run the kernels in the CPU interpreter (slow, for tests), "
                         "or use logprob_backend = 'torch'")  # fmt: skip
    return _jit(name, interpret)


def _fp32_dot(weight: torch.Tensor) -> bool:
    # fp32 weights get IEEE fp32 products. So do bf16 ones in the interpreter, whose bf16 tl.dot is wrong:
    # bf16 products are exact in fp32, so that is what the GPU's bf16 MMA with fp32 accumulation computes.
    return weight.dtype == torch.float32 or _interpreting()


def _blocks(dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K): tl.dot needs powers of two >= 16. fp32 tiles are smaller to fit
    the same register/shared-memory budget; the interpreter prefers few, large blocks."""
    if device.type != "cuda":
        return 16, 64, 32
    return (64, 128, 64) if dtype != torch.float32 else (64, 64, 32)


def _num_splits(token_blocks: int, tiles: int, device: torch.device) -> int:
    """Vocabulary runs per token block: enough programs to fill the GPU (about 4 per SM)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(4 * sms, token_blocks)))


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                  chunk_size: int, with_entropy: bool, splits: int | None = None) -> Stats:  # fmt: skip
    """Same contract as `torch_impl.forward_stats`; `chunk_size` is unused (nothing of size [N, V] exists)."""
    n, v, hd = hidden.shape[0], weight.shape[0], hidden.shape[1]
    if v == 0 or n == 0:
        out = torch.zeros(4, n, dtype=torch.float32, device=hidden.device)
        out[0:2] = float("-inf") if v == 0 else 0.0
        return Stats(*out)
    h, w, y = hidden.to(weight.dtype).contiguous(), weight.contiguous(), labels.contiguous()
    bn, bv, bk = _blocks(w.dtype, w.device)
    token_blocks, tiles = triton.cdiv(n, bn), triton.cdiv(v, bv)
    splits = min(splits or _num_splits(token_blocks, tiles, w.device), tiles)
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)  # no run left empty
    out = torch.empty(4, splits, n, dtype=torch.float32, device=h.device)
    _kernel("fwd", w.device)[(token_blocks, splits)](
        h, w, y, out, n, v, hd, h.stride(0), w.stride(0), per_split, 1.0 / temperature,
        WITH_ENTROPY=with_entropy, FP32=_fp32_dot(w), BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
    )  # fmt: skip
    stats = Stats(*out)
    return Stats(*(x[0] for x in stats)) if splits == 1 else merge_slices(stats)


def backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
             ez: torch.Tensor | None, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, *,
             temperature: float, chunk_size: int, need_hidden: bool, need_weight: bool):  # fmt: skip
    """Same contract as `torch_impl.backward`: fp32 (hidden grad or None, weight grad or None).
    Peak extra memory: one `[chunk_size, V]` gradient tile in the weight's dtype."""
    n, v, hd = hidden.shape[0], weight.shape[0], hidden.shape[1]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    if v == 0 or n == 0:
        return grad_hidden, grad_weight
    h, w, y = hidden.to(weight.dtype).contiguous(), weight.contiguous(), labels.contiguous()
    glp = grad_logprobs.float().contiguous()
    with_entropy = grad_entropy is not None
    gent = grad_entropy.float().contiguous() if with_entropy else glp
    ez = ez.contiguous() if with_entropy else glp
    bn, bv, bk = _blocks(w.dtype, w.device)
    kernel = _kernel("grad", w.device)
    buf = torch.empty(min(chunk_size, n), v, dtype=w.dtype, device=w.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        gz = buf[: end - start]
        kernel[(triton.cdiv(end - start, bn), triton.cdiv(v, bv))](
            h[start:], w, y[start:], lse[start:], ez[start:], glp[start:], gent[start:], gz, end - start, v, hd,
            h.stride(0), w.stride(0), gz.stride(0), 1.0 / temperature,
            WITH_ENTROPY=with_entropy, FP32=_fp32_dot(w), BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
        )  # fmt: skip
        if need_hidden:
            grad_hidden[start:end] = gz @ w
        if need_weight:
            if grad_weight.dtype == gz.dtype:
                grad_weight.addmm_(gz.t(), h[start:end])
            else:
                grad_weight += (gz.t() @ h[start:end]).float()
    return grad_hidden, grad_weight
