"""Calibration profiles: factors fitted on a user's own measurements, and the catalog they adjust."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from service.planning.catalog import Catalog
from service.planning.kernels import KernelCalibration
from service.planning.moe_cost import MoeCalibration
from service.planning.specs import PlanningError

PROFILE_KIND = "splan-profile"
PROFILE_VERSION = 1
# Multipliers on the GPU's calibrated efficiencies, by the resource they scale.
FACTOR_NAMES = ("compute", "memory_bandwidth", "collective_bandwidth")
# EngineSpec fields a profile may set (absolute values, seconds).
ENGINE_CONSTANTS = ("step_overhead_s", "per_sequence_overhead_s", "step_gap_s", "request_overhead_s")
# A factor this far below 1 means the GPU runs at a fifth of its calibrated efficiency: a wrong GPU or dtype.
MIN_FACTOR = 0.2
_TOP_LEVEL = {"kind", "version", "gpu", "engine", "models", "factors", "engine_constants", "kernel_calibration", "fit"}


@dataclass(frozen=True, slots=True)
class Profile:
    """What `splan calibrate` fitted, and the GPU, engine and models it was fitted for."""

    gpu: str
    engine: str
    # Models the measurements covered; empty: no model scope.
    models: tuple[str, ...] = ()
    compute_factor: float = 1.0
    memory_bandwidth_factor: float = 1.0
    collective_bandwidth_factor: float = 1.0
    engine_constants: dict[str, float] = field(default_factory=dict)
    # KernelCalibration fields fitted on kernel tables, applied before the factors.
    kernel_calibration: dict[str, Any] = field(default_factory=dict)
    # The fit's report (residuals, uncertainties, rows): kept with the profile, never applied.
    fit: dict[str, Any] = field(default_factory=dict)

    def factor(self, name: str) -> float:
        """One of FACTOR_NAMES."""
        return float(getattr(self, f"{name}_factor"))

    def as_document(self) -> dict[str, Any]:
        """The YAML/JSON form (what `parse_profile` reads back)."""
        doc: dict[str, Any] = {
            "kind": PROFILE_KIND,
            "version": PROFILE_VERSION,
            "gpu": self.gpu,
            "engine": self.engine,
            "models": list(self.models),
            "factors": {name: round(self.factor(name), 6) for name in FACTOR_NAMES},
            "engine_constants": {k: float(f"{v:.6g}") for k, v in self.engine_constants.items()},
        }
        if self.kernel_calibration:
            doc["kernel_calibration"] = self.kernel_calibration
        if self.fit:
            doc["fit"] = self.fit
        return doc


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PlanningError(f"invalid profile: {where} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise PlanningError(f"invalid profile: {where} must be a number (got {value!r})") from None
    if not math.isfinite(number):
        raise PlanningError(f"invalid profile: {where} must be finite")
    return number


def parse_profile(doc: Any) -> Profile:
    """A profile from its parsed YAML/JSON mapping; one-line PlanningError when it is not one."""
    if not isinstance(doc, Mapping):
        raise PlanningError("invalid profile: it must be a mapping (written by `splan calibrate`)")
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise PlanningError(f"invalid profile: unknown key {unknown[0]!r}; known: {', '.join(sorted(_TOP_LEVEL))}")
    if doc.get("kind", PROFILE_KIND) != PROFILE_KIND:
        raise PlanningError(f"invalid profile: kind must be {PROFILE_KIND!r}")
    for key in ("gpu", "engine"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise PlanningError(f"invalid profile: {key} (the {key} it was fitted on) is required")
    models = doc.get("models") or []
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise PlanningError("invalid profile: models must be a list of model names")
    factors_raw = doc.get("factors") or {}
    if not isinstance(factors_raw, Mapping):
        raise PlanningError("invalid profile: factors must be a mapping")
    factors: dict[str, float] = {}
    for name, value in factors_raw.items():
        if name not in FACTOR_NAMES:
            raise PlanningError(f"invalid profile: unknown factor {name!r}; known: {', '.join(FACTOR_NAMES)}")
        factors[name] = _number(value, f"factors.{name}")
        if factors[name] < MIN_FACTOR:
            raise PlanningError(
                f"invalid profile: factors.{name} must be at least {MIN_FACTOR} (got {factors[name]:g})"
            )
    constants_raw = doc.get("engine_constants") or {}
    if not isinstance(constants_raw, Mapping):
        raise PlanningError("invalid profile: engine_constants must be a mapping")
    constants: dict[str, float] = {}
    for name, value in constants_raw.items():
        if name not in ENGINE_CONSTANTS:
            raise PlanningError(
                f"invalid profile: unknown engine constant {name!r}; known: {', '.join(ENGINE_CONSTANTS)}"
            )
        constants[name] = _number(value, f"engine_constants.{name}")
        if constants[name] < 0:
            raise PlanningError(f"invalid profile: engine_constants.{name} must not be negative")
    kernel = doc.get("kernel_calibration") or {}
    if not isinstance(kernel, Mapping):
        raise PlanningError("invalid profile: kernel_calibration must be a mapping of calibration fields")
    try:
        KernelCalibration().with_overrides(dict(kernel))
    except (ValueError, TypeError, AttributeError) as exc:
        raise PlanningError(f"invalid profile: kernel_calibration: {exc}") from None
    fit = doc.get("fit") or {}
    return Profile(
        gpu=str(doc["gpu"]).strip().lower(),
        engine=str(doc["engine"]).strip().lower(),
        models=tuple(m.strip().lower() for m in models),
        compute_factor=factors.get("compute", 1.0),
        memory_bandwidth_factor=factors.get("memory_bandwidth", 1.0),
        collective_bandwidth_factor=factors.get("collective_bandwidth", 1.0),
        engine_constants=constants,
        kernel_calibration=dict(kernel),
        fit=dict(fit) if isinstance(fit, Mapping) else {},
    )


def _scaled(value: float, factor: float) -> float:
    # An efficiency is a share of the datasheet peak: no factor takes it past 1.
    return min(1.0, value * factor)


def _scaled_map(values: Mapping[Any, float], factor: float) -> dict[Any, float]:
    return {k: _scaled(v, factor) for k, v in values.items()}


def scale_calibration(cal: KernelCalibration, *, compute: float, memory: float, collective: float) -> KernelCalibration:
    """Kernel calibration with its compute, memory-bandwidth and collective efficiencies multiplied."""
    return replace(
        cal,
        gemm_peak_efficiency=_scaled_map(cal.gemm_peak_efficiency, compute),
        gemm_tiled_efficiency=_scaled_map(cal.gemm_tiled_efficiency, compute),
        gemm_block_scaled_efficiency=_scaled(cal.gemm_block_scaled_efficiency, compute),
        attention_prefill_efficiency=_scaled(cal.attention_prefill_efficiency, compute),
        gemm_bandwidth_efficiency=_scaled(cal.gemm_bandwidth_efficiency, memory),
        gemm_tiled_bandwidth_efficiency=_scaled(cal.gemm_tiled_bandwidth_efficiency, memory),
        attention_decode_bandwidth_efficiency=_scaled_map(cal.attention_decode_bandwidth_efficiency, memory),
        elementwise_bandwidth_efficiency=_scaled(cal.elementwise_bandwidth_efficiency, memory),
        collective_bus_efficiency=_scaled(cal.collective_bus_efficiency, collective),
        collective_kind_bus_efficiency=_scaled_map(cal.collective_kind_bus_efficiency, collective),
        custom_all_reduce_bus_efficiency=_scaled(cal.custom_all_reduce_bus_efficiency, collective),
    )


def scale_moe_calibration(cal: MoeCalibration, *, compute: float, memory: float, collective: float) -> MoeCalibration:
    """MoE-layer calibration with its expert-GEMM and all-to-all efficiencies multiplied."""
    return replace(
        cal,
        compute_efficiency=_scaled_map(cal.compute_efficiency, compute),
        bandwidth_efficiency=_scaled_map(cal.bandwidth_efficiency, memory),
        alltoall_bandwidth_efficiency=_scaled_map(cal.alltoall_bandwidth_efficiency, collective),
    )


def factor_upper_bounds(cal: KernelCalibration) -> dict[str, float]:
    """The largest physical factor per resource: the one that takes the best calibrated efficiency to 1."""
    compute = max(
        *cal.gemm_peak_efficiency.values(),
        *cal.gemm_tiled_efficiency.values(),
        cal.gemm_block_scaled_efficiency,
        cal.attention_prefill_efficiency,
    )
    memory = max(
        cal.gemm_bandwidth_efficiency,
        cal.gemm_tiled_bandwidth_efficiency,
        *cal.attention_decode_bandwidth_efficiency.values(),
        cal.elementwise_bandwidth_efficiency,
    )
    collective = max(
        cal.collective_bus_efficiency,
        *cal.collective_kind_bus_efficiency.values(),
        cal.custom_all_reduce_bus_efficiency,
    )
    return {"compute": 1.0 / compute, "memory_bandwidth": 1.0 / memory, "collective_bandwidth": 1.0 / collective}


def scope_warnings(profile: Profile, *, gpu: str, engine: str, model: str) -> list[str]:
    """Where the use of a profile lies outside what it was fitted on."""
    out = []
    if gpu.strip().lower() != profile.gpu:
        out.append(f"profile fitted on GPU {profile.gpu} is applied to {gpu}: its factors may not carry over")
    if engine.strip().lower() != profile.engine:
        out.append(f"profile fitted on engine {profile.engine} is applied to {engine}: its CPU constants may not hold")
    if profile.models and model.strip().lower() not in profile.models:
        fitted = ", ".join(profile.models)
        out.append(f"profile fitted on model(s) {fitted} is applied to {model}: expect larger errors")
    return out


def apply_profile(
    catalog: Catalog, profile: Profile, *, gpu: str, engine: str, model: str
) -> tuple[Catalog, list[str]]:
    """The catalog with the profile applied to ``gpu``'s calibration and ``engine``'s constants, and scope warnings."""
    gpu_spec = catalog.gpu(gpu)
    engine_spec = catalog.engine(engine)
    cal = catalog.calibration_for(gpu_spec)
    if profile.kernel_calibration:
        cal = cal.with_overrides(dict(profile.kernel_calibration))
    factors = {"compute": profile.compute_factor, "memory": profile.memory_bandwidth_factor}
    factors["collective"] = profile.collective_bandwidth_factor
    cal = scale_calibration(cal, **factors)
    moe = scale_moe_calibration(catalog.moe_calibration_for(gpu_spec), **factors)
    adjusted = replace(
        catalog,
        gpu_calibration={**catalog.gpu_calibration, gpu_spec.name: cal},
        gpu_moe_calibration={**catalog.gpu_moe_calibration, gpu_spec.name: moe},
        engines={**catalog.engines, engine_spec.name: replace(engine_spec, **dict[str, Any](profile.engine_constants))},
    )
    return adjusted, scope_warnings(profile, gpu=gpu, engine=engine, model=model)


def profiled_catalog(
    catalog: Catalog, profile: Mapping[str, Any] | Profile | None, *, gpu: str, engine: str, model: str
) -> tuple[Catalog, list[str]]:
    """The catalog a request runs against: ``catalog`` itself without a profile, else the adjusted one.

    The one place that applies a profile: `splan estimate`, `splan plan`, POST /v1/estimates and the plan worker
    all come through here.
    """
    if profile is None:
        return catalog, []
    parsed = profile if isinstance(profile, Profile) else parse_profile(profile)
    return apply_profile(catalog, parsed, gpu=gpu, engine=engine, model=model)
