"""Cost of one engine step (a batch of prefill chunks and decode tokens) on one model replica."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.planning.kernels import (
    FloatArray,
    KernelCalibration,
    attention_decode_time_s,
    attention_prefill_time_s,
    collective_time_s,
    elementwise_time_s,
    gemm_time_s,
    prefill_chunk_tiles,
    prefill_tile_shape,
    tp_all_reduce_time_s,
)
from service.planning.mla_cost import MlaCalibration, mla_decode_time_s, mla_prefill_time_s
from service.planning.moe_cost import (
    AUTO_BACKEND,
    RANDOM,
    MoeCalibration,
    alltoall_time_s,
    expert_kernel,
    moe_layer_time_s,
)
from service.planning.specs import DType, EngineSpec, GpuSpec, ModelSpec, PlanningError, SpeculativeDecoding

# TP sizes vLLM's CustomAllreduce serves (vllm/distributed/device_communicators/custom_all_reduce.py
# _SUPPORTED_WORLD_SIZES; SGLang carries the same kernels); larger or cross-node groups fall back to NCCL.
CUSTOM_ALL_REDUCE_GPUS = frozenset({2, 4, 6, 8})

# Mean contexts (tokens) at which MLA decode time is tabulated per batch size; steps interpolate between them.
MLA_CONTEXT_GRID_TOKENS = (0.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0)
# Kernels per decoder layer that an eager (non-graphed) step launches: norms, GEMMs, rotary,
# attention, activation, collectives.
KERNELS_PER_LAYER = 14
# Activation bytes moved by element-wise kernels per token per layer, in units of hidden size.
ELEMENTWISE_HIDDEN_PASSES = 10.0
ELEMENTWISE_KERNELS_PER_LAYER = 5


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    """How one replica splits a model, as engines express it.

    Attention runs tensor-parallel over ``tp`` GPUs in each of ``attention_dp`` data-parallel ranks; the
    MoE layers of the same tp x attention_dp GPUs are split ``moe_tp`` (slices of each expert) x ``moe_ep``
    (groups of experts); ``pp`` pipeline stages repeat that. ``moe_tp`` 0 means all the stage's GPUs that
    expert parallelism leaves (tp x attention_dp / moe_ep).
    """

    tp: int = 1
    pp: int = 1
    attention_dp: int = 1
    moe_tp: int = 0
    moe_ep: int = 1

    @property
    def stage_gpus(self) -> int:
        """GPUs of one pipeline stage."""
        return self.tp * self.attention_dp

    @property
    def gpus(self) -> int:
        """GPUs in one replica."""
        return self.stage_gpus * self.pp

    @property
    def expert_tp(self) -> int:
        """Slices each expert is cut into."""
        return self.moe_tp or max(1, self.stage_gpus // max(1, self.moe_ep))

    @property
    def ep(self) -> int:
        """Expert-parallel degree (alias of ``moe_ep``)."""
        return self.moe_ep

    def label(self) -> str:
        """Short human label, e.g. tp4-pp2 or tp1-dp8-ep8."""
        parts = [f"tp{self.tp}"]
        if self.attention_dp > 1:
            parts.append(f"dp{self.attention_dp}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        if self.moe_ep > 1:
            parts.append(f"ep{self.moe_ep}")
            if self.expert_tp > 1:
                parts.append(f"moetp{self.expert_tp}")
        return "-".join(parts)

    def describe(self) -> dict[str, int]:
        """The layout as a plain mapping."""
        return {
            "tp": self.tp,
            "pp": self.pp,
            "attention_dp": self.attention_dp,
            "moe_tp": self.expert_tp,
            "moe_ep": self.moe_ep,
        }


def make_layout(
    *, tp: int = 1, pp: int = 1, attention_dp: int = 1, moe_tp: int | None = None, moe_ep: int = 1
) -> ParallelLayout:
    """A layout from engine-style arguments; moe_tp defaults to the GPUs expert parallelism leaves."""
    return ParallelLayout(tp=tp, pp=pp, attention_dp=attention_dp, moe_tp=moe_tp or 0, moe_ep=moe_ep)


def validate_layout(model: ModelSpec, layout: ParallelLayout) -> None:
    """Refuse layouts the model cannot be split into."""
    degrees = (layout.tp, layout.pp, layout.attention_dp, layout.moe_ep)
    if min(degrees) < 1 or layout.moe_tp < 0:
        raise PlanningError("parallel degrees must be positive integers")
    if model.num_attention_heads % layout.tp != 0:
        raise PlanningError(
            f"tp={layout.tp} does not divide the {model.num_attention_heads} attention heads of {model.name}; "
            "use attention data parallelism (--attention-dp) for the rest of the GPUs"
        )
    if model.num_kv_heads % layout.tp != 0 and layout.tp % model.num_kv_heads != 0:
        raise PlanningError(
            f"tp={layout.tp} neither divides nor is a multiple of the {model.num_kv_heads} KV heads of {model.name}"
        )
    if layout.pp > model.num_layers:
        raise PlanningError(f"pp={layout.pp} exceeds the {model.num_layers} layers of {model.name}")
    if model.moe is None:
        if layout.moe_ep > 1:
            raise PlanningError(f"expert parallelism needs an MoE model; {model.name} is dense")
        return
    if layout.expert_tp * layout.moe_ep != layout.stage_gpus:
        raise PlanningError(
            f"moe_tp x moe_ep = {layout.expert_tp} x {layout.moe_ep} must equal tp x attention_dp = "
            f"{layout.tp} x {layout.attention_dp} (the GPUs of one stage)"
        )
    if model.moe.num_experts % layout.moe_ep != 0:
        raise PlanningError(f"moe_ep={layout.moe_ep} does not divide the {model.moe.num_experts} experts")
    if model.moe.expert_intermediate_size % layout.expert_tp != 0:
        raise PlanningError(
            f"moe_tp={layout.expert_tp} does not divide the expert width {model.moe.expert_intermediate_size}"
        )


def kv_bytes_per_token_per_gpu(model: ModelSpec, layout: ParallelLayout, kv_dtype: DType) -> float:
    """KV-cache bytes one token occupies on one GPU of the replica."""
    layers = math.ceil(model.num_layers / layout.pp)
    if model.mla is not None:
        # The latent cache is shared by all heads, so tensor parallelism replicates it.
        return layers * (model.mla.kv_lora_rank + model.mla.qk_rope_head_dim) * kv_dtype.bytes_per_element
    kv_heads = max(1.0, model.num_kv_heads / layout.tp)
    return layers * 2.0 * kv_heads * model.head_dim * kv_dtype.bytes_per_element


@dataclass(frozen=True, slots=True)
class StepTime:
    """Breakdown of one step's duration in seconds."""

    total_s: float
    gpu_s: float
    cpu_s: float
    gemm_s: float
    attention_s: float
    communication_s: float


