"""Tests for mapping Hugging Face config.json dicts to ModelSpec, and for the built-in models.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.planning.hf_config import model_from_hf_config
from service.planning.specs import MLASpec, ModelSpec, MoESpec, PlanningError

MODELS_YAML = Path(__file__).resolve().parents[1] / "service" / "catalog" / "data" / "models.yaml"

# Architecture keys of the published config.json files (rope, dtype and token-id keys left out).
LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "first_k_dense_replace": 3,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "tie_word_embeddings": False,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
OPT_13B: dict[str, Any] = {
    "_name_or_path": "facebook/opt-13b",
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "activation_function": "relu",
    "ffn_dim": 20480,
    "hidden_size": 5120,
    "max_position_embeddings": 2048,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "vocab_size": 50272,
    "word_embed_proj_dim": 5120,
}


def test_llama_31_8b_maps_gqa_fields() -> None:
    spec = model_from_hf_config(LLAMA_31_8B, name="llama-3.1-8b")
    assert (spec.name, spec.num_layers, spec.hidden_size) == ("llama-3.1-8b", 32, 4096)
    assert (spec.num_attention_heads, spec.num_kv_heads, spec.head_dim) == (32, 8, 128)
    assert (spec.intermediate_size, spec.vocab_size, spec.max_position_embeddings) == (14336, 128256, 131072)
    assert spec.ffn_gated
    assert not spec.tie_word_embeddings
    assert spec.moe is None
    assert spec.mla is None


def test_mixtral_maps_local_experts() -> None:
    spec = model_from_hf_config(MIXTRAL_8X7B, name="mixtral-8x7b")
    assert spec.moe == MoESpec(num_experts=8, experts_per_token=2, expert_intermediate_size=14336)
    assert spec.intermediate_size == 14336
    assert (spec.num_kv_heads, spec.head_dim) == (8, 128)


def test_deepseek_v3_maps_mla_and_shared_experts() -> None:
    spec = model_from_hf_config(DEEPSEEK_V3, name="deepseek-v3")
    assert spec.mla == MLASpec(
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
    )
    assert spec.moe == MoESpec(
        num_experts=256,
        experts_per_token=8,
        expert_intermediate_size=2048,
        num_shared_experts=1,
        shared_expert_intermediate_size=2048,
        num_dense_layers=3,
    )
    assert (spec.head_dim, spec.num_kv_heads, spec.intermediate_size) == (192, 128, 18432)
    assert (spec.num_layers, spec.vocab_size, spec.max_position_embeddings) == (61, 129280, 163840)


def test_opt_uses_ffn_dim_relu_and_tied_head() -> None:
    spec = model_from_hf_config(OPT_13B, name="opt-13b")
    assert (spec.intermediate_size, spec.num_kv_heads, spec.head_dim) == (20480, 40, 128)
    assert not spec.ffn_gated
    assert spec.tie_word_embeddings
    assert spec.hf_id == "facebook/opt-13b"


def test_only_a_per_layer_qk_norm_spans_the_heads() -> None:
    def spec(**keys: Any) -> bool:
        return model_from_hf_config({**LLAMA_31_8B, **keys}, name="m").qk_norm_across_heads

    # MiniMax-M2: one RMSNorm over every head's q (and k) elements; Qwen3-style norms are per head.
    assert spec(use_qk_norm=True, qk_norm_type="per_layer") is True
    assert spec(use_qk_norm=True, qk_norm_type="per_head") is False
    assert spec(use_qk_norm=False, qk_norm_type="per_layer") is False
    assert spec() is False


def test_text_config_is_read_for_multimodal_wrappers() -> None:
    wrapped = {"architectures": ["SomeVisionForConditionalGeneration"], "text_config": dict(LLAMA_31_8B)}
    assert model_from_hf_config(wrapped, name="x") == model_from_hf_config(LLAMA_31_8B, name="x")


def test_missing_hidden_size_raises() -> None:
    config = {k: v for k, v in LLAMA_31_8B.items() if k != "hidden_size"}
    with pytest.raises(PlanningError, match="hidden_size"):
        model_from_hf_config(config, name="broken")


def _catalog() -> dict[str, dict[str, Any]]:
    content = yaml.safe_load(MODELS_YAML.read_text(encoding="utf-8"))
    assert isinstance(content, dict)
    return content


def _spec(name: str, entry: dict[str, Any]) -> ModelSpec:
    fields = dict(entry)
    moe = fields.pop("moe", None)
    mla = fields.pop("mla", None)
    return ModelSpec(
        name=name,
        moe=MoESpec(**moe) if moe else None,
        mla=MLASpec(**mla) if mla else None,
        **fields,
    )


def test_every_catalog_entry_builds_a_model_spec() -> None:
    catalog = _catalog()
    assert len(catalog) >= 18
    for name, entry in catalog.items():
        spec = _spec(name, entry)
        assert spec.num_attention_heads % spec.num_kv_heads == 0, name
        assert spec.hf_id, name


def _parameter_count(spec: ModelSpec) -> int:
    """Weights of the matrices (norms and biases left out), counted independently of service code."""
    h = spec.hidden_size
    embeddings = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    if spec.mla is not None:
        m, heads = spec.mla, spec.num_attention_heads
        attention = (
            h * m.q_lora_rank
            + m.q_lora_rank * heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
            + h * (m.kv_lora_rank + m.qk_rope_head_dim)
            + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
            + heads * m.v_head_dim * h
        )
    else:
        q_and_o = 2 * h * spec.num_attention_heads * spec.head_dim
        attention = q_and_o + 2 * h * spec.num_kv_heads * spec.head_dim
    matrices = 3 if spec.ffn_gated else 2
    dense_ffn = matrices * h * spec.intermediate_size
    if spec.moe is None:
        return embeddings + spec.num_layers * (attention + dense_ffn)
    moe = spec.moe
    sparse_ffn = (
        moe.num_experts * matrices * h * moe.expert_intermediate_size
        + h * moe.num_experts
        + moe.num_shared_experts * matrices * h * moe.shared_expert_intermediate_size
    )
    moe_layers = spec.num_layers - moe.num_dense_layers
    ffn_total = moe.num_dense_layers * dense_ffn + moe_layers * sparse_ffn
    return embeddings + spec.num_layers * attention + ffn_total


@pytest.mark.parametrize(
    ("name", "published_total"),
    [
        ("llama-3.1-8b", 8.03e9),
        ("llama-3.1-70b", 70.6e9),
        ("llama-2-7b", 6.74e9),
        ("qwen3-32b", 32.8e9),
        ("mixtral-8x7b", 46.7e9),
        # The 671B excludes the 14B multi-token-prediction module.
        ("deepseek-v3", 671e9),
        ("opt-13b", 12.85e9),
    ],
)
def test_catalog_parameter_counts_match_published_totals(name: str, published_total: float) -> None:
    spec = _spec(name, _catalog()[name])
    assert _parameter_count(spec) == pytest.approx(published_total, rel=0.03)
