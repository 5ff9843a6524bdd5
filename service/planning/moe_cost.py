"""Mixture-of-experts cost: experts touched per GPU, grouped-GEMM time and expert-parallel all-to-all.

The fused-MoE layer on one GPU is modelled from its routing: the token-expert pairs that land on each of the
GPU's local experts (its *load*). Every touched expert's GEMMs run in whole M tiles of ``tile_tokens`` rows; the
tiles times the N tiles of each GEMM are the CTAs, which run in waves over the GPU's SMs (a wave costs the same
whether it is full or not). The touched experts' weights stream in from HBM; the two are blended as a roofline.
Routing, sorting, permutation and the weighted sum add a fixed cost plus a pass over the routed activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from service.planning.kernels import FloatArray, Num
from service.planning.specs import DType, GpuSpec, PlanningError

# Routing skew names as in the kernel tables: balanced (even) or power_law_<exponent> (skewed).
BALANCED = "balanced"
# Independent uniform routing: each token picks its top-k experts at random, as a served model's router does
# without a tuned balance. Fewer experts are touched than under the tables' even spread at small batches.
RANDOM = "random"
# Routings a deployment may state for its served traffic: random (the default), balanced (an even spread, as an
# expert-placement balancer such as EPLB aims for) or the kernel tables' two power-law skews.
SERVED_ROUTINGS: tuple[str, ...] = (RANDOM, BALANCED, "power_law_1.01", "power_law_1.2")
MOE_ROUTING_HELP = (
    "how the router spreads served tokens over the experts: random (default; independent top-k picks), balanced "
    "(an even spread, as an expert balancer such as EPLB aims for) or power_law_1.01 / power_law_1.2 (skewed; "
    "under expert parallelism the busiest GPU sets the layer time)"
)
# MoE kernel backends a deployment may force: auto (what the engine picks for the weights and GPU), marlin,
# vLLM's weight-only Marlin kernels for 4-bit experts (`VLLM_MXFP4_USE_MARLIN=1`, `--moe-backend marlin`), or
# flashinfer_cutlass, FlashInfer's CUTLASS fused MoE on Blackwell where auto runs FlashInfer's TRT-LLM kernels
# (vLLM `VLLM_FLASHINFER_MOE_BACKEND=throughput`; the B200 table times both: priced with the TRT-LLM kernels'
# constants, its CUTLASS rows read 31-49% fast).
AUTO_BACKEND = "auto"
MARLIN_BACKEND = "marlin"
FLASHINFER_CUTLASS_BACKEND = "flashinfer_cutlass"
MOE_BACKENDS: tuple[str, ...] = (AUTO_BACKEND, MARLIN_BACKEND, FLASHINFER_CUTLASS_BACKEND)
MOE_BACKEND_HELP = (
    "MoE kernels: auto (default; what the engine picks for the expert dtype and GPU), marlin (weight-only Marlin "
    "kernels for 4-bit experts, as vLLM runs with VLLM_MXFP4_USE_MARLIN=1 or --moe-backend marlin) or "
    "flashinfer_cutlass (FlashInfer's CUTLASS fused MoE for bf16 or fp4 experts on Blackwell, as vLLM runs with "
    "VLLM_FLASHINFER_MOE_BACKEND=throughput; auto there is FlashInfer's TRT-LLM kernels)"
)
# On Blackwell the engines' default fused MoE for these expert kernels is FlashInfer's TRT-LLM kernels; its CUTLASS
# fused MoE is a kernel of its own (named here), fitted on the B200 table's rows that ran it.
BLACKWELL_CUTLASS_KERNELS: dict[str, str] = {"bf16": "bf16_cutlass", "fp8": "fp8_cutlass", "nvfp4": "nvfp4_cutlass"}
# N width (output columns) of one grouped-GEMM CTA tile.
TILE_N = 128
# Expert kernels whose weights the engine pads on an architecture, and the multiple: vLLM's MXFP4 MoE method rounds
# each expert's intermediate size per partition and the hidden size up to 256 for FlashInfer's TRT-LLM MXFP4 kernels
# on Blackwell (quantization/mxfp4.py create_weights; SGLang's sm100 FlashInfer path the same), and the kernels run
# the padded shapes: a 3072-wide expert split 32 ways computes 256 columns, not 96.
PADDED_EXPERT_KERNELS: dict[tuple[str, str], float] = {
    ("w4a8_mxfp4_mxfp8", "blackwell"): 256.0,
    ("mxfp4_bf16", "blackwell"): 256.0,
}
# Marlin's MoE picks its M block per call (vLLM fused_marlin_moe.py; SGLang's Marlin runner the same): the first of
# these under which the blocks would be less than 90% full (tokens x top-k / local experts / block < 0.9), else the
# last. Its layer time steps with that block, not with a fixed tile, so a `kernel_tile_tokens` entry for a Marlin
# kernel is not used.
MARLIN_BLOCK_TOKENS: tuple[float, ...] = (8.0, 16.0, 32.0, 48.0, 64.0)
MARLIN_KERNELS: frozenset[str] = frozenset({"int4_wo", "w4a16_mxfp4"})


@dataclass(frozen=True, slots=True)
class MoeCalibration:
    """Efficiencies and overheads of the fused-MoE layer and DeepEP-style all-to-all (fitted on kernels)."""

    # Per expert kernel (named as in the kernel tables, see KERNELS): grouped-GEMM compute efficiency
    # (fraction of the math dtype's datasheet peak in full waves) and achieved fraction of HBM bandwidth while
    # the touched experts' weights stream in.
    compute_efficiency: dict[str, float] = field(default_factory=lambda: {"bf16": 0.55})
    bandwidth_efficiency: dict[str, float] = field(default_factory=lambda: {"bf16": 0.8})
    # Tokens each expert's GEMM is padded to (the kernel's M tile): an expert with 1 token costs a tile.
    tile_tokens: float = 64.0
    # Fixed cost of one fused-MoE layer: routing top-k, sort/align, activation quantisation, launches.
    fixed_s: float = 4.0e-5
    # Per kernel values where they were fitted (kernels differ: Triton, CUTLASS, TRT-LLM, Marlin); a kernel
    # absent here uses the shared value above or below.
    kernel_tile_tokens: dict[str, float] = field(default_factory=dict)
    kernel_fixed_s: dict[str, float] = field(default_factory=dict)
    kernel_per_pair_s: dict[str, float] = field(default_factory=dict)
    kernel_routed_activation_passes: dict[str, float] = field(default_factory=dict)
    # Extra fixed cost of a layer whose experts are split by expert parallelism (the expert map that drops the
    # other GPUs' picks, a wider alignment); fitted where a kernel was timed both with and without it, else 0.
    kernel_ep_fixed_s: dict[str, float] = field(default_factory=dict)
    # Per local token-expert pair: permute, un-permute and the weighted sum.
    per_pair_s: float = 2.0e-9
    # bf16 passes over the routed activations (tokens x top-k x hidden) of every token entering the layer:
    # permutation, intermediate caches and the weighted sum span all routed slots even when this GPU holds
    # few of the experts.
    routed_activation_passes: float = 4.0
    # Roofline blend power: larger is closer to max(compute, memory).
    blend_power: float = 4.0
    # All-to-all: fixed latency per phase and achieved share of the link bandwidth, by kernel mode.
    alltoall_latency_s: dict[str, float] = field(default_factory=lambda: {"low_latency": 3.0e-5, "normal": 8.0e-5})
    alltoall_bandwidth_efficiency: dict[str, float] = field(
        default_factory=lambda: {"low_latency": 0.35, "normal": 0.55}
    )
    # Per token each rank handles in one phase (normal mode: its layout, notify and copy work per token).
    alltoall_per_token_s: dict[str, float] = field(default_factory=dict)
    # MLA attention-block constants (service/planning/mla_cost.py MlaCalibration fields), kept here so that one
    # file and one catalog lookup carry them: MlaCalibration().with_overrides(calibration.mla).
    mla: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, overrides: dict[str, Any]) -> MoeCalibration:
        """A copy with the named fields replaced (dtype-keyed mappings accept dtype names)."""
        known = {f.name: f for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown MoE calibration field {key!r}")
            if key == "mla":
                value = dict(value or {})
            elif isinstance(value, dict):
                value = {str(k): float(v) for k, v in value.items()}
            else:
                value = float(value)
            values[key] = value
        return replace(self, **values)

    def kernel_constants(self, kernel: str) -> KernelConstants:
        """Tile, fixed cost, per-pair cost and routed passes of an expert kernel (shared values as fallback)."""
        return KernelConstants(
            tile_tokens=self.kernel_tile_tokens.get(kernel, self.tile_tokens),
            fixed_s=self.kernel_fixed_s.get(kernel, self.fixed_s),
            per_pair_s=self.kernel_per_pair_s.get(kernel, self.per_pair_s),
            routed_activation_passes=self.kernel_routed_activation_passes.get(kernel, self.routed_activation_passes),
            ep_fixed_s=self.kernel_ep_fixed_s.get(kernel, 0.0),
        )


@dataclass(frozen=True, slots=True)
class KernelConstants:
    """The per-kernel constants of the fused-MoE layer (scalars, or per-row arrays when fitting)."""

    tile_tokens: FloatArray | float
    fixed_s: FloatArray | float
    per_pair_s: FloatArray | float
    routed_activation_passes: FloatArray | float
    ep_fixed_s: FloatArray | float = 0.0


def _power_law_exponent(distribution: str) -> float:
    if not distribution.startswith("power_law_"):
        raise ValueError(f"unknown routing distribution {distribution!r}")
    return float(distribution.removeprefix("power_law_"))


def routing_probabilities(num_experts: int, distribution: str = BALANCED) -> FloatArray:
    """Share of the routed slots each expert receives, most popular first, at a large token count."""
    if distribution == BALANCED:
        return np.full(num_experts, 1.0 / num_experts)
    loads = expert_loads(
        np.array([1 << 20], dtype=np.float64), num_experts=num_experts, topk=1, ep_ranks=1, distribution=distribution
    )[0]
    out: FloatArray = loads / loads.sum()
    return out


def _skewed_loads(n: FloatArray, num_experts: int, topk: int, exponent: float) -> FloatArray:
    """Expected sorted expert loads (tokens per expert, most loaded first) under power-law skew.

    Expert loads are drawn from a power-law density x^-exponent on [1, 0.8 n] (on [0.01, 2] when there are
    fewer routed slots than experts) and scaled to n x topk slots; no expert can take more than the n tokens.
    The expected order statistics stand in for the draw.
    """
    e = num_experts
    u = 1.0 - (np.arange(e, dtype=np.float64) + 0.5) / e
    many = (n * topk > e)[:, None]
    lo = np.where(many, 1.0, 0.01)
    hi = np.maximum(np.where(many, 0.8 * n[:, None], 2.0), lo * 1.001)
    b = 1.0 - exponent
    x = lo * (hi / lo) ** u[None, :] if abs(b) < 1e-09 else ((hi**b - lo**b) * u[None, :] + lo**b) ** (1.0 / b)
    total = (n * topk)[:, None]
    loads: FloatArray = x / x.sum(axis=1, keepdims=True) * total
    cap = n[:, None]
    for _ in range(8):
        over = np.maximum(loads - cap, 0.0).sum(axis=1, keepdims=True)
        loads = np.minimum(loads, cap)
        free = np.where(loads < cap, loads, 0.0)
        loads = loads + over * free / np.maximum(free.sum(axis=1, keepdims=True), 1e-30)
    return loads


def expert_loads(
    tokens: FloatArray | float, *, num_experts: int, topk: int, ep_ranks: int, distribution: str = BALANCED
) -> FloatArray:
    """Expected token-expert pairs on each local expert of the busiest GPU, shape tokens.shape + (local,).

    Balanced routing spreads the n x topk slots evenly (n x topk / experts each). Under skew the layer waits for
    the busiest GPU: the one holding the most loaded expert, with a typical share of the others (every
    ``ep_ranks``-th expert by load).
    """
    n = np.atleast_1d(np.asarray(tokens, dtype=np.float64))
    local = num_experts // max(1, ep_ranks)
    if distribution == BALANCED:
        out: FloatArray = np.repeat((n * topk / num_experts)[:, None], local, axis=1)
    else:
        exponent = _power_law_exponent(distribution)
        out = _skewed_loads(n.ravel(), num_experts, topk, exponent)[:, ::ep_ranks][:, :local]
        # The draw changes range where the routed slots outnumber the experts; past that point the busiest GPU
        # keeps at least the load it had there (more tokens never unload it).
        edge = np.floor(num_experts / topk)
        if np.any(n > edge):
            floor = _skewed_loads(np.array([edge]), num_experts, topk, exponent)[:, ::ep_ranks][:, :local]
            out = np.where((n.ravel() > edge)[:, None], np.maximum(out, floor), out)
            # The held load can never exceed the slots routed (tokens x topk) to this GPU's experts.
            routed = (n.ravel() * topk)[:, None]
            total = out.sum(axis=1, keepdims=True)
            out = out * np.minimum(1.0, routed / np.maximum(total, 1e-300))
    return out.reshape((*np.shape(tokens), local))


@dataclass(frozen=True, slots=True)
class Routing:
    """Per-GPU routing summary: touched experts, token-expert pairs and M tiles (tokens-shaped arrays)."""

    touched: FloatArray
    pairs: FloatArray
    tiles: FloatArray


def marlin_block_tokens(
    tokens: FloatArray | float, *, topk: FloatArray | float, local_experts: FloatArray | float
) -> FloatArray:
    """Marlin's M block for ``tokens`` entering the layer (per row)."""
    density = np.asarray(tokens, dtype=np.float64) * topk / np.maximum(local_experts, 1.0)
    out: FloatArray = np.full(density.shape, MARLIN_BLOCK_TOKENS[-1])
    for block in reversed(MARLIN_BLOCK_TOKENS):
        out = np.where(density / block < 0.9, block, out)
    return out


