"""rlx.kernels: every logprob backend's values and gradients (hidden and weight) equal the naive full-logits
log_softmax reference, at odd sizes, with temperature, entropy on and off, and masked tokens. The Triton
kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) here, compiled on CUDA when a GPU is present."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from rlx.algorithms.logprobs import LOGPROB_BACKENDS, logprobs_from_hidden, resolve_logprob_backend
from rlx.algorithms.logprobs import token_stats_from_hidden
from rlx.kernels import Stats, merge_slices
from rlx.kernels.vocab_parallel import local_labels

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
FUSED = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    # Without CUDA the Triton kernels run in the interpreter; rlx.kernels reads the flag at launch.
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_case(n, h, v, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0], labels[-1] = 0, v - 1  # both ends of the vocabulary (first and last tile)
    return hidden, weight, labels, g


def naive(hidden, weight, labels, temperature):
    logp = torch.log_softmax((hidden @ weight.t()).float() / temperature, dim=-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def values_and_grads(fn, hidden, weight, g_lp, g_ent):
    hidden.grad = weight.grad = None
    lp, ent = fn()
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    loss.backward()
    return lp.detach(), (ent.detach() if g_ent is not None else None), hidden.grad.clone(), weight.grad.clone()


# (N, H, V, temperature, entropy): 1 token; N, H and V not multiples of any tile (16 / 32 / 64 here);
# temperature below and above 1; entropy on and off.
CASES = [(1, 16, 97, 1.0, True), (37, 24, 300, 0.7, True), (37, 24, 300, 1.3, False), (20, 48, 65, 1.0, False)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n,h,v,temperature,with_entropy", CASES)
def test_backend_matches_naive_values_and_grads_fp32(backend, n, h, v, temperature, with_entropy):
    hidden, weight, labels, g = make_case(n, h, v)
    # Masked tokens (a response mask): zero upstream gradient; they must not leak into dh or dW.
    mask = (torch.rand(n, generator=g) > 0.3).float()
    mask[0] = 1.0
    g_lp = torch.randn(n, generator=g) * mask
    g_ent = torch.randn(n, generator=g) * mask if with_entropy else None
    want = values_and_grads(lambda: naive(hidden, weight, labels, temperature), hidden, weight, g_lp, g_ent)

    def run():
        out = logprobs_from_hidden(hidden, weight, labels, chunk_size=8, temperature=temperature,
                                   return_entropy=with_entropy, backend=backend)  # fmt: skip
        return out if with_entropy else (out, None)

    got = values_and_grads(run, hidden, weight, g_lp, g_ent)
    for name, a, b in zip(("logprobs", "entropy", "d_hidden", "d_weight"), got, want):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert (got[2][mask == 0] == 0).all(), "a masked token got a hidden gradient"


@pytest.mark.parametrize("backend", FUSED)
def test_backend_bf16_within_stated_bound(backend):
    """bf16 hidden/weight, against an fp32 reference on the same bf16 values. The matmul runs in bf16
    (torch: bf16-rounded logits, like the naive bf16 path; Triton: fp32 accumulation), softmax math in fp32.
    Stated bound, with logits |z| up to ~22 here: logprob and entropy within 0.06 (bf16 rounds z by up to
    2^-8 |z|); hidden and weight gradients within 2% of their largest entry, returned in bf16. Measured
    over 5 seeds: torch 0.047 / 1.1%, Triton 4e-6 / 0.6%, naive bf16 logits 0.037 / 0.8%."""
    hidden, weight, labels, g = make_case(33, 32, 200, dtype=torch.bfloat16)
    g_lp, g_ent = torch.randn(33, generator=g), torch.randn(33, generator=g)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = values_and_grads(lambda: naive(h32, w32, labels, 0.8), h32, w32, g_lp, g_ent)
    got = values_and_grads(lambda: logprobs_from_hidden(hidden, weight, labels, chunk_size=16, temperature=0.8,
                                                        return_entropy=True, backend=backend),
                           hidden, weight, g_lp, g_ent)  # fmt: skip
    assert got[0].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], atol=0.06, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=0.06, rtol=0)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a.float(), b, atol=0.02 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", ["naive", *FUSED])
def test_token_stats_match_naive(backend):
    hidden, weight, _, _ = make_case(19, 24, 131, seed=4)
    max_prob, entropy = token_stats_from_hidden(hidden, weight, chunk_size=5, temperature=1.3, backend=backend)
    p = torch.softmax((hidden @ weight.t()).detach() / 1.3, dim=-1)
    torch.testing.assert_close(max_prob, p.max(-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", FUSED)
def test_vocabulary_slices_merge_exactly(impl):
    """What TP ranks (and the Triton kernel's vocabulary runs) do: statistics of uneven vocabulary slices,
    combined, equal those of the whole vocabulary; labels outside a slice contribute nothing there."""
    module = pytest.importorskip(f"rlx.kernels.{impl}_impl")
    hidden, weight, labels, _ = make_case(21, 16, 150, seed=2)
    hidden, weight = hidden.detach(), weight.detach()
    kw = dict(temperature=0.9, chunk_size=6, with_entropy=True)
    whole = module.forward_stats(hidden, weight, labels, **kw)
    bounds = [0, 64, 65, 150]  # a 1-row slice among them
    parts = [module.forward_stats(hidden, weight[a:b], local_labels(labels, a, b - a), **kw)
             for a, b in zip(bounds, bounds[1:])]  # fmt: skip
    merged = merge_slices(Stats(*(torch.stack(x) for x in zip(*parts))))
    for a, b in zip(merged, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_vocabulary_runs_equal_one_run():
    from rlx.kernels import triton_impl

    hidden, weight, labels, _ = make_case(18, 16, 333, seed=3)
    kw = dict(temperature=1.0, chunk_size=8, with_entropy=True)
    one = triton_impl.forward_stats(hidden.detach(), weight.detach(), labels, splits=1, **kw)
    runs = triton_impl.forward_stats(hidden.detach(), weight.detach(), labels, splits=3, **kw)
    for a, b in zip(runs, one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_interpreter_after_an_earlier_triton_import():
    """vLLM imports triton before any test can set TRITON_INTERPRET=1; the kernels must still interpret."""
    code = (
        "import os, torch, triton\n"  # imported without the flag, as vLLM does
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from rlx.algorithms.logprobs import logprobs_from_hidden\n"
        "h, w = torch.randn(5, 16), torch.randn(70, 16)\n"
        "y = torch.randint(0, 70, (5,))\n"
        "ref = torch.log_softmax(h @ w.t(), -1).gather(-1, y[:, None]).squeeze(-1)\n"
        "got = logprobs_from_hidden(h, w, y, backend='triton')\n"
        "assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_backend_names_and_auto_choice(monkeypatch):
    assert set(LOGPROB_BACKENDS) == {"naive", "torch", "triton"}
    assert resolve_logprob_backend("auto", "cpu") == "torch"
    assert resolve_logprob_backend("triton", "cpu") == "triton"
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown logprob backend 'fused'; valid: auto, naive, torch, triton"):
        logprobs_from_hidden(h, w, y, backend="fused")
    with pytest.raises(ValueError, match="valid: auto"):
        token_stats_from_hidden(h, w, backend="Torch")
    if HAS_TRITON:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
            logprobs_from_hidden(h, w, y, backend="triton")


def test_no_tokens_and_no_grad_paths():
    hidden, weight, labels, _ = make_case(4, 8, 30)
    empty = logprobs_from_hidden(hidden[:0], weight, labels[:0], return_entropy=True)
    assert empty[0].shape == empty[1].shape == (0,)
    with torch.no_grad():
        lp = logprobs_from_hidden(hidden, weight, labels, chunk_size=3, temperature=0.5)
    torch.testing.assert_close(lp, naive(hidden, weight, labels, 0.5)[0].detach(), atol=1e-5, rtol=1e-5)
    # Entropy only in the loss (no logprob gradient) and a frozen weight (reference model).
    frozen = weight.detach()
    _, ent = logprobs_from_hidden(hidden, frozen, labels, return_entropy=True)
    ent.sum().backward()
    dh = hidden.grad.clone()
    hidden.grad = None
    naive(hidden, frozen, labels, 1.0)[1].sum().backward()
    torch.testing.assert_close(dh, hidden.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_triton_compiled_on_cuda_matches_naive(dtype, atol):
    """The compiled kernels at a realistic vocabulary (not a multiple of any tile)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 257, 256, 32003
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (0.05 * torch.randn(v, h, device="cuda", generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    g_lp, g_ent = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = values_and_grads(lambda: naive(h32, w32, labels, 0.7), h32, w32, g_lp, g_ent)
    got = values_and_grads(lambda: logprobs_from_hidden(hidden, weight, labels, chunk_size=64, temperature=0.7,
                                                        return_entropy=True, backend="triton"),
                           hidden, weight, g_lp, g_ent)  # fmt: skip
    grad_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=0)
    torch.testing.assert_close(got[2].float(), want[2], atol=grad_tol, rtol=grad_tol)
    torch.testing.assert_close(got[3].float(), want[3], atol=grad_tol, rtol=grad_tol)
