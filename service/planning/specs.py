"""Typed specifications of models, GPUs, engines and dtypes used by the planning core."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class PlanningError(ValueError):
    """A planning request that cannot be answered as asked (bad input or an infeasible strategy)."""


class DType(StrEnum):
    """Numeric formats for weights and the KV cache."""

    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    # NVIDIA fp4 (e2m1 with an fp8 scale per 16 elements), the Blackwell tensor-core format.
    FP4 = "fp4"
    # OCP microscaling fp4 (e2m1 with an e8m0 scale per 32 elements), e.g. gpt-oss experts.
    MXFP4 = "mxfp4"

    @property
    def bytes_per_element(self) -> float:
        """Storage bytes per element (4-bit formats include their block scales)."""
        return _DTYPE_BYTES[self]


_DTYPE_BYTES: dict[DType, float] = {
    DType.BF16: 2.0,
    DType.FP8: 1.0,
    DType.INT8: 1.0,
    # 4-bit weights carry one 16-bit scale per group of 128 (int4) or one 8-bit scale per 16 (fp4).
    DType.INT4: 0.5 + 2.0 / 128,
    DType.FP4: 0.5 + 1.0 / 16,
    DType.MXFP4: 0.5 + 1.0 / 32,
}

WEIGHT_DTYPES: tuple[DType, ...] = (DType.BF16, DType.FP8, DType.INT4, DType.FP4, DType.MXFP4)
# Names accepted for a dtype beside its value.
DTYPE_ALIASES: dict[str, DType] = {"nvfp4": DType.FP4, "fp8_block": DType.FP8, "w4a16_mxfp4": DType.MXFP4}
# 4-bit formats: they run on fp4 tensor cores where the GPU has them, else as weight-only (dequantised) GEMMs.
FOUR_BIT_DTYPES: tuple[DType, ...] = (DType.INT4, DType.FP4, DType.MXFP4)
KV_DTYPES: tuple[DType, ...] = (DType.BF16, DType.FP8)


@dataclass(frozen=True, slots=True)
class MoESpec:
    """Mixture-of-experts layout of a model's feed-forward blocks."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    # Leading layers that keep a dense FFN (DeepSeek-V3: first_k_dense_replace = 3).
    num_dense_layers: int = 0


