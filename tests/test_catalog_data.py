"""Checks of the built-in catalog data against published figures (model cards, config.json files, datasheets)."""

from __future__ import annotations

from typing import Any

import pytest

from service.catalog.loader import load_catalog
from service.planning.catalog import Catalog
from service.planning.hf_config import model_from_hf_config
from service.planning.memory import parameter_counts
from service.planning.specs import DType, GpuSpec, ModelSpec

MIB = 2**20


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def _active_parameters(model: ModelSpec, *, count_input_embedding: bool) -> float:
    """Parameters one token passes through: all but the unrouted experts (and, by some vendors' convention,
    the input embedding, which is a lookup rather than a matrix product)."""
    counts = parameter_counts(model)
    total = counts.total(model)
    if model.moe is not None:
        moe = model.moe
        moe_layers = model.num_layers - moe.num_dense_layers
        idle_share = (moe.num_experts - moe.experts_per_token) / moe.num_experts
        total -= moe_layers * counts.moe_experts * idle_share
    if not count_input_embedding:
        total -= counts.embedding
    return total


# Published totals. DeepSeek's 671B leaves out the 14B multi-token-prediction module, as the catalog does;
# gpt-oss figures are the model card's component table (116.83B / 20.91B total), the rest model cards' headlines.
PUBLISHED_TOTALS: list[tuple[str, float, float]] = [
    ("deepseek-v3", 671e9, 0.01),
    ("deepseek-r1", 671e9, 0.01),
    ("kimi-k2", 1.03e12, 0.01),
    ("minimax-m2.5", 229e9, 0.01),
    ("gpt-oss-120b", 116.83e9, 0.002),
    ("gpt-oss-20b", 20.91e9, 0.002),
    ("qwen3-coder-480b-a35b", 480e9, 0.01),
    ("qwen3-235b-a22b", 235e9, 0.01),
    ("qwen3-30b-a3b", 30.5e9, 0.01),
]


@pytest.mark.parametrize(("name", "published", "rel"), PUBLISHED_TOTALS)
def test_total_parameters_match_published(catalog: Catalog, name: str, published: float, rel: float) -> None:
    model = catalog.model(name)
    assert parameter_counts(model).total(model) == pytest.approx(published, rel=rel)


# Published active parameters, the absolute tolerance being half a unit of the last digit given.
# OpenAI's gpt-oss table, Moonshot, MiniMax and DeepSeek leave the input embedding out; Qwen counts it.
PUBLISHED_ACTIVE: list[tuple[str, float, float, bool]] = [
    ("deepseek-r1", 37e9, 0.5e9, False),
    ("kimi-k2", 32e9, 0.5e9, False),
    ("minimax-m2.5", 10e9, 0.5e9, False),
    ("gpt-oss-120b", 5.13e9, 0.005e9, False),
    ("gpt-oss-20b", 3.61e9, 0.005e9, False),
    ("qwen3-coder-480b-a35b", 35e9, 0.5e9, True),
    ("qwen3-235b-a22b", 22e9, 0.5e9, True),
    # "3.3B activated": the count with embeddings is 3.35B, so the tolerance is widened slightly.
    ("qwen3-30b-a3b", 3.3e9, 0.06e9, True),
]


@pytest.mark.parametrize(("name", "published", "tolerance", "with_embedding"), PUBLISHED_ACTIVE)
def test_active_parameters_match_published(
    catalog: Catalog, name: str, published: float, tolerance: float, with_embedding: bool
) -> None:
    active = _active_parameters(catalog.model(name), count_input_embedding=with_embedding)
    assert active == pytest.approx(published, abs=tolerance)


def test_deepseek_r1_has_the_deepseek_v3_architecture(catalog: Catalog) -> None:
    v3, r1 = catalog.model("deepseek-v3"), catalog.model("deepseek-r1")
    assert r1.hf_id == "deepseek-ai/DeepSeek-R1"
    assert (r1.num_layers, r1.hidden_size, r1.moe, r1.mla, r1.vocab_size) == (
        v3.num_layers,
        v3.hidden_size,
        v3.moe,
        v3.mla,
        v3.vocab_size,
    )


