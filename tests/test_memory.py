"""Hand-checked memory model: parameter counts, weights per GPU, KV bytes per token, KV capacity, refusals.

Every expected number below is worked out by hand from the architecture of a tiny model (built here and in
tests/specs_for_tests.py, not from the catalog), with the arithmetic written next to it so a reader can redo it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from service.planning.memory import (
    CUDA_GRAPH_RESERVE_BYTES,
    GIB,
    KV_BLOCK_TOKENS,
    NON_TORCH_RESERVE_BYTES,
    MemoryPlan,
    activation_reserve_bytes,
    parameter_counts,
    plan_memory,
    require_fit,
    weight_bytes_per_gpu,
)
from service.planning.specs import DType, MLASpec, MoESpec, PlanningError
from service.planning.stepcost import ParallelLayout, kv_bytes_per_token_per_gpu, make_layout
from tests.specs_for_tests import engine_spec, gpu_spec, tiny_dense, tiny_moe

# A dense GQA model: 4 layers, hidden 64, 8 query heads and 2 KV heads of 16 dims, SwiGLU FFN 128, vocab 1000.
DENSE = tiny_dense()

# The same trunk with MoE FFNs: 16 experts of width 64 (top-2), one shared expert of width 64, first layer dense.
MOE = tiny_moe()

# MLA attention (DeepSeek style) on 3 layers of hidden 64 with 4 heads.
MLA = tiny_dense(
    name="tiny-mla",
    num_layers=3,
    num_attention_heads=4,
    num_kv_heads=4,
    head_dim=12,
    tie_word_embeddings=True,
    mla=MLASpec(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
)

GPU = gpu_spec(memory_bytes=2 * GIB)

ENGINE = engine_spec(
    cuda_graphs=False,
    cuda_graph_max_batch=32,
    max_num_batched_tokens=256,
    max_num_seqs=32,
    gpu_memory_fraction=0.5,
)


# Parameter counts ----------------------------------------------------------------------------------------


def test_parameter_counts_of_a_gqa_moe_model() -> None:
    counts = parameter_counts(MOE)
    assert counts.embedding == 64_000  # vocab 1000 x hidden 64
    assert counts.lm_head == 64_000  # untied: a second 1000 x 64 matrix
    # q (8 heads) + o (8 heads) + k, v (2 heads each), 16 dims per head: 64 x 16 x (2x8 + 2x2) = 1024 x 20
    assert counts.attention_sharded == 20_480
    assert counts.attention_replicated == 0
    assert counts.dense_ffn == 24_576  # gate, up, down: 3 x 64 x 128
    assert counts.moe_experts == 196_608  # 16 experts x 3 x 64 x 64
    assert counts.moe_shared == 12_288  # 1 shared expert x 3 x 64 x 64
    assert counts.moe_router == 1_024  # 64 x 16
    # 128_000 ends + 4 x 20_480 attention + 1 dense FFN 24_576 + 3 MoE layers x (196_608 + 12_288 + 1_024)
    # = 128_000 + 81_920 + 24_576 + 629_760
    assert counts.total(MOE) == 864_256


def test_parameter_counts_of_a_dense_ungated_model() -> None:
    opt = tiny_dense(
        name="tiny-opt",
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=4,
        intermediate_size=256,
        vocab_size=100,
        tie_word_embeddings=True,
        ffn_gated=False,
    )
    counts = parameter_counts(opt)
    assert counts.attention_sharded == 64 * 16 * (2 * 4 + 2 * 4)  # 16_384
    assert counts.dense_ffn == 2 * 64 * 256  # up and down only: 32_768
    assert counts.lm_head == 0  # tied to the embedding
    assert counts.moe_experts == counts.moe_shared == counts.moe_router == 0
    # 6_400 embedding + 2 x (16_384 + 32_768)
    assert counts.total(opt) == 104_704


def test_parameter_counts_of_mla_attention() -> None:
    counts = parameter_counts(MLA)
    # q up (32 -> 4 heads x (8 + 4)) = 1_536; kv up (16 -> 4 heads x (8 + 8)) = 1_024; o (4 x 8 -> 64) = 2_048
    assert counts.attention_sharded == 4_608
    # Down-projections every TP rank keeps whole: 64 x (q_lora 32 + kv_lora 16 + rope 4)
    assert counts.attention_replicated == 3_328
    assert counts.lm_head == 0
    # 64_000 embedding + 3 x (4_608 + 3_328 + 24_576)
    assert counts.total(MLA) == 161_536


# Weights per GPU -----------------------------------------------------------------------------------------


def test_full_model_on_one_gpu_is_every_parameter_at_two_bytes() -> None:
    # attention 4 x 20_480 x 2 = 163_840; dense FFN 24_576 x 2 = 49_152;
    # MoE 3 x (196_608 + 12_288 + 1_024) x 2 = 1_259_520; embedding + head 128_000 x 2 = 256_000
    assert weight_bytes_per_gpu(MOE, ParallelLayout(), DType.BF16) == 1_728_512
    assert weight_bytes_per_gpu(MOE, ParallelLayout(), DType.BF16) == 2 * parameter_counts(MOE).total(MOE)


def test_weights_per_gpu_tp2_pp2_dp2_ep4() -> None:
    layout = make_layout(tp=2, pp=2, attention_dp=2, moe_ep=4)
    assert layout.expert_tp == 1  # tp x dp = 4 GPUs per stage, all taken by expert parallelism
    # ceil(4 / 2) = 2 layers per stage; the heavier stage holds 2 MoE layers (the dense layer is on stage 0).
    # attention split over tp=2:      2 layers x 20_480 / 2 x 2 B             =  40_960
    # routed experts over ep=4:       196_608 / (4 x 1) x 2 B                 =  98_304 per layer
    # shared expert split over tp=2:  12_288 / 2 x 2 B                        =  12_288 per layer
    # router replicated, bf16:        1_024 x 2 B                             =   2_048 per layer
    # MoE layers:                     2 x (98_304 + 12_288 + 2_048)           = 225_280
    # embedding or LM head (pp > 1):  64_000 / 2 x 2 B                        =  64_000
    assert weight_bytes_per_gpu(MOE, layout, DType.BF16) == 40_960 + 225_280 + 64_000


def test_experts_split_over_moe_ep_times_moe_tp() -> None:
    # ep=2 with each expert cut moe_tp=2 ways holds as many expert bytes as ep=4 with whole experts.
    ep2_tp2 = make_layout(tp=2, pp=2, attention_dp=2, moe_ep=2)
    assert ep2_tp2.expert_tp == 2
    ep4 = make_layout(tp=2, pp=2, attention_dp=2, moe_ep=4)
    assert weight_bytes_per_gpu(MOE, ep2_tp2, DType.BF16) == weight_bytes_per_gpu(MOE, ep4, DType.BF16)
    # tp=2, ep=2, moe_tp=1 on one stage: experts 196_608 / 2 x 2 B = 196_608 per layer, 3 MoE layers + 1 dense.
    # attention 4 x 20_480 = 81_920; dense FFN 24_576 / 2 x 2 = 24_576; MoE 3 x (196_608 + 12_288 + 2_048)
    # = 632_832; ends (64_000 + 64_000) / 2 x 2 = 128_000
    layout = make_layout(tp=2, moe_tp=1, moe_ep=2)
    assert weight_bytes_per_gpu(MOE, layout, DType.BF16) == 81_920 + 24_576 + 632_832 + 128_000


def test_fp8_experts_beside_bf16_attention() -> None:
    layout = make_layout(tp=2, pp=2, attention_dp=2, moe_ep=4)
    # Only the routed experts drop to 1 byte: 196_608 / 4 x 1 B = 49_152 per layer.
    # 40_960 attention + 2 x (49_152 + 12_288 + 2_048) + 64_000 ends
    assert weight_bytes_per_gpu(MOE, layout, DType.BF16, DType.FP8) == 40_960 + 126_976 + 64_000
    # All-fp8 weights: attention, shared expert and experts at 1 byte; router, embedding and head stay bf16.
    # 2 x 20_480 / 2 x 1 = 20_480; 2 x (49_152 + 6_144 + 2_048) = 114_688; ends 64_000
    assert weight_bytes_per_gpu(MOE, layout, DType.FP8) == 20_480 + 114_688 + 64_000
    # mxfp4 experts: 0.5 B + one 1-byte scale per 32 elements = 0.53125 B; 49_152 x 0.53125 = 26_112.
    assert weight_bytes_per_gpu(MOE, layout, DType.BF16, DType.MXFP4) == 40_960 + 2 * (26_112 + 14_336) + 64_000


def test_mla_down_projections_are_not_split_by_tp() -> None:
    # tp=4, tied embedding: attention 3 x (4_608 / 4 + 3_328) x 2 B = 3 x 4_480 x 2 = 26_880;
    # FFN 3 x 24_576 / 4 x 2 = 36_864; embedding 64_000 / 4 x 2 = 32_000
    assert weight_bytes_per_gpu(MLA, make_layout(tp=4), DType.BF16) == 26_880 + 36_864 + 32_000


def test_the_most_loaded_pipeline_stage_counts() -> None:
    # A model whose dense FFN outweighs a MoE layer on one GPU (DeepSeek-V3-like with wide expert parallelism:
    # the dense first layers hold 3 x 7168 x 18432 parameters, a MoE layer's 8-way share far fewer).
    wide_dense = tiny_dense(
        name="tiny-wide-dense",
        intermediate_size=1024,
        moe=MoESpec(num_experts=16, experts_per_token=2, expert_intermediate_size=64, num_dense_layers=1),
    )
    layout = make_layout(tp=1, pp=2, attention_dp=4, moe_ep=4)
    # Stage 0 holds layers 0 (dense) and 1 (MoE) and the embedding; stage 1 layers 2, 3 (MoE) and the LM head.
    attention = 20_480 * 2  # 40_960 B per layer at tp=1, bf16
    dense_ffn = 3 * 64 * 1024 * 2  # 393_216
    moe_layer = 16 * 3 * 64 * 64 // 4 * 2 + 64 * 16 * 2  # experts over ep=4 + router = 98_304 + 2_048
    stage0 = 2 * attention + dense_ffn + moe_layer + 64_000 * 2  # 81_920 + 393_216 + 100_352 + 128_000
    stage1 = 2 * attention + 2 * moe_layer + 64_000 * 2  # 81_920 + 200_704 + 128_000
    assert stage0 == 703_488
    assert stage1 == 410_624
    # Every stage holds the same number of KV blocks, so the heaviest one sets the budget.
    assert weight_bytes_per_gpu(wide_dense, layout, DType.BF16) == max(stage0, stage1)


# KV bytes per token --------------------------------------------------------------------------------------


def test_kv_bytes_per_token_gqa() -> None:
    # 4 layers x (K and V) x 2 KV heads x 16 dims x 2 B
    assert kv_bytes_per_token_per_gpu(DENSE, ParallelLayout(), DType.BF16) == 512
    assert kv_bytes_per_token_per_gpu(DENSE, ParallelLayout(), DType.FP8) == 256
    # tp=2: one KV head per GPU
    assert kv_bytes_per_token_per_gpu(DENSE, make_layout(tp=2), DType.BF16) == 256
    # tp=8 > 2 KV heads: each GPU still keeps a whole (replicated) KV head
    assert kv_bytes_per_token_per_gpu(DENSE, make_layout(tp=8), DType.BF16) == 256
    # pp=2: 2 layers per stage
    assert kv_bytes_per_token_per_gpu(DENSE, make_layout(pp=2), DType.BF16) == 256
    # attention DP does not split a rank's KV cache
    assert kv_bytes_per_token_per_gpu(DENSE, make_layout(tp=2, attention_dp=2), DType.BF16) == 256


def test_kv_bytes_per_token_mla() -> None:
    # 3 layers x (kv_lora 16 + rope 4) x 2 B: the latent is shared by all heads.
    assert kv_bytes_per_token_per_gpu(MLA, ParallelLayout(), DType.BF16) == 120
    # ... so tensor parallelism replicates it rather than splitting it.
    assert kv_bytes_per_token_per_gpu(MLA, make_layout(tp=4), DType.BF16) == 120
    assert kv_bytes_per_token_per_gpu(MLA, ParallelLayout(), DType.FP8) == 60
    # pp=2: ceil(3 / 2) = 2 layers on the fuller stage
    assert kv_bytes_per_token_per_gpu(MLA, make_layout(pp=2), DType.BF16) == 80


# KV capacity --------------------------------------------------------------------------------------------


def _plan(**changes: Any) -> MemoryPlan:
    """The memory plan of DENSE on one GPU, bf16 weights and KV, 256 batched tokens, with ``changes``."""
    args: dict[str, Any] = {
        "model": DENSE,
        "gpu": GPU,
        "engine": ENGINE,
        "layout": ParallelLayout(),
        "weight_dtype": DType.BF16,
        "kv_dtype": DType.BF16,
        "max_batched_tokens": 256,
    }
    return plan_memory(**{**args, **changes})


def test_activation_reserve() -> None:
    # 256 tokens x (18 x 64 + 4 x 128 / tp=1) x 2 B = 256 x 1_664 x 2 = 851_968 activations;
    # min(32 sequences, 256 tokens) x vocab 1000 x 4 B = 128_000 sampler; no CUDA graphs; 0.6 GiB outside torch
    reserve = activation_reserve_bytes(DENSE, ParallelLayout(), ENGINE, 256)
    assert reserve == 851_968 + 128_000 + NON_TORCH_RESERVE_BYTES
    graphed = replace(ENGINE, cuda_graphs=True)
    assert activation_reserve_bytes(DENSE, ParallelLayout(), graphed, 256) == reserve + CUDA_GRAPH_RESERVE_BYTES


def test_kv_capacity_from_the_formula() -> None:
    plan = _plan()
    usable = 2 * GIB * 0.5  # 1_073_741_824
    # attention 4 x 20_480 x 2 = 163_840 + FFN 4 x 24_576 x 2 = 196_608 + ends 128_000 x 2 = 256_000
    weights = 616_448
    reserve = 851_968 + 128_000 + 0.6 * GIB  # 645_225_062.4
    kv_bytes = usable - weights - reserve  # 427_900_313.6
    assert plan.usable_bytes == usable
    assert plan.weight_bytes == weights
    assert plan.reserve_bytes == pytest.approx(reserve, abs=1e-6)
    assert plan.kv_cache_bytes == pytest.approx(kv_bytes, abs=1e-6)
    assert plan.kv_bytes_per_token == 512
    # 427_900_313.6 // 512 = 835_742 tokens (512 x 835_742 = 427_899_904), rounded down to whole 16-token
    # blocks: 835_742 // 16 = 52_233 blocks = 835_728 tokens.
    assert math.floor(kv_bytes / 512) == 835_742
    assert plan.kv_capacity_tokens == 835_728
    assert plan.kv_capacity_tokens % KV_BLOCK_TOKENS == 0


def test_kv_capacity_with_an_explicit_memory_fraction_and_tp2() -> None:
    plan = _plan(layout=make_layout(tp=2), kv_dtype=DType.FP8, max_batched_tokens=100, memory_fraction=0.75)
    usable = 2 * GIB * 0.75  # 1_610_612_736
    weights = 616_448 / 2  # every matrix split over tp=2: 308_224
    # 100 x (18 x 64 + 4 x 128 / 2) x 2 = 100 x 1_408 x 2 = 281_600; sampler 32 x 1000 x 4 = 128_000
    reserve = 281_600 + 128_000 + 0.6 * GIB
    per_token = 4 * 2 * 1 * 16 * 1  # 4 layers, K and V, 1 KV head per GPU, 16 dims, fp8 = 128 B
    # (1_610_612_736 - 308_224 - 409_600 - 644_245_094.4) = 965_649_817.6 B -> 7_544_139 tokens
    # (128 x 7_544_139 = 965_649_792) -> 471_508 whole blocks = 7_544_128 tokens
    assert plan.kv_bytes_per_token == per_token
    assert usable - weights - reserve == pytest.approx(965_649_817.6, abs=1e-3)
    assert plan.kv_capacity_tokens == 7_544_128


def test_kv_capacity_is_zero_when_weights_do_not_fit() -> None:
    small = replace(GPU, memory_bytes=1.0 * GIB)
    # 0.5 GiB usable is less than the 0.6 GiB reserve alone.
    plan = _plan(gpu=small)
    assert plan.kv_cache_bytes < 0
    assert plan.kv_capacity_tokens == 0


def test_require_fit_names_the_numbers() -> None:
    plan = _plan()
    require_fit(plan, min_tokens=835_728, label="tiny-dense tp1")  # exactly enough: accepted
    with pytest.raises(PlanningError) as info:
        require_fit(plan, min_tokens=835_729, label="tiny-dense tp1")
    message = str(info.value)
    assert message.startswith("tiny-dense tp1 does not fit: ")
    assert "(835728 tokens)" in message
    assert "one request needs 835729 tokens of KV cache" in message
    # usable 1.0 GiB, reserve 0.6 GiB, weights 0.0 GiB, KV 0.4 GiB
    assert "of 1.0 GiB usable per GPU" in message
    assert "reserve 0.6 GiB" in message
    assert "leaves 0.4 GiB for KV" in message