def routing_summary(loads: FloatArray, tile_tokens: FloatArray | float) -> Routing:
    """Touched experts, pairs and M tiles from per-expert loads (last axis).

    A load below one is the chance the expert gets its single token; otherwise its GEMM runs ceil(load / tile)
    M tiles.
    """
    touched = np.minimum(loads, 1.0)
    tile = np.asarray(tile_tokens, dtype=np.float64)
    tile = tile[..., None] if tile.ndim else tile
    tiles = np.where(loads < 1.0, loads, np.ceil(loads / tile - 1e-9))
    return Routing(touched.sum(axis=-1), loads.sum(axis=-1), tiles.sum(axis=-1))


def _random_summary(n: FloatArray, num_experts: int, topk: int, local: int, tile_tokens: FloatArray | float) -> Routing:
    """Routing of independent uniform top-k picks: an expert's load is Binomial(n, topk / experts)."""
    p = topk / num_experts
    hit = 1.0 - np.power(1.0 - p, n)
    mean = n * p
    # A touched expert holds mean / hit tokens on average; its GEMM runs that many tokens in whole tiles.
    per_touched = np.where(hit > 0, mean / np.maximum(hit, 1e-300), 0.0)
    tiles = hit * np.ceil(np.maximum(per_touched, 1.0) / tile_tokens - 1e-9)
    return Routing(hit * local, mean * local, tiles * local)


