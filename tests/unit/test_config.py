"""rlx.config: loading, precedence, overrides, round trip, validation and CLI error messages."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from rlx.config import (
    AdaptiveSamplerConfig, Config, ConfigError, RolloutCorrectionConfig, help_config, load_config, parse_args,
    save_resolved,
)  # fmt: skip
from rlx.config.fields import field_docs, type_hints

REPO = Path(__file__).resolve().parents[2]

def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlx.cli", "config", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_cli_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("rlx: error:"), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ---------------------------------------------------------------------------------------------
# CLI: one test per error class, plus the dry run


def test_cli_dry_run_prints_resolved_toml(tmp_path):
    path = write(tmp_path, "[data]\ntrain_batch_size = 4\n")
    result = run_cli("--config", str(path), "--dry-run", "--loss.clip_ratio_high=0.28")
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["data"]["gen_batch_size"] == 4  # resolved: 0 means train_batch_size
    assert printed["loss"]["clip_ratio_high"] == 0.28


def test_cli_unknown_key_lists_valid_keys_and_closest(tmp_path):
    path = write(tmp_path, "[loss]\nclip_ratio_hgh = 0.3\n")
    assert_cli_error(run_cli("--config", str(path), "--dry-run"), str(path), "loss.clip_ratio_hgh",
                     "did you mean 'loss.clip_ratio_high'", "valid keys in [loss]", "kl_coef")  # fmt: skip


def test_cli_unknown_nested_key(tmp_path):
    path = write(tmp_path, "[sampler.adaptive]\nmaxn = 3\n")
    assert_cli_error(run_cli("--config", str(path)), "sampler.adaptive.maxn", "sampler.adaptive.max_n",
                     "valid keys in [sampler.adaptive]")  # fmt: skip


def test_cli_unknown_section_lists_sections(tmp_path):
    path = write(tmp_path, "[lose]\nkl_coef = 0.1\n")
    assert_cli_error(run_cli("--config", str(path)), str(path), "unknown section", "did you mean [loss]",
                     "valid sections: job, model")  # fmt: skip


def test_cli_wrong_type(tmp_path):
    path = write(tmp_path, '[generator]\nn = "eight"\n')
    assert_cli_error(run_cli("--config", str(path)), str(path), "generator.n", "expected integer",
                     "got string 'eight'")  # fmt: skip


def test_cli_out_of_range(tmp_path):
    path = write(tmp_path, "[loss]\nclip_ratio_c = 0.5\n")
    assert_cli_error(run_cli("--config", str(path)), str(path), "loss.clip_ratio_c", "must be > 1.0", "0.5")


def test_cli_invalid_choice_lists_choices(tmp_path):
    path = write(tmp_path, '[algorithm]\nadv_estimator = "ppo"\n')
    assert_cli_error(run_cli("--config", str(path)), "algorithm.adv_estimator", "invalid choice 'ppo'",
                     "grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, gae")  # fmt: skip


def test_cli_malformed_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, "[loss]\nkl_coef = 0.1\nclip_ratio_high 0.3\n")
    assert_cli_error(run_cli("--config", str(path)), str(path), "invalid TOML", "line 3")


def test_cli_missing_file(tmp_path):
    assert_cli_error(run_cli("--config", str(tmp_path / "nope.toml")), "config file not found", "nope.toml")


def test_cli_error_from_override_names_command_line(tmp_path):
    path = write(tmp_path, "[loss]\nkl_coef = 0.1\n")
    assert_cli_error(run_cli("--config", str(path), "--loss.ppo_epochs=0"), "command line: loss.ppo_epochs",
                     "must be >= 1")  # fmt: skip


def test_cli_unrecognized_argument():
    assert_cli_error(run_cli("--dryrun"), "unrecognized argument '--dryrun'", "--section.key=value")


def test_cli_rollout_correction_error(tmp_path):
    path = write(tmp_path, '[rollout_correction]\nrollout_rs = "token_k1,seq_max_k9"\nrollout_rs_threshold = 2.0\n')
    assert_cli_error(run_cli("--config", str(path)), str(path), "rollout_correction.rollout_rs", "seq_max_k9",
                     "seq_max_k2")  # fmt: skip


def test_cli_help_config():
    result = run_cli("--help-config")
    assert result.returncode == 0
    assert "[sampler.adaptive]" in result.stdout and "clip_ratio_c: float (> 1.0) = 3.0" in result.stdout


# ---------------------------------------------------------------------------------------------
# Loading: precedence, overrides, "none", unions


def test_defaults_are_valid_and_no_torch():
    Config().validate()
    code = "import sys, rlx.config; rlx.config.load_config(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_precedence_defaults_toml_cli(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 3e-6\nwarmup_steps = 5\n[generator]\nn = 4\n")
    cfg = load_config(path, ["--optim.lr=1e-5", "generator.temperature=0.7"])
    assert cfg.optim.lr == 1e-5  # CLI beats TOML
    assert cfg.optim.warmup_steps == 5  # TOML beats default
    assert cfg.generator.n == 4 and cfg.generator.temperature == 0.7
    assert cfg.optim.eps == 1e-8  # default


def test_override_value_parsing():
    cfg = load_config(overrides=[
        'generator.stop=["\\n", "</answer>"]', "rollout_correction.rollout_is=token", "loss.clip_ratio_high=0.28",
        "logging.wandb=true", "generator.enforce_eager=false", "job.name=123", "data.train_files=a.jsonl",
        "reward.kwargs={scale = 2, tag = \"x\"}", "optim.lr=1", "generator.top_k=-1",
    ])  # fmt: skip
    assert cfg.generator.stop == ["\n", "</answer>"]
    assert cfg.rollout_correction.rollout_is == "token"
    assert cfg.loss.clip_ratio_high == 0.28 and cfg.logging.wandb is True and cfg.generator.enforce_eager is False
    assert cfg.job.name == "123"  # a string field keeps the text even though it reads as an integer
    assert cfg.data.train_files == ["a.jsonl"]
    assert cfg.reward.kwargs == {"scale": 2, "tag": "x"}
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.generator.top_k == -1


def test_nested_overrides(tmp_path):
    path = write(tmp_path, '[sampler]\ntype = "adaptive"\n[sampler.adaptive]\nmax_n = 32\nmin_rollouts = 4\n')
    cfg = load_config(path, ["--sampler.adaptive.max_n=64"])
    assert cfg.sampler.adaptive == AdaptiveSamplerConfig(max_n=64, min_rollouts=4)
    cfg = load_config(path, ["--sampler.type=filtered", "--sampler.adaptive={}", "--sampler.filtered.metric=score"])
    assert cfg.sampler.filtered.metric == "score"
    # Options of a sampler that is not selected would do nothing: an error naming the selected one.
    with pytest.raises(ConfigError, match="sampler.filtered.metric: is set, but sampler.type = 'adaptive'"):
        load_config(path, ["--sampler.filtered.metric=score"])
    cfg = load_config(path, ["--sampler.adaptive={max_n = 8, rollouts_per_batch = 4}"])  # a whole table
    assert cfg.sampler.adaptive == AdaptiveSamplerConfig(max_n=8, rollouts_per_batch=4)  # replaces the TOML table
    with pytest.raises(ConfigError, match="exp.toml: sampler.adaptive.min_rollouts: 4 exceeds max_n=3"):
        load_config(path, ["--sampler.adaptive.max_n=3"])


def test_parse_args_space_separated_and_resume(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 3\n")
    cfg, args = parse_args(["--config", str(path), "--train.steps", "7", "--resume"])
    assert cfg.train.steps == 7 and cfg.checkpoint.resume == "auto" and not args.dry_run
    cfg, _ = parse_args(["--resume", "runs/x/checkpoints/step_5"])
    assert cfg.checkpoint.resume == "runs/x/checkpoints/step_5"


def test_none_disables_optional_fields(tmp_path):
    path = write(tmp_path, '[rollout_correction]\nrollout_is = "none"\nrollout_rs = "null"\n'
                           'rollout_token_veto_threshold = "none"\n[loss]\nloss_scale_factor = "None"\n')  # fmt: skip
    cfg = load_config(path)
    rc = cfg.rollout_correction
    assert rc.rollout_is is None and rc.rollout_rs is None and rc.rollout_token_veto_threshold is None
    assert cfg.loss.loss_scale_factor is None
    # A non-optional string keeps "none" as a value: checkpoint.resume = "none" means start fresh.
    assert load_config(overrides=["checkpoint.resume=none"]).checkpoint.resume == "none"


def test_union_typed_thresholds(tmp_path):
    rc = load_config(overrides=["rollout_correction.rollout_is_threshold=3"]).rollout_correction
    assert rc.rollout_is_threshold == 3.0 and isinstance(rc.rollout_is_threshold, float)
    # "lo_hi" stays a string; TOML alone would read 0.5_2 as the number 0.52.
    rc = load_config(overrides=["rollout_correction.rollout_is_threshold=0.5_2"]).rollout_correction
    assert rc.rollout_is_threshold == "0.5_2"
    rc = load_config(overrides=["rollout_correction.rollout_rs=token_k1,seq_max_k2",
                                "rollout_correction.rollout_rs_threshold=0.6_1.6,2.5"]).rollout_correction  # fmt: skip
    assert rc.rollout_rs_threshold == "0.6_1.6,2.5"
    path = write(tmp_path, "[rollout_correction]\nrollout_is_threshold = true\n")
    with pytest.raises(ConfigError, match="rollout_is_threshold: expected float or string, got boolean True"):
        load_config(path)
    with pytest.raises(ConfigError, match="command line: rollout_correction.rollout_is_threshold: .*not a number"):
        load_config(overrides=["rollout_correction.rollout_is_threshold=true"])


# ---------------------------------------------------------------------------------------------
# Rollout correction validation and the bypass warning


@pytest.mark.parametrize("settings, fragments", [
    ({"rollout_rs": "token_k1"}, ["rollout_correction.rollout_rs_threshold", "required"]),
    ({"rollout_rs": "token_k1,seq_max_k2", "rollout_rs_threshold": "0.6_1.6,2.5,3"}, ["3 entries", "exactly 2"]),
    ({"rollout_rs": "token_k7", "rollout_rs_threshold": 2.0}, ["rollout_correction.rollout_rs", "token_k1"]),
    ({"rollout_is_threshold": "2_0.5"}, ["rollout_correction.rollout_is_threshold", "lower bound"]),
    ({"rollout_is": "tokens"}, ["invalid choice 'tokens'", "token, sequence"]),
])  # fmt: skip
def test_rollout_correction_errors(settings, fragments):
    with pytest.raises(ConfigError) as info:
        Config(rollout_correction=RolloutCorrectionConfig(**settings)).validate()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_rollout_correction_valid_combinations():
    for settings in (
        {"rollout_is": "token", "rollout_is_threshold": 2.0, "bypass_mode": True, "loss_type": "reinforce"},
        {"rollout_is": "sequence", "rollout_rs": "token_k1,seq_max_k2", "rollout_rs_threshold": "0.6_1.6,2.5"},
        {"rollout_rs": "geometric", "rollout_rs_threshold": 1.0002, "rollout_rs_threshold_lower": 0.9998,
         "rollout_token_veto_threshold": 1e-4},
    ):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Config(rollout_correction=RolloutCorrectionConfig(**settings)).validate()


def test_bypass_with_several_ppo_epochs_warns(tmp_path):
    path = write(tmp_path, "[rollout_correction]\nbypass_mode = true\n[loss]\nppo_epochs = 4\n")
    with pytest.warns(UserWarning, match=r"bypass_mode = true with loss.ppo_epochs = 4.*rollout engine's logprobs"):
        load_config(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(path, ["loss.ppo_epochs=1"])


def test_ignored_option_warns():
    with pytest.warns(UserWarning, match="rollout_rs_threshold is ignored"):
        load_config(overrides=["rollout_correction.rollout_rs_threshold=2.0"])


# ---------------------------------------------------------------------------------------------
# Registry names, round trip, resolution, docs


def test_sampler_type_and_reward_fn_formats():
    assert load_config(overrides=["sampler.type=my_pkg.samplers:BestOfN"]).sampler.type == "my_pkg.samplers:BestOfN"
    assert load_config(overrides=["reward.fn=my_pkg.rewards:score"]).reward.fn == "my_pkg.rewards:score"
    with pytest.raises(ConfigError, match="sampler.type: unknown sampler type 'adaptiv' .did you mean 'adaptive'"):
        load_config(overrides=["sampler.type=adaptiv"])
    with pytest.raises(ConfigError, match="reward.fn: unknown reward function 'my-pkg:f'"):
        load_config(overrides=["reward.fn=my-pkg:f"])


def test_round_trip(tmp_path):
    path = write(tmp_path, """