class ReplicaStepCost:
    """Precomputed step-cost function for one (model, GPU, engine, layout, dtypes) combination."""

    def __init__(
        self,
        *,
        model: ModelSpec,
        gpu: GpuSpec,
        engine: EngineSpec,
        layout: ParallelLayout,
        weight_dtype: DType,
        kv_dtype: DType,
        calibration: KernelCalibration,
        max_tokens: int,
        moe_calibration: MoeCalibration | None = None,
        moe_weight_dtype: DType | None = None,
        speculative: SpeculativeDecoding | None = None,
        moe_routing: str = RANDOM,
        moe_backend: str = AUTO_BACKEND,
    ) -> None:
        validate_layout(model, layout)
        self.moe_routing = moe_routing
        self.speculative = speculative
        self.model = model
        self.gpu = gpu
        self.engine = engine
        self.layout = layout
        self.weight_dtype = weight_dtype
        self.kv_dtype = kv_dtype
        self.calibration = calibration
        self.moe_calibration = moe_calibration or MoeCalibration()
        self.moe_weight_dtype = moe_weight_dtype or weight_dtype
        self.moe_kernel = expert_kernel(self.moe_weight_dtype, gpu, moe_backend) if model.moe is not None else None
        self.max_tokens = max(1, max_tokens)
        tp = layout.tp
        self.layers_per_stage = math.ceil(model.num_layers / layout.pp)
        self.heads_per_gpu = model.num_attention_heads / tp
        self.kv_heads_per_gpu = max(1.0, model.num_kv_heads / tp)
        self.kv_bytes_per_token_layer = kv_bytes_per_token_per_gpu(model, layout, kv_dtype) / self.layers_per_stage
        self._prefill_shape = prefill_tile_shape(
            self.heads_per_gpu, self.kv_heads_per_gpu, self._attention_head_dim(), calibration
        )
        domain = gpu.scale_up_domain_gpus
        self.link_bandwidth = self._link_bandwidth(tp)
        # The engines' own all-reduce kernels (peer-to-peer buffers over NVLink) serve TP groups inside one node.
        self.tp_custom_all_reduce = (
            engine.custom_all_reduce and tp in CUSTOM_ALL_REDUCE_GPUS and tp <= gpu.scale_up_domain_gpus
        )
        self.moe_link_bandwidth = self._link_bandwidth(layout.stage_gpus)
        self.stage_link_bandwidth = self._link_bandwidth(layout.gpus)
        self.domain_gpus = domain
        m = np.arange(self.max_tokens + 1, dtype=np.float64)
        self._dense_layer_gemm = self._attention_gemms(m) + self._dense_ffn_gemms(m)
        self._moe_layer_gemm = self._attention_gemms(m) + self._moe_ffn_gemms(m) if model.moe else None
        # Expert-parallel dispatch + combine per MoE layer: low-latency kernels in decode-only steps,
        # normal (high-throughput) kernels when prefill tokens are in the step.
        self._ep_comm_decode, self._ep_comm_prefill = self._expert_parallel_comm(m)
        self._mla_arguments: dict[str, object] | None = None
        self._mla_decode_table = self._mla_decode_times(m) if model.mla is not None else None
        self._lm_head = gemm_time_s(
            m,
            model.vocab_size / tp,
            model.hidden_size,
            gpu=gpu,
            weight_dtype=weight_dtype,
            calibration=calibration,
        )
        if model.moe is not None:
            self.moe_layers = self.layers_per_stage - min(self.layers_per_stage, model.moe.num_dense_layers)
        else:
            self.moe_layers = 0
        self.dense_layers = self.layers_per_stage - self.moe_layers

    def _link_bandwidth(self, gpus: int) -> float:
        """Per-GPU bandwidth of a collective over ``gpus`` GPUs: scale-up links inside the domain."""
        if gpus <= self.gpu.scale_up_domain_gpus:
            return self.gpu.intra_node_bandwidth_bytes_per_s
        return self.gpu.inter_node_bandwidth_bytes_per_s

    def _gemm(self, m: FloatArray, n: float, k: float) -> FloatArray:
        return gemm_time_s(
            m,
            n,
            k,
            gpu=self.gpu,
            weight_dtype=self.weight_dtype,
            calibration=self.calibration,
        )

    def _attention_gemms(self, m: FloatArray) -> FloatArray:
        model = self.model
        hidden = model.hidden_size
        mla = model.mla
        if mla is None:
            qkv_n = (self.heads_per_gpu + 2 * self.kv_heads_per_gpu) * model.head_dim
            out: FloatArray = self._gemm(m, qkv_n, hidden) + self._gemm(m, hidden, self.heads_per_gpu * model.head_dim)
            return out
        # The MLA block (its projections, attention and output projection) is timed whole in mla_cost.
        return np.zeros_like(m)

    def _ffn_gemms(self, m: FloatArray, ffn_per_gpu: float) -> FloatArray:
        hidden = self.model.hidden_size
        up_n = (2.0 if self.model.ffn_gated else 1.0) * ffn_per_gpu
        out: FloatArray = self._gemm(m, up_n, hidden) + self._gemm(m, hidden, ffn_per_gpu)
        return out

    def _dense_ffn_gemms(self, m: FloatArray) -> FloatArray:
        return self._ffn_gemms(m, self.model.intermediate_size / self.layout.tp)

    def _moe_ffn_gemms(self, m: FloatArray) -> FloatArray:
        """Router, shared experts and the fused-MoE layer for ``m`` tokens per attention-DP rank."""
        moe = self.model.moe
        assert moe is not None
        layout = self.layout
        # Attention-DP ranks run the MoE layers in lock step: every rank's tokens enter every MoE layer.
        entering = m * layout.attention_dp
        experts = moe_layer_time_s(
            entering,
            hidden_size=self.model.hidden_size,
            expert_width_per_gpu=moe.expert_intermediate_size / layout.expert_tp,
            num_experts=moe.num_experts,
            local_experts=moe.num_experts // layout.moe_ep,
            topk=moe.experts_per_token,
            weight_dtype=self.moe_weight_dtype,
            gpu=self.gpu,
            calibration=self.moe_calibration,
            gated=self.model.ffn_gated,
            distribution=self.moe_routing,
            kernel=self.moe_kernel,
        )
        router = self._gemm(m, moe.num_experts, self.model.hidden_size)
        shared: FloatArray = np.zeros_like(m)
        if moe.num_shared_experts > 0:
            shared_ffn = moe.num_shared_experts * (moe.shared_expert_intermediate_size or moe.expert_intermediate_size)
            shared = self._ffn_gemms(m, shared_ffn / layout.tp)
        total: FloatArray = experts + router + shared
        return total

    def _mla_kwargs(self) -> dict[str, object]:
        """Arguments of the MLA block functions, built once per step-cost object (steps call them often)."""
        if self._mla_arguments is not None:
            return self._mla_arguments
        model = self.model
        self._mla_arguments = {
            "heads_per_gpu": self.heads_per_gpu,
            "kv_dtype": self.kv_dtype,
            "gemm_dtype": "fp8_block" if self.weight_dtype is DType.FP8 else "bf16",
            "gpu": self.gpu,
            "calibration": MlaCalibration().with_overrides(self.moe_calibration.mla),
            "mla": model.mla,
            "hidden_size": model.hidden_size,
        }
        return self._mla_arguments

    def _mla_decode_times(self, m: FloatArray) -> FloatArray:
        """MLA decode block time per layer, by batch size (rows) and mean context (MLA_CONTEXT_GRID_TOKENS)."""
        kwargs = self._mla_kwargs()
        columns = [
            mla_decode_time_s(m, np.full_like(m, ctx), **kwargs)  # type: ignore[arg-type]
            for ctx in MLA_CONTEXT_GRID_TOKENS
        ]
        table: FloatArray = np.stack(columns, axis=1)
        return table

    def _mla_attention_s(
        self, prefill_tokens: int, prefill_chunks: int, prefill_key_pairs: float, decode_sequences: int, context: float
    ) -> float:
        """One layer's MLA blocks for the step's prefill chunks and decode tokens."""
        total = 0.0
        if prefill_tokens > 0:
            chunks = max(1, prefill_chunks)
            chunk = prefill_tokens / chunks
            # Key pairs = sum of chunk x (past + (chunk + 1) / 2): recover the mean past length.
            past = max(0.0, prefill_key_pairs / prefill_tokens - (chunk + 1.0) / 2.0)
            kwargs = self._mla_kwargs()
            total += float(mla_prefill_time_s(chunks, chunk, past_kv_len=past, **kwargs))  # type: ignore[arg-type]
        if decode_sequences > 0:
            assert self._mla_decode_table is not None
            batch = min(decode_sequences, self.max_tokens)
            mean_context = context / decode_sequences
            row = self._mla_decode_table[batch]
            per_batch = float(np.interp(mean_context, MLA_CONTEXT_GRID_TOKENS, row))
            total += per_batch * decode_sequences / batch
        return total

    def _expert_parallel_comm(self, m: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Dispatch + combine time per MoE layer for ``m`` tokens per rank (zero without EP)."""
        layout, moe = self.layout, self.model.moe
        if moe is None or layout.moe_ep <= 1 or layout.attention_dp <= 1:
            return np.zeros_like(m), np.zeros_like(m)
        # Each GPU of a rank sends its share of the rank's tokens; dispatch carries fp8, combine bf16.
        per_gpu = m / layout.tp
        out = []
        for mode in ("low_latency", "normal"):
            phases = [
                alltoall_time_s(
                    per_gpu,
                    hidden_size=self.model.hidden_size,
                    topk=moe.experts_per_token,
                    ep_ranks=layout.moe_ep,
                    bytes_per_element=element_bytes,
                    intra_bandwidth_bytes_per_s=self.gpu.intra_node_bandwidth_bytes_per_s,
                    inter_bandwidth_bytes_per_s=self.gpu.inter_node_bandwidth_bytes_per_s,
                    ranks_per_domain=self.gpu.scale_up_domain_gpus,
                    mode=mode,
                    calibration=self.moe_calibration,
                    phase=phase,
                )
                for phase, element_bytes in (("dispatch", 1.0), ("combine", 2.0))
            ]
            out.append(phases[0] + phases[1])
        return out[0], out[1]

    def _ffn_width_per_gpu(self) -> float:
        moe = self.model.moe
        if moe is None:
            return self.model.intermediate_size / self.layout.tp
        return moe.expert_intermediate_size * moe.experts_per_token / self.layout.tp

    def _layer_gemms(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        if tokens > self.max_tokens:
            # Beyond the table GEMM time is linear in m; scale from the largest entry.
            return self._layer_gemms(self.max_tokens) * tokens / self.max_tokens
        dense = float(self._dense_layer_gemm[tokens]) * self.dense_layers
        moe = float(self._moe_layer_gemm[tokens]) * self.moe_layers if self._moe_layer_gemm is not None else 0.0
        return dense + moe

    def _lm_head_time(self, sequences: int) -> float:
        if sequences <= 0:
            return 0.0
        if sequences > self.max_tokens:
            return float(self._lm_head[self.max_tokens]) * sequences / self.max_tokens
        return float(self._lm_head[sequences])

    def step(
        self,
        *,
        prefill_tokens: int = 0,
        prefill_key_pairs: float = 0.0,
        prefill_kv_tokens: float = 0.0,
        prefill_sequences: int = 0,
        prefill_tiles: tuple[float, float, float] | None = None,
        decode_sequences: int = 0,
        decode_context_tokens: float = 0.0,
        sampled_sequences: int | None = None,
        prefill_chunks: int = 0,
        queries: int | None = None,
    ) -> StepTime:
        """Duration of one step that runs the given prefill chunks and decode tokens.

        ``prefill_tiles`` (query tiles, key tiles, longest query tile's key tiles; see ``prefill_chunk_tiles``) sums
        the chunks exactly; without it the prefill counts as ``prefill_chunks`` equal chunks. ``queries`` is the query
        tokens per decode sequence: by default 1, or with speculative decoding the verify pass and the drafts, the
        step charged per token gained ((verify + drafts) / acceptance length).
        """
        spec = self.speculative
        if queries is None and spec is not None and decode_sequences > 0:
            arguments = {name: value for name, value in locals().items() if name not in ("self", "spec")}
            return self._speculative_step(spec, {**arguments, "queries": spec.draft_tokens + 1})
        queries = queries or 1
        pp = self.layout.pp
        tokens = prefill_tokens + decode_sequences * queries
        if tokens <= 0:
            return StepTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        # With pipeline parallelism the batch is split into pp micro-batches that flow through the
        # stages back to back; a token sees every layer once, so the full-model time at batch/pp.
        micro = max(1, math.ceil(tokens / pp))
        # A partial last micro-batch still takes a full pipeline slot: no discount for uneven splits.
        scale = 1.0
        gemm = self._layer_gemms(micro) * pp * scale
        model, c, gpu = self.model, self.calibration, self.gpu
        layers_total = self.layers_per_stage * pp
        attention = 0.0
        # Prefill chunks of one token each (prompts whose cached prefix leaves only the last token): the engines run
        # one-token queries in the decode kernel's launch, beside the decoding sequences.
        one_token_chunks = model.mla is None and 0 < prefill_tokens == max(1, prefill_chunks or prefill_sequences)
        if model.mla is not None:
            # Verify queries count as decode rows of the absorbed MLA block at their sequence's context.
            attention = layers_total * self._mla_attention_s(
                prefill_tokens,
                prefill_chunks or prefill_sequences,
                prefill_key_pairs,
                decode_sequences * queries,
                decode_context_tokens * queries,
            )
        elif prefill_tokens > 0 and not one_token_chunks:
            if prefill_tiles is None:
                chunks = max(1, prefill_chunks or prefill_sequences)
                new = prefill_tokens / chunks
                query_tiles, key_tiles, longest = self.chunk_tiles(max(0.0, prefill_kv_tokens / chunks - new), new)
                prefill_tiles = (query_tiles * chunks, key_tiles * chunks, longest)
            units, _, tile_m, tile_n = self._prefill_shape
            attention += layers_total * attention_prefill_time_s(
                query_tiles=prefill_tiles[0],
                key_tiles=prefill_tiles[1],
                longest_key_tiles=prefill_tiles[2],
                head_units=units,
                tile_m=tile_m,
                tile_n=tile_n,
                head_dim=self._attention_head_dim(),
                query_tokens=float(prefill_tokens),
                kv_tokens_read=prefill_kv_tokens,
                heads_per_gpu=self.heads_per_gpu,
                kv_heads_per_gpu=self.kv_heads_per_gpu,
                kv_bytes_per_element=self.kv_dtype.bytes_per_element,
                fp8_kv=self.kv_dtype is DType.FP8,
                gpu=gpu,
                calibration=c,
            )
        decoded = decode_sequences + (prefill_tokens if one_token_chunks else 0)
        if decoded > 0 and model.mla is None:
            one_token_context = prefill_kv_tokens if one_token_chunks else 0.0
            attention += layers_total * attention_decode_time_s(
                sequences=decoded,
                context_tokens=decode_context_tokens + one_token_context,
                kv_bytes_per_token=self.kv_bytes_per_token_layer,
                kv_dtype=self.kv_dtype,
                # The verify queries of a sequence share one read of its KV.
                flops=self._decode_attention_flops(decode_context_tokens) * queries
                + self._decode_attention_flops(one_token_context),
                gpu=gpu,
                calibration=c,
                kv_heads=self.kv_heads_per_gpu,
                head_dim=self._attention_head_dim(),
            )
        elementwise_bytes = (
            tokens * (ELEMENTWISE_HIDDEN_PASSES * model.hidden_size + 3 * self._ffn_width_per_gpu()) * 2.0
        )
        elementwise = layers_total * elementwise_time_s(
            elementwise_bytes, ELEMENTWISE_KERNELS_PER_LAYER, gpu=gpu, calibration=c
        )
        communication = self._layer_communication(micro, decode_only=prefill_tokens == 0) * pp * scale
        if pp > 1:
            send = c.collective_base_latency_s + micro * model.hidden_size * 2.0 / (
                self.stage_link_bandwidth * c.collective_bus_efficiency
            )
            communication += send * (pp - 1) * pp * scale
        sampled = decode_sequences + prefill_sequences if sampled_sequences is None else sampled_sequences
        sampled += decode_sequences * (queries - 1)
        lm_head = self._lm_head_time(sampled)
        gpu_s = gemm + attention + elementwise + communication + lm_head
        cpu_s, launch_s = self._cpu_time(prefill_tokens, decode_sequences, prefill_sequences)
        gpu_s = max(gpu_s, launch_s)
        total = max(gpu_s, cpu_s) + self.engine.step_gap_s if self.engine.overlap_scheduling else gpu_s + cpu_s
        return StepTime(total, gpu_s, cpu_s, gemm + lm_head, attention, communication)

    def _speculative_step(self, spec: SpeculativeDecoding, verify_arguments: dict[str, Any]) -> StepTime:
        """A speculative decode step: the verify pass given, the drafts added, charged per token gained."""
        # Verify: every sequence's last token and its drafts go through the target model in one pass.
        verify = self.step(**verify_arguments)
        decode_sequences = int(verify_arguments["decode_sequences"])
        decode_context_tokens = float(verify_arguments["decode_context_tokens"])
        prefill_tokens = int(verify_arguments["prefill_tokens"])
        # Draft: draft_tokens passes of a one-layer drafter (a layer like the target's, then the LM head).
        plain = self.step(decode_sequences=decode_sequences, decode_context_tokens=decode_context_tokens, queries=1)
        lm_head = self._lm_head_time(decode_sequences)
        layer_s = (plain.gpu_s - lm_head) / (self.layers_per_stage * self.layout.pp)
        draft_s = spec.draft_tokens * (layer_s + lm_head)
        gpu_s = verify.gpu_s + draft_s
        overlap = self.engine.overlaps(speculative=True)
        total = max(gpu_s, verify.cpu_s) + self.engine.step_gap_s if overlap else gpu_s + verify.cpu_s
        # The simulator advances a decode sequence one token per step: a decode-only step is charged per token
        # gained. A step that also prefills keeps its full time (the prefill chunk moves once per step).
        per = spec.acceptance_length if prefill_tokens == 0 else 1.0
        return StepTime(
            total / per,
            gpu_s / per,
            verify.cpu_s / per,
            (verify.gemm_s + draft_s) / per,
            verify.attention_s / per,
            verify.communication_s / per,
        )

    def _all_reduce(self, message_bytes: float, gpus: int, bandwidth: float) -> float:
        return collective_time_s(
            "all_reduce", message_bytes, gpus, link_bandwidth_bytes_per_s=bandwidth, calibration=self.calibration
        )

    def _tp_all_reduce(self, message_bytes: float) -> float:
        """One all-reduce over the attention TP group, with the engine's own kernels where it has them."""
        if self.layout.tp <= 1:
            return 0.0
        if self.tp_custom_all_reduce:
            return tp_all_reduce_time_s(
                message_bytes,
                self.layout.tp,
                link_bandwidth_bytes_per_s=self.link_bandwidth,
                calibration=self.calibration,
            )
        return self._all_reduce(message_bytes, self.layout.tp, self.link_bandwidth)

    def _layer_communication(self, tokens: int, *, decode_only: bool) -> float:
        """Collectives of one pipeline stage's layers for ``tokens`` tokens per attention-DP rank."""
        layout, hidden = self.layout, self.model.hidden_size
        activation_bytes = tokens * hidden * 2.0
        # Row-parallel attention output (and dense FFN) end in an all-reduce over the attention TP group.
        tp_reduce = self._tp_all_reduce(activation_bytes)
        total = tp_reduce * self.layers_per_stage + tp_reduce * self.dense_layers
        if self.model.qk_norm_across_heads:
            # The q and k variances of every token (two fp32 values), summed over the TP shards of the heads.
            total += self._tp_all_reduce(tokens * 2.0 * 4.0) * self.layers_per_stage
        if self.moe_layers == 0:
            return total
        if layout.attention_dp == 1:
            # Attention TP leaves every token on every GPU of the stage: each GPU runs its experts (or
            # expert slices) on all tokens and one all-reduce sums the outputs, with or without EP.
            per_layer = tp_reduce
        elif layout.moe_ep > 1:
            # Attention-DP ranks hold different tokens: dispatch them to their experts' GPUs and back.
            index = min(tokens, self.max_tokens)
            table = self._ep_comm_decode if decode_only else self._ep_comm_prefill
            per_layer = float(table[index]) * max(1.0, tokens / self.max_tokens)
            if layout.expert_tp > 1:
                per_layer += self._all_reduce(activation_bytes, layout.expert_tp, self.moe_link_bandwidth)
        else:
            # Pure MoE-TP under attention DP: gather every rank's tokens, reduce-scatter the outputs.
            gathered = activation_bytes * layout.attention_dp
            per_layer = 2.0 * collective_time_s(
                "all_gather",
                gathered,
                layout.stage_gpus,
                link_bandwidth_bytes_per_s=self.moe_link_bandwidth,
                calibration=self.calibration,
            )
        return total + per_layer * self.moe_layers

    def chunk_tiles(self, past_tokens: float, new_tokens: float) -> tuple[float, float, float]:
        """Prefill attention tiles of one chunk of ``new_tokens`` after ``past_tokens`` (``prefill_chunk_tiles``)."""
        _, rows_per_token, tile_m, tile_n = self._prefill_shape
        return prefill_chunk_tiles(
            float(past_tokens), float(new_tokens), rows_per_token=rows_per_token, tile_m=tile_m, tile_n=tile_n
        )

    def _attention_head_dim(self) -> float:
        mla = self.model.mla
        if mla is None:
            return float(self.model.head_dim)
        return float(mla.qk_nope_head_dim + mla.qk_rope_head_dim)

    def _decode_attention_flops(self, context_tokens: float) -> float:
        mla = self.model.mla
        if mla is None:
            return 4.0 * self.heads_per_gpu * self.model.head_dim * context_tokens
        # Absorbed MLA decode attends every head over the latent (kv_lora + rope) vectors.
        return 4.0 * self.heads_per_gpu * (mla.kv_lora_rank + mla.qk_rope_head_dim) * context_tokens

    def _cpu_time(self, prefill_tokens: int, decode_sequences: int, prefill_sequences: int) -> tuple[float, float]:
        """CPU time of the step and the eager kernel-launch time the GPU must wait for."""
        engine = self.engine
        sequences = decode_sequences + prefill_sequences
        cpu = engine.step_overhead_s + engine.per_sequence_overhead_s * sequences
        kernels = KERNELS_PER_LAYER * self.layers_per_stage
        decode_only = prefill_tokens == 0
        if engine.cuda_graphs and decode_only and decode_sequences <= engine.cuda_graph_max_batch:
            launched = 0
        elif (
            engine.cuda_graphs and engine.piecewise_cuda_graphs and prefill_tokens + decode_sequences <= self.max_tokens
        ):
            # Piecewise graphs replay everything but attention, which launches eagerly.
            launched = 2 * self.layers_per_stage
        else:
            launched = kernels
        launch_s = launched * engine.kernel_launch_s
        return cpu + launch_s, launch_s

    def decode_floor_s(self) -> float:
        """Step time of a single decode token at short context: the TPOT floor."""
        return self.step(decode_sequences=1, decode_context_tokens=1).total_s