def _balanced_summary(
    n: FloatArray, num_experts: int, topk: int, local: int, tile_tokens: FloatArray | float
) -> Routing:
    per_expert = n * topk / num_experts
    touched = np.minimum(per_expert, 1.0)
    tiles = np.where(per_expert < 1.0, per_expert, np.ceil(per_expert / tile_tokens - 1e-9))
    return Routing(touched * local, per_expert * local, tiles * local)


def moe_routing_summary(
    tokens: FloatArray | float,
    *,
    num_experts: int,
    local_experts: int,
    topk: int,
    tile_tokens: FloatArray | float,
    distribution: str = BALANCED,
) -> Routing:
    """Routing summary of the busiest GPU for ``tokens`` entering the layer."""
    n = np.asarray(tokens, dtype=np.float64)
    if distribution == BALANCED:
        return _balanced_summary(n, num_experts, topk, local_experts, tile_tokens)
    if distribution == RANDOM:
        return _random_summary(n, num_experts, topk, local_experts, tile_tokens)
    ep = max(1, num_experts // max(1, local_experts))
    loads = expert_loads(n, num_experts=num_experts, topk=topk, ep_ranks=ep, distribution=distribution)
    return routing_summary(loads, tile_tokens)


def expected_touched_experts(
    tokens: FloatArray | float, *, num_experts: int, topk: int, local_experts: int, distribution: str = BALANCED
) -> FloatArray:
    """Expected distinct local experts of one GPU hit by ``tokens`` tokens each routed to ``topk`` experts."""
    touched, _ = moe_routing(
        tokens, num_experts=num_experts, local_experts=local_experts, topk=topk, distribution=distribution
    )
    return touched


def local_pair_share(num_experts: int, local_experts: int, topk: int, distribution: str = BALANCED) -> float:
    """Token-expert pairs per token that land on the busiest GPU's experts (at a large token count)."""
    if distribution in (BALANCED, RANDOM):
        return topk * local_experts / num_experts
    ep = max(1, num_experts // max(1, local_experts))
    loads = expert_loads(float(1 << 16), num_experts=num_experts, topk=topk, ep_ranks=ep, distribution=distribution)
    return float(loads.sum() / (1 << 16))


def moe_routing(
    tokens: FloatArray | float,
    *,
    num_experts: int,
    local_experts: int,
    topk: int,
    distribution: str = BALANCED,
) -> tuple[FloatArray, FloatArray]:
    """Expected (touched local experts, token-expert pairs on this GPU) for ``tokens`` entering the layer."""
    s = moe_routing_summary(
        tokens,
        num_experts=num_experts,
        local_experts=local_experts,
        topk=topk,
        tile_tokens=1.0,
        distribution=distribution,
    )
    return s.touched, s.pairs


def _waves(ctas: FloatArray, num_sms: FloatArray | float) -> FloatArray:
    out: FloatArray = np.ceil(ctas / num_sms - 1e-9)
    return out


def moe_time_from_routing_s(
    tokens: FloatArray,
    routing: Routing,
    *,
    hidden_size: FloatArray | float,
    expert_width_per_gpu: FloatArray | float,
    weight_bytes_per_element: FloatArray | float,
    peak_flops_per_s: FloatArray | float,
    compute_efficiency: FloatArray | float,
    bandwidth_efficiency: FloatArray | float,
    constants: KernelConstants,
    hbm_bandwidth_bytes_per_s: float,
    num_sms: float,
    topk: FloatArray | float,
    calibration: MoeCalibration,
    gated: bool | np.ndarray = True,
    expert_parallel: bool | np.ndarray = False,
) -> FloatArray:
    """Fused-MoE layer time from its routing (vectorised over rows for fitting)."""
    c = calibration
    h = np.asarray(hidden_size, dtype=np.float64)
    w = np.asarray(expert_width_per_gpu, dtype=np.float64)
    # Gated experts (SwiGLU) hold gate, up and down matrices; plain ones (relu^2, Nemotron-H) up and down.
    up_matrices = np.where(np.asarray(gated), 2.0, 1.0)
    up_n = up_matrices * w
    matrices = up_matrices + 1.0
    # Grouped GEMMs: up (M tiles x up_n/TILE_N CTAs, K = hidden) then down (M tiles x hidden/TILE_N, K = width);
    # each wave of CTAs over the SMs costs a full wave of tile FLOPs.
    k = constants
    t = k.tile_tokens
    wave_flops_up = _waves(routing.tiles * np.ceil(up_n / TILE_N), num_sms) * num_sms * 2.0 * t * TILE_N * h
    wave_flops_down = _waves(routing.tiles * np.ceil(h / TILE_N), num_sms) * num_sms * 2.0 * t * TILE_N * w
    t_compute = (wave_flops_up + wave_flops_down) / (peak_flops_per_s * compute_efficiency)
    weight_bytes = routing.touched * matrices * h * w * weight_bytes_per_element
    act_bytes = routing.pairs * (2.0 * h + matrices * w) * 2.0 + tokens * h * 4.0
    t_memory = (weight_bytes + act_bytes) / (hbm_bandwidth_bytes_per_s * bandwidth_efficiency)
    p = c.blend_power
    blended = (t_compute**p + t_memory**p) ** (1.0 / p)
    routed_bytes = k.routed_activation_passes * tokens * topk * h * 2.0
    ep_fixed = np.where(np.asarray(expert_parallel), k.ep_fixed_s, 0.0)
    overhead = k.fixed_s + ep_fixed + k.per_pair_s * routing.pairs + routed_bytes / hbm_bandwidth_bytes_per_s
    out: FloatArray = np.where(tokens > 0, blended + overhead, 0.0)
    return out


# Expert kernels: name -> math dtype of the GEMMs (weights dequantised to it where it differs).
KERNELS: dict[str, DType] = {
    "bf16": DType.BF16,
    "fp8": DType.FP8,
    "fp8_block": DType.FP8,
    "nvfp4": DType.FP4,
    "int4_wo": DType.BF16,
    "w4a16_mxfp4": DType.BF16,
    "mxfp4_bf16": DType.BF16,
    "w4a8_mxfp4_mxfp8": DType.FP8,
    "bf16_cutlass": DType.BF16,
    "fp8_cutlass": DType.FP8,
    "nvfp4_cutlass": DType.FP4,
}


def expert_kernel(weight_dtype: DType, gpu: GpuSpec, backend: str = AUTO_BACKEND) -> str:
    """The fused-MoE kernel engines run for ``weight_dtype`` experts on ``gpu`` (``backend`` may force Marlin)."""
    if backend not in MOE_BACKENDS:
        raise PlanningError(f"unknown MoE backend {backend!r}; use one of {', '.join(MOE_BACKENDS)}")
    if backend == MARLIN_BACKEND:
        if weight_dtype in (DType.MXFP4, DType.FP4):
            return "w4a16_mxfp4"
        if weight_dtype is DType.INT4:
            return "int4_wo"
        raise PlanningError(
            f"the Marlin MoE backend runs 4-bit weight-only experts (mxfp4, fp4, int4), not {weight_dtype.value}"
        )
    if backend == FLASHINFER_CUTLASS_BACKEND:
        engine_default = expert_kernel(weight_dtype, gpu)
        if gpu.architecture != "blackwell" or engine_default not in BLACKWELL_CUTLASS_KERNELS:
            raise PlanningError(
                "the flashinfer_cutlass MoE backend is priced for bf16 and fp4 experts on Blackwell GPUs (the B200 "
                f"kernel table), not {weight_dtype.value} experts on {gpu.name} ({gpu.architecture}); use auto"
            )
        return BLACKWELL_CUTLASS_KERNELS[engine_default]
    if weight_dtype is DType.FP8:
        # FP8 MoE checkpoints (DeepSeek, Qwen3, MiniMax) are block-scaled: the engines' block-fp8 path.
        return "fp8_block" if gpu.runs_natively(DType.FP8) else "int4_wo"
    if weight_dtype is DType.FP4:
        return "nvfp4" if gpu.runs_natively(DType.FP4) else "w4a16_mxfp4"
    if weight_dtype is DType.MXFP4:
        # MXFP4 checkpoints (gpt-oss) go through vLLM's own MXFP4 MoE method, not Marlin: on Hopper the OpenAI
        # Triton matmul_ogs kernels with bf16 activations (quantization/mxfp4.py, Mxfp4MoeBackend; the H100
        # table's `vllm_gptossmxfp4moe_triton_oaitritonmxfp4expertsmonolithic`).
        return "w4a8_mxfp4_mxfp8" if gpu.runs_natively(DType.MXFP4) else "mxfp4_bf16"
    if weight_dtype is DType.INT4:
        return "int4_wo"
    return "bf16"


def padded_expert_shape(kernel: str, architecture: str, hidden_size: Num, expert_width: Num) -> tuple[Num, Num]:
    """(hidden size, expert width per GPU) as the kernel runs them: padded where the engine pads the weights."""
    multiple = PADDED_EXPERT_KERNELS.get((kernel, architecture))
    if multiple is None:
        return hidden_size, expert_width
    return np.ceil(hidden_size / multiple) * multiple, np.ceil(expert_width / multiple) * multiple


def kernel_efficiencies(kernel: str, calibration: MoeCalibration) -> tuple[float, float]:
    """(compute, bandwidth) efficiency of an expert kernel, falling back to the bf16 kernel's."""
    c = calibration
    compute = c.compute_efficiency.get(kernel, c.compute_efficiency["bf16"])
    bandwidth = c.bandwidth_efficiency.get(kernel, c.bandwidth_efficiency["bf16"])
    return compute, bandwidth


def moe_layer_time_s(
    tokens: FloatArray | float,
    *,
    hidden_size: int,
    expert_width_per_gpu: float,
    num_experts: int,
    local_experts: int,
    topk: int,
    weight_dtype: DType,
    gpu: GpuSpec,
    calibration: MoeCalibration,
    gated: bool = True,
    distribution: str = BALANCED,
    kernel: str | None = None,
) -> FloatArray:
    """Fused-MoE layer on one GPU: ``tokens`` enter (all ranks' tokens under expert parallelism)."""
    n = np.asarray(tokens, dtype=np.float64)
    name = kernel or expert_kernel(weight_dtype, gpu)
    constants = calibration.kernel_constants(name)
    if name in MARLIN_KERNELS:
        constants = replace(
            constants, tile_tokens=marlin_block_tokens(n, topk=topk, local_experts=float(local_experts))
        )
    routing = moe_routing_summary(
        n,
        num_experts=num_experts,
        local_experts=local_experts,
        topk=topk,
        tile_tokens=constants.tile_tokens,
        distribution=distribution,
    )
    compute_eff, bandwidth_eff = kernel_efficiencies(name, calibration)
    hidden, width = padded_expert_shape(name, gpu.architecture, float(hidden_size), float(expert_width_per_gpu))
    return moe_time_from_routing_s(
        n,
        routing,
        hidden_size=hidden,
        expert_width_per_gpu=width,
        weight_bytes_per_element=weight_dtype.bytes_per_element,
        peak_flops_per_s=gpu.peak_for(KERNELS[name]),
        compute_efficiency=compute_eff,
        bandwidth_efficiency=bandwidth_eff,
        constants=constants,
        hbm_bandwidth_bytes_per_s=gpu.hbm_bandwidth_bytes_per_s,
        num_sms=float(gpu.num_sms),
        topk=topk,
        calibration=calibration,
        gated=gated,
        expert_parallel=local_experts < num_experts,
    )


def expected_destination_ranks(topk: int, ep_ranks: int) -> float:
    """Distinct EP ranks a token is sent to (DeepEP sends a token once per rank, not per expert)."""
    if ep_ranks <= 1:
        return 0.0
    return ep_ranks * (1.0 - (1.0 - 1.0 / ep_ranks) ** topk)


def alltoall_copies_per_token(topk: int, ep_ranks: int, mode: str) -> float:
    """Copies of a token sent to other ranks in one phase.

    DeepEP's normal (high-throughput) kernels send a token once to each destination rank; its low-latency
    kernels send one copy per selected expert (no de-duplication by rank), of which (ep - 1) / ep live elsewhere.
    """
    if ep_ranks <= 1:
        return 0.0
    remote_share = (ep_ranks - 1) / ep_ranks
    if mode == "low_latency":
        return topk * remote_share
    return expected_destination_ranks(topk, ep_ranks) * remote_share


def alltoall_time_s(
    tokens_per_gpu: FloatArray | float,
    *,
    hidden_size: int,
    topk: int,
    ep_ranks: int,
    bytes_per_element: float,
    intra_bandwidth_bytes_per_s: float,
    inter_bandwidth_bytes_per_s: float,
    ranks_per_domain: int,
    mode: str,
    calibration: MoeCalibration,
    phase: str | None = None,
) -> FloatArray:
    """One dispatch or combine phase of expert-parallel all-to-all over ``ep_ranks`` GPUs.

    Each GPU sends its tokens' copies (``alltoall_copies_per_token``) of ``hidden_size`` x
    ``bytes_per_element`` bytes; peers in the scale-up domain are reached over its links, the rest over the
    network, both in parallel. A fixed latency and a per-token cost (layout, notify, casts) add to the transfer.
    Constants are looked up as ``<mode>_<phase>`` (e.g. ``normal_dispatch``: the normal kernels' dispatch waits
    for a notify round the combine skips), then ``<mode>``.
    """
    n = np.asarray(tokens_per_gpu, dtype=np.float64)
    if ep_ranks <= 1:
        return np.zeros_like(n)
    c = calibration
    copies = alltoall_copies_per_token(topk, ep_ranks, mode)
    local_peers = max(0, min(ranks_per_domain, ep_ranks) - 1)
    remote_peers = ep_ranks - 1 - local_peers
    sent = n * hidden_size * bytes_per_element * copies
    key = f"{mode}_{phase}" if phase and f"{mode}_{phase}" in c.alltoall_latency_s else mode
    eff = c.alltoall_bandwidth_efficiency.get(key, c.alltoall_bandwidth_efficiency["normal"])
    t_local = sent * local_peers / (ep_ranks - 1) / (intra_bandwidth_bytes_per_s * eff)
    t_remote = sent * remote_peers / (ep_ranks - 1) / (inter_bandwidth_bytes_per_s * eff)
    latency = c.alltoall_latency_s.get(key, c.alltoall_latency_s["normal"])
    per_token = c.alltoall_per_token_s.get(key, 0.0)
    out: FloatArray = np.where(n > 0, latency + per_token * n + np.maximum(t_local, t_remote), 0.0)
    return out
