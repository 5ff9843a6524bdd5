"""The chosen strategy of a plan result, read into what launch commands need: pools, dtypes, knobs, nodes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from service.launch.engines import LaunchError
from service.planning.catalog import Catalog
from service.planning.specs import GpuSpec, PlanningError, SpeculativeDecoding
from service.planning.stepcost import ParallelLayout
from service.planning.workload import LengthDistribution

SERVER, PREFILL, DECODE = "server", "prefill", "decode"

# Checkpoints published in a format other than bf16: (weights, routed experts). The engines read the
# format from the checkpoint's quantization config, so serving these "as published" needs no flag.
NATIVE_CHECKPOINT_DTYPES: dict[str, tuple[str, str]] = {
    "deepseek-v3": ("fp8", "fp8"),
    "deepseek-r1": ("fp8", "fp8"),
    "kimi-k2": ("fp8", "fp8"),
    "minimax-m2.5": ("fp8", "fp8"),
    "gpt-oss-120b": ("bf16", "mxfp4"),
    "gpt-oss-20b": ("bf16", "mxfp4"),
}
# Models whose tokenizer or config code lives in the checkpoint repository.
TRUST_REMOTE_CODE = frozenset({"kimi-k2", "minimax-m2.5"})
# Catalog models whose checkpoint carries the MTP layer the engines draft with (num_nextn_predict_layers 1).
MTP_CHECKPOINTS = frozenset({"deepseek-v3", "deepseek-r1"})


# One instance's parallel layout in the planner's own terms.
Layout = ParallelLayout


@dataclass(frozen=True, slots=True)
class Memory:
    """Per-GPU memory the plan budgeted for an instance (GiB) and its KV capacity."""

    weights_gib: float
    reserve_gib: float
    kv_cache_gib: float
    kv_capacity_tokens: int


@dataclass(frozen=True, slots=True)
class Pool:
    """Identical instances of one role: collocated servers, or the prefill or decode workers."""

    role: str
    layout: Layout
    instances: int
    nodes: int
    memory: Memory | None

    @property
    def gpus_per_node(self) -> int:
        """GPUs each node of an instance contributes."""
        return self.layout.gpus // self.nodes

    @property
    def multi_node(self) -> bool:
        """Whether one instance spans more than one node."""
        return self.nodes > 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Which weights the commands load and what each engine must be told about their format."""

    model: str
    # Format the plan assumed: weights and (MoE models) routed experts.
    weight_dtype: str
    expert_dtype: str | None
    # Format of the checkpoint named by ``model`` as published.
    native_weight_dtype: str
    native_expert_dtype: str | None
    from_model_config: bool

    @property
    def as_published(self) -> bool:
        """Whether the published checkpoint already has the planned format."""
        return (self.weight_dtype, self.expert_dtype) == (self.native_weight_dtype, self.native_expert_dtype)

    @property
    def online_fp8(self) -> bool:
        """Whether the plan quantizes a bf16 checkpoint to fp8 when loading (vLLM, SGLang --quantization fp8)."""
        bf16 = self.native_weight_dtype == "bf16" and self.native_expert_dtype in (None, "bf16")
        fp8 = self.weight_dtype == "fp8" and self.expert_dtype in (None, "fp8")
        return bf16 and fp8


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything the launch commands of one strategy depend on."""

    model_name: str
    slug: str
    checkpoint: Checkpoint
    trust_remote_code: bool
    moe: bool
    strategy: Mapping[str, Any]
    rank: int
    label: str
    mode: str
    gpus: int
    plan_engine: str
    gpu: GpuSpec
    kv_dtype: str
    max_batched_tokens: int
    max_sequences: int
    memory_fraction: float
    chunked_prefill: bool
    max_input_tokens: int
    pools: tuple[Pool, ...]
    # The spec's engine_settings.speculative: the drafter every server runs (None: no speculative decoding).
    speculative: SpeculativeDecoding | None = None
    # The spec's engine_settings.moe_backend: MoE kernels the plan priced ("marlin", "flashinfer_cutlass"), None or
    # "auto": the engine's.
    moe_backend: str | None = None

    @property
    def draft_model_needed(self) -> bool:
        """Whether the servers load a drafter checkpoint of their own (EAGLE heads; MTP uses the model's layers)."""
        return self.speculative is not None and self.speculative.method != "mtp"

    @property
    def disaggregated(self) -> bool:
        """Whether prefill and decode run on separate pools."""
        return self.mode == "disaggregated"

    def pool(self, role: str) -> Pool:
        """The pool of ``role``."""
        for pool in self.pools:
            if pool.role == role:
                return pool
        raise KeyError(role)

    def memory_fraction_for(self, engine: str, pool: Pool) -> float:
        """The engine's memory knob that gives ``pool`` the KV cache the plan budgeted."""
        # vLLM's --gpu-memory-utilization is the planner's own fraction (weights, activations and KV out of the
        # GPU's memory). SGLang's --mem-fraction-static covers weights and the KV pool only; TRT-LLM's
        # free_gpu_memory_fraction is the share of the memory left after weights and activations. Without the
        # plan's per-GPU memory the planner's fraction is passed through unchanged.
        memory = pool.memory
        total = self.gpu.memory_bytes / 1024**3
        if engine == "vllm" or memory is None:
            return self.memory_fraction
        if engine == "sglang":
            return round(min(0.99, (memory.weights_gib + memory.kv_cache_gib) / total), 3)
        free = total - memory.weights_gib - memory.reserve_gib
        return round(min(0.99, max(0.01, memory.kv_cache_gib / free)), 3) if free > 0 else self.memory_fraction


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise LaunchError(f"the strategy's {what} must be a positive integer, got {value!r}")
    return int(value)


def _layout(raw: Any, what: str) -> Layout:
    if not isinstance(raw, Mapping):
        raise LaunchError(f"the strategy's {what} layout is missing or not a mapping")
    tp = _int(raw.get("tp", 1), f"{what} tp")
    dp = _int(raw.get("attention_dp", 1), f"{what} attention_dp")
    ep = _int(raw.get("moe_ep", 1), f"{what} moe_ep")
    moe_tp = raw.get("moe_tp")
    return Layout(
        tp=tp,
        pp=_int(raw.get("pp", 1), f"{what} pp"),
        attention_dp=dp,
        moe_tp=_int(moe_tp, f"{what} moe_tp") if moe_tp is not None else max(1, tp * dp // ep),
        moe_ep=ep,
    )


def _memory(raw: Any) -> Memory | None:
    if not isinstance(raw, Mapping):
        return None
    try:
        return Memory(
            weights_gib=float(raw["weights_gib"]),
            reserve_gib=float(raw["reserve_gib"]),
            kv_cache_gib=float(raw["kv_cache_gib"]),
            kv_capacity_tokens=int(raw["kv_capacity_tokens"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def nodes_for(gpus: int, gpus_per_node: int) -> int:
    """Nodes an instance of ``gpus`` GPUs spans: the fewest that split it evenly."""
    nodes = max(1, math.ceil(gpus / gpus_per_node))
    while gpus % nodes:
        nodes += 1
    return nodes


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:24].rstrip("-") or "model"


def _max_input_tokens(spec: Mapping[str, Any]) -> int:
    workload = spec.get("workload")
    isl = workload.get("isl") if isinstance(workload, Mapping) else None
    try:
        if isinstance(isl, int) and not isinstance(isl, bool):
            return isl
        if isinstance(isl, str):
            return LengthDistribution.parse(isl).max_tokens()
    except PlanningError:
        pass
    return 0


def _strategy(result: Mapping[str, Any], rank: int) -> Mapping[str, Any]:
    strategies = result.get("strategies")
    if not isinstance(strategies, list) or not strategies:
        raise LaunchError("the plan has no strategies to launch")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= len(strategies):
        raise LaunchError(f"strategy rank {rank!r} is out of range: the plan has strategies 1 to {len(strategies)}")
    for strategy in strategies:
        if isinstance(strategy, Mapping) and strategy.get("rank") == rank:
            return strategy
    chosen = strategies[rank - 1]
    if not isinstance(chosen, Mapping):
        raise LaunchError(f"strategy {rank} of the plan is not a mapping")
    return chosen


def _model(spec: Mapping[str, Any], catalog: Catalog) -> tuple[str, str, bool]:
    """(catalog name or config name, engine model argument, whether it came from model_config)."""
    name = spec.get("model")
    if isinstance(name, str) and name.strip():
        try:
            entry = catalog.model(name)
        except PlanningError as exc:
            raise LaunchError(str(exc)) from None
        return entry.name, entry.hf_id or name, False
    config = spec.get("model_config")
    if isinstance(config, str) and config.strip():
        path = PurePosixPath(config)
        # A config.json path names its checkpoint directory; a directory is the checkpoint itself.
        directory = path.parent if path.suffix == ".json" else path
        return directory.name or str(directory), str(directory), True
    raise LaunchError("the plan spec names neither model nor model_config")


def _moe_backend(spec: Mapping[str, Any]) -> str | None:
    settings = spec.get("engine_settings")
    raw = settings.get("moe_backend") if isinstance(settings, Mapping) else None
    return None if raw is None else str(raw)


def _speculative(spec: Mapping[str, Any]) -> SpeculativeDecoding | None:
    settings = spec.get("engine_settings")
    raw = settings.get("speculative") if isinstance(settings, Mapping) else None
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise LaunchError("the spec's engine_settings.speculative is not a mapping")
    try:
        found = SpeculativeDecoding(
            method=str(raw["method"]),
            draft_tokens=_int(raw["draft_tokens"], "speculative draft_tokens"),
            acceptance_length=float(raw["acceptance_length"]),
        )
        found.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise LaunchError(f"the spec's engine_settings.speculative is incomplete or malformed: {exc}") from None
    except PlanningError as exc:
        raise LaunchError(str(exc)) from None
    return found


def read_plan(spec: Mapping[str, Any], result: Mapping[str, Any], rank: int, catalog: Catalog) -> LaunchPlan:
    """Read strategy ``rank`` of ``result`` (the JSON of `splan plan`) for the spec it answered."""
    if not isinstance(spec, Mapping) or not isinstance(result, Mapping):
        raise LaunchError("launch needs the plan spec and the plan result as mappings")
    strategy = _strategy(result, rank)
    model_name, model_arg, from_config = _model(spec, catalog)
    gpu_name = spec.get("gpu")
    if not isinstance(gpu_name, str):
        raise LaunchError("the plan spec names no gpu")
    try:
        gpu = catalog.gpu(gpu_name)
        engine = catalog.engine(str(strategy.get("engine") or spec.get("engine") or "vllm"))
    except PlanningError as exc:
        raise LaunchError(str(exc)) from None
    mode = strategy.get("mode")
    layout = strategy.get("layout")
    if mode not in ("collocated", "disaggregated") or not isinstance(layout, Mapping):
        raise LaunchError(f"strategy {rank} has no mode (collocated or disaggregated) and layout")
    found = strategy.get("memory_per_gpu")
    memory: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    node_gpus = gpu.gpus_per_node
    pools: list[Pool] = []
    if mode == "collocated":
        server = _layout(layout, "collocated")
        replicas = _int(layout.get("replicas", 1), "replicas")
        pools.append(Pool(SERVER, server, replicas, nodes_for(server.gpus, node_gpus), _memory(memory.get("replica"))))
    else:
        for role in (PREFILL, DECODE):
            part = layout.get(role)
            role_layout = _layout(part, role)
            workers = _int(part.get("workers", 1) if isinstance(part, Mapping) else 1, f"{role} workers")
            pools.append(
                Pool(role, role_layout, workers, nodes_for(role_layout.gpus, node_gpus), _memory(memory.get(role)))
            )
    weight = str(strategy.get("weight_dtype") or spec.get("weight_dtype") or "bf16")
    experts_raw = strategy.get("moe_weight_dtype")
    experts = str(experts_raw) if experts_raw else None
    moe = experts is not None or any(p.layout.moe_ep > 1 for p in pools)
    native: tuple[str, str | None] = NATIVE_CHECKPOINT_DTYPES.get(model_name, ("bf16", "bf16"))
    if from_config:
        # A local checkpoint is taken to hold what the plan assumed.
        native = (weight, experts)
    checkpoint = Checkpoint(
        model=model_arg,
        weight_dtype=weight,
        expert_dtype=experts if moe else None,
        native_weight_dtype=native[0],
        native_expert_dtype=native[1] if moe else None,
        from_model_config=from_config,
    )
    return LaunchPlan(
        model_name=model_name,
        slug=_slug(model_name),
        checkpoint=checkpoint,
        trust_remote_code=model_name in TRUST_REMOTE_CODE,
        moe=moe,
        strategy=strategy,
        rank=rank,
        label=str(strategy.get("label", "")),
        mode=str(mode),
        gpus=int(strategy.get("gpus") or sum(p.layout.gpus * p.instances for p in pools)),
        plan_engine=engine.name,
        gpu=gpu,
        kv_dtype=str(strategy.get("kv_dtype") or "bf16"),
        max_batched_tokens=_int(strategy.get("max_batched_tokens") or engine.max_num_batched_tokens, "tokens"),
        max_sequences=_int(strategy.get("max_sequences") or engine.max_num_seqs, "max_sequences"),
        memory_fraction=float(strategy.get("gpu_memory_fraction") or engine.gpu_memory_fraction),
        chunked_prefill=engine.chunked_prefill,
        max_input_tokens=_max_input_tokens(spec),
        pools=tuple(pools),
        speculative=_speculative(spec),
        moe_backend=_moe_backend(spec),
    )