[job]
name = "rt"
description = "quotes \\" and\\nnewlines"
[generator]
stop = ["\\n\\n", "</s>"]
[reward]
kwargs = {scale = 0.5, "odd key" = [1, 2], nested = {a = true}}
[rollout_correction]
rollout_is = "token"
rollout_is_threshold = "0.5_2.0"
rollout_rs = "token_k1"
rollout_rs_threshold = 2.5
[sampler]
type = "filtered"
[sampler.filtered]
max_num_gen_batches = 0
""")
    cfg = load_config(path, ["optim.lr=inf", "optim.eps=1e-12"]).resolved()
    saved = save_resolved(cfg, tmp_path / "run")
    assert saved == tmp_path / "run" / "config.toml"
    assert load_config(saved) == cfg
    assert "rollout_is_threshold_lower" not in saved.read_text()  # None is omitted


def test_resolved_fills_derived_values_once():
    cfg = load_config(overrides=["model.path=/m", "data.train_batch_size=16", "generator.n=4", "job.name=r"])
    res = cfg.resolved()
    assert cfg.data.gen_batch_size == 0  # the loaded config is untouched
    assert res.model.tokenizer_path == "/m" and res.model.ref_path == "/m"
    assert res.data.gen_batch_size == 16
    assert res.sampler.token_adaptive.target_rollouts == 0  # the fixed sampler's config: its table stays untouched
    assert res.generator.max_model_len == 512 + 256 and res.generator.dtype == "float32"
    assert res.loss.loss_scale_factor == 256.0  # none means generator.max_tokens
    assert res.checkpoint.dir == str(Path("runs") / "r" / "checkpoints")
    assert res.resolved() == res
    token_adaptive = load_config(overrides=["generator.n=4", "sampler.type=token_adaptive"]).resolved()
    assert token_adaptive.sampler.token_adaptive.target_rollouts == 4


def test_every_field_documented():
    classes = [Config] + [type_hints(Config)[name] for name in Config.section_names()]
    classes += [AdaptiveSamplerConfig]
    for cls in classes:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    text = help_config()
    assert "[rollout_correction]" in text and "rollout_is_threshold: float or string = 2.0" in text


def test_section_accessor():
    cfg = Config()
    assert cfg.section("loss") is cfg.loss
    with pytest.raises(ConfigError, match="unknown section 'lose'"):
        cfg.section("lose")


def test_list_override_with_underscores_in_paths_parses_as_a_list():
    cfg = load_config(None, ['--data.train_files=["/tmp/my_data/train_a.jsonl", "/x/b_c.jsonl"]'])
    assert cfg.data.train_files == ["/tmp/my_data/train_a.jsonl", "/x/b_c.jsonl"]
    assert load_config(None, ["--rollout_correction.rollout_is_threshold=0.5_2"]).rollout_correction.rollout_is_threshold == "0.5_2"
