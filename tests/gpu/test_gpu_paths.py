"""GPU-only paths (skipped without CUDA): vLLM sleep mode around a weight push, bf16 FSDP mixed
precision, and the chunked logprobs on CUDA. Their CPU analogues are tested in tests/unit and
tests/integration; run these when a GPU machine is available (`pytest tests/gpu`)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_chunked_logprobs_on_cuda_match_naive_bf16():
    from rlx.algorithms import logprobs_from_hidden

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(512, 256, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4096, 256, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 4096, (512,), device="cuda", generator=g)
    lp = logprobs_from_hidden(hidden, weight, labels, chunk_size=128)
    ref = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, ref, atol=2e-2, rtol=0)
    lp.sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_sleep_wake_and_push_keep_generation_exact(tmp_path):
    """Sleep (level 1) frees the engine while the trainer works; after wake-up and a push of new
    weights, greedy completions equal the trainer model's argmax decoding."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from rlx.config import GeneratorConfig
    from rlx.generator import build_generator
    from rlx.models import from_pretrained
    from rlx.models.tiny import make_tiny
    from rlx.types import GenerationRequest
    from rlx.weight_sync import WeightSync

    path = make_tiny(tmp_path / "tiny", num_layers=2, seed=1)
    cfg = GeneratorConfig(dtype="float32", max_tokens=16, enable_sleep_mode=True, gpu_memory_utilization=0.3)
    generator = build_generator(cfg, str(path), max_prompt_length=64)
    model = from_pretrained(path, device="cuda")
    try:
        free_awake = torch.cuda.mem_get_info()[0]
        generator.sleep()
        assert generator.is_sleeping and torch.cuda.mem_get_info()[0] > free_awake
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        generator.wake_up()
        WeightSync(generator).push(model, version=1)
        prompts = [[1, 5, 9, 12 + i] for i in range(4)]
        outs = generator.generate([GenerationRequest(p, n=1, temperature=0.0) for p in prompts])
        for prompt, (completion,) in zip(prompts, outs):
            ids = torch.tensor([prompt], device="cuda")
            for tok in completion.token_ids:
                assert int(model(ids)[0, -1].argmax()) == tok
                ids = torch.cat([ids, torch.tensor([[tok]], device="cuda")], dim=1)
    finally:
        generator.shutdown()


def test_bf16_fsdp_step_tracks_fp32(tmp_path):
    """One process, FSDP with bf16 params and fp32 reduction: the loss after a step is close to the
    fp32 trainer's (mixed precision works end to end on NCCL)."""
    from rlx import distributed
    from rlx.models.tiny import make_tiny
    from rlx.parallel import ParallelDims, build_parallel_model
    from rlx.trainer.train_step import build_lr_scheduler, build_optimizer, pack_micro_batches, train_step

    device = distributed.init_distributed("nccl")
    path = make_tiny(tmp_path / "tiny", num_layers=2, seed=1)
    docs = [(list(range(1, 40)), [0] * 5 + [1] * 34)] * 4
    optim_cfg = SimpleNamespace(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, lr_schedule="constant",
                                warmup_steps=0, min_lr_ratio=0.0)  # fmt: skip
    losses = {}
    for param_dtype in ("float32", "bfloat16"):
        dims = ParallelDims(1, 1, 1, 1)
        dims.build_mesh("cuda")
        par = SimpleNamespace(activation_checkpoint="none", ac_every=1, compile=False, reshard_after_forward=True,
                              param_dtype=param_dtype, reduce_dtype="float32")  # fmt: skip
        model = build_parallel_model(path, dims, par, device=device)
        opt = build_optimizer(model, optim_cfg)
        sched = build_lr_scheduler(opt, optim_cfg, total_steps=2)
        mbs = pack_micro_batches(docs, 1024)
        losses[param_dtype] = [train_step(model, opt, sched, mbs, device=device)["loss"] for _ in range(2)]
    assert losses["bfloat16"][1] == pytest.approx(losses["float32"][1], rel=5e-2)
    distributed.teardown_distributed()
