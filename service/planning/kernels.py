"""Kernel-level time model: the adapted roofline with efficiencies, occupancy and launch floors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from service.planning.specs import FOUR_BIT_DTYPES, DType, GpuSpec

FloatArray = npt.NDArray[np.float64]
# A float or an array of them: the step model passes floats, the kernel tables whole columns.
Num = TypeVar("Num", float, FloatArray)


@dataclass(frozen=True, slots=True)
class GemmTileRule:
    """One branch of an engine's GEMM kernel dispatch: the shapes it takes and the tiles its kernel runs."""

    kernel: str
    tile_m: float
    tile_n: float
    cluster_m: float = 1.0
    cluster_n: float = 1.0
    m_min: float = 0.0
    m_max: float = math.inf
    n_max: float = math.inf
    k_min: float = 0.0
    k_max: float = math.inf

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> GemmTileRule:
        """A rule from its catalog entry (bounds left out are open)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - known)
        missing = sorted({"kernel", "tile_m", "tile_n"} - set(entry))
        if unknown or missing:
            raise ValueError(f"gemm dispatch rule {entry}: unknown keys {unknown}, missing keys {missing}")
        values = {key: (str(value) if key == "kernel" else float(value)) for key, value in entry.items()}
        rule = cls(**values)  # type: ignore[arg-type]
        if min(rule.tile_m, rule.tile_n, rule.cluster_m, rule.cluster_n) < 1:
            raise ValueError(f"gemm dispatch rule {entry}: tiles and clusters must be at least 1")
        return rule


@dataclass(frozen=True, slots=True)
class KernelCalibration:
    """Efficiencies and floors that turn datasheet peaks into kernel times (fitted on measured kernels)."""

    # Dense GEMM: compute roof = datasheet peak x efficiency per dtype, over tile_m x tile_n output tiles dealt in
    # waves over the GPU's SMs (split-k when there are fewer tiles than SMs); each tile pays a fixed prologue and
    # epilogue worth ``gemm_k_overhead_elems`` steps of its k loop. Memory roof: bytes moved at achieved bandwidth.
    gemm_peak_efficiency: dict[DType, float] = field(
        default_factory=lambda: {DType.BF16: 0.85, DType.FP8: 0.60, DType.INT8: 0.60, DType.FP4: 0.50}
    )
    gemm_k_overhead_elems: dict[DType, float] = field(
        default_factory=lambda: {DType.BF16: 130.0, DType.FP8: 0.0, DType.INT8: 0.0, DType.FP4: 130.0}
    )
    gemm_tile_m: int = 128
    gemm_tile_n: int = 128
    # Weight-only (dequantising, Marlin-style) kernels tile m by 16: small batches are not padded to 128 rows.
    gemm_weight_only_tile_m: int = 16
    # Split-k gives each extra CTA at least this many elements of k.
    gemm_split_k_min_elems: float = 256.0
    # Occupancy (busy share of the last wave) enters the compute roof as occupancy**power (kernels adapt tiles).
    gemm_occupancy_power: float = 0.3
    gemm_bandwidth_efficiency: float = 0.85
    gemm_blend_power: float = 4.0
    gemm_launch_s: float = 3.0e-6
    # Scaled GEMMs (fp8/int8/fp4 activations) quantise the activations in a separate kernel first: its own
    # launch, a per-row (per-token scale) cost and the bf16-in / quantised-out bytes.
    gemm_quant_launch_s: dict[DType, float] = field(
        default_factory=lambda: {DType.FP8: 2.7e-6, DType.INT8: 2.7e-6, DType.FP4: 4.2e-6}
    )
    gemm_quant_per_row_s: dict[DType, float] = field(
        default_factory=lambda: {DType.FP8: 6.4e-9, DType.INT8: 6.4e-9, DType.FP4: 0.4e-9}
    )
    # Bytes the quantisation path moves per activation element: a fused one-pass kernel reads the bf16 value and
    # writes the quantised one (2 + 1 for fp8); an unfused path (scale, clamp and cast as separate element-wise
    # kernels, as an engine's native fallback runs it) moves several times that.
    gemm_quant_bytes_per_element: dict[DType, float] = field(
        default_factory=lambda: {DType.FP8: 3.0, DType.INT8: 3.0, DType.FP4: 2.5}
    )
    # Per-tensor scaled GEMMs (fp8/int8) and native fp4 GEMMs on an architecture with a dispatch table (catalog
    # gemm_dispatch.yaml, keyed by architecture for fp8/int8 and ``<architecture>/fp4`` for fp4: the engine's kernel
    # per shape, first matching rule wins) run persistent tiles: a cluster of
    # cluster_m x cluster_n SMs takes a block of tiles, blocks are dealt in waves over the SMs (a partial wave costs
    # ``waves**wave_power x (blocks / slots)**(1 - wave_power)`` of a full one). A tile streams its k loop from L2
    # at ``feed_bandwidth_factor`` x HBM bandwidth shared by the SMs (multicast across the cluster) against its
    # MMAs at the per-SM peak x the kernel's efficiency; HBM bytes at the tiled bandwidth efficiency.
    gemm_dispatch: dict[str, tuple[GemmTileRule, ...]] = field(default_factory=dict)
    gemm_tiled_efficiency: dict[str, float] = field(default_factory=dict)
    gemm_tiled_feed_bandwidth_factor: float = 3.4
    gemm_tiled_wave_power: float = 0.9
    gemm_tiled_blend_power: float = 3.0
    gemm_tiled_bandwidth_efficiency: float = 0.65
    # Block-scaled fp8 (128x128 weight blocks, per-token-group activation scales; DeepGEMM): own efficiency and
    # fixed cost (the reference B200 table timed it eagerly, so it carries the host launch path).
    gemm_block_scaled_efficiency: float = 0.75
    gemm_block_scaled_launch_s: float = 2.0e-5
    gemm_block_scaled_k_overhead_elems: float = 0.0
    # Weight-only 4-bit GEMMs dequantize in the kernel: their compute roof is the bf16 roof times this.
    weight_only_compute_factor: float = 0.6
    # Prefill attention as FlashAttention-3 runs it (hopper/tile_size.h, heuristics.h): query tiles of tile_m rows
    # (with GQA packed, vLLM's paged path: the group's query heads share a tile) each loop over the key tiles of
    # tile_n keys they attend (causal); a key tile costs its MMA FLOPs at peak x efficiency (x the fp8-KV factor)
    # plus the softmax of its tile_m x tile_n scores; each query tile pays ``cta_fixed_tiles`` key tiles of
    # prologue and epilogue. Time blends the SMs' average load with the longest query tile (power mean).
    attention_prefill_efficiency: float = 0.70
    attention_prefill_softmax_s_per_score: float = 2.0e-11
    attention_prefill_cta_fixed_tiles: float = 1.0
    attention_prefill_makespan_power: float = 2.0
    attention_prefill_fp8_kv_factor: float = 1.0
    attention_prefill_bandwidth_efficiency: float = 0.5
    attention_prefill_pack_gqa: bool = True
    # Tile shapes by head dimension (the smallest bound >= head_dim applies): FA3's sm90 forward tiles.
    attention_prefill_tile_m: dict[str, float] = field(
        default_factory=lambda: {"64": 192.0, "128": 128.0, "192": 128.0, "256": 128.0, "512": 128.0}
    )
    attention_prefill_tile_n: dict[str, float] = field(
        default_factory=lambda: {"64": 128.0, "128": 128.0, "192": 96.0, "256": 80.0, "512": 64.0}
    )
    # Decode attention's compute roof (rarely binding: wide GQA groups at long context).
    attention_decode_compute_efficiency: float = 0.45
    attention_launch_s: float = 1.2e-5
    # Decode attention: KV bytes/(bw*eff) plus a per-sequence cost expressed in bytes at the GPU's own bandwidth
    # (page-table walk, query/output and split-KV partials), so it scales with the target GPU.
    attention_decode_bandwidth_efficiency: dict[DType, float] = field(
        default_factory=lambda: {DType.BF16: 0.85, DType.FP8: 0.70}
    )
    attention_decode_per_sequence_bytes: float = 1.3e5
    attention_decode_launch_s: float = 1.2e-5
    # The KV stream's fill and drain (first loads in flight, the last CTAs' tail), paid once per kernel on top of
    # its bytes at the achieved bandwidth.
    attention_decode_memory_ramp_s: float = 0.0
    # Decode attention as split-KV ("flash decoding") kernels run it (FA3 hopper/heuristics.h num_splits_heuristic,
    # FlashInfer TRT-LLM multi-CTA KV): one CTA per (sequence, KV head, m-block of packed GQA query rows), its KV
    # split over more CTAs until the SMs are busy. A CTA walks its keys in tiles of tile_n and per key pays the larger
    # of streaming its K/V bytes (cost x the per-SM share of HBM bandwidth: a lone CTA cannot pull its share) and
    # the tile_m-row MMAs over them (cost x the per-SM bf16 peak; x the fp8 factor with an fp8 cache); CTAs beyond
    # ctas_per_sm per SM queue, each with a fixed prologue/epilogue. That chain and the whole-GPU KV stream are two
    # roofs, not a sum: while one SM runs a prologue the others stream, so with thousands of CTAs (a large batch x
    # KV heads) the prologues hide under the stream (the H100 table: 9-28% over-predicted when they were added).
    # Zero costs (the defaults) turn these terms off.
    attention_decode_cta_fixed_s: float = 0.0
    attention_decode_cta_stream_cost: float = 0.0
    attention_decode_cta_mma_cost: float = 0.0
    attention_decode_fp8_mma_factor: float = 1.0
    attention_decode_ctas_per_sm: float = 1.0
    # Decode tiles by head dimension (smallest bound >= head_dim): FA3's one-MMA-warpgroup decode tiles
    # (hopper/tile_size.h tile_size_fwd_sm90, use_one_mma_wg; paged KV without TMA).
    attention_decode_tile_m: dict[str, float] = field(
        default_factory=lambda: {"64": 64.0, "128": 64.0, "192": 128.0, "256": 128.0, "512": 128.0}
    )
    attention_decode_tile_n: dict[str, float] = field(
        default_factory=lambda: {"64": 160.0, "128": 128.0, "192": 96.0, "256": 80.0, "512": 64.0}
    )
    # NCCL collectives: latency alpha(n) = base + per_hop*log2(n); bandwidth at a bus efficiency of the link.
    # Per-kind values (all_reduce, all_gather, reduce_scatter, alltoall) override the shared ones.
    collective_base_latency_s: float = 3.0e-6
    collective_latency_per_log2_gpu_s: float = 3.5e-6
    collective_bus_efficiency: float = 0.80
    collective_kind_base_latency_s: dict[str, float] = field(default_factory=dict)
    collective_kind_latency_per_log2_gpu_s: dict[str, float] = field(default_factory=dict)
    collective_kind_bus_efficiency: dict[str, float] = field(default_factory=dict)
    # vLLM's custom all-reduce (peer-to-peer buffers, inside CUDA graphs): used for TP all-reduces smaller than
    # its buffer (vLLM CustomAllreduce max_size, 8 MiB); base + per-GPU latency, bandwidth at its own efficiency.
    custom_all_reduce_max_bytes: float = 8.0 * 1024 * 1024
    custom_all_reduce_base_latency_s: float = 4.0e-6
    custom_all_reduce_latency_per_gpu_s: float = 1.0e-7
    custom_all_reduce_bus_efficiency: float = 0.60
    # Element-wise kernels (norms, rotary, activation, residual): bandwidth efficiency and per-kernel floor.
    elementwise_bandwidth_efficiency: float = 0.75
    elementwise_launch_s: float = 2.0e-6

    def with_overrides(self, overrides: dict[str, Any]) -> KernelCalibration:
        """A copy with the named fields replaced (dtype-keyed mappings accept dtype names)."""
        known = {f.name for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown calibration field {key!r}")
            if key == "gemm_dispatch":
                value = {str(arch): _tile_rules(rules) for arch, rules in value.items()}
            elif isinstance(getattr(self, key), bool):
                # A YAML string such as "false" would read as true.
                if not isinstance(value, bool):
                    raise ValueError(f"calibration field {key!r} must be true or false, not {value!r}")
            elif isinstance(value, dict):
                dtype_keyed = any(isinstance(k, DType) for k in getattr(self, key))
                value = {(DType(k) if dtype_keyed else str(k)): float(v) for k, v in value.items()}
            values[key] = value
        return replace(self, **values)


def _tile_rules(rules: Any) -> tuple[GemmTileRule, ...]:
    """Dispatch rules from catalog entries (or rules already built)."""
    if not isinstance(rules, list | tuple) or not rules:
        raise ValueError("gemm dispatch: each architecture needs a non-empty list of rules")
    if not all(isinstance(r, GemmTileRule | dict) for r in rules):
        raise ValueError("gemm dispatch: each rule is a mapping such as {kernel: k, tile_m: 128, tile_n: 128}")
    return tuple(r if isinstance(r, GemmTileRule) else GemmTileRule.from_entry(dict(r)) for r in rules)


def _dispatch(
    rules: tuple[GemmTileRule, ...], m: FloatArray, n: FloatArray, k: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, list[str], npt.NDArray[np.int64]]:
    """Per shape: tile and cluster sizes of the first matching rule, the kernels and each shape's kernel index."""
    chosen = np.full(m.shape, len(rules) - 1, dtype=np.int64)
    undecided = np.ones(m.shape, dtype=bool)
    for index, rule in enumerate(rules):
        hit = (
            undecided
            & (m >= rule.m_min)
            & (m <= rule.m_max)
            & (n <= rule.n_max)
            & (k >= rule.k_min)
            & (k <= rule.k_max)
        )
        chosen[hit] = index
        undecided &= ~hit

    def column(name: str) -> FloatArray:
        return np.array([getattr(r, name) for r in rules], dtype=np.float64)[chosen]

    kernels = [r.kernel for r in rules]
    return column("tile_m"), column("tile_n"), column("cluster_m"), column("cluster_n"), kernels, chosen


