"""Chunked log-probs/entropy from hidden states equal the naive full-logits computation (values and grads)."""

import math

import pytest
import torch

from rlx.algorithms import LOGPROB_BACKENDS, entropy_from_logits, logprobs_from_hidden, logprobs_from_logits


def naive(hidden, weight, labels, temperature=1.0):
    logits = (hidden @ weight.t()).float() / temperature
    return logprobs_from_logits(logits, labels), entropy_from_logits(logits)


def test_logits_helpers_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert torch.allclose(logprobs_from_logits(logits, torch.tensor([1])), torch.tensor([math.log(0.75)]))
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))
    bf = logprobs_from_logits(logits.bfloat16(), torch.tensor([1]))
    assert bf.dtype == torch.bfloat16 and abs(bf.float().item() - math.log(0.75)) < 1e-2


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_naive_values_and_grads(chunk_size, temperature):
    g = torch.Generator().manual_seed(0)
    N, H, V = 50, 16, 97
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)

    lp, ent = naive(hidden, weight, labels, temperature)
    (lp * gl + ent * ge).sum().backward()
    ref = (lp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    lp2, ent2 = logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size, temperature=temperature,
                                     return_entropy=True)
    (lp2 * gl + ent2 * ge).sum().backward()
    for got, want in zip((lp2.detach(), ent2.detach(), hidden.grad, weight.grad), ref):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_logprobs_only_batched_shape_and_no_grad():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(33, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 33, (2, 5), generator=g)
    lp = logprobs_from_hidden(hidden, weight, labels, chunk_size=3)
    assert lp.shape == (2, 5)
    lp.sum().backward()
    ref_lp, _ = naive(hidden, weight, labels)
    hg, wg = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_lp.sum().backward()
    assert torch.allclose(lp, ref_lp, atol=1e-5)
    assert torch.allclose(hg, hidden.grad, atol=1e-5) and torch.allclose(wg, weight.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(logprobs_from_hidden(hidden, weight, labels), ref_lp, atol=1e-5)


def test_weight_without_grad_and_from_a_view():
    # e.g. a frozen reference model, or weight = dtensor.full_tensor() / to_local(): any plain tensor works
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 6, generator=g, requires_grad=True)
    weight = base[:, :]  # a non-leaf view; grads must flow back into `base`
    hidden = torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 40, (9,), generator=g)
    logprobs_from_hidden(hidden, weight, labels, chunk_size=4).sum().backward()
    ref = base.grad.clone()
    base.grad = None
    naive(hidden, base, labels)[0].sum().backward()
    assert torch.allclose(ref, base.grad, atol=1e-5)


def test_bf16_inputs_compute_in_fp32_per_chunk():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(50, 16, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (20,), generator=g)
    lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=6, return_entropy=True)
    assert lp.dtype == torch.float32
    ref_lp, ref_ent = naive(hidden, weight, labels)  # bf16 matmul, fp32 softmax
    assert torch.allclose(lp, ref_lp, atol=1e-4) and torch.allclose(ent, ref_ent, atol=1e-4)
    lp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    hg, wg = hidden.grad.float(), weight.grad.float()
    hidden.grad = weight.grad = None
    ref_lp.sum().backward()
    assert torch.allclose(hg, hidden.grad.float(), atol=3e-2, rtol=2e-2)
    assert torch.allclose(wg, weight.grad.float(), atol=3e-2, rtol=2e-2)


def test_errors_and_backend_hook():
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    assert "torch" in LOGPROB_BACKENDS
    with pytest.raises(ValueError, match="backend"):
        logprobs_from_hidden(h, w, y, backend="triton-missing")
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_hidden(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="hidden size"):
        logprobs_from_hidden(h, torch.randn(5, 3), y)
