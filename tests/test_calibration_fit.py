"""The kernel-constant fits recover the calibration that generated a table, on every table kind they fit."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from service.planning.calibration_fit import (
    SHAPE_KEYS,
    Param,
    apply_values,
    fit_all,
    fit_all_moe,
    holdout_mask,
)
from service.planning.catalog import Catalog
from service.planning.kernel_accuracy import PREDICTORS, measured_s, usable_rows
from service.planning.kernels import KernelCalibration
from service.planning.mla_cost import MlaCalibration
from service.planning.moe_cost import MoeCalibration
from service.planning.moe_fit import (
    ALLTOALL_MODES,
    predict_alltoall_rows,
    predict_mla,
    predict_moe_rows,
    prepare_alltoall_rows,
    prepare_moe_rows,
    table_kernel,
)
from service.planning.specs import DType, GpuSpec

TEXT = "U24"
GEMM = [("dtype", TEXT), ("m", "i8"), ("n", "i8"), ("k", "i8"), ("latency_ms", "f8")]
ATTENTION = [
    ("batch_size", "i8"),
    ("input_len", "i8"),
    ("num_heads", "i8"),
    ("num_key_value_heads", "i8"),
    ("head_dim", "i8"),
    ("kv_cache_dtype", TEXT),
    ("past_kv_len", "i8"),
    ("latency_ms", "f8"),
]
NCCL = [("op_name", TEXT), ("dtype", TEXT), ("num_gpus", "i8"), ("message_elems", "i8"), ("latency_ms", "f8")]
CUSTOM = [*NCCL[:4], ("kernel_source", TEXT), ("latency_ms", "f8")]
MOE = [
    ("dtype", TEXT),
    ("hidden_size", "i8"),
    ("inter_size", "i8"),
    ("topk", "i8"),
    ("num_experts", "i8"),
    ("moe_tp_size", "i8"),
    ("moe_ep_size", "i8"),
    ("distribution", TEXT),
    ("num_tokens", "i8"),
    ("latency_ms", "f8"),
]
ALLTOALL = [
    ("comm_backend", TEXT),
    ("phase", TEXT),
    ("ep_size", "i8"),
    ("hidden_size", "i8"),
    ("topk", "i8"),
    ("num_experts", "i8"),
    ("sms", "i8"),
    ("num_tokens", "i8"),
    ("latency_ms", "f8"),
]
MLA = [
    ("gemm_dtype", TEXT),
    ("kv_cache_dtype", TEXT),
    ("num_heads", "i8"),
    ("batch_size", "i8"),
    ("input_len", "i8"),
    ("past_kv_len", "i8"),
    ("kernel_source", TEXT),
    ("latency_ms", "f8"),
]
MLA_BMM = [("op_name", TEXT), ("dtype", TEXT), ("num_heads", "i8"), ("num_tokens", "i8"), ("latency_ms", "f8")]


def _rows(columns: list[tuple[str, str]], values: list[tuple[Any, ...]]) -> np.ndarray:
    """A structured array as np.genfromtxt reads a reference table, with the latency column left at 0."""
    return np.array([(*v, 0.0) for v in values], dtype=columns)


def _timed(table: str, rows: np.ndarray, gpu: GpuSpec, truth: KernelCalibration) -> np.ndarray:
    rows["latency_ms"] = PREDICTORS[table](rows, gpu=gpu, calibration=truth) * 1e3
    return rows


def _kernel_tables(gpu: GpuSpec, truth: KernelCalibration, gemm_dtypes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One small table of each kernel kind, timed by ``truth``."""
    grid = itertools.product
    gemm = _rows(
        GEMM,
        [(d, m, n, k) for d, m, n, k in grid(gemm_dtypes, (1, 16, 128, 1024, 8192), (1024, 4096, 14336), (1024, 8192))],
    )
    heads = ((32, 8), (64, 8))
    context = [
        (b, s, h, kv, 128, d, p) for b, s, (h, kv), d, p in grid((1, 4), (128, 8192), heads, ("bf16", "fp8"), (0, 2048))
    ]
    decode = [
        (b, 1, h, kv, 128, d, p) for b, (h, kv), d, p in grid((1, 64, 256), heads, ("bf16", "fp8"), (128, 2048, 16384))
    ]
    nccl = [
        (op, "half", g, e) for op, g, e in grid(("all_reduce", "all_gather"), (2, 4, 8), (256, 65536, 1 << 20, 1 << 26))
    ]
    custom = [
        ("all_reduce", "bf16", g, e, "vLLM_custom_graph") for g, e in grid((2, 4, 8), (128, 4096, 65536, 1 << 20))
    ]
    return {
        "gemm": _timed("gemm", gemm, gpu, truth),
        "attention_context": _timed("attention_context", _rows(ATTENTION, context), gpu, truth),
        "attention_generation": _timed("attention_generation", _rows(ATTENTION, decode), gpu, truth),
        "nccl": _timed("nccl", _rows(NCCL, nccl), gpu, truth),
        "custom_allreduce": _timed("custom_allreduce", _rows(CUSTOM, custom), gpu, truth),
    }


