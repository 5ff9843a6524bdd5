"""Map a parsed Hugging Face config.json onto a ModelSpec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.planning.specs import MLASpec, ModelSpec, MoESpec, PlanningError


@dataclass(frozen=True, slots=True)
class _Family:
    """How one architecture family spells its FFN and what it leaves implicit."""

    ffn_key: str
    ffn_gated: bool
    # Value Transformers uses when config.json omits tie_word_embeddings.
    tie_default: bool


_SWIGLU = _Family(ffn_key="intermediate_size", ffn_gated=True, tie_default=False)
# OPT's config.json never states tie_word_embeddings; PretrainedConfig's default (True) applies and
# OPTForCausalLM ties lm_head to embed_tokens. Its FFN is ReLU fc1/fc2 of width ffn_dim.
_OPT = _Family(ffn_key="ffn_dim", ffn_gated=False, tie_default=True)

_FAMILIES: dict[str, _Family] = {
    "LlamaForCausalLM": _SWIGLU,
    "MistralForCausalLM": _SWIGLU,
    "Qwen2ForCausalLM": _SWIGLU,
    "Qwen3ForCausalLM": _SWIGLU,
    "Qwen3MoeForCausalLM": _SWIGLU,
    "MixtralForCausalLM": _SWIGLU,
    "DeepseekV2ForCausalLM": _SWIGLU,
    "DeepseekV3ForCausalLM": _SWIGLU,
    "OPTForCausalLM": _OPT,
}
_FAMILIES_BY_MODEL_TYPE: dict[str, _Family] = {"opt": _OPT}

# Expert-count keys in the order the families introduced them: Mixtral, Qwen-MoE, DeepSeek.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def model_from_hf_config(config: Mapping[str, Any], *, name: str) -> ModelSpec:
    """Build a ModelSpec from a config.json mapping (text_config of multimodal configs included)."""
    cfg = _text_view(config)
    family = _family_of(cfg)

    layers = _require_int(cfg, "num_hidden_layers")
    hidden = _require_int(cfg, "hidden_size")
    heads = _require_int(cfg, "num_attention_heads")
    vocab = _require_int(cfg, "vocab_size")
    moe = _moe_spec(cfg)
    ffn = _dense_ffn_size(cfg, family, moe)
    mla = _mla_spec(cfg)

    if mla is not None:
        # MLA caches one latent per token; heads are not grouped, and q/k use nope+rope dims.
        kv_heads = heads
        head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    else:
        kv_heads = _optional_int(cfg, "num_key_value_heads") or heads
        head_dim = _optional_int(cfg, "head_dim") or _derived_head_dim(hidden, heads)
    if heads % kv_heads != 0:
        raise PlanningError(f"num_attention_heads={heads} not a multiple of num_key_value_heads={kv_heads}")

    extra: dict[str, Any] = {}
    max_positions = _optional_int(cfg, "max_position_embeddings")
    if max_positions is not None:
        extra["max_position_embeddings"] = max_positions
    if cfg.get("qk_norm_type") == "per_layer" and _optional_bool(cfg, "use_qk_norm", False):
        extra["qk_norm_across_heads"] = True

    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=ffn,
        vocab_size=vocab,
        tie_word_embeddings=_optional_bool(cfg, "tie_word_embeddings", family.tie_default),
        ffn_gated=family.ffn_gated,
        hf_id=_hub_id(cfg),
        moe=moe,
        mla=mla,
        **extra,
    )


def _text_view(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model keys, with a nested text_config taking precedence over the top level."""
    text = config.get("text_config")
    if isinstance(text, Mapping):
        return {**config, **text}
    return config


def _family_of(cfg: Mapping[str, Any]) -> _Family:
    """The family of the first recognised architecture, else the generic SwiGLU decoder."""
    architectures = cfg.get("architectures")
    if isinstance(architectures, list):
        for arch in architectures:
            if isinstance(arch, str) and arch in _FAMILIES:
                return _FAMILIES[arch]
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in _FAMILIES_BY_MODEL_TYPE:
        return _FAMILIES_BY_MODEL_TYPE[model_type]
    # Unknown OPT-style configs carry ffn_dim instead of intermediate_size.
    if "intermediate_size" not in cfg and "ffn_dim" in cfg:
        return _OPT
    return _SWIGLU


