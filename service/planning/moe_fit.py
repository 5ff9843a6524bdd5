"""Fit the MoE-layer and expert-parallel all-to-all constants on measured kernel tables (arrays in, values out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import least_squares  # type: ignore[import-untyped]

from service.planning.kernels import FloatArray
from service.planning.moe_cost import (
    KERNELS,
    MoeCalibration,
    alltoall_time_s,
    kernel_efficiencies,
    moe_routing,
    moe_time_from_routing_s,
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
    "w4a8_mxfp4_mxfp8": DType.MXFP4,
}
# DeepEP backends by the mode the step-cost model uses them in.
ALLTOALL_MODES: dict[str, str] = {"deepep_ll": "low_latency", "deepep_ht": "normal"}

Columns = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class MoeRows:
    """MoE kernel rows with their routing precomputed (it does not depend on the fitted constants)."""

    tokens: FloatArray
    touched: FloatArray
    pairs: FloatArray
    hidden: FloatArray
    topk: FloatArray
    width: FloatArray
    weight_bytes: FloatArray
    kernel: np.ndarray
    peak: FloatArray
    measured_s: FloatArray


def prepare_moe_rows(columns: Columns, gpu: GpuSpec) -> MoeRows:
    """Routing and dtype facts per row of a fused-MoE table (columns as in h100_sxm_moe.csv)."""
    size = len(columns["num_tokens"])
    touched = np.empty(size)
    pairs = np.empty(size)
    keys = np.stack([columns[k].astype(np.float64) for k in ("num_experts", "moe_ep_size", "topk")], axis=1).astype(
        np.int64
    )
    dist = np.asarray(columns["distribution"]).astype(str)
    tokens = columns["num_tokens"].astype(np.float64)
    groups: dict[tuple[int, int, int, str], list[int]] = {}
    for i in range(size):
        groups.setdefault((int(keys[i, 0]), int(keys[i, 1]), int(keys[i, 2]), dist[i]), []).append(i)
    for (experts, ep, topk, distribution), index in groups.items():
        sel = np.asarray(index)
        t, p = moe_routing(
            tokens[sel], num_experts=experts, local_experts=experts // ep, topk=topk, distribution=distribution
        )
        touched[sel], pairs[sel] = t, p
    names = np.asarray(columns["dtype"]).astype(str)
    return MoeRows(
        tokens=tokens,
        touched=touched,
        pairs=pairs,
        hidden=columns["hidden_size"].astype(np.float64),
        topk=columns["topk"].astype(np.float64),
        width=columns["inter_size"].astype(np.float64) / columns["moe_tp_size"].astype(np.float64),
        weight_bytes=np.array([KERNEL_WEIGHT_DTYPES[n].bytes_per_element for n in names]),
        kernel=names,
        peak=np.array([gpu.peak_for(KERNELS[n]) for n in names]),
        measured_s=columns["latency_ms"].astype(np.float64) * 1e-3,
    )


def predict_moe_rows(rows: MoeRows, gpu: GpuSpec, calibration: MoeCalibration) -> FloatArray:
    """Predicted layer times of prepared rows under ``calibration``."""
    effs = {k: kernel_efficiencies(k, calibration) for k in np.unique(rows.kernel)}
    compute = np.array([effs[k][0] for k in rows.kernel])
    bandwidth = np.array([effs[k][1] for k in rows.kernel])
    return moe_time_from_routing_s(
        rows.tokens,
        rows.touched,
        rows.pairs,
        hidden_size=rows.hidden,
        expert_width_per_gpu=rows.width,
        weight_bytes_per_element=rows.weight_bytes,
        peak_flops_per_s=rows.peak,
        compute_efficiency=compute,
        bandwidth_efficiency=bandwidth,
        hbm_bandwidth_bytes_per_s=gpu.hbm_bandwidth_bytes_per_s,
        topk=rows.topk,
        calibration=calibration,
    )


def fit_moe(rows: MoeRows, gpu: GpuSpec, base: MoeCalibration) -> MoeCalibration:
    """Least-squares fit of the MoE-layer constants on log error: shared overheads, efficiencies per kernel."""
    kernels = sorted(set(rows.kernel.tolist()))
    shared = 3

    def build(x: FloatArray, tile: float) -> MoeCalibration:
        k = len(kernels)
        return replace(
            base,
            tile_tokens=tile,
            fixed_s=float(np.exp(x[0])),
            per_pair_s=float(np.exp(x[1])),
            routed_activation_passes=float(np.exp(x[2])),
            compute_efficiency={n: float(np.exp(x[shared + i])) for i, n in enumerate(kernels)},
            bandwidth_efficiency={n: float(np.exp(x[shared + k + i])) for i, n in enumerate(kernels)},
        )

    start = np.log([3e-5, 1e-10, 4.0, *[0.5] * len(kernels), *[0.7] * len(kernels)])
    lower = np.log([1e-6, 1e-13, 0.1, *[0.02] * len(kernels), *[0.05] * len(kernels)])
    upper = np.log([1e-3, 1e-7, 50.0, *[1.0] * len(kernels), *[1.0] * len(kernels)])
    best: MoeCalibration | None = None
    best_cost = np.inf
    # The M tile is a kernel constant: try the usual powers of two rather than a continuous value.
    for tile in (16.0, 32.0, 64.0, 128.0):

        def residual(x: FloatArray, tile: float = tile) -> FloatArray:
            out: FloatArray = np.log(predict_moe_rows(rows, gpu, build(x, tile)) / rows.measured_s)
            return out

        fit = least_squares(residual, start, bounds=(lower, upper), loss="soft_l1", max_nfev=200)
        if fit.cost < best_cost:
            best_cost, best = fit.cost, build(fit.x, tile)
    assert best is not None
    return best


@dataclass(frozen=True, slots=True)
class AlltoallRows:
    """DeepEP all-to-all rows (columns as in h100_sxm_moe_alltoall.csv) for one mode."""

    tokens: FloatArray
    hidden: FloatArray
    topk: FloatArray
    ep: FloatArray
    bytes_per_element: FloatArray
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
        measured_s=columns["latency_ms"][sel].astype(np.float64) * 1e-3,
    )


def predict_alltoall_rows(rows: AlltoallRows, gpu: GpuSpec, mode: str, calibration: MoeCalibration) -> FloatArray:
    """Predicted phase times of all-to-all rows on one node."""
    out = np.empty(rows.tokens.size)
    for i in range(rows.tokens.size):
        out[i] = float(
            alltoall_time_s(
                rows.tokens[i],
                hidden_size=int(rows.hidden[i]),
                topk=int(rows.topk[i]),
                ep_ranks=int(rows.ep[i]),
                bytes_per_element=float(rows.bytes_per_element[i]),
                intra_bandwidth_bytes_per_s=gpu.intra_node_bandwidth_bytes_per_s,
                inter_bandwidth_bytes_per_s=gpu.inter_node_bandwidth_bytes_per_s,
                ranks_per_domain=gpu.scale_up_domain_gpus,
                mode=mode,
                calibration=calibration,
            )
        )
    return out


def fit_alltoall(rows: AlltoallRows, gpu: GpuSpec, mode: str, base: MoeCalibration) -> MoeCalibration:
    """Fit the latency and bandwidth efficiency of one all-to-all mode."""

    def build(x: FloatArray) -> MoeCalibration:
        return replace(
            base,
            alltoall_latency_s={**base.alltoall_latency_s, mode: float(np.exp(x[0]))},
            alltoall_bandwidth_efficiency={**base.alltoall_bandwidth_efficiency, mode: float(np.exp(x[1]))},
        )

    def residual(x: FloatArray) -> FloatArray:
        out: FloatArray = np.log(predict_alltoall_rows(rows, gpu, mode, build(x)) / rows.measured_s)
        return out

    start = np.log([base.alltoall_latency_s.get(mode, 5e-5), base.alltoall_bandwidth_efficiency.get(mode, 0.5)])
    fit = least_squares(residual, start, bounds=(np.log([1e-6, 0.02]), np.log([1e-3, 1.0])), loss="soft_l1")
    return build(fit.x)


def calibration_values(calibration: MoeCalibration) -> dict[str, Any]:
    """The fitted constants as plain YAML-ready values."""
    return {
        "compute_efficiency": {k: round(v, 4) for k, v in calibration.compute_efficiency.items()},
        "bandwidth_efficiency": {k: round(v, 4) for k, v in calibration.bandwidth_efficiency.items()},
        "tile_tokens": calibration.tile_tokens,
        "fixed_s": float(f"{calibration.fixed_s:.4g}"),
        "per_pair_s": float(f"{calibration.per_pair_s:.4g}"),
        "routed_activation_passes": round(calibration.routed_activation_passes, 3),
        "alltoall_latency_s": {k: float(f"{v:.4g}") for k, v in calibration.alltoall_latency_s.items()},
        "alltoall_bandwidth_efficiency": {k: round(v, 4) for k, v in calibration.alltoall_bandwidth_efficiency.items()},
    }
