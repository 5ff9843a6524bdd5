"""Fit the MoE-layer and expert-parallel all-to-all constants on measured kernel tables (arrays in, values out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any

import numpy as np
from scipy.optimize import least_squares  # type: ignore[import-untyped]

from service.planning.kernels import FloatArray
from service.planning.mla_cost import MlaCalibration, mla_bmm_time_s, mla_decode_time_s, mla_prefill_time_s
from service.planning.moe_cost import (
    BLACKWELL_CUTLASS_KERNELS,
    KERNELS,
    MARLIN_KERNELS,
    KernelConstants,
    MoeCalibration,
    Routing,
    alltoall_time_s,
    kernel_efficiencies,
    marlin_block_tokens,
    moe_routing_summary,
    moe_time_from_routing_s,
    padded_expert_shape,
)
from service.planning.specs import DType, GpuSpec

# Weight storage of each kernel-table dtype.
KERNEL_WEIGHT_DTYPES: dict[str, DType] = {
    "bf16": DType.BF16,
    "fp8": DType.FP8,
    "fp8_block": DType.FP8,
    "nvfp4": DType.FP4,
    "int4_wo": DType.INT4,
    "w4a16_mxfp4": DType.MXFP4,
    "mxfp4_bf16": DType.MXFP4,
    "w4a8_mxfp4_mxfp8": DType.MXFP4,
    "bf16_cutlass": DType.BF16,
    "fp8_cutlass": DType.FP8,
    "nvfp4_cutlass": DType.FP4,
}
# The tables file two kernels under dtype w4a16_mxfp4: Marlin (compressed-tensors MXFP4 checkpoints) and vLLM's
# gpt-oss MXFP4 method (OpenAI Triton on H100, FlashInfer TRT-LLM mxfp4 x bf16 on B200), which run at different
# speeds; the latter gets a kernel of its own.
GPT_OSS_MXFP4_SOURCE = "gptossmxfp4"


# The source of FlashInfer's CUTLASS fused MoE; on Blackwell it is not the engines' default kernel (see
# moe_cost.BLACKWELL_CUTLASS_KERNELS), on Hopper it is the fp8 kernel the table's dtype names.
FLASHINFER_CUTLASS_SOURCE = "flashinfer_cutlass"


def table_kernel(dtype: str, kernel_source: str, architecture: str = "") -> str:
    """The expert kernel a MoE table row timed (on a GPU of ``architecture``)."""
    if dtype == "w4a16_mxfp4" and GPT_OSS_MXFP4_SOURCE in kernel_source:
        return "mxfp4_bf16"
    if architecture == "blackwell" and FLASHINFER_CUTLASS_SOURCE in kernel_source:
        return BLACKWELL_CUTLASS_KERNELS.get(dtype, dtype)
    return dtype


# (hidden, expert width, top-k, experts) of the tables' models whose experts are not gated: NVIDIA Nemotron-H
# MoE models use squared-ReLU experts (up and down matrices only). Every other shape is a SwiGLU expert.
NON_GATED_SHAPES: frozenset[tuple[int, int, int, int]] = frozenset(
    {(2688, 1856, 6, 128), (2048, 5120, 22, 512), (1024, 2688, 22, 512)}
)
# DeepEP backends by the mode the step-cost model uses them in.
ALLTOALL_MODES: dict[str, str] = {"deepep_ll": "low_latency", "deepep_ht": "normal"}
# All-to-all phases: dispatch carries fp8 activations, combine returns bf16 results.
PHASES: tuple[str, str] = ("dispatch", "combine")
# M tiles tried per kernel (the kernel's tile is a power of two, not a continuous value).
TILE_CHOICES: tuple[float, ...] = (16.0, 32.0, 64.0, 128.0)

# Columns by name: a mapping of arrays or a numpy structured array (as np.genfromtxt reads the tables).
Columns = Mapping[str, np.ndarray] | np.ndarray


@dataclass(slots=True)
class MoeRows:
    """MoE kernel rows with the facts the fitted constants do not change; routing is cached per M tile."""

    tokens: FloatArray
    experts: np.ndarray
    ep: np.ndarray
    topk: FloatArray
    distribution: np.ndarray
    hidden: FloatArray
    width: FloatArray
    gated: np.ndarray
    weight_bytes: FloatArray
    kernel: np.ndarray
    peak: FloatArray
    measured_s: FloatArray
    _routing: dict[float | None, Routing] = field(default_factory=dict)

    def subset(self, sel: np.ndarray) -> MoeRows:
        """The selected rows (routing recomputed on demand)."""
        return MoeRows(
            **{
                name: getattr(self, name)[sel]
                for name in (
                    "tokens",
                    "experts",
                    "ep",
                    "topk",
                    "distribution",
                    "hidden",
                    "width",
                    "gated",
                    "weight_bytes",
                    "kernel",
                    "peak",
                    "measured_s",
                )
            }
        )

    def marlin_tiles(self) -> FloatArray:
        """Marlin's M block of every row (it picks one per call from the tokens per local expert)."""
        return marlin_block_tokens(self.tokens, topk=self.topk, local_experts=self.experts // self.ep)

    def routing(self, tile_tokens: float | None) -> Routing:
        """Routing summary of every row for one M tile, or Marlin's per-call block (None); computed once per group
        of routing keys."""
        if tile_tokens not in self._routing:
            row_tiles: FloatArray | float = self.marlin_tiles() if tile_tokens is None else tile_tokens
            size = self.tokens.size
            touched, pairs, tiles = np.empty(size), np.empty(size), np.empty(size)
            groups: dict[tuple[int, int, int, str], list[int]] = {}
            for i in range(size):
                key = (int(self.experts[i]), int(self.ep[i]), int(self.topk[i]), str(self.distribution[i]))
                groups.setdefault(key, []).append(i)
            for (experts, ep, topk, distribution), index in groups.items():
                sel = np.asarray(index)
                r = moe_routing_summary(
                    self.tokens[sel],
                    num_experts=experts,
                    local_experts=experts // ep,
                    topk=topk,
                    tile_tokens=row_tiles[sel] if isinstance(row_tiles, np.ndarray) else row_tiles,
                    distribution=distribution,
                )
                touched[sel], pairs[sel], tiles[sel] = r.touched, r.pairs, r.tiles
            self._routing[tile_tokens] = Routing(touched, pairs, tiles)
        return self._routing[tile_tokens]


def prepare_moe_rows(columns: Columns, gpu: GpuSpec) -> MoeRows:
    """Routing keys and dtype facts per row of a fused-MoE table (columns as in h100_sxm_moe.csv)."""
    dtypes = np.asarray(columns["dtype"]).astype(str)
    present = (columns.dtype.names or ()) if isinstance(columns, np.ndarray) else tuple(columns)
    # A table without the kernel column (a user's own) times the kernel its dtype names.
    sources = (
        np.asarray(columns["kernel_source"]).astype(str) if "kernel_source" in present else np.full(dtypes.size, "")
    )
    names = np.array([table_kernel(d, k, gpu.architecture) for d, k in zip(dtypes, sources, strict=True)])
    shape = zip(columns["hidden_size"], columns["inter_size"], columns["topk"], columns["num_experts"], strict=True)
    hidden = columns["hidden_size"].astype(np.float64)
    width = columns["inter_size"].astype(np.float64) / columns["moe_tp_size"].astype(np.float64)
    for name in np.unique(names):
        sel = names == name
        hidden[sel], width[sel] = padded_expert_shape(str(name), gpu.architecture, hidden[sel], width[sel])
    return MoeRows(
        tokens=columns["num_tokens"].astype(np.float64),
        experts=columns["num_experts"].astype(np.int64),
        ep=columns["moe_ep_size"].astype(np.int64),
        topk=columns["topk"].astype(np.float64),
        distribution=np.asarray(columns["distribution"]).astype(str),
        hidden=hidden,
        width=width,
        gated=np.array([(int(h), int(w), int(k), int(e)) not in NON_GATED_SHAPES for h, w, k, e in shape]),
        weight_bytes=np.array([KERNEL_WEIGHT_DTYPES[n].bytes_per_element for n in names]),
        kernel=names,
        peak=np.array([gpu.peak_for(KERNELS[n]) for n in names]),
        measured_s=columns["latency_ms"].astype(np.float64) * 1e-3,
    )


def predict_moe_rows(rows: MoeRows, gpu: GpuSpec, calibration: MoeCalibration) -> FloatArray:
    """Predicted layer times of prepared rows under ``calibration``."""
    out = np.full(rows.tokens.size, np.nan)
    for kernel in np.unique(rows.kernel):
        sel = rows.kernel == kernel
        part = rows.subset(sel) if not sel.all() else rows
        constants = calibration.kernel_constants(str(kernel))
        compute, bandwidth = kernel_efficiencies(str(kernel), calibration)
        out[sel] = _predict(part, gpu, calibration, constants, compute, bandwidth, marlin=kernel in MARLIN_KERNELS)
    return out


def _predict(
    rows: MoeRows,
    gpu: GpuSpec,
    calibration: MoeCalibration,
    constants: KernelConstants,
    compute: float,
    bandwidth: float,
    *,
    marlin: bool,
) -> FloatArray:
    # One M tile per row for both the routing and the FLOPs: Marlin's per-call block, else the kernel's fitted tile.
    if marlin:
        constants = replace(constants, tile_tokens=rows.marlin_tiles())
        routing = rows.routing(None)
    else:
        routing = rows.routing(float(constants.tile_tokens))
    return moe_time_from_routing_s(
        rows.tokens,
        routing,
        hidden_size=rows.hidden,
        expert_width_per_gpu=rows.width,
        weight_bytes_per_element=rows.weight_bytes,
        peak_flops_per_s=rows.peak,
        compute_efficiency=compute,
        bandwidth_efficiency=bandwidth,
        constants=constants,
        hbm_bandwidth_bytes_per_s=gpu.hbm_bandwidth_bytes_per_s,
        num_sms=float(gpu.num_sms),
        topk=rows.topk,
        calibration=calibration,
        gated=rows.gated,
        expert_parallel=rows.ep > 1,
    )


def fit_moe_kernel(rows: MoeRows, gpu: GpuSpec, kernel: str, base: MoeCalibration) -> MoeCalibration:
    """Fit one expert kernel's efficiencies, fixed and per-pair costs, routed passes and M tile (log error).

    The extra fixed cost of expert-parallel layers is fitted only where the kernel was timed both with and without
    expert parallelism (else it stays 0: nothing tells it apart from the shared fixed cost).
    """
    both = bool(np.any(rows.ep > 1) and np.any(rows.ep == 1))
    start = np.log([0.5, 0.7, 3e-5, 1e-10, 1.0, 1e-5])
    lower = np.log([0.02, 0.05, 1e-6, 1e-13, 0.01, 1e-8])
    upper = np.log([1.0, 1.0, 1e-3, 1e-7, 50.0, 1e-3])
    if not both:
        start, lower, upper = start[:5], lower[:5], upper[:5]
    best: tuple[float, float | None, FloatArray] | None = None
    # Marlin picks its block per call (MARLIN_BLOCK_TOKENS): nothing to choose; the other kernels' tile is fitted.
    marlin = kernel in MARLIN_KERNELS
    for tile in (None,) if marlin else TILE_CHOICES:
        rows.routing(tile)

        def residual(x: FloatArray, tile: float | None = tile) -> FloatArray:
            v = np.exp(x)
            ep_fixed = float(v[5]) if both else 0.0
            # Marlin's tile is set per row inside _predict; 0 stands for it here and is never used.
            constants = KernelConstants(tile or 0.0, float(v[2]), float(v[3]), float(v[4]), ep_fixed)
            pred = _predict(rows, gpu, base, constants, float(v[0]), float(v[1]), marlin=tile is None)
            out: FloatArray = np.log(pred / rows.measured_s)
            return out

        # soft_l1 keeps the few throttled or noisy timings from pulling the fit.
        fit = least_squares(residual, start, bounds=(lower, upper), loss="soft_l1", f_scale=0.1, max_nfev=300)
        if best is None or fit.cost < best[0]:
            best = (float(fit.cost), tile, np.exp(fit.x))
    assert best is not None
    _, tile, v = best
    return replace(
        base,
        compute_efficiency={**base.compute_efficiency, kernel: float(v[0])},
        bandwidth_efficiency={**base.bandwidth_efficiency, kernel: float(v[1])},
        kernel_tile_tokens=base.kernel_tile_tokens if tile is None else {**base.kernel_tile_tokens, kernel: tile},
        kernel_fixed_s={**base.kernel_fixed_s, kernel: float(v[2])},
        kernel_per_pair_s={**base.kernel_per_pair_s, kernel: float(v[3])},
        kernel_routed_activation_passes={**base.kernel_routed_activation_passes, kernel: float(v[4])},
        kernel_ep_fixed_s={**base.kernel_ep_fixed_s, kernel: float(v[5]) if both else 0.0},
    )


def fit_moe(rows: MoeRows, gpu: GpuSpec, base: MoeCalibration) -> MoeCalibration:
    """Fit every expert kernel in the rows; the bf16 kernel's constants also become the shared fallbacks."""
    cal = base
    for kernel in sorted(set(rows.kernel.tolist())):
        cal = fit_moe_kernel(rows.subset(rows.kernel == kernel), gpu, kernel, cal)
    if "bf16" in cal.kernel_fixed_s:
        k = cal.kernel_constants("bf16")
        cal = replace(
            cal,
            tile_tokens=float(k.tile_tokens),
            fixed_s=float(k.fixed_s),
            per_pair_s=float(k.per_pair_s),
            routed_activation_passes=float(k.routed_activation_passes),
        )
    return cal


@dataclass(frozen=True, slots=True)
class AlltoallRows:
    """DeepEP all-to-all rows (columns as in h100_sxm_moe_alltoall.csv) for one backend."""

    tokens: FloatArray
    hidden: FloatArray
    topk: FloatArray
    ep: FloatArray
    bytes_per_element: FloatArray
    phase: np.ndarray
    measured_s: FloatArray


def prepare_alltoall_rows(columns: Columns, backend: str) -> AlltoallRows:
    """Rows of one backend; dispatch sends fp8 (1 byte), combine returns bf16 (2 bytes)."""
    sel = np.asarray(columns["comm_backend"]).astype(str) == backend
    phase = np.asarray(columns["phase"]).astype(str)[sel]
    return AlltoallRows(
        tokens=columns["num_tokens"][sel].astype(np.float64),
        hidden=columns["hidden_size"][sel].astype(np.float64),
        topk=columns["topk"][sel].astype(np.float64),
        ep=columns["ep_size"][sel].astype(np.float64),
        bytes_per_element=np.where(phase == "dispatch", 1.0, 2.0),
        phase=phase,
        measured_s=columns["latency_ms"][sel].astype(np.float64) * 1e-3,
    )


def predict_alltoall_rows(rows: AlltoallRows, gpu: GpuSpec, mode: str, calibration: MoeCalibration) -> FloatArray:
    """Predicted phase times of all-to-all rows on one node."""
    out = np.empty(rows.tokens.size)
    keys = np.stack([rows.hidden, rows.topk, rows.ep, rows.bytes_per_element], axis=1)
    phase = np.where(rows.bytes_per_element == 1.0, 0.0, 1.0)
    for key in np.unique(keys, axis=0):
        sel = np.all(keys == key, axis=1)
        name = PHASES[int(phase[sel][0])]
        out[sel] = alltoall_time_s(
            rows.tokens[sel],
            hidden_size=int(key[0]),
            topk=int(key[1]),
            ep_ranks=int(key[2]),
            bytes_per_element=float(key[3]),
            intra_bandwidth_bytes_per_s=gpu.intra_node_bandwidth_bytes_per_s,
            inter_bandwidth_bytes_per_s=gpu.inter_node_bandwidth_bytes_per_s,
            ranks_per_domain=gpu.scale_up_domain_gpus,
            mode=mode,
            calibration=calibration,
            phase=name,
        )
    return out


def fit_alltoall(rows: AlltoallRows, gpu: GpuSpec, mode: str, base: MoeCalibration) -> MoeCalibration:
    """Fit latency, link-bandwidth efficiency and per-token cost of one all-to-all mode, per phase.

    The keys are ``<mode>_<phase>``; the mode's own key (used where the caller names no phase) is the phases'
    geometric mean.
    """
    cal = base
    for phase in PHASES:
        sel = rows.phase == phase
        part = AlltoallRows(*(getattr(rows, f)[sel] for f in AlltoallRows.__slots__))
        key = f"{mode}_{phase}"

        def build(x: FloatArray, cal: MoeCalibration = cal, key: str = key) -> MoeCalibration:
            v = np.exp(x)
            return replace(
                cal,
                alltoall_latency_s={**cal.alltoall_latency_s, key: float(v[0])},
                alltoall_bandwidth_efficiency={**cal.alltoall_bandwidth_efficiency, key: float(v[1])},
                alltoall_per_token_s={**cal.alltoall_per_token_s, key: float(v[2])},
            )

        def residual(x: FloatArray, part: AlltoallRows = part, build: Any = build) -> FloatArray:
            out: FloatArray = np.log(predict_alltoall_rows(part, gpu, mode, build(x)) / part.measured_s)
            return out

        start = np.log([5e-5, 0.5, 1e-9])
        bounds = (np.log([1e-6, 0.02, 1e-12]), np.log([1e-3, 1.0, 1e-6]))
        fit = least_squares(residual, start, bounds=bounds, loss="soft_l1", f_scale=0.1)
        cal = build(fit.x)
    keys = [f"{mode}_{phase}" for phase in PHASES]

    def mean(mapping: dict[str, float]) -> dict[str, float]:
        return {**mapping, mode: float(np.exp(np.mean([np.log(mapping[k]) for k in keys])))}

    return replace(
        cal,
        alltoall_latency_s=mean(cal.alltoall_latency_s),
        alltoall_bandwidth_efficiency=mean(cal.alltoall_bandwidth_efficiency),
        alltoall_per_token_s=mean(cal.alltoall_per_token_s),
    )


def calibration_values(calibration: MoeCalibration) -> dict[str, Any]:
    """The fitted constants as plain YAML-ready values (six significant digits)."""

    def sig(v: float) -> float:
        return float(f"{v:.6g}")

    out: dict[str, Any] = {}
    for name in (
        "compute_efficiency",
        "bandwidth_efficiency",
        "kernel_tile_tokens",
        "kernel_fixed_s",
        "kernel_per_pair_s",
        "kernel_routed_activation_passes",
        "kernel_ep_fixed_s",
        "alltoall_latency_s",
        "alltoall_bandwidth_efficiency",
        "alltoall_per_token_s",
    ):
        out[name] = {str(k): sig(v) for k, v in sorted(getattr(calibration, name).items())}
    for name in ("tile_tokens", "fixed_s", "per_pair_s", "routed_activation_passes", "blend_power"):
        out[name] = sig(getattr(calibration, name))
    return out


def _fit_fields(
    base: MlaCalibration,
    params: Sequence[tuple[str, str | None, float, float]],
    predict: Any,
    measured: FloatArray,
) -> MlaCalibration:
    """Least squares on log error over the named MLA fields (``(field, key or None, low, high)``)."""

    def build(x: FloatArray) -> MlaCalibration:
        cal = base
        for (name, key, _, _), v in zip(params, np.exp(x), strict=True):
            value: Any = float(v) if key is None else {**getattr(cal, name), key: float(v)}
            cal = replace(cal, **{name: value})
        return cal

    def current(name: str, key: str | None) -> float:
        value = getattr(base, name)
        return float(value if key is None else value.get(key, 0.5))

    low = np.log([p[2] for p in params])
    high = np.log([p[3] for p in params])
    start = np.clip(np.log([current(p[0], p[1]) for p in params]), low + 1e-6, high - 1e-6)

    def residual(x: FloatArray) -> FloatArray:
        out: FloatArray = np.log(predict(build(x)) / measured)
        return out

    fit = least_squares(residual, start, bounds=(low, high), loss="soft_l1", f_scale=0.1)
    return build(fit.x)


def predict_mla(table: str, rows: Columns, gpu: GpuSpec, calibration: MlaCalibration) -> FloatArray:
    """Predicted times of mla_context, mla_generation or mla_bmm rows."""
    heads = rows["num_heads"].astype(np.float64)
    out = np.empty(heads.size)
    if table == "mla_bmm":
        ops = np.asarray(rows["op_name"]).astype(str)
        for op in np.unique(ops):
            for h in np.unique(heads):
                sel = (ops == op) & (heads == h)
                out[sel] = mla_bmm_time_s(
                    rows["num_tokens"][sel].astype(np.float64),
                    heads_per_gpu=float(h),
                    op=str(op),
                    gpu=gpu,
                    calibration=calibration,
                )
        return out
    gemm = np.asarray(rows["gemm_dtype"]).astype(str)
    kv = np.asarray(rows["kv_cache_dtype"]).astype(str)
    for g in np.unique(gemm):
        for k in np.unique(kv):
            for h in np.unique(heads):
                sel = (gemm == g) & (kv == k) & (heads == h)
                if not sel.any():
                    continue
                b = rows["batch_size"][sel].astype(np.float64)
                common: dict[str, Any] = {
                    "heads_per_gpu": float(h),
                    "kv_dtype": str(k),
                    "gemm_dtype": str(g),
                    "gpu": gpu,
                }
                if table == "mla_context":
                    out[sel] = mla_prefill_time_s(
                        b,
                        rows["input_len"][sel].astype(np.float64),
                        past_kv_len=rows["past_kv_len"][sel].astype(np.float64),
                        calibration=calibration,
                        **common,
                    )
                else:
                    out[sel] = mla_decode_time_s(
                        b, rows["past_kv_len"][sel].astype(np.float64) + 1.0, calibration=calibration, **common
                    )
    return out


# The MLA fit's stages in order, each a table and the fields fitted on it: ``(field, key or None, low, high)``.
_MLA_STAGES: tuple[tuple[str, tuple[tuple[str, str | None, float, float], ...]], ...] = (
    (
        "mla_bmm",
        (
            ("bmm_efficiency", None, 0.05, 1.0),
            ("bandwidth_efficiency", None, 0.2, 1.0),
            ("launch_s", None, 1e-7, 3e-5),
        ),
    ),
    (
        "mla_context",
        (
            ("gemm_efficiency", "bf16", 0.05, 1.0),
            ("gemm_efficiency", "fp8_block", 0.05, 1.0),
            ("prefill_attention_efficiency", None, 0.05, 1.0),
            ("prefill_fixed_s", None, 1e-6, 1e-3),
        ),
    ),
    (
        "mla_generation",
        (
            ("decode_attention_efficiency", None, 0.05, 1.0),
            ("decode_kv_bandwidth_efficiency", "bf16", 0.1, 1.0),
            ("decode_kv_bandwidth_efficiency", "fp8", 0.1, 1.0),
            ("decode_fixed_s", None, 1e-6, 1e-3),
            ("decode_per_sequence_s", None, 1e-10, 1e-5),
        ),
    ),
)


def fit_mla(tables: Mapping[str, Columns], gpu: GpuSpec, base: MlaCalibration) -> MlaCalibration:
    """Fit the MLA constants: batched GEMMs first (bf16 GEMM efficiency, bandwidth, launch), then prefill, decode."""
    cal = base
    for table, params in _MLA_STAGES:
        if table in tables:
            rows = tables[table]
            measured: FloatArray = rows["latency_ms"].astype(np.float64) * 1e-3
            cal = _fit_fields(cal, params, partial(predict_mla, table, rows, gpu), measured)
    return cal


def mla_values(calibration: MlaCalibration) -> dict[str, Any]:
    """The MLA constants as YAML-ready values (six significant digits)."""
    out: dict[str, Any] = {}
    for f in fields(calibration):
        value = getattr(calibration, f.name)
        if isinstance(value, dict):
            out[f.name] = {str(k): float(f"{v:.6g}") for k, v in sorted(value.items())}
        else:
            out[f.name] = float(f"{value:.6g}")
    return out