def _worst_error_pct(tables: dict[str, np.ndarray], gpu: GpuSpec, calibration: KernelCalibration) -> dict[str, float]:
    out = {}
    for table, rows in tables.items():
        rows = rows[usable_rows(table, rows)]
        predicted = PREDICTORS[table](rows, gpu=gpu, calibration=calibration)
        out[table] = float(np.max(np.abs(predicted / measured_s(rows) - 1.0)) * 100.0)
    return out


@pytest.mark.parametrize(
    ("gpu_name", "gemm_dtypes"), [("h100-sxm", ("bf16", "fp8")), ("b200", ("bf16", "fp8_block", "nvfp4"))]
)
def test_fit_all_recovers_the_timings_of_the_calibration_that_made_them(
    catalog: Catalog, gpu_name: str, gemm_dtypes: tuple[str, ...]
) -> None:
    gpu = catalog.gpu(gpu_name)
    truth = catalog.calibration_for(gpu)
    # The dispatch table is a fact of the engine, not a fitted constant: the fit starts from it (as bench/calibrate.py).
    base = KernelCalibration(gemm_dispatch=truth.gemm_dispatch)
    tables = _kernel_tables(gpu, truth, gemm_dtypes)
    before = _worst_error_pct(tables, gpu, base)
    # Held-out shapes are left out of the fit and still predicted: the model is the one that made the timings.
    values = fit_all(tables, gpu, base)
    after = _worst_error_pct(tables, gpu, base.with_overrides(values))
    # Worst error per table: from several percent at the defaults to a fraction of it (exact for most kernels; the
    # split-KV decode terms trade off against each other within a percent or two).
    for table, worst_pct in after.items():
        assert worst_pct < min(2.0, before[table] / 3.0), (table, before[table], worst_pct)
    # Every table fitted something, and all_reduce's own constants are the shared collective ones.
    assert {"gemm_launch_s", "attention_launch_s", "attention_decode_launch_s"} <= set(values)
    # Whether the prefill kernel packs GQA groups is read off the timings (FA3 on H100 does, B200's kernel does not).
    assert values["attention_prefill_pack_gqa"] is truth.attention_prefill_pack_gqa is (gpu_name == "h100-sxm")
    assert "custom_all_reduce_bus_efficiency" in values
    kinds = values["collective_kind_bus_efficiency"]
    assert set(kinds) == {"all_reduce", "all_gather"}
    assert values["collective_bus_efficiency"] == kinds["all_reduce"]
    assert values["collective_base_latency_s"] == values["collective_kind_base_latency_s"]["all_reduce"]


def test_int8_gemms_take_the_fp8_constants(catalog: Catalog) -> None:
    gpu = catalog.gpu("h100-sxm")
    tables = _kernel_tables(gpu, catalog.calibration_for(gpu), ("bf16", "fp8"))
    values = fit_all({"gemm": tables["gemm"]}, gpu, KernelCalibration(), holdout=False)
    for field in ("gemm_peak_efficiency", "gemm_k_overhead_elems", "gemm_quant_launch_s", "gemm_quant_per_row_s"):
        assert values[field]["int8"] == values[field]["fp8"], field
    # Only the table that was given is fitted.
    assert not any(key.startswith(("attention", "collective", "custom")) for key in values)