@dataclass(frozen=True, slots=True)
class MLASpec:
    """Multi-head latent attention dimensions (DeepSeek-V2/V3)."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture numbers of a decoder-only transformer."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    # SwiGLU-style FFNs have gate, up and down projections; OPT-style have only up and down.
    ffn_gated: bool = True
    max_position_embeddings: int = 131072
    # Sliding-window attention: window in tokens and the share of layers that use it (gpt-oss: 128, 0.5).
    sliding_window_tokens: int = 0
    sliding_window_layer_fraction: float = 0.0
    # QK-norm over the whole q and k projections rather than per head (MiniMax-M2 `qk_norm_type: per_layer`): under
    # attention TP every layer all-reduces each token's q and k variances across the TP group.
    qk_norm_across_heads: bool = False
    hf_id: str = ""
    moe: MoESpec | None = None
    mla: MLASpec | None = None

    @property
    def is_moe(self) -> bool:
        """Whether feed-forward blocks are mixtures of experts."""
        return self.moe is not None


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Datasheet numbers of one accelerator type."""

    name: str
    memory_bytes: float
    hbm_bandwidth_bytes_per_s: float
    # Dense (no sparsity) peak throughput per dtype; a dtype absent here has no tensor-core path.
    peak_flops_per_s: dict[DType, float]
    intra_node_bandwidth_bytes_per_s: float
    inter_node_bandwidth_bytes_per_s: float
    gpus_per_node: int
    price_per_hour_usd: float
    num_sms: int
    vendor: str = "nvidia"
    # GPUs joined by the scale-up fabric (NVLink switch domain): 8 on HGX boards, 72 on GB200 NVL72.
    # 0 means one node.
    nvlink_domain_gpus: int = 0
    # Weight formats the GPU's kernels dequantise to bf16 math (no tensor-core path of their own).
    weight_only_dtypes: tuple[DType, ...] = (DType.INT4, DType.MXFP4)
    description: str = ""
    # Architecture family (hopper, blackwell, ada, ampere, cdna3): a GPU without a kernel calibration of its own
    # takes its family's (service/catalog/loader.py ARCHITECTURE_CALIBRATION).
    architecture: str = ""

    @property
    def scale_up_domain_gpus(self) -> int:
        """GPUs that reach each other over the scale-up links rather than the network."""
        return self.nvlink_domain_gpus or self.gpus_per_node

    def peak_for(self, dtype: DType) -> float:
        """Peak FLOP/s for a GEMM whose inputs are in ``dtype`` (falls back to bf16 math)."""
        if dtype in self.peak_flops_per_s:
            return self.peak_flops_per_s[dtype]
        return self.peak_flops_per_s[DType.BF16]

    def runs_natively(self, dtype: DType) -> bool:
        """Whether GEMMs with ``dtype`` weights run on this GPU's tensor cores in that format."""
        return dtype in self.peak_flops_per_s

    def supports_weights(self, dtype: DType) -> bool:
        """Whether the GPU can serve weights stored in ``dtype`` at all (natively or dequantised)."""
        return dtype is DType.BF16 or self.runs_natively(dtype) or dtype in self.weight_only_dtypes


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Serving-engine behaviour: CPU costs, CUDA graphs and default scheduler knobs."""

    name: str
    # CPU time the engine spends per step outside the GPU (schedule, prepare inputs, sample, detokenize).
    step_overhead_s: float
    # Extra CPU time per running sequence per step.
    per_sequence_overhead_s: float
    # CPU cost of launching one kernel eagerly (steps not captured in a CUDA graph).
    kernel_launch_s: float
    cuda_graphs: bool
    cuda_graph_max_batch: int
    # Whether the CPU work of step n+1 overlaps the GPU work of step n.
    overlap_scheduling: bool
    max_num_batched_tokens: int
    max_num_seqs: int
    chunked_prefill: bool
    # Whether a step can carry prefill chunks and decode tokens together.
    mixed_batches: bool
    gpu_memory_fraction: float
    # GPU-idle time per step that overlapping cannot hide (host sync, sampling copies).
    step_gap_s: float = 0.0
    # Latency the API server adds to each request outside the GPU steps (HTTP, chat template and tokenisation
    # before the scheduler, detokenisation and streaming of the first token), seen by the client in TTFT and E2E.
    request_overhead_s: float = 0.0
    # Tensor-parallel all-reduces inside one node run the engine's own kernels (one-shot/two-shot over
    # peer-to-peer NVLink buffers, below 8 MiB) instead of NCCL: vLLM `disable_custom_all_reduce` and SGLang
    # `--disable-custom-all-reduce` default to off, TRT-LLM's `allreduce_strategy` AUTO picks its custom kernels.
    custom_all_reduce: bool = True
    # Piecewise CUDA graphs (vLLM V1) also cover mixed prefill/decode steps, all but attention.
    piecewise_cuda_graphs: bool = False
    # Share of a request's output tokens whose KV blocks admission reserves up front: 0 allocates on
    # demand and preempts when full (vLLM), 1 guarantees no eviction (TRT-LLM's default policy).
    kv_reserve_output_fraction: float = 0.0
    # Batch-forming rules of the engine family: vllm, sglang or trtllm (service/planning/schedulers.py).
    scheduler: str = "vllm"
    # vLLM long_prefill_token_threshold: cap on one request's prefill chunk per step (0 = none).
    long_prefill_token_threshold_tokens: int = 0
    # SGLang admission estimate: initial and floor new_token_ratio, steps to decay between them.
    new_token_ratio_init: float = 0.7
    new_token_ratio_min: float = 0.098
    new_token_ratio_decay_steps: int = 600
    # SGLang retract_decode: decode steps of headroom kept after retracting requests.
    retract_decode_steps: int = 20
    # SGLang max_prefill_tokens: token budget of one prefill batch beside chunked_prefill_size.
    max_prefill_tokens: int = 16384
    # TRT-LLM without chunked prefill: max_num_tokens sized to max_batch_size + prompt + 500 (benchmarked configs).
    prompt_sized_token_budget: bool = False
    # Automatic prefix caching on by default (vLLM V1 enable_prefix_caching, SGLang radix cache, TRT-LLM block reuse).
    prefix_caching: bool = False
    # KV-cache dtype used by default for a given weight dtype.
    default_kv_dtype: dict[DType, DType] = field(default_factory=dict)
    # Whether the overlap scheduler stays on with speculative decoding (SGLang turns it off for EAGLE/MTP).
    speculative_overlap: bool = True
    description: str = ""

    def overlaps(self, *, speculative: bool) -> bool:
        """Whether the engine forms the next batch while the current one runs (with speculative decoding or not)."""
        return self.overlap_scheduling and (not speculative or self.speculative_overlap)

    def kv_dtype_for(self, weight_dtype: DType) -> DType:
        """Default KV-cache dtype for weights in ``weight_dtype``."""
        return self.default_kv_dtype.get(weight_dtype, DType.BF16)


SPECULATIVE_METHODS = ("mtp", "eagle", "eagle3")
MAX_DRAFT_TOKENS = 8


@dataclass(frozen=True, slots=True)
class SpeculativeDecoding:
    """Speculative decoding with a one-layer drafter (the model's MTP module, EAGLE or EAGLE-3 heads)."""

    method: str
    # Tokens the drafter proposes per step (SGLang speculative_num_steps, vLLM num_speculative_tokens).
    draft_tokens: int
    # Mean tokens each sequence gains per step, the bonus token included: what engines log as accept length.
    acceptance_length: float

    def validate(self) -> None:
        """Refuse settings no engine runs."""
        if self.method not in SPECULATIVE_METHODS:
            raise PlanningError(f"unknown speculative method {self.method!r}; known: {', '.join(SPECULATIVE_METHODS)}")
        if not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise PlanningError(f"draft tokens must be between 1 and {MAX_DRAFT_TOKENS} (got {self.draft_tokens})")
        if not 1.0 <= self.acceptance_length <= self.draft_tokens + 1:
            raise PlanningError(
                f"acceptance length must be at least 1 and at most draft tokens + 1 = {self.draft_tokens + 1} "
                f"(got {self.acceptance_length})"
            )


SPEC_KINDS = ("strategy", "fleet")


def spec_kind(doc: Mapping[str, Any]) -> str:
    """`fleet` or `strategy`: the document's `kind`, else `fleet` when it lists `deployments`."""
    kind = doc.get("kind")
    if kind is None:
        return "fleet" if "deployments" in doc else "strategy"
    if kind not in SPEC_KINDS:
        raise PlanningError(f"unknown spec kind {kind!r}; use strategy or fleet")
    return str(kind)