def dispatch_key(architecture: str, math_dtype: DType) -> str:
    """The gemm_dispatch.yaml key of a scaled GEMM's rules: the architecture for fp8/int8, ``<arch>/fp4`` for fp4."""
    return architecture if math_dtype in (DType.FP8, DType.INT8) else f"{architecture}/{math_dtype.value}"


def dispatch_kernels(
    rules: tuple[GemmTileRule, ...], m: FloatArray, n: FloatArray, k: FloatArray
) -> tuple[list[str], npt.NDArray[np.int64]]:
    """The dispatch's kernel names and, per shape, the index of the rule that takes it."""
    _, _, _, _, kernels, chosen = _dispatch(rules, m, n, k)
    return kernels, chosen


def tiled_gemm_time_s(
    m: FloatArray,
    n: FloatArray,
    k: FloatArray,
    *,
    gpu: GpuSpec,
    math_dtype: DType,
    rules: tuple[GemmTileRule, ...],
    calibration: KernelCalibration,
) -> FloatArray:
    """GEMM time of a persistent tiled kernel chosen by the engine's dispatch (no activation quantisation)."""
    c = calibration
    tile_m, tile_n, cluster_m, cluster_n, kernels, chosen = _dispatch(rules, m, n, k)
    default_eff = c.gemm_peak_efficiency.get(math_dtype, c.gemm_peak_efficiency[DType.BF16])
    eff = np.array([c.gemm_tiled_efficiency.get(name, default_eff) for name in kernels])[chosen]
    sms = float(gpu.num_sms)
    blocks = np.ceil(np.ceil(m / tile_m) / cluster_m) * np.ceil(np.ceil(n / tile_n) / cluster_n)
    slots = np.maximum(np.floor(sms / (cluster_m * cluster_n)), 1.0)
    q = c.gemm_tiled_wave_power
    waves = np.ceil(blocks / slots) ** q * (blocks / slots) ** (1.0 - q)
    t_mma = 2.0 * tile_m * tile_n * k / (gpu.peak_for(math_dtype) / sms * eff)
    feed_per_sm = gpu.hbm_bandwidth_bytes_per_s * c.gemm_tiled_feed_bandwidth_factor / sms
    t_feed = (tile_m / cluster_n + tile_n / cluster_m) * k * math_dtype.bytes_per_element / feed_per_sm
    p = c.gemm_tiled_blend_power
    t_compute = waves * (t_mma**p + t_feed**p) ** (1.0 / p)
    moved_bytes = (m * k + n * k) * math_dtype.bytes_per_element + m * n * 2.0
    t_memory = moved_bytes / (gpu.hbm_bandwidth_bytes_per_s * c.gemm_tiled_bandwidth_efficiency)
    out: FloatArray = (t_compute**p + t_memory**p) ** (1.0 / p) + c.gemm_launch_s
    return out