def test_only_graph_captured_custom_all_reduce_below_the_buffer_is_fitted(catalog: Catalog) -> None:
    gpu = catalog.gpu("h100-sxm")
    truth = catalog.calibration_for(gpu)
    graph = _kernel_tables(gpu, truth, ("bf16",))["custom_allreduce"]
    # Eager launches and messages past the buffer run other code paths: timings 3x the model must not move the fit.
    too_big = int(truth.custom_all_reduce_max_bytes)  # elements of 2 bytes: twice the buffer
    other = _rows(CUSTOM, [("all_reduce", "bf16", 4, e, "vLLM_custom_eager") for e in (128, 65536)])
    past = _rows(CUSTOM, [("all_reduce", "bf16", 4, too_big, "vLLM_custom_graph")])
    other["latency_ms"] = 3.0 * _timed("custom_allreduce", other.copy(), gpu, truth)["latency_ms"]
    past["latency_ms"] = 3.0 * _timed("custom_allreduce", past.copy(), gpu, truth)["latency_ms"]
    rows = np.concatenate([graph, other, past])
    values = fit_all({"custom_allreduce": rows}, gpu, KernelCalibration(), holdout=False)
    assert _worst_error_pct({"custom_allreduce": graph}, gpu, KernelCalibration().with_overrides(values)) == {
        "custom_allreduce": pytest.approx(0.0, abs=0.01)
    }


def test_holdout_takes_whole_shapes_and_follows_the_fraction(catalog: Catalog) -> None:
    gpu = catalog.gpu("h100-sxm")
    gemm = _kernel_tables(gpu, catalog.calibration_for(gpu), ("bf16", "fp8"))["gemm"]
    held = holdout_mask("gemm", gemm)
    by_shape: dict[tuple[int, int], set[bool]] = {}
    for row, is_held in zip(gemm, held, strict=True):
        by_shape.setdefault((int(row["n"]), int(row["k"])), set()).add(bool(is_held))
    assert all(len(flags) == 1 for flags in by_shape.values()), by_shape
    assert SHAPE_KEYS["gemm"] == ("n", "k")
    assert not holdout_mask("gemm", gemm, fraction=0.0).any()
    assert holdout_mask("gemm", gemm, fraction=1.0).all()
    # The same mask on a copy (CRC32 of the shape, not Python's per-process hash).
    assert (holdout_mask("gemm", gemm.copy()) == held).all()
    # Tables without shape keys, and empty tables, hold nothing out.
    assert not holdout_mask("unknown", gemm).any()
    assert holdout_mask("gemm", gemm[:0]).size == 0


def test_keyed_params_set_one_key_and_start_between_their_bounds() -> None:
    base = KernelCalibration()
    params = [Param("gemm_launch_s", 1e-7, 1e-4), Param("gemm_peak_efficiency", 0.1, 1.0, DType.FP8)]
    cal = apply_values(base, params, np.array([3e-6, 0.625]))
    assert cal.gemm_launch_s == 3e-6
    assert cal.gemm_peak_efficiency[DType.FP8] == 0.625
    # The other dtypes' values are kept.
    assert cal.gemm_peak_efficiency[DType.BF16] == base.gemm_peak_efficiency[DType.BF16]


def _moe_tables(gpu: GpuSpec, truth: MoeCalibration) -> dict[str, np.ndarray]:
    """Fused-MoE, DeepEP all-to-all and MLA tables timed by ``truth``."""
    grid = itertools.product
    moe = _rows(
        MOE,
        [
            (d, 2048, 768, 8, 128, 1, ep, dist, n)
            for d, ep, dist, n in grid(("bf16", "fp8"), (1, 8), ("balanced", "power_law_1.2"), (1, 16, 256, 4096))
        ],
    )
    moe["latency_ms"] = predict_moe_rows(prepare_moe_rows(moe, gpu), gpu, truth) * 1e3
    alltoall = _rows(
        ALLTOALL,
        [
            (b, ph, ep, 7168, 8, 256, 20, n)
            for b, ph, ep, n in grid(ALLTOALL_MODES, ("dispatch", "combine"), (2, 4, 8), (16, 128, 1024, 4096))
        ],
    )
    for backend, mode in ALLTOALL_MODES.items():
        sel = alltoall["comm_backend"] == backend
        alltoall["latency_ms"][sel] = (
            predict_alltoall_rows(prepare_alltoall_rows(alltoall, backend), gpu, mode, truth) * 1e3
        )
    mla = MlaCalibration().with_overrides(truth.mla)
    dtypes = list(grid(("bf16", "fp8_block"), ("bf16", "fp8"), (16, 128)))
    context = _rows(
        MLA, [(g, kv, h, b, s, p, "FLASH_ATTN") for (g, kv, h), b, s, p in grid(dtypes, (1, 8), (128, 4096), (0, 1024))]
    )
    decode = _rows(
        MLA, [(g, kv, h, b, 1, p, "FLASHMLA") for (g, kv, h), b, p in grid(dtypes, (1, 32, 256), (512, 8192))]
    )
    ops = ("mla_gen_pre", "mla_gen_post")
    bmm = _rows(MLA_BMM, [(op, "bf16", h, n) for op, h, n in grid(ops, (16, 128), (1, 64, 1024, 8192))])
    tables = {"moe": moe, "moe_alltoall": alltoall, "mla_context": context, "mla_generation": decode, "mla_bmm": bmm}
    for table in ("mla_context", "mla_generation", "mla_bmm"):
        tables[table]["latency_ms"] = predict_mla(table, tables[table], gpu, mla) * 1e3
    return tables