def _dense_ffn_size(cfg: Mapping[str, Any], family: _Family, moe: MoESpec | None) -> int:
    """Width of the dense FFN (for MoE models without one, the expert width)."""
    size = _optional_int(cfg, family.ffn_key)
    if size is not None:
        return size
    if moe is not None:
        return moe.expert_intermediate_size
    raise PlanningError(f"config.json is missing required key {family.ffn_key!r}")


def _moe_spec(cfg: Mapping[str, Any]) -> MoESpec | None:
    """Mixture-of-experts layout, or None for dense configs (absent, null or zero expert count)."""
    num_experts = next((n for key in _EXPERT_COUNT_KEYS if (n := _optional_int(cfg, key))), None)
    if num_experts is None:
        return None
    top_k = _require_int(cfg, "num_experts_per_tok")
    expert_ffn = _optional_int(cfg, "moe_intermediate_size") or _optional_int(cfg, "intermediate_size")
    if expert_ffn is None:
        raise PlanningError("config.json is missing required key 'moe_intermediate_size'")
    shared = _optional_int(cfg, "n_shared_experts") or 0
    shared_width = expert_ffn if shared else 0
    if not shared:
        # Qwen-MoE states one shared expert by its total width rather than by a count.
        shared_width = _optional_int(cfg, "shared_expert_intermediate_size") or 0
        shared = 1 if shared_width else 0
    return MoESpec(
        num_experts=num_experts,
        experts_per_token=top_k,
        expert_intermediate_size=expert_ffn,
        num_shared_experts=shared,
        shared_expert_intermediate_size=shared_width,
        num_dense_layers=_optional_int(cfg, "first_k_dense_replace") or 0,
    )


def _mla_spec(cfg: Mapping[str, Any]) -> MLASpec | None:
    """Multi-head latent attention dimensions, or None when the config has no KV latent."""
    kv_lora_rank = _optional_int(cfg, "kv_lora_rank")
    if not kv_lora_rank:
        return None
    return MLASpec(
        # Null q_lora_rank (DeepSeek-V2-Lite) means queries are projected directly; 0 encodes that.
        q_lora_rank=_optional_int(cfg, "q_lora_rank") or 0,
        kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=_require_int(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=_require_int(cfg, "qk_rope_head_dim"),
        v_head_dim=_require_int(cfg, "v_head_dim"),
    )


def _derived_head_dim(hidden: int, heads: int) -> int:
    """hidden_size / num_attention_heads, which must divide exactly."""
    if hidden % heads != 0:
        raise PlanningError(
            f"hidden_size={hidden} is not divisible by num_attention_heads={heads} and head_dim is not given"
        )
    return hidden // heads


def _hub_id(cfg: Mapping[str, Any]) -> str:
    """The hub repository in _name_or_path when it names one ("org/model"), else empty."""
    value = cfg.get("_name_or_path")
    if not isinstance(value, str):
        return ""
    parts = value.split("/")
    # Local checkpoints record a filesystem path here, which is not a hub id.
    if len(parts) == 2 and all(parts) and not value.startswith((".", "~")):
        return value
    return ""


def _require_int(cfg: Mapping[str, Any], key: str) -> int:
    """A positive integer that must be present."""
    value = _optional_int(cfg, key)
    if value is None:
        raise PlanningError(f"config.json is missing required key {key!r}")
    if value == 0:
        raise PlanningError(f"config.json key {key!r} must be positive, got 0")
    return value


def _optional_int(cfg: Mapping[str, Any], key: str) -> int | None:
    """An integer that may be absent or null; zero is returned as is, negatives are refused."""
    value = cfg.get(key)
    if value is None:
        return None
    # bool is an int subclass, and JSON writers sometimes emit 4096.0 for integer fields.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanningError(f"config.json key {key!r} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise PlanningError(f"config.json key {key!r} must be an integer, got {value!r}")
    if value < 0:
        raise PlanningError(f"config.json key {key!r} must not be negative, got {value!r}")
    return int(value)


def _optional_bool(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean that may be absent or null."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PlanningError(f"config.json key {key!r} must be true or false, got {value!r}")
    return value
