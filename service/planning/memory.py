"""Memory model: weights per GPU, runtime reserve and the KV-cache capacity that is left."""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.planning.specs import DType, EngineSpec, GpuSpec, ModelSpec, PlanningError
from service.planning.stepcost import ParallelLayout, kv_bytes_per_token_per_gpu

GIB = 1024.0**3
# Memory outside PyTorch's allocator (CUDA context, NCCL buffers) per GPU.
NON_TORCH_RESERVE_BYTES = 0.6 * GIB
CUDA_GRAPH_RESERVE_BYTES = 0.5 * GIB
# KV cache is allocated in blocks of this many tokens (vLLM's default block_size; --kv-block-size changes it).
KV_BLOCK_TOKENS = 16


@dataclass(frozen=True, slots=True)
class ParameterCounts:
    """Parameter counts of a model by where they live."""

    embedding: float
    lm_head: float
    # Per layer: attention parameters split by tensor parallelism, and replicated ones (MLA down-projections).
    attention_sharded: float
    attention_replicated: float
    dense_ffn: float
    moe_experts: float
    moe_shared: float
    moe_router: float

    def total(self, model: ModelSpec) -> float:
        """All parameters of the model."""
        moe_layers = 0 if model.moe is None else model.num_layers - model.moe.num_dense_layers
        dense_layers = model.num_layers - moe_layers
        per_layer_attention = self.attention_sharded + self.attention_replicated
        return (
            self.embedding
            + self.lm_head
            + model.num_layers * per_layer_attention
            + dense_layers * self.dense_ffn
            + moe_layers * (self.moe_experts + self.moe_shared + self.moe_router)
        )