def _moe_worst_error_pct(tables: dict[str, np.ndarray], gpu: GpuSpec, cal: MoeCalibration) -> dict[str, float]:
    ratios = {"moe": predict_moe_rows(prepare_moe_rows(tables["moe"], gpu), gpu, cal) / measured_s(tables["moe"])}
    for backend, mode in ALLTOALL_MODES.items():
        rows = prepare_alltoall_rows(tables["moe_alltoall"], backend)
        ratios[backend] = predict_alltoall_rows(rows, gpu, mode, cal) / rows.measured_s
    mla = MlaCalibration().with_overrides(cal.mla)
    for table in ("mla_context", "mla_generation", "mla_bmm"):
        ratios[table] = predict_mla(table, tables[table], gpu, mla) / measured_s(tables[table])
    return {name: float(np.max(np.abs(r - 1.0)) * 100.0) for name, r in ratios.items()}


def test_fit_all_moe_recovers_the_layer_alltoall_and_mla_timings(catalog: Catalog) -> None:
    gpu = catalog.gpu("h100-sxm")
    truth, base = catalog.moe_calibration_for(gpu), MoeCalibration()
    tables = _moe_tables(gpu, truth)
    before = _moe_worst_error_pct(tables, gpu, base)
    cal, ran = fit_all_moe(tables, gpu, base)
    after = _moe_worst_error_pct(tables, gpu, cal)
    assert ran == ["moe", "moe_alltoall", "mla"]
    assert min(before.values()) > 10.0, before
    assert max(after.values()) < 0.1, after
    # The bf16 kernel's constants are the fallbacks of kernels without their own.
    assert cal.tile_tokens == cal.kernel_tile_tokens["bf16"]
    assert cal.fixed_s == cal.kernel_fixed_s["bf16"]
    assert cal.per_pair_s == cal.kernel_per_pair_s["bf16"]
    # A mode's own all-to-all constants are the geometric mean of its two phases'.
    for mode in ALLTOALL_MODES.values():
        phases = [cal.alltoall_latency_s[f"{mode}_{phase}"] for phase in ("dispatch", "combine")]
        assert cal.alltoall_latency_s[mode] == pytest.approx(float(np.sqrt(phases[0] * phases[1])), rel=1e-12)


def test_fit_all_moe_runs_only_the_fitters_whose_tables_are_there(catalog: Catalog) -> None:
    gpu = catalog.gpu("h100-sxm")
    tables = _moe_tables(gpu, catalog.moe_calibration_for(gpu))
    base = MoeCalibration()
    cal, ran = fit_all_moe({"mla_bmm": tables["mla_bmm"], "moe": tables["moe"][:0]}, gpu, base, holdout=False)
    assert ran == ["mla"]
    assert cal.kernel_fixed_s == base.kernel_fixed_s
    assert cal.alltoall_latency_s == base.alltoall_latency_s
    assert cal.mla != base.mla
    assert fit_all_moe({}, gpu, base) == (base, [])


