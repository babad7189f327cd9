"""Typed, validated model configs read from a checkpoint's ``config.json``.

One ``ModelConfig`` describes all three supported families:

- ``llama``: DeepSeek-LLM and DeepSeek-Coder v1 (multi-head / grouped-query attention,
  SwiGLU MLP, rotate-half RoPE, optionally linearly scaled).
- ``deepseek_v2`` / ``deepseek_v3``: Multi-head Latent Attention and DeepSeekMoE,
  interleaved RoPE, YaRN scaling.

Field names follow the Hugging Face config files so a checkpoint's ``config.json``
maps onto this object one to one; ``to_hf_dict`` writes it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_model.attention_pattern import AttentionPattern

__all__ = [
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
]

SUPPORTED_MODEL_TYPES = ("llama", "deepseek_v2", "deepseek_v3")
# config.json's model_type for a model with a non-dense attention pattern: a name
# transformers (and vLLM's architectures) do not know, so they refuse the checkpoint
# instead of loading it as dense; the family is kept under our own "ds_model_type".
PATTERN_MODEL_TYPE = "ds_model"
PATTERN_ARCHITECTURE = "DsModelPatternAttentionForCausalLM"
ROPE_TYPES = ("default", "linear", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ATTENTION_BACKENDS = ("sdpa", "triton", "reference")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or outside what is supported."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as in ``config.json``'s ``rope_scaling`` (or ``rope_parameters``).

    ``linear`` divides every frequency by ``factor``; ``yarn`` blends interpolated and
    extrapolated frequencies between the ``beta_fast``/``beta_slow`` correction dims and
    scales attention by ``mscale`` (the YaRN attention-scale correction).
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "rope_scaling.")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        if not (isinstance(self.factor, (int, float)) and self.factor > 0):
            raise ConfigError(f"rope_scaling factor={self.factor!r} must be a positive number")

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RopeScaling | None:
        if not raw:
            return None
        if not isinstance(raw, dict):
            raise ConfigError(f"rope_scaling={raw!r}: expected an object (or null)")
        kind = raw.get("rope_type", raw.get("type", "default"))
        if kind == "default" and "factor" not in raw:
            return None
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        kwargs = {k: raw[k] for k in known if raw.get(k) is not None}
        return cls(rope_type=kind, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.rope_type, "rope_type": self.rope_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "rope_type" and value is not None:
                out[f.name] = value
        return out


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one model. Construct with keywords or ``from_dict``/``from_file``.

    Dense llama models leave ``n_routed_experts`` and ``kv_lora_rank`` as ``None``;
    V2/V3 set ``kv_lora_rank`` (MLA) and ``n_routed_experts`` (DeepSeekMoE).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None
    # ds-attention backend by name ("sdpa", "triton", "reference"); None: its default.
    attention_backend: str | None = None
    # Multi-head Latent Attention (V2/V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = True
    # DeepSeekMoE (V2/V3)
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_nextn_predict_layers: int = 0
    # Attention pattern (ours): an AttentionPattern, or its config.json object / kind name.
    attention: AttentionPattern = field(default_factory=AttentionPattern)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _positive_int(name, getattr(self, name))
        for name in ("rms_norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        for name in ("first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; supported: silu")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.is_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _positive_int(name, getattr(self, name))
            if self.q_lora_rank is not None:
                _positive_int("q_lora_rank", self.q_lora_rank)
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        else:
            if self.head_dim is None:
                if self.hidden_size % self.num_attention_heads:
                    raise ConfigError(
                        f"hidden_size={self.hidden_size} is not divisible by "
                        f"num_attention_heads={self.num_attention_heads}; set head_dim"
                    )
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            _positive_int("head_dim", self.head_dim)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(
                    f"num_attention_heads={self.num_attention_heads} is not divisible by "
                    f"num_key_value_heads={self.num_key_value_heads}"
                )
        if self.is_moe:
            self._validate_moe()
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        self._validate_attention()
        if self.attention_backend not in (None, *ATTENTION_BACKENDS):
            raise ConfigError(
                f"attention_backend={self.attention_backend!r} is not one of "
                f"{', '.join(ATTENTION_BACKENDS)} (or null for ds-attention's default)"
            )

    def _validate_attention(self) -> None:
        pattern = AttentionPattern.parse(self.attention)
        object.__setattr__(self, "attention", pattern)
        if pattern.kind == "sliding_window":
            # One window for every path: the fixed sliding_window option is this pattern.
            if self.sliding_window is None:
                object.__setattr__(self, "sliding_window", pattern.window)
            elif self.sliding_window != pattern.window:
                raise ConfigError(
                    f"sliding_window={self.sliding_window} disagrees with attention "
                    f"window={pattern.window}; set one of them"
                )
        elif pattern.kind != "dense" and self.sliding_window is not None:
            raise ConfigError(
                f"sliding_window={self.sliding_window} cannot combine with attention "
                f"kind={pattern.kind!r}; use kind 'sliding_window' or unset sliding_window"
            )

    def _validate_moe(self) -> None:
        for name in (
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "moe_layer_freq",
        ):
            _positive_int(name, getattr(self, name))
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"n_routed_experts={self.n_routed_experts}"
            )
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(
                f"topk_method={self.topk_method!r} is not supported; supported: "
                f"{', '.join(TOPK_METHODS)}"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(
                f"scoring_func={self.scoring_func!r} is not supported; supported: "
                f"{', '.join(SCORING_FUNCS)}"
            )
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise ConfigError("topk_method='noaux_tc' requires scoring_func='sigmoid'")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            _positive_int("n_group", self.n_group)
            _positive_int("topk_group", self.topk_group)
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} is not divisible by "
                    f"n_group={self.n_group}"
                )
            if self.topk_group > self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ConfigError(
                    f"noaux_tc scores a group by its top-2 experts; n_routed_experts/n_group="
                    f"{per_group} must be >= 2"
                )
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
                    f"topk_group={self.topk_group} groups ({self.topk_group * per_group})"
                )

    # -- derived properties -------------------------------------------------------------

    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v2", "deepseek_v3")

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def interleaved_rope(self) -> bool:
        """V2 always rotates interleaved pairs; V3 does unless ``rope_interleave`` is off."""
        if self.model_type == "deepseek_v2":
            return True
        return self.model_type == "deepseek_v3" and self.rope_interleave

    @property
    def softmax_scale(self) -> float:
        """``1/sqrt(d_qk)``, times YaRN's ``mscale_all_dim`` correction squared."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.rope_type == "yarn" and rs.mscale_all_dim:
            m = _yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes the KV cache holds per token over all layers.

        MLA caches the compressed latent and the shared rope key only:
        ``(kv_lora_rank + qk_rope_head_dim) x layers x dtype``; MHA/GQA caches
        ``2 x kv_heads x head_dim x layers x dtype``.
        """
        if self.is_mla:
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_key_value_heads * self.head_dim
        return per_layer * self.num_hidden_layers * dtype_bytes

    # -- (de)serialisation ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict. Unknown keys are kept in ``extra``."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a dict, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type == PATTERN_MODEL_TYPE:  # written by to_hf_dict for a non-dense pattern
            model_type = raw.get("ds_model_type")
            if model_type not in SUPPORTED_MODEL_TYPES:
                raise ConfigError(
                    f"model_type={PATTERN_MODEL_TYPE!r} needs ds_model_type, the model "
                    f"family, one of {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r}"
                )
            raw = {k: v for k, v in raw.items() if k != "ds_model_type"}
            raw["model_type"] = model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={model_type!r} is not supported; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling"}
        kwargs: dict[str, Any] = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        kwargs["attention"] = AttentionPattern.parse(raw.get("attention"))
        if model_type == "deepseek_v3":
            # V3 always routes by sigmoid + noaux_tc; older configs omit the fields.
            kwargs.setdefault("topk_method", "noaux_tc")
            kwargs.setdefault("scoring_func", "sigmoid")
            kwargs.setdefault("norm_topk_prob", True)
        if model_type != "llama":
            kwargs.pop("head_dim", None)  # HF writes head_dim=qk_rope_head_dim for MLA
        rope_raw = raw.get("rope_scaling") or raw.get("rope_parameters")
        if isinstance(rope_raw, dict) and "rope_theta" in rope_raw and "rope_theta" not in raw:
            kwargs["rope_theta"] = rope_raw["rope_theta"]
        kwargs["rope_scaling"] = RopeScaling.from_dict(rope_raw)
        if kwargs["rope_scaling"] is not None and kwargs["rope_scaling"].rope_type == "yarn":
            if kwargs["rope_scaling"].original_max_position_embeddings is None:
                kwargs["rope_scaling"] = dataclasses.replace(
                    kwargs["rope_scaling"],
                    original_max_position_embeddings=raw.get("max_position_embeddings", 4096),
                )
        extra = {k: v for k, v in raw.items() if k not in names}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (or the one in a directory); every error names the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        raw = read_json(path, ConfigError)
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r} is unknown; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` transformers (4.x remote code and 5.x) reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "attention"):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        architectures = {
            "llama": "LlamaForCausalLM",
            "deepseek_v2": "DeepseekV2ForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM",
        }
        out["architectures"] = [architectures[self.model_type]]
        if self.attention.kind != "dense":
            out["attention"] = self.attention.to_dict()
        for name in ("sliding_window", "attention_backend"):  # ours; omitted when unset
            if out.get(name) is None:
                out.pop(name, None)
        if self.is_mla:
            out.pop("head_dim")
            out.pop("mlp_bias")
            out["num_key_value_heads"] = self.num_attention_heads
        else:
            for name in (
                "q_lora_rank",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "rope_interleave",
                "n_routed_experts",
                "n_shared_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "first_k_dense_replace",
                "moe_layer_freq",
                "topk_method",
                "scoring_func",
                "n_group",
                "topk_group",
                "norm_topk_prob",
                "routed_scaling_factor",
                "num_nextn_predict_layers",
            ):
                out.pop(name)
        if self.model_type == "deepseek_v2":
            out.pop("rope_interleave")
        if self.attention.kind != "dense":
            out["ds_model_type"] = self.model_type
            out["model_type"] = PATTERN_MODEL_TYPE
            out["architectures"] = [PATTERN_ARCHITECTURE]
        return out


def read_json(path: Path, error: type[Exception]) -> Any:
    """``path``'s JSON; bad UTF-8 or JSON raises ``error`` naming the file and the place."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_token_ids(v: Any) -> bool:
    ids = v if isinstance(v, list) else [v]
    return bool(ids) and all(_is_int(i) for i in ids)