def test_gpt_oss_alternates_sliding_window_layers(catalog: Catalog) -> None:
    for name in ("gpt-oss-120b", "gpt-oss-20b"):
        model = catalog.model(name)
        assert (model.sliding_window_tokens, model.sliding_window_layer_fraction) == (128, 0.5), name
    for name in ("deepseek-r1", "kimi-k2", "minimax-m2.5", "qwen3-coder-480b-a35b"):
        assert catalog.model(name).sliding_window_tokens == 0, name


# Architecture keys of the published config.json files (rope, token-id and quantization keys left out).
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "kimi-k2": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "_name_or_path": "moonshotai/Kimi-K2-Instruct",
        "first_k_dense_replace": 1,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 131072,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 384,
        "n_shared_experts": 1,
        "num_attention_heads": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 64,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "tie_word_embeddings": False,
        "v_head_dim": 128,
        "vocab_size": 163840,
    },
    "minimax-m2.5": {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "_name_or_path": "MiniMaxAI/MiniMax-M2.5",
        "head_dim": 128,
        "hidden_size": 3072,
        "intermediate_size": 1536,
        "max_position_embeddings": 196608,
        "num_attention_heads": 48,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 62,
        "num_key_value_heads": 8,
        "num_local_experts": 256,
        "qk_norm_type": "per_layer",
        "use_qk_norm": True,
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "vocab_size": 200064,
    },
    "gpt-oss-120b": {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "_name_or_path": "openai/gpt-oss-120b",
        "head_dim": 64,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "num_local_experts": 128,
        "sliding_window": 128,
        "tie_word_embeddings": False,
        "vocab_size": 201088,
    },
    "gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "_name_or_path": "openai/gpt-oss-20b",
        "head_dim": 64,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "sliding_window": 128,
        "tie_word_embeddings": False,
        "vocab_size": 201088,
    },
    "qwen3-coder-480b-a35b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "_name_or_path": "Qwen/Qwen3-Coder-480B-A35B-Instruct",
        "head_dim": 128,
        "hidden_size": 6144,
        "intermediate_size": 8192,
        "max_position_embeddings": 262144,
        "moe_intermediate_size": 2560,
        "num_attention_heads": 96,
        "num_experts": 160,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 62,
        "num_key_value_heads": 8,
        "shared_expert_intermediate_size": 0,
        "tie_word_embeddings": False,
        "vocab_size": 151936,
    },
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_catalog_entry_matches_its_config_json(catalog: Catalog, name: str) -> None:
    from_config = model_from_hf_config(HF_CONFIGS[name], name=name)
    entry = catalog.model(name)
    # The config mapping does not read sliding-window layouts; compare everything else.
    for field in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "ffn_gated",
        "max_position_embeddings",
        "hf_id",
        "moe",
        "mla",
        "qk_norm_across_heads",
    ):
        assert getattr(entry, field) == getattr(from_config, field), field


BLACKWELL = {"b200", "b300", "gb200"}


def _nvidia(catalog: Catalog) -> list[GpuSpec]:
    return [gpu for gpu in catalog.gpus.values() if gpu.vendor == "nvidia"]


def test_fp4_tensor_cores_only_on_blackwell(catalog: Catalog) -> None:
    assert set(catalog.gpus) >= BLACKWELL
    for gpu in catalog.gpus.values():
        blackwell = gpu.name in BLACKWELL
        assert gpu.runs_natively(DType.FP4) is blackwell, gpu.name
        assert gpu.runs_natively(DType.MXFP4) is blackwell, gpu.name
        if blackwell:
            # mxfp4 and nvfp4 run at the same dense fp4 peak, twice fp8 or more.
            assert gpu.peak_for(DType.MXFP4) == gpu.peak_for(DType.FP4) >= 2 * gpu.peak_for(DType.FP8), gpu.name
            assert DType.FP4 not in gpu.weight_only_dtypes, gpu.name
            assert DType.MXFP4 not in gpu.weight_only_dtypes, gpu.name
        else:
            assert gpu.peak_for(DType.FP4) == gpu.peak_for(DType.BF16), gpu.name