def test_the_gpt_oss_mxfp4_kernel_is_told_apart_from_marlin(catalog: Catalog) -> None:
    gpt_oss = "vllm_gptossmxfp4moe_triton_oaitritonmxfp4expertsmonolithic"
    marlin = "vllm_compressedtensorsw4a4mxfp4moe_marlin_marlinexperts_situ_as_silu"
    assert table_kernel("w4a16_mxfp4", gpt_oss) == "mxfp4_bf16"
    assert table_kernel("w4a16_mxfp4", marlin) == "w4a16_mxfp4"
    assert table_kernel("bf16", gpt_oss) == "bf16"
    with_source = [*MOE[:-1], ("kernel_source", "U80"), MOE[-1]]
    rows = _rows(with_source, [("w4a16_mxfp4", 2880, 2880, 4, 128, 1, 1, "balanced", 8, gpt_oss)])
    gpu = catalog.gpu("h100-sxm")
    assert prepare_moe_rows(rows, gpu).kernel.tolist() == ["mxfp4_bf16"]
    # A table without the kernel column (a user's own) times the kernel its dtype names.
    plain = _rows(MOE, [("w4a16_mxfp4", 2880, 2880, 4, 128, 1, 1, "balanced", 8)])
    assert prepare_moe_rows(plain, gpu).kernel.tolist() == ["w4a16_mxfp4"]


def test_flashinfer_cutlass_moe_rows_are_a_kernel_of_their_own_on_blackwell(catalog: Catalog) -> None:
    cutlass = "vllm_compressedtensorsw4a4nvfp4moe_flashinfer_cutlass_flashinferexperts"
    trtllm = "vllm_compressedtensorsw4a4nvfp4moe_flashinfer_trtllm_trtllmnvfp4expertsmonolithic"
    assert table_kernel("nvfp4", cutlass, "blackwell") == "nvfp4_cutlass"
    assert table_kernel("nvfp4", trtllm, "blackwell") == "nvfp4"
    # On Hopper FlashInfer's CUTLASS MoE is the fp8 kernel the dtype names (the engines' choice there).
    hopper_fp8 = "vllm_modeloptfp8moe_flashinfer_cutlass_flashinferexperts"
    assert table_kernel("fp8", hopper_fp8, "hopper") == table_kernel("fp8", hopper_fp8) == "fp8"
    assert table_kernel("fp8", hopper_fp8, "blackwell") == "fp8_cutlass"
    with_source = [*MOE[:-1], ("kernel_source", "U80"), MOE[-1]]
    rows = _rows(with_source, [("nvfp4", 6144, 3072, 4, 128, 1, 1, "balanced", 8, cutlass)])
    assert prepare_moe_rows(rows, catalog.gpu("b200")).kernel.tolist() == ["nvfp4_cutlass"]
    # A shape held out at 20% (7168|2048|8|384: CRC32 bucket 97 of 1000) that is the CUTLASS kernel's only one is
    # trained on; without the architecture the rows count as nvfp4's, whose other shape keeps it held out.
    shape = [("dtype", "U16"), ("hidden_size", "i8"), ("inter_size", "i8"), ("topk", "i8"), ("num_experts", "i8")]
    table = np.array(
        [("nvfp4", 7168, 2048, 8, 384, cutlass), ("nvfp4", 2048, 768, 8, 128, trtllm)],
        dtype=[*shape, ("kernel_source", "U80")],
    )
    assert holdout_mask("moe", table, architecture="blackwell").tolist() == [False, False]
    assert holdout_mask("moe", table).tolist() == [True, False]


def test_a_moe_kernel_timed_on_held_out_shapes_only_is_fitted_on_all_of_them() -> None:
    # CRC32 buckets (of 1000): 7168|2048|8|384 -> 97 and 4096|2048|8|128 -> 74 are held out at 20%, 2048|768|8|128
    # -> 320 is not. bf16 keeps a training shape, so its held-out shape stays held out; the int4 Marlin kernel has
    # only the held-out shape, so none of its rows is.
    rows = np.array(
        [
            ("bf16", 4096, 2048, 8, 128, "vllm_unquantizedfusedmoe_triton"),
            ("bf16", 2048, 768, 8, 128, "vllm_unquantizedfusedmoe_triton"),
            ("int4_wo", 7168, 2048, 8, 384, "vllm_compressedtensorswna16marlinmoe_marlin"),
            ("int4_wo", 7168, 2048, 8, 384, "vllm_compressedtensorswna16marlinmoe_marlin"),
        ],
        dtype=[
            ("dtype", "U16"),
            ("hidden_size", "i8"),
            ("inter_size", "i8"),
            ("topk", "i8"),
            ("num_experts", "i8"),
            ("kernel_source", "U64"),
        ],
    )
    assert holdout_mask("moe", rows).tolist() == [True, False, False, False]
    # Without a kernel_source column the dtype names the kernel.
    plain = rows[["dtype", "hidden_size", "inter_size", "topk", "num_experts"]]
    assert holdout_mask("moe", plain).tolist() == [True, False, False, False]
