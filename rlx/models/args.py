"""ModelArgs: the shape of one decoder-only transformer, read from and written to HF config.json.

One dataclass covers Llama 3.x, Qwen2 and Qwen3; per-architecture differences live in `ARCHS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rlx.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """What an HF `architectures` entry implies beyond the numbers in config.json."""

    model_type: str
    qk_norm: bool
    """Qwen3: RMSNorm over head_dim on q and k (per head), before RoPE."""
    qkv_bias_always: bool
    """Qwen2: q/k/v always have a bias and o_proj never; the config has no `attention_bias`."""
    default_max_position: int


ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", qk_norm=False, qkv_bias_always=False, default_max_position=2048),
    "Qwen2ForCausalLM": ArchSpec("qwen2", qk_norm=False, qkv_bias_always=True, default_max_position=32768),
    "Qwen3ForCausalLM": ArchSpec("qwen3", qk_norm=True, qkv_bias_always=False, default_max_position=32768),
}

# Keys a llama3 `rope_scaling` dict must carry (transformers' _compute_llama3_parameters).
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def arch_spec(arch: str) -> ArchSpec:
    """The spec of a supported architecture; a `UserError` naming the supported ones otherwise."""
    if arch not in ARCHS:
        raise UserError(f"unsupported model architecture '{arch}'; supported: {', '.join(ARCHS)}")
    return ARCHS[arch]


@dataclass
class ModelArgs:
    """Sizes and options of one model. Field names follow HF config.json where one exists."""

    arch: str = "Qwen3ForCausalLM"
    """HF `architectures[0]`: LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM."""
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """Fewer than num_attention_heads means grouped-query attention."""
    head_dim: int | None = None
    """Per-head size; None means hidden_size // num_attention_heads (filled in by __post_init__)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None (plain RoPE) or a llama3 dict: rope_type="llama3" plus LLAMA3_ROPE_KEYS."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    """lm_head.weight is model.embed_tokens.weight (one Parameter, saved once)."""
    attention_bias: bool = False
    """Bias on q_proj, k_proj and v_proj."""
    o_proj_bias: bool = False
    """Bias on o_proj (Llama/Qwen3 `attention_bias: true` sets both; Qwen2 has q/k/v bias only)."""
    qk_norm: bool = False
    """Qwen3 per-head RMSNorm on q and k."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Unused HF keys kept so that to_hf_config() writes them back (e.g. sliding_window: null)."""

    def __post_init__(self) -> None:
        arch_spec(self.arch)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            _check_llama3_rope(self.rope_scaling)

    @property
    def model_type(self) -> str:
        return ARCHS[self.arch].model_type

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Parse an HF config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`). Options this model does not implement raise a `UserError`."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise UserError(f"config.json has no 'architectures' entry; supported: {', '.join(ARCHS)}")
        arch = archs[0]
        spec = arch_spec(arch)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise UserError(f"config.json lacks required keys: {', '.join(missing)}")
        _reject_unsupported(cfg)
        if spec.qkv_bias_always:
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        theta, scaling = _parse_rope(cfg)
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", spec.default_max_position),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            qk_norm=spec.qk_norm,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra={k: cfg[k] for k in _PASSTHROUGH_KEYS if k in cfg},
        )

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) and vLLM load.

        RoPE is written both ways: `rope_theta` + `rope_scaling` (4.x, older vLLM) and
        `rope_parameters` (5.x); likewise `torch_dtype` and `dtype`."""
        spec = ARCHS[self.arch]
        if self.o_proj_bias != (self.attention_bias and not spec.qkv_bias_always):
            raise UserError(
                f"{self.arch} cannot express attention_bias={self.attention_bias} with "
                f"o_proj_bias={self.o_proj_bias} in config.json"
            )
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        cfg: dict[str, Any] = {
            **self.extra,
            "architectures": [self.arch],
            "model_type": spec.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "dtype": dtype,
            "use_cache": True,
        }
        if not spec.qkv_bias_always:
            cfg["attention_bias"] = self.attention_bias
        if spec.model_type == "llama":
            cfg["mlp_bias"] = False
        else:
            cfg["use_sliding_window"] = False
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# HF keys that do not change the math but that a round trip should preserve.
_PASSTHROUGH_KEYS = ("initializer_range", "attention_dropout", "sliding_window", "max_window_layers")


def _reject_unsupported(cfg: dict[str, Any]) -> None:
    """Options whose math this model does not implement: fail rather than silently differ."""
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu')")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={cfg['partial_rotary_factor']}")
    if problems:
        raise UserError(f"config.json uses options rlx models do not implement: {'; '.join(problems)}")


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 scaling dict or None). transformers 5 lets `rope_scaling` override
    `rope_parameters`, so this reads them in the same order."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UserError(f"unsupported rope_type '{rope_type}' in config.json; supported: default, llama3")
    scaling = {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_ROPE_KEYS if k in params}}
    _check_llama3_rope(scaling)
    return theta, scaling


def _check_llama3_rope(scaling: dict[str, Any]) -> None:
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise UserError(f"unsupported rope_scaling {scaling}; supported: rope_type 'llama3'")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise UserError(f"llama3 rope_scaling lacks keys: {', '.join(missing)}")