def gemm_time_s(
    m: FloatArray | float,
    n: FloatArray | float,
    k: FloatArray | float,
    *,
    gpu: GpuSpec,
    weight_dtype: DType,
    calibration: KernelCalibration,
    block_scaled: bool = False,
) -> FloatArray:
    """Time of C[m,n] = A[m,k] W[k,n] on one GPU (vectorised over m, n and k)."""
    m_arr = np.asarray(m, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    k_arr = np.asarray(k, dtype=np.float64)
    c = calibration
    # 4-bit weights without a tensor-core path of their own run as weight-only GEMMs: bf16 math, 4-bit bytes read.
    weight_only = weight_dtype in FOUR_BIT_DTYPES and not gpu.runs_natively(weight_dtype)
    math_dtype = DType.BF16 if weight_only else weight_dtype
    scaled = math_dtype is not DType.BF16
    rules = c.gemm_dispatch.get(dispatch_key(gpu.architecture, math_dtype), ()) if not block_scaled else ()
    if rules and scaled:
        m_b, n_b, k_b = np.broadcast_arrays(m_arr, n_arr, k_arr)
        tiled_bandwidth = gpu.hbm_bandwidth_bytes_per_s * c.gemm_tiled_bandwidth_efficiency
        tiled = tiled_gemm_time_s(m_b, n_b, k_b, gpu=gpu, math_dtype=math_dtype, rules=rules, calibration=c)
        tiled = tiled + _quantisation_time_s(m_b, k_b, math_dtype, tiled_bandwidth, c)
        result: FloatArray = np.where(m_b > 0, tiled, 0.0)
        return result
    peak = gpu.peak_for(math_dtype)
    if block_scaled:
        eff = c.gemm_block_scaled_efficiency
    else:
        eff = c.gemm_peak_efficiency.get(math_dtype, c.gemm_peak_efficiency[DType.BF16])
    if weight_only:
        eff *= c.weight_only_compute_factor
    if block_scaled:
        k_overhead = c.gemm_block_scaled_k_overhead_elems
    else:
        k_overhead = c.gemm_k_overhead_elems.get(math_dtype, c.gemm_k_overhead_elems[DType.BF16])
    sms = float(gpu.num_sms)
    tile_m = c.gemm_weight_only_tile_m if weight_only else c.gemm_tile_m
    m_tiles = np.ceil(m_arr / tile_m)
    n_tiles = np.ceil(n_arr / c.gemm_tile_n)
    tiles = np.maximum(m_tiles * n_tiles, 1.0)
    # Too few tiles for the SMs: the k loop is split over idle SMs, down to gemm_split_k_min_elems per split.
    split = np.clip(np.floor(sms / tiles), 1.0, np.maximum(1.0, np.floor(k_arr / c.gemm_split_k_min_elems)))
    work = tiles * split
    occupancy = work / (np.ceil(work / sms) * sms)
    padded_flops = 2.0 * (m_tiles * tile_m) * (n_tiles * c.gemm_tile_n) * (k_arr + k_overhead)
    t_compute = padded_flops / (peak * eff * occupancy**c.gemm_occupancy_power)
    act_bytes = math_dtype.bytes_per_element if scaled else 2.0
    moved_bytes = k_arr * n_arr * weight_dtype.bytes_per_element + m_arr * k_arr * act_bytes + m_arr * n_arr * 2.0
    bandwidth = gpu.hbm_bandwidth_bytes_per_s * c.gemm_bandwidth_efficiency
    t_memory = moved_bytes / bandwidth
    p = c.gemm_blend_power
    total = (t_compute**p + t_memory**p) ** (1.0 / p) + c.gemm_launch_s
    if block_scaled:
        total = total + c.gemm_block_scaled_launch_s
    elif scaled:
        total = total + _quantisation_time_s(m_arr, k_arr, math_dtype, bandwidth, c)
    out: FloatArray = np.where(m_arr > 0, total, 0.0)
    return out


def _quantisation_time_s(
    m: FloatArray, k: FloatArray, math_dtype: DType, bandwidth_bytes_per_s: float, c: KernelCalibration
) -> FloatArray:
    """The activation-quantisation kernel before a scaled GEMM: launch, per-row scale, bf16 in and quantised out."""
    launch = c.gemm_quant_launch_s.get(math_dtype, 0.0)
    per_row = c.gemm_quant_per_row_s.get(math_dtype, 0.0) * m
    per_element = c.gemm_quant_bytes_per_element.get(math_dtype, 2.0 + math_dtype.bytes_per_element)
    out: FloatArray = launch + per_row + m * k * per_element / bandwidth_bytes_per_s
    return out


def _scalar(value: float) -> FloatArray:
    """A 0-d float array, so the scalar API can share the vectorised code."""
    return np.asarray(value, dtype=np.float64)


def prefill_tile_shape(
    heads_per_gpu: float, kv_heads_per_gpu: float, head_dim: float, calibration: KernelCalibration
) -> tuple[float, float, float, float]:
    """(head units, query rows per token, tile_m, tile_n) of the prefill attention kernel for one shape."""
    bounds = sorted((float(k), k) for k in calibration.attention_prefill_tile_m)
    key = next((k for bound, k in bounds if head_dim <= bound), bounds[-1][1])
    tile_m, tile_n = calibration.attention_prefill_tile_m[key], calibration.attention_prefill_tile_n[key]
    group = heads_per_gpu / kv_heads_per_gpu
    if calibration.attention_prefill_pack_gqa and group > 1:
        return kv_heads_per_gpu, group, tile_m, tile_n
    return heads_per_gpu, 1.0, tile_m, tile_n


def prefill_chunk_tiles(
    past_tokens: Num, new_tokens: Num, *, rows_per_token: float, tile_m: float, tile_n: float
) -> tuple[Num, Num, Num]:
    """(query tiles, key tiles summed over them, key tiles of the longest) of one causal chunk, per head unit."""
    # -(-x // 1) is ceil for floats and arrays alike.
    query_tiles = -(-(new_tokens * rows_per_token / tile_m) // 1)
    tokens_per_tile = tile_m / rows_per_token
    # Query tile j attends past + min((j+1) * tokens_per_tile, new) keys; the last one all of them.
    attended = query_tiles * past_tokens + tokens_per_tile * query_tiles * (query_tiles - 1) / 2 + new_tokens
    # Each query tile's key count rounds up to whole key tiles: half a tile on average.
    key_tiles = attended / tile_n + 0.5 * query_tiles
    longest = -(-((past_tokens + new_tokens) / tile_n) // 1)
    return query_tiles, key_tiles, longest


def attention_prefill_time_s(
    *,
    query_tiles: Num,
    key_tiles: Num,
    longest_key_tiles: Num,
    head_units: float | FloatArray,
    tile_m: float | FloatArray,
    tile_n: float | FloatArray,
    head_dim: float | FloatArray,
    query_tokens: Num,
    kv_tokens_read: Num,
    heads_per_gpu: float | FloatArray,
    kv_heads_per_gpu: float | FloatArray,
    kv_bytes_per_element: float | FloatArray,
    fp8_kv: bool | npt.NDArray[np.bool_],
    gpu: GpuSpec,
    calibration: KernelCalibration,
) -> Num:
    """One layer of (chunked) prefill attention over a batch on one GPU; tile counts per head unit."""
    c = calibration
    sms = float(gpu.num_sms)
    mma_s = 4.0 * tile_m * tile_n * head_dim / (gpu.peak_for(DType.BF16) / sms * c.attention_prefill_efficiency)
    fp8_factor = np.where(fp8_kv, c.attention_prefill_fp8_kv_factor, 1.0)
    tile_s = mma_s * fp8_factor + tile_m * tile_n * c.attention_prefill_softmax_s_per_score
    average_s = head_units * (key_tiles + c.attention_prefill_cta_fixed_tiles * query_tiles) * tile_s / sms
    longest_s = (longest_key_tiles + c.attention_prefill_cta_fixed_tiles) * tile_s
    power = c.attention_prefill_makespan_power
    compute_s = (average_s**power + longest_s**power) ** (1.0 / power)
    moved = kv_tokens_read * kv_heads_per_gpu * head_dim * 2.0 * kv_bytes_per_element
    moved = moved + 2.0 * query_tokens * heads_per_gpu * head_dim * 2.0
    memory_s = moved / (gpu.hbm_bandwidth_bytes_per_s * c.attention_prefill_bandwidth_efficiency)
    out = c.attention_launch_s + compute_s + memory_s
    return cast("Num", out if isinstance(out, np.ndarray) and out.ndim else float(out))


# Head dimension assumed when a caller gives only KV bytes per token (Llama/Qwen/Mistral-style heads).
DEFAULT_DECODE_HEAD_DIM = 128.0


def _by_head_dim(table: dict[str, float], head_dim: FloatArray) -> FloatArray:
    """Per-row value of a table keyed by head-dimension bounds (the smallest bound >= head_dim)."""
    bounds = sorted((float(k), v) for k, v in table.items())
    out = np.full(head_dim.shape, bounds[-1][1])
    for bound, value in reversed(bounds):
        out = np.where(head_dim <= bound, value, out)
    return out


def attention_decode_times_s(
    *,
    sequences: FloatArray,
    context_tokens: FloatArray,
    kv_bytes_per_token: FloatArray,
    bandwidth_efficiency: FloatArray,
    flops: FloatArray,
    kv_heads: FloatArray,
    head_dim: FloatArray,
    fp8_kv: FloatArray | npt.NDArray[np.bool_],
    gpu: GpuSpec,
    calibration: KernelCalibration,
) -> FloatArray:
    """Decode attention of one layer (vectorised over batches); efficiency per row from the KV dtype.

    ``flops`` (4 x query rows x head_dim x keys) also gives the query rows each KV head packs into its CTAs."""
    c = calibration
    bandwidth = gpu.hbm_bandwidth_bytes_per_s
    sms = float(gpu.num_sms)
    t_memory = (
        context_tokens * kv_bytes_per_token / (bandwidth * bandwidth_efficiency) + c.attention_decode_memory_ramp_s
    )
    t_compute = flops / (gpu.peak_for(DType.BF16) * c.attention_decode_compute_efficiency)
    per_sequence = c.attention_decode_per_sequence_bytes * sequences / bandwidth
    tile_m = _by_head_dim(c.attention_decode_tile_m, head_dim)
    tile_n = _by_head_dim(c.attention_decode_tile_n, head_dim)
    keys = np.maximum(context_tokens, 1.0)
    # Packed GQA: a KV head's query rows (group x verify queries) share m-blocks of tile_m rows.
    rows_per_kv_head = flops / (4.0 * head_dim * keys * kv_heads)
    m_blocks = np.maximum(np.ceil(np.round(rows_per_kv_head, 6) / tile_m), 1.0)
    slots = sms * c.attention_decode_ctas_per_sm
    # Splits fill the SMs down to one key tile per CTA: the CTAs that stream at once.
    key_tiles = kv_heads * m_blocks * keys / tile_n
    parallel = np.clip(key_tiles, 1.0, slots)
    key_bytes = kv_bytes_per_token / kv_heads
    stream_s = key_bytes * c.attention_decode_cta_stream_cost * sms / bandwidth
    fp8_factor = np.where(fp8_kv, c.attention_decode_fp8_mma_factor, 1.0)
    mma_s = 4.0 * tile_m * head_dim * c.attention_decode_cta_mma_cost * fp8_factor * sms / gpu.peak_for(DType.BF16)
    t_ctas = keys * kv_heads * m_blocks * np.maximum(stream_s, mma_s) / parallel
    ctas = sequences * kv_heads * m_blocks
    t_fixed = c.attention_decode_cta_fixed_s * np.maximum(1.0, ctas / slots)
    t_kernel = np.maximum(np.maximum(t_memory, t_compute), t_ctas + t_fixed)
    out: FloatArray = np.where(sequences > 0, c.attention_decode_launch_s + per_sequence + t_kernel, 0.0)
    return out


def attention_decode_time_s(
    *,
    sequences: float,
    context_tokens: float,
    kv_bytes_per_token: float,
    kv_dtype: DType,
    flops: float,
    gpu: GpuSpec,
    calibration: KernelCalibration,
    kv_heads: float | None = None,
    head_dim: float | None = None,
) -> float:
    """One layer of decode attention (one new token per sequence, or verify queries), on one GPU.

    Without ``head_dim`` the heads are taken as DEFAULT_DECODE_HEAD_DIM wide; without ``kv_heads`` they follow
    from the KV bytes per token."""
    if sequences <= 0:
        return 0.0
    # Scalar arithmetic (the step model calls this per step); the same formula as attention_decode_times_s.
    c = calibration
    eff = c.attention_decode_bandwidth_efficiency.get(kv_dtype, c.attention_decode_bandwidth_efficiency[DType.BF16])
    dim = DEFAULT_DECODE_HEAD_DIM if head_dim is None else head_dim
    heads = kv_bytes_per_token / (2.0 * dim * kv_dtype.bytes_per_element) if kv_heads is None else kv_heads
    bandwidth = gpu.hbm_bandwidth_bytes_per_s
    sms = float(gpu.num_sms)
    peak = gpu.peak_for(DType.BF16)
    t_memory = context_tokens * kv_bytes_per_token / (bandwidth * eff) + c.attention_decode_memory_ramp_s
    t_compute = flops / (peak * c.attention_decode_compute_efficiency)
    per_sequence = c.attention_decode_per_sequence_bytes * sequences / bandwidth
    tile_m = _head_dim_entry(c.attention_decode_tile_m, dim)
    tile_n = _head_dim_entry(c.attention_decode_tile_n, dim)
    keys = max(context_tokens, 1.0)
    m_blocks = max(math.ceil(round(flops / (4.0 * dim * keys * heads), 6) / tile_m), 1.0)
    slots = sms * c.attention_decode_ctas_per_sm
    parallel = min(max(heads * m_blocks * keys / tile_n, 1.0), slots)
    stream_s = kv_bytes_per_token / heads * c.attention_decode_cta_stream_cost * sms / bandwidth
    fp8_factor = c.attention_decode_fp8_mma_factor if kv_dtype is DType.FP8 else 1.0
    mma_s = 4.0 * tile_m * dim * c.attention_decode_cta_mma_cost * fp8_factor * sms / peak
    t_ctas = keys * heads * m_blocks * max(stream_s, mma_s) / parallel
    t_fixed = c.attention_decode_cta_fixed_s * max(1.0, sequences * heads * m_blocks / slots)
    return c.attention_decode_launch_s + per_sequence + max(t_memory, t_compute, t_ctas + t_fixed)


def _head_dim_entry(table: dict[str, float], head_dim: float) -> float:
    """The value of a head-dimension-bound table for one head dimension (the smallest bound >= head_dim)."""
    # A loop, not a sort: this runs once per simulated step.
    best_bound, best = math.inf, 0.0
    top_bound, top = -math.inf, 0.0
    for key, value in table.items():
        bound = float(key)
        if head_dim <= bound < best_bound:
            best_bound, best = bound, value
        if bound > top_bound:
            top_bound, top = bound, value
    return best if best_bound < math.inf else top


def _collective_constants(kind: str, c: KernelCalibration) -> tuple[float, float, float]:
    """Base latency, latency per log2(GPUs) and bus efficiency of a collective ``kind`` (per-kind overrides)."""
    return (
        c.collective_kind_base_latency_s.get(kind, c.collective_base_latency_s),
        c.collective_kind_latency_per_log2_gpu_s.get(kind, c.collective_latency_per_log2_gpu_s),
        c.collective_kind_bus_efficiency.get(kind, c.collective_bus_efficiency),
    )


def _bus_factor(kind: str, num_gpus: FloatArray) -> FloatArray:
    """Bytes each GPU sends per message byte in a ring (all-reduce moves twice the data of the others)."""
    share: FloatArray = (num_gpus - 1.0) / num_gpus
    return 2.0 * share if kind == "all_reduce" else share


def collective_times_s(
    kind: str,
    message_bytes: FloatArray,
    num_gpus: FloatArray,
    *,
    link_bandwidth_bytes_per_s: float,
    calibration: KernelCalibration,
) -> FloatArray:
    """NCCL collective times (vectorised over messages and GPU counts)."""
    n = np.asarray(num_gpus, dtype=np.float64)
    size = np.asarray(message_bytes, dtype=np.float64)
    base, per_hop, eff = _collective_constants(kind, calibration)
    latency = base + per_hop * np.log2(np.maximum(n, 1.0))
    t = latency + _bus_factor(kind, n) * size / (link_bandwidth_bytes_per_s * eff)
    out: FloatArray = np.where((n > 1) & (size > 0), t, 0.0)
    return out


def collective_time_s(
    kind: str,
    message_bytes: float,
    num_gpus: int,
    *,
    link_bandwidth_bytes_per_s: float,
    calibration: KernelCalibration,
) -> float:
    """Time of one NCCL collective over ``num_gpus`` GPUs (ring cost with a latency floor)."""
    if num_gpus <= 1 or message_bytes <= 0:
        return 0.0
    n = float(num_gpus)
    base, per_hop, eff = _collective_constants(kind, calibration)
    factor = (2.0 if kind == "all_reduce" else 1.0) * (n - 1.0) / n
    return base + per_hop * math.log2(n) + factor * message_bytes / (link_bandwidth_bytes_per_s * eff)


def custom_all_reduce_times_s(
    message_bytes: FloatArray,
    num_gpus: FloatArray,
    *,
    link_bandwidth_bytes_per_s: float,
    calibration: KernelCalibration,
) -> FloatArray:
    """vLLM custom all-reduce times inside a CUDA graph (vectorised over messages and GPU counts)."""
    c = calibration
    n = np.asarray(num_gpus, dtype=np.float64)
    size = np.asarray(message_bytes, dtype=np.float64)
    latency = c.custom_all_reduce_base_latency_s + c.custom_all_reduce_latency_per_gpu_s * n
    t = latency + _bus_factor("all_reduce", n) * size / (
        link_bandwidth_bytes_per_s * c.custom_all_reduce_bus_efficiency
    )
    out: FloatArray = np.where((n > 1) & (size > 0), t, 0.0)
    return out


def tp_all_reduce_time_s(
    message_bytes: float,
    num_gpus: int,
    *,
    link_bandwidth_bytes_per_s: float,
    calibration: KernelCalibration,
    custom_all_reduce: bool = True,
) -> float:
    """A tensor-parallel all-reduce as vLLM runs it: custom all-reduce below its buffer size, else NCCL."""
    if num_gpus <= 1 or message_bytes <= 0:
        return 0.0
    if custom_all_reduce and message_bytes < calibration.custom_all_reduce_max_bytes:
        return float(
            custom_all_reduce_times_s(
                _scalar(message_bytes),
                _scalar(num_gpus),
                link_bandwidth_bytes_per_s=link_bandwidth_bytes_per_s,
                calibration=calibration,
            )
        )
    return collective_time_s(
        "all_reduce",
        message_bytes,
        num_gpus,
        link_bandwidth_bytes_per_s=link_bandwidth_bytes_per_s,
        calibration=calibration,
    )


def elementwise_time_s(moved_bytes: float, kernels: int, *, gpu: GpuSpec, calibration: KernelCalibration) -> float:
    """Memory-bound element-wise kernels moving ``moved_bytes`` in total."""
    c = calibration
    return kernels * c.elementwise_launch_s + moved_bytes / (
        gpu.hbm_bandwidth_bytes_per_s * c.elementwise_bandwidth_efficiency
    )
