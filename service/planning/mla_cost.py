"""DeepSeek multi-head latent attention (MLA) block time: prefill (expanded heads) and absorbed decode.

One layer's attention block on one GPU, from its physics:

* projections: q_a (hidden -> q_lora), q_b (q_lora -> heads x (nope + rope)), kv_a (hidden -> kv_lora + rope),
  o (heads x v -> hidden) in the GEMM dtype, and in prefill kv_b (kv_lora -> heads x (nope + v)); each a
  roofline of its FLOPs and bytes plus a launch;
* prefill attention: causal FLOPs at head_dim nope + rope (192) for scores and v (128) for values;
* absorbed decode: each sequence reads its latent KV (kv_lora + rope = 576 values per token) once for all heads,
  attention runs in the latent space (576-wide scores, 512-wide values), and the two batched GEMMs move queries
  into the latent space (mla_gen_pre) and results back to value heads (mla_gen_post); a per-sequence cost
  (split-KV scheduling, combine) adds to the launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from service.planning.kernels import FloatArray
from service.planning.specs import DType, GpuSpec, MLASpec

# DeepSeek-V3 / R1 dimensions (the reference tables' model).
DEEPSEEK_V3_MLA = MLASpec(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
DEEPSEEK_V3_HIDDEN = 7168


@dataclass(frozen=True, slots=True)
class MlaCalibration:
    """Efficiencies and overheads of the MLA block (fitted on h100_sxm_mla_* tables)."""

    # Projection GEMMs: fraction of the GEMM dtype's peak, keyed by GEMM dtype name (bf16, fp8_block).
    gemm_efficiency: dict[str, float] = field(default_factory=lambda: {"bf16": 0.6, "fp8_block": 0.5})
    # Absorbed-decode batched GEMMs (bf16): fraction of the bf16 peak.
    bmm_efficiency: float = 0.3
    # Achieved fraction of HBM bandwidth for weights and activations.
    bandwidth_efficiency: float = 0.8
    # Prefill attention tensor-core efficiency (fraction of the bf16 peak).
    prefill_attention_efficiency: float = 0.5
    # Decode attention: fraction of the bf16 peak on latent-space FLOPs; KV read bandwidth by KV dtype.
    decode_attention_efficiency: float = 0.4
    decode_kv_bandwidth_efficiency: dict[str, float] = field(default_factory=lambda: {"bf16": 0.85, "fp8": 0.75})
    # Launch cost per projection/batched GEMM kernel and fixed cost of the block (norms, rope, cache write).
    launch_s: float = 5e-6
    prefill_fixed_s: float = 4e-5
    decode_fixed_s: float = 4e-5
    # Per decoded sequence (split-KV scheduling metadata, partial-result combine).
    decode_per_sequence_s: float = 1e-7
    # Roofline blend power of each GEMM.
    blend_power: float = 4.0

    def with_overrides(self, overrides: dict[str, Any]) -> MlaCalibration:
        """A copy with the named fields replaced."""
        known = {f.name for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown MLA calibration field {key!r}")
            values[key] = {str(k): float(v) for k, v in value.items()} if isinstance(value, dict) else float(value)
        return replace(self, **values)


def _gemm_dtype_name(gemm_dtype: DType | str) -> str:
    name = str(gemm_dtype)
    return "fp8_block" if name in ("fp8", "fp8_block") else name


def _roofline(flops: FloatArray, bytes_: FloatArray, peak: float, eff: float, bw: float, p: float) -> FloatArray:
    t_c = flops / peak / eff
    t_m = bytes_ / bw
    out: FloatArray = (t_c**p + t_m**p) ** (1.0 / p)
    return out


def projection_time_s(
    tokens: FloatArray,
    *,
    heads_per_gpu: float,
    gemm_dtype: DType | str,
    gpu: GpuSpec,
    calibration: MlaCalibration,
    prefill: bool,
    mla: MLASpec = DEEPSEEK_V3_MLA,
    hidden_size: int = DEEPSEEK_V3_HIDDEN,
) -> FloatArray:
    """The block's projection GEMMs for ``tokens`` tokens (kv_b only in prefill: decode absorbs it)."""
    c = calibration
    name = _gemm_dtype_name(gemm_dtype)
    w_bytes = 2.0 if name == "bf16" else 1.0
    peak = gpu.peak_for(DType.BF16 if name == "bf16" else DType.FP8)
    eff = c.gemm_efficiency.get(name, c.gemm_efficiency["bf16"])
    bw = gpu.hbm_bandwidth_bytes_per_s * c.bandwidth_efficiency
    h = heads_per_gpu
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    shapes = [
        (mla.q_lora_rank, hidden_size),
        (h * qk, mla.q_lora_rank),
        (mla.kv_lora_rank + mla.qk_rope_head_dim, hidden_size),
        (hidden_size, h * mla.v_head_dim),
    ]
    if prefill:
        shapes.append((h * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank))
    total = np.zeros_like(tokens)
    for n, k in shapes:
        flops = 2.0 * tokens * n * k
        moved = n * k * w_bytes + tokens * (k + n) * 2.0
        total = total + _roofline(flops, moved, peak, eff, bw, c.blend_power) + c.launch_s
    out: FloatArray = total
    return out