def parameter_counts(model: ModelSpec) -> ParameterCounts:
    """Count parameters from the architecture numbers."""
    hidden = model.hidden_size
    mla = model.mla
    if mla is None:
        sharded = hidden * model.head_dim * (2 * model.num_attention_heads + 2 * model.num_kv_heads)
        replicated = 0.0
    else:
        heads = model.num_attention_heads
        qk_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        q = mla.q_lora_rank * heads * qk_head if mla.q_lora_rank > 0 else hidden * heads * qk_head
        sharded = (
            q + mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim) + heads * mla.v_head_dim * hidden
        )
        replicated = hidden * (mla.q_lora_rank + mla.kv_lora_rank + mla.qk_rope_head_dim)
    matrices = 3 if model.ffn_gated else 2
    dense_ffn = matrices * hidden * model.intermediate_size
    experts = shared = router = 0.0
    if model.moe is not None:
        moe = model.moe
        experts = moe.num_experts * matrices * hidden * moe.expert_intermediate_size
        shared_width = moe.num_shared_experts * (moe.shared_expert_intermediate_size or moe.expert_intermediate_size)
        shared = matrices * hidden * shared_width
        router = hidden * moe.num_experts
    embedding = float(model.vocab_size * hidden)
    lm_head = 0.0 if model.tie_word_embeddings else embedding
    return ParameterCounts(
        embedding, lm_head, float(sharded), float(replicated), float(dense_ffn), experts, shared, router
    )


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Per-GPU memory budget of one replica layout."""

    gpu_memory_bytes: float
    usable_bytes: float
    weight_bytes: float
    reserve_bytes: float
    kv_cache_bytes: float
    kv_bytes_per_token: float
    kv_capacity_tokens: int

    def describe(self) -> str:
        """One line with the numbers, in GiB."""
        return (
            f"weights {self.weight_bytes / GIB:.1f} GiB + reserve {self.reserve_bytes / GIB:.1f} GiB "
            f"of {self.usable_bytes / GIB:.1f} GiB usable per GPU leaves {self.kv_cache_bytes / GIB:.1f} GiB "
            f"for KV ({self.kv_capacity_tokens} tokens)"
        )


def weight_bytes_per_gpu(
    model: ModelSpec, layout: ParallelLayout, weight_dtype: DType, moe_weight_dtype: DType | None = None
) -> float:
    """Bytes of weights on the most loaded GPU of the replica."""
    counts = parameter_counts(model)
    wbytes = weight_dtype.bytes_per_element
    expert_bytes = (moe_weight_dtype or weight_dtype).bytes_per_element
    # Embeddings and the LM head stay in bf16 in quantized checkpoints.
    embed_bytes = DType.BF16.bytes_per_element
    tp, pp = layout.tp, layout.pp
    # Attention, dense FFNs and shared experts are split over the attention TP group (each attention-DP
    # rank holds a copy); routed experts over moe_ep groups, each expert cut moe_tp ways.
    attention = (counts.attention_sharded / tp) * wbytes + counts.attention_replicated * wbytes
    dense_layer = attention + counts.dense_ffn / tp * wbytes
    experts = counts.moe_experts / (layout.moe_ep * layout.expert_tp) * expert_bytes
    moe_layer = attention + experts + counts.moe_shared / tp * wbytes + counts.moe_router * embed_bytes
    dense_total = model.num_layers if model.moe is None else min(model.num_layers, model.moe.num_dense_layers)
    per_stage = math.ceil(model.num_layers / pp)
    heaviest = 0.0
    # Leading dense layers sit in the first stages; the embedding on the first, the LM head on the last.
    for stage in range(pp):
        first = stage * per_stage
        last = min(model.num_layers, first + per_stage)
        dense = max(0, min(last, dense_total) - first)
        body = dense * dense_layer + (last - first - dense) * moe_layer
        if stage == 0:
            body += counts.embedding / tp * embed_bytes
        if stage == pp - 1:
            body += counts.lm_head / tp * embed_bytes
        heaviest = max(heaviest, body)
    return heaviest


def activation_reserve_bytes(model: ModelSpec, layout: ParallelLayout, engine: EngineSpec, max_tokens: int) -> float:
    """Peak activation and sampler memory the engine keeps free of KV blocks."""
    ffn = (
        model.intermediate_size
        if model.moe is None
        else model.moe.expert_intermediate_size * model.moe.experts_per_token
    )
    activations = max_tokens * (18.0 * model.hidden_size + 4.0 * ffn / layout.tp) * 2.0
    sampler = min(engine.max_num_seqs, max_tokens) * model.vocab_size * 4.0
    graphs = CUDA_GRAPH_RESERVE_BYTES if engine.cuda_graphs else 0.0
    return activations + sampler + graphs + NON_TORCH_RESERVE_BYTES


def plan_memory(
    *,
    model: ModelSpec,
    gpu: GpuSpec,
    engine: EngineSpec,
    layout: ParallelLayout,
    weight_dtype: DType,
    kv_dtype: DType,
    max_batched_tokens: int,
    memory_fraction: float | None = None,
    moe_weight_dtype: DType | None = None,
    kv_block_tokens: int = KV_BLOCK_TOKENS,
) -> MemoryPlan:
    """Budget one GPU of the replica; the KV capacity may come out zero or negative."""
    fraction = engine.gpu_memory_fraction if memory_fraction is None else memory_fraction
    usable = gpu.memory_bytes * fraction
    weights = weight_bytes_per_gpu(model, layout, weight_dtype, moe_weight_dtype)
    reserve = activation_reserve_bytes(model, layout, engine, max_batched_tokens)
    kv_bytes = usable - weights - reserve
    per_token = kv_bytes_per_token_per_gpu(model, layout, kv_dtype)
    tokens = int(max(0.0, kv_bytes) // per_token) // kv_block_tokens * kv_block_tokens
    return MemoryPlan(gpu.memory_bytes, usable, weights, reserve, kv_bytes, per_token, tokens)


def require_fit(plan: MemoryPlan, *, min_tokens: int, label: str) -> None:
    """Refuse a layout whose KV cache cannot hold ``min_tokens`` (one longest request)."""
    if plan.kv_capacity_tokens < min_tokens:
        raise PlanningError(
            f"{label} does not fit: {plan.describe()}; one request needs {min_tokens} tokens of KV cache"
        )