def test_four_bit_weights_are_served_weight_only_before_blackwell(catalog: Catalog) -> None:
    for gpu in _nvidia(catalog):
        for dtype in (DType.INT4, DType.FP4, DType.MXFP4):
            assert gpu.supports_weights(dtype), (gpu.name, dtype)
        assert not gpu.runs_natively(DType.INT4), gpu.name
    for name in ("h100-sxm", "h100-pcie", "h200-sxm", "l40s"):
        assert set(catalog.gpu(name).weight_only_dtypes) == {DType.INT4, DType.FP4, DType.MXFP4}, name
    # nvfp4 checkpoints are an NVIDIA format; MI300X serves int4 and mxfp4 weights only.
    mi300x = catalog.gpu("mi300x")
    assert not mi300x.supports_weights(DType.FP4)
    assert mi300x.supports_weights(DType.MXFP4)


def test_fp8_is_native_from_ada_on_and_weight_only_on_ampere(catalog: Catalog) -> None:
    a100 = catalog.gpu("a100-sxm")
    assert not a100.runs_natively(DType.FP8)
    assert a100.supports_weights(DType.FP8)
    for gpu in catalog.gpus.values():
        if gpu.name != "a100-sxm":
            assert gpu.runs_natively(DType.FP8), gpu.name
            # Dense fp8 is twice dense bf16 on every listed chip (L40S datasheet: 733 vs 362 TF).
            assert gpu.peak_for(DType.FP8) == pytest.approx(2 * gpu.peak_for(DType.BF16), rel=0.02), gpu.name


def test_scale_up_domains(catalog: Catalog) -> None:
    gb200 = catalog.gpu("gb200")
    assert (gb200.gpus_per_node, gb200.nvlink_domain_gpus, gb200.scale_up_domain_gpus) == (4, 72, 72)
    for name in ("a100-sxm", "h100-sxm", "h200-sxm", "b200", "b300"):
        assert catalog.gpu(name).nvlink_domain_gpus == 8, name
    for name in ("h100-pcie", "l40s"):
        assert catalog.gpu(name).nvlink_domain_gpus == 0, name


def test_new_gpu_datasheet_numbers(catalog: Catalog) -> None:
    gb200, b300 = catalog.gpu("gb200"), catalog.gpu("b300")
    # Driver-reported capacities (nvidia-smi MiB).
    assert gb200.memory_bytes == 189471 * MIB
    assert b300.memory_bytes == 275040 * MIB
    # GB200 NVL72: 576 TB/s and 360 PF sparse bf16 per 72 GPUs; NVLink5 1.8 TB/s bidirectional.
    assert gb200.hbm_bandwidth_bytes_per_s == pytest.approx(576e12 / 72)
    assert gb200.peak_for(DType.BF16) == pytest.approx(360e15 / 72 / 2)
    assert gb200.peak_for(DType.FP4) == pytest.approx(1440e15 / 72 / 2)
    assert gb200.intra_node_bandwidth_bytes_per_s == b300.intra_node_bandwidth_bytes_per_s == 900e9
    assert (gb200.num_sms, b300.num_sms) == (152, 148)
    # Blackwell Ultra: B200's bf16/fp8, more fp4, and no int8 tensor-core entry.
    b200 = catalog.gpu("b200")
    assert b300.peak_for(DType.BF16) == b200.peak_for(DType.BF16)
    assert b300.peak_for(DType.FP8) == b200.peak_for(DType.FP8)
    assert b300.peak_for(DType.FP4) > b200.peak_for(DType.FP4)
    assert not b300.runs_natively(DType.INT8)
    # Per-GPU price from CoreWeave's 4-GPU GB200 NVL72 instance at $42.00/h.
    assert gb200.price_per_hour_usd == pytest.approx(42.00 / 4)