def mla_prefill_time_s(
    batch: FloatArray | float,
    input_len: FloatArray | float,
    *,
    heads_per_gpu: float,
    kv_dtype: DType | str,
    gemm_dtype: DType | str,
    gpu: GpuSpec,
    calibration: MlaCalibration,
    past_kv_len: FloatArray | float = 0.0,
    mla: MLASpec = DEEPSEEK_V3_MLA,
    hidden_size: int = DEEPSEEK_V3_HIDDEN,
) -> FloatArray:
    """One MLA layer in prefill: ``batch`` sequences of ``input_len`` new tokens after ``past_kv_len`` cached."""
    c = calibration
    b = np.asarray(batch, dtype=np.float64)
    s = np.asarray(input_len, dtype=np.float64)
    past = np.asarray(past_kv_len, dtype=np.float64)
    tokens = b * s
    proj = projection_time_s(
        tokens,
        heads_per_gpu=heads_per_gpu,
        gemm_dtype=gemm_dtype,
        gpu=gpu,
        calibration=c,
        prefill=True,
        mla=mla,
        hidden_size=hidden_size,
    )
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    pairs = b * s * (past + (s + 1.0) / 2.0)
    flops = 2.0 * heads_per_gpu * pairs * (qk + mla.v_head_dim)
    # Expanded K and V (past ones re-expanded from the latent cache) and the queries/outputs stream once.
    kv_bytes = (str(kv_dtype) == "fp8" and 1.0) or 2.0
    moved = (
        b * (s + past) * heads_per_gpu * (qk + mla.v_head_dim) * kv_bytes
        + tokens * heads_per_gpu * (qk + mla.v_head_dim) * 2.0
    )
    attn = flops / (gpu.peak_for(DType.BF16) * c.prefill_attention_efficiency) + moved / (
        gpu.hbm_bandwidth_bytes_per_s * c.bandwidth_efficiency
    )
    out: FloatArray = np.where(tokens > 0, c.prefill_fixed_s + proj + attn, 0.0)
    return out


def mla_bmm_time_s(
    tokens: FloatArray | float,
    *,
    heads_per_gpu: float,
    op: str,
    gpu: GpuSpec,
    calibration: MlaCalibration,
    mla: MLASpec = DEEPSEEK_V3_MLA,
) -> FloatArray:
    """One absorbed-decode batched GEMM (bf16): ``mla_gen_pre`` (nope query -> latent) or ``mla_gen_post``."""
    c = calibration
    n = np.asarray(tokens, dtype=np.float64)
    small = mla.v_head_dim if op == "mla_gen_post" else mla.qk_nope_head_dim
    flops = 2.0 * n * heads_per_gpu * small * mla.kv_lora_rank
    moved = heads_per_gpu * (small * mla.kv_lora_rank + n * (small + mla.kv_lora_rank)) * 2.0
    bw = gpu.hbm_bandwidth_bytes_per_s * c.bandwidth_efficiency
    roof = _roofline(flops, moved, gpu.peak_for(DType.BF16), c.bmm_efficiency, bw, c.blend_power)
    out: FloatArray = roof + c.launch_s
    return out


def mla_decode_time_s(
    batch: FloatArray | float,
    context: FloatArray | float,
    *,
    heads_per_gpu: float,
    kv_dtype: DType | str,
    gemm_dtype: DType | str,
    gpu: GpuSpec,
    calibration: MlaCalibration,
    mla: MLASpec = DEEPSEEK_V3_MLA,
    hidden_size: int = DEEPSEEK_V3_HIDDEN,
) -> FloatArray:
    """One MLA layer in absorbed decode: ``batch`` sequences, one new token each, ``context`` tokens cached each.

    ``context`` may be the mean context of the batch (the KV read and attention FLOPs are linear in it).
    """
    c = calibration
    b = np.asarray(batch, dtype=np.float64)
    ctx = np.asarray(context, dtype=np.float64)
    proj = projection_time_s(
        b,
        heads_per_gpu=heads_per_gpu,
        gemm_dtype=gemm_dtype,
        gpu=gpu,
        calibration=c,
        prefill=False,
        mla=mla,
        hidden_size=hidden_size,
    )
    bmm = sum(
        mla_bmm_time_s(b, heads_per_gpu=heads_per_gpu, op=op, gpu=gpu, calibration=c, mla=mla)
        for op in ("mla_gen_pre", "mla_gen_post")
    )
    latent = mla.kv_lora_rank + mla.qk_rope_head_dim
    kv_name = "fp8" if str(kv_dtype) == "fp8" else "bf16"
    kv_bytes = b * ctx * latent * (1.0 if kv_name == "fp8" else 2.0)
    kv_eff = c.decode_kv_bandwidth_efficiency.get(kv_name, c.decode_kv_bandwidth_efficiency["bf16"])
    t_kv = kv_bytes / (gpu.hbm_bandwidth_bytes_per_s * kv_eff)
    flops = 2.0 * heads_per_gpu * b * ctx * (latent + mla.kv_lora_rank)
    t_flops = flops / (gpu.peak_for(DType.BF16) * c.decode_attention_efficiency)
    attn = np.maximum(t_kv, t_flops) + c.decode_per_sequence_s * b
    out: FloatArray = np.where(b > 0, c.decode_fixed_s + proj + bmm + attn, 0.0)
    return out