# Field annotation -> (check, what is allowed). ``None`` passes every ``X | None``.
_TYPE_CHECKS: dict[str, tuple[Any, str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int | list[int]": (_is_token_ids, "an integer token id or a non-empty list of them"),
}


def check_field_types(obj: Any, prefix: str = "") -> None:
    """Raise ``ConfigError`` for the first field whose value is not of its declared type
    (a JSON ``"1e-6"`` for a float, ``"no"`` for a bool, ``1.5`` for an integer)."""
    for f in dataclasses.fields(obj):
        kind = str(f.type).removesuffix(" | None")
        value = getattr(obj, f.name)
        if value is None and str(f.type).endswith(" | None"):
            continue
        check = _TYPE_CHECKS.get(kind)
        if check is not None and not check[0](value):
            raise ConfigError(f"{prefix}{f.name}={value!r}: expected {check[1]}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-Base's two published configurations (a llama-shaped decoder); the depth
    # and vocabulary, which the published shapes leave open, follow DeepSeek-LLM (102400 tokens).
    "standard": {
        "model_type": "llama",
        "vocab_size": 102400,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "max_position_embeddings": 16384,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    "light": {
        "model_type": "llama",
        "vocab_size": 102400,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "max_position_embeddings": 4096,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
    # A tiny V3-shaped model (MLA + DeepSeekMoE) for tests and smoke runs.
    "tiny": {
        "model_type": "deepseek_v3",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 512,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}
