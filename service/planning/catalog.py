"""The catalog container: models, GPUs, engines and kernel calibration by name."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from service.planning.kernels import KernelCalibration
from service.planning.moe_cost import MoeCalibration
from service.planning.specs import EngineSpec, GpuSpec, ModelSpec, PlanningError

T = TypeVar("T")


@dataclass(frozen=True)
class Catalog:
    """Everything the planner knows by name: models, GPUs, engines and kernel calibration."""

    models: dict[str, ModelSpec] = field(default_factory=dict)
    gpus: dict[str, GpuSpec] = field(default_factory=dict)
    engines: dict[str, EngineSpec] = field(default_factory=dict)
    calibration: KernelCalibration = field(default_factory=KernelCalibration)
    # Per-GPU calibration overrides (fitted on that GPU's own kernel measurements).
    gpu_calibration: dict[str, KernelCalibration] = field(default_factory=dict)
    # MoE-layer and all-to-all constants: shared defaults and per-GPU fits.
    moe_calibration: MoeCalibration = field(default_factory=MoeCalibration)
    gpu_moe_calibration: dict[str, MoeCalibration] = field(default_factory=dict)

    def model(self, name: str) -> ModelSpec:
        """A model by catalog name (case-insensitive)."""
        return _lookup(self.models, name, "model")

    def gpu(self, name: str) -> GpuSpec:
        """A GPU by catalog name."""
        return _lookup(self.gpus, name, "GPU")

    def engine(self, name: str) -> EngineSpec:
        """An engine by catalog name."""
        return _lookup(self.engines, name, "engine")

    def table(self, kind: Literal["models", "gpus", "engines"]) -> dict[str, dict[str, Any]]:
        """One catalog table as JSON-ready dictionaries keyed by name."""
        tables: dict[str, dict[str, Any]] = {"models": self.models, "gpus": self.gpus, "engines": self.engines}
        entries = tables[kind]
        # A JSON round trip turns enums and tuples into plain values.
        return {name: json.loads(json.dumps(asdict(spec), default=str)) for name, spec in sorted(entries.items())}

    def calibration_for(self, gpu: GpuSpec) -> KernelCalibration:
        """Kernel calibration for a GPU: its own fit when there is one, else the shared defaults."""
        return self.gpu_calibration.get(gpu.name, self.calibration)

    def moe_calibration_for(self, gpu: GpuSpec) -> MoeCalibration:
        """MoE calibration for a GPU: its own fit when there is one, else the shared defaults."""
        return self.gpu_moe_calibration.get(gpu.name, self.moe_calibration)


def _lookup(table: dict[str, T], name: str, what: str) -> T:
    key = name.strip().lower()
    if key in table:
        return table[key]
    known = ", ".join(sorted(table))
    raise PlanningError(f"unknown {what} {name!r}; known: {known}")
