"""The value model: built from a policy directory (head initialized from the seed, lm_head ignored),
saved with the policy in a checkpoint (exact resume), exported by `rlx export --critic` as an HF
`Qwen3ForTokenClassification` that transformers loads with the same values, and loaded back as
`critic.path` (head included); a checkpoint without a critic is a clear error for a critic run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlx.checkpoint import Checkpointer, export_main
from rlx.errors import CheckpointError, UserError
from rlx.models import from_pretrained, read_hf_config
from rlx.models.tiny import make_tiny
from rlx.models.value import ValueModel, init_value_head, load_value_weights, value_model_args
from rlx.trainer.train_step import build_lr_scheduler, build_optimizer, make_generator

OPTIM = SimpleNamespace(lr=1e-2, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, lr_schedule="cosine", warmup_steps=1,
                        min_lr_ratio=0.1)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("m"), "qwen3", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=32, intermediate_size=64, vocab_size=320, tie=True)  # fmt: skip


def value_model(path: Path, seed: int = 0) -> tuple[ValueModel, bool]:
    model = ValueModel(value_model_args(read_hf_config(path)), device="meta")
    model.to_empty(device="cpu")
    return model, load_value_weights(model, path, seed=seed)


def test_built_from_a_tied_policy(model_dir):
    critic, loaded_head = value_model(model_dir, seed=5)
    policy = from_pretrained(model_dir)
    assert not loaded_head and not critic.args.tie_word_embeddings
    assert "lm_head.weight" not in critic.state_dict()
    for name, p in policy.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(critic.state_dict()[name], p), name
    head = init_value_head(32, seed=5)
    assert torch.equal(critic.score.weight, head["score.weight"]) and torch.equal(critic.score.bias, torch.zeros(1))
    assert not torch.equal(value_model(model_dir, seed=6)[0].score.weight, critic.score.weight)
    ids = torch.randint(0, 320, (2, 9), generator=make_generator(1))
    values = critic(ids)
    hidden = policy(ids, return_hidden=True)
    torch.testing.assert_close(values, (hidden @ head["score.weight"].T)[..., 0])


def test_checkpoint_resume_and_export_to_transformers(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = SimpleNamespace(enable=True, interval=1, keep_last=0, async_save=False, dir=str(tmp_path / "ckpt"),
                          resume="auto", init_from="")  # fmt: skip
    policy = from_pretrained(model_dir)
    critic, _ = value_model(model_dir)
    opts = [build_optimizer(m, OPTIM) for m in (policy, critic)]
    scheds = [build_lr_scheduler(o, OPTIM, total_steps=5) for o in opts]
    ids = torch.randint(0, 320, (2, 12), generator=make_generator(2))
    for _ in range(2):  # train the critic towards 1.0 so that the saved state is not the initial one
        (critic(ids) - 1.0).square().mean().backward()
        opts[1].step()
        opts[1].zero_grad()
        scheds[1].step()
    ckpt = Checkpointer(cfg, model=policy, optimizer=opts[0], scheduler=scheds[0], hf_dir=model_dir,
                        critic=(critic, opts[1], scheds[1]))  # fmt: skip
    ckpt.save(2)

    fresh, _ = value_model(model_dir)
    fresh_opt = build_optimizer(fresh, OPTIM)
    fresh_sched = build_lr_scheduler(fresh_opt, OPTIM, total_steps=5)
    fresh_policy = from_pretrained(model_dir)
    resumed = Checkpointer(cfg, model=fresh_policy, optimizer=build_optimizer(fresh_policy, OPTIM),
                           critic=(fresh, fresh_opt, fresh_sched))  # fmt: skip
    assert resumed.maybe_resume().step == 2
    for name, p in critic.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name
    assert fresh_sched.last_epoch == scheds[1].last_epoch and fresh_opt.state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()

    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "critic_hf"), "--critic"]) == 0
    config = json.loads((tmp_path / "critic_hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForTokenClassification"] and config["id2label"] == {"0": "LABEL_0"}
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "critic_hf", torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.eval()(ids).logits[..., 0]
        ours = critic(ids)
    assert (ours - theirs).abs().max().item() <= 1e-5
    # The export is a valid critic.path: the trained head comes back.
    again, loaded_head = value_model(tmp_path / "critic_hf")
    assert loaded_head and torch.equal(again.score.weight, critic.score.weight)
    # The policy export still works from the same checkpoint.
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "policy_hf")]) == 0


def test_a_checkpoint_without_a_critic(model_dir, tmp_path):
    cfg = SimpleNamespace(enable=True, interval=1, keep_last=0, async_save=False, dir=str(tmp_path / "ckpt"),
                          resume="auto", init_from="")  # fmt: skip
    policy = from_pretrained(model_dir)
    Checkpointer(cfg, model=policy, optimizer=build_optimizer(policy, OPTIM), hf_dir=model_dir).save(1)
    critic, _ = value_model(model_dir)
    opt = build_optimizer(critic, OPTIM)
    ckpt = Checkpointer(cfg, model=policy, critic=(critic, opt, build_lr_scheduler(opt, OPTIM, total_steps=3)))
    with pytest.raises(CheckpointError, match="has no critic"):
        ckpt.maybe_resume()
    with pytest.raises(UserError, match="has no critic"):
        export_main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--critic"])
