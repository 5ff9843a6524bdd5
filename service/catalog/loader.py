"""Load the model, GPU and engine catalogs (and kernel calibration) from YAML/JSON files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from service.planning.catalog import Catalog
from service.planning.hf_config import model_from_hf_config
from service.planning.kernels import KernelCalibration
from service.planning.moe_cost import MoeCalibration
from service.planning.specs import DType, EngineSpec, GpuSpec, MLASpec, ModelSpec, MoESpec, PlanningError

DATA_DIR = Path(__file__).parent / "data"
# Extra catalog directories (os.pathsep-separated), each holding any of models/gpus/engines .yaml/.json.
CATALOG_PATH_ENV = "SPLAN_CATALOG_PATH"


try:
    # libyaml's parser: the catalog loads on every command, and the pure-Python parser takes ~0.4 s.
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _Yaml12FloatLoader(_SafeLoader):
    """Safe YAML loader that reads YAML 1.2 floats such as 25e9 (YAML 1.1 leaves them strings)."""


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text, reading exponent floats without a dot (25e9) as numbers."""
    return yaml.load(text, Loader=_Yaml12FloatLoader)


def read_text_file(path: Path) -> str:
    """A file's text, with a one-line error when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanningError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_structured_file(path: Path) -> Any:
    """Parse a YAML or JSON file, with a one-line error when it cannot be read."""
    text = read_text_file(path)
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return parse_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PlanningError(f"cannot parse {path}: {first_line}") from None


def _coerce_numbers(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Cast numeric fields (YAML 1.1 reads exponents without a dot, 3.35e12, as strings); refuse a non-boolean
    value for a boolean field, which would otherwise count as true."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        if kinds.get(key) == "bool" and not isinstance(value, bool):
            raise ValueError(f"field {key!r} must be true or false, not {value!r}")
        if kinds.get(key) == "float" and isinstance(value, str | int):
            out[key] = float(value)
        elif kinds.get(key) == "int" and isinstance(value, str | float):
            out[key] = int(float(value))
    return out


def _model_from_entry(name: str, entry: Mapping[str, Any]) -> ModelSpec:
    try:
        fields_ = _coerce_numbers(ModelSpec, dict(entry))
        moe = fields_.pop("moe", None)
        mla = fields_.pop("mla", None)
        return ModelSpec(
            name=name,
            moe=MoESpec(**moe) if moe else None,
            mla=MLASpec(**mla) if mla else None,
            **fields_,
        )
    except (TypeError, ValueError) as exc:
        raise PlanningError(f"model {name!r}: {exc}") from None


# Architecture family -> the calibrated GPU whose kernel efficiencies a new GPU of that family starts from. A
# family without one (ada, ampere, cdna3) takes a calibration.yaml section named after the family, else `default`.
ARCHITECTURE_CALIBRATION = {"hopper": "h100-sxm", "blackwell": "b200"}
ARCHITECTURES = ("hopper", "blackwell", "ada", "ampere", "cdna3")
# Dense bf16 FLOP/s per SM (compute unit) of each family's datasheet parts: H100 SXM, B200, L40S, A100, MI300X.
# Only to guess num_sms when a datasheet entry leaves it out.
BF16_FLOPS_PER_SM = {"hopper": 7.5e12, "blackwell": 15.2e12, "ada": 2.55e12, "ampere": 2.89e12, "cdna3": 4.3e12}
# Placeholders for link numbers a datasheet entry leaves out: PCIe Gen4 x16 per direction, one 200 Gb/s NIC.
DEFAULT_INTRA_NODE_BANDWIDTH = 32.0e9
DEFAULT_INTER_NODE_BANDWIDTH = 25.0e9
_REQUIRED_GPU_FIELDS = ("memory_bytes", "hbm_bandwidth_bytes_per_s", "peak_flops_per_s")


def _completed_gpu_entry(entry: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A datasheet GPU entry with the non-datasheet fields filled in, and what was assumed."""
    out = dict(entry)
    assumed: list[str] = []
    architecture = str(out.get("architecture", "")).strip().lower()
    if "num_sms" not in out:
        peak = out.get("peak_flops_per_s") or {}
        per_sm = BF16_FLOPS_PER_SM.get(architecture, BF16_FLOPS_PER_SM["hopper"])
        try:
            sms = max(1, round(float(peak.get("bf16", 0.0)) / per_sm))
        except (TypeError, ValueError, AttributeError):
            sms = 1
        out["num_sms"] = sms
        assumed.append(
            f"num_sms not given: assumed {sms} from the bf16 peak and the {architecture or 'hopper'} FLOP/s per SM"
        )
    domain = int(float(out.get("nvlink_domain_gpus", 0) or 0))
    if "gpus_per_node" not in out:
        out["gpus_per_node"] = min(8, domain) if domain > 0 else 1
        assumed.append(f"gpus_per_node not given: assumed {out['gpus_per_node']}")
    if "intra_node_bandwidth_bytes_per_s" not in out:
        out["intra_node_bandwidth_bytes_per_s"] = DEFAULT_INTRA_NODE_BANDWIDTH
        assumed.append("intra_node_bandwidth_bytes_per_s not given: assumed PCIe Gen4 x16 (32e9 B/s per direction)")
    if "inter_node_bandwidth_bytes_per_s" not in out:
        out["inter_node_bandwidth_bytes_per_s"] = DEFAULT_INTER_NODE_BANDWIDTH
        assumed.append("inter_node_bandwidth_bytes_per_s not given: assumed one 200 Gb/s NIC per GPU (25e9 B/s)")
    if "price_per_hour_usd" not in out:
        out["price_per_hour_usd"] = 0.0
        assumed.append("price_per_hour_usd not given: cost columns will read 0 (or pass --gpu-price)")
    return out, assumed


def _gpu_from_entry(name: str, entry: Mapping[str, Any]) -> GpuSpec:
    try:
        fields_ = _coerce_numbers(GpuSpec, _completed_gpu_entry(entry)[0])
        fields_["peak_flops_per_s"] = {DType(k): float(v) for k, v in fields_.get("peak_flops_per_s", {}).items()}
        if "weight_only_dtypes" in fields_:
            fields_["weight_only_dtypes"] = tuple(DType(v) for v in fields_["weight_only_dtypes"])
        return GpuSpec(name=name, **fields_)
    except (TypeError, ValueError) as exc:
        raise PlanningError(f"gpu {name!r}: {exc}") from None


def _engine_from_entry(name: str, entry: Mapping[str, Any]) -> EngineSpec:
    try:
        fields_ = _coerce_numbers(EngineSpec, dict(entry))
        fields_["default_kv_dtype"] = {DType(k): DType(v) for k, v in fields_.get("default_kv_dtype", {}).items()}
        return EngineSpec(name=name, **fields_)
    except (TypeError, ValueError) as exc:
        raise PlanningError(f"engine {name!r}: {exc}") from None


def _merge_dir(directory: Path, raw: dict[str, dict[str, Any]]) -> None:
    for kind in ("models", "gpus", "engines", "calibration", "moe_calibration", "engine_calibration", "gemm_dispatch"):
        for suffix in (".yaml", ".yml", ".json"):
            path = directory / f"{kind}{suffix}"
            if path.exists():
                content = read_structured_file(path)
                if not isinstance(content, dict):
                    raise PlanningError(f"{path} must hold a mapping of names to entries")
                raw[kind].update({str(k).lower(): v for k, v in content.items()})


def load_catalog(extra_dirs: tuple[Path, ...] = ()) -> Catalog:
    """Load the built-in catalog merged with user directories (later entries override earlier)."""
    raw: dict[str, dict[str, Any]] = {
        "models": {},
        "gpus": {},
        "engines": {},
        "calibration": {},
        "moe_calibration": {},
        "engine_calibration": {},
        "gemm_dispatch": {},
    }
    dirs = [DATA_DIR]
    env = os.environ.get(CATALOG_PATH_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += list(extra_dirs)
    for directory in dirs:
        if not directory.is_dir():
            raise PlanningError(f"catalog directory {directory} does not exist")
        _merge_dir(directory, raw)
    calibration_raw = raw["calibration"]
    default_fields = calibration_raw.get("default", {}) or {}
    try:
        dispatch = {"gemm_dispatch": raw["gemm_dispatch"]} if raw["gemm_dispatch"] else {}
        base = KernelCalibration().with_overrides({**dispatch, **default_fields})
        per_gpu = {
            name: base.with_overrides(values or {}) for name, values in calibration_raw.items() if name != "default"
        }
        moe_raw = raw["moe_calibration"]
        moe_base = MoeCalibration().with_overrides(moe_raw.get("default", {}) or {})
        moe_per_gpu = {
            name: moe_base.with_overrides(values or {}) for name, values in moe_raw.items() if name != "default"
        }
    except ValueError as exc:
        raise PlanningError(f"calibration: {exc}") from None
    gpus = {k: _gpu_from_entry(k, v) for k, v in raw["gpus"].items()}
    for name, spec in gpus.items():
        source = calibration_source(name, spec.architecture, per_gpu)
        if source != name and source in per_gpu:
            per_gpu[name] = per_gpu[source]
        moe_source = calibration_source(name, spec.architecture, moe_per_gpu)
        if moe_source != name and moe_source in moe_per_gpu:
            moe_per_gpu[name] = moe_per_gpu[moe_source]
    return Catalog(
        models={k: _model_from_entry(k, v) for k, v in raw["models"].items()},
        gpus=gpus,
        engines={
            k: _engine_from_entry(k, {**v, **(raw["engine_calibration"].get(k) or {})})
            for k, v in raw["engines"].items()
        },
        calibration=base,
        gpu_calibration=per_gpu,
        moe_calibration=moe_base,
        gpu_moe_calibration=moe_per_gpu,
    )


def calibration_source(name: str, architecture: str, sections: Mapping[str, Any]) -> str:
    """The calibration section a GPU uses: its own, its family's, its family's calibrated GPU's, else `default`."""
    if name in sections:
        return name
    family = architecture.strip().lower()
    if family in sections:
        return family
    reference = ARCHITECTURE_CALIBRATION.get(family)
    if reference is not None and reference in sections:
        return reference
    return "default"


@dataclasses.dataclass(frozen=True, slots=True)
class GpuFinding:
    """One thing `splan catalog gpus --check` found in a GPU entry."""

    gpu: str
    severity: str
    message: str

    def __str__(self) -> str:
        return f"gpu {self.gpu}: {self.severity}: {self.message}"


def _ratio_check(peaks: Mapping[DType, float], high: DType, low: DType, lo: float, hi: float) -> str | None:
    if high in peaks and low in peaks and peaks[low] > 0:
        ratio = peaks[high] / peaks[low]
        if not lo <= ratio <= hi:
            return (
                f"peak_flops_per_s {high.value} is {ratio:.2f}x {low.value} (datasheets give about 2x): "
                "is one of them a with-sparsity figure?"
            )
    return None


def check_gpu_entry(
    name: str, entry: Any, *, calibration_sections: Mapping[str, Any] | None = None
) -> list[GpuFinding]:
    """What is missing or implausible in one datasheet GPU entry (errors make it unusable)."""
    out: list[GpuFinding] = []

    def add(severity: str, message: str) -> None:
        out.append(GpuFinding(name, severity, message))

    if not isinstance(entry, Mapping):
        add("error", "the entry must be a mapping of GpuSpec fields")
        return out
    known = {f.name for f in dataclasses.fields(GpuSpec)} - {"name"}
    for key in sorted(set(entry) - known):
        add("error", f"unknown field {key!r}")
    for key in _REQUIRED_GPU_FIELDS:
        if key not in entry:
            add("error", f"{key} is required (a datasheet number)")
    if out:
        return out
    _, assumed = _completed_gpu_entry(entry)
    try:
        spec = _gpu_from_entry(name, entry)
    except PlanningError as exc:
        add("error", str(exc).split(": ", 1)[-1])
        return out
    for note in assumed:
        add("warning", note)
    if DType.BF16 not in spec.peak_flops_per_s:
        add("error", "peak_flops_per_s needs a bf16 figure (dense, FLOP/s)")
        return out
    architecture = spec.architecture.strip().lower()
    if not architecture:
        add(
            "warning",
            "architecture not given: kernel efficiencies fall back to the `default` calibration (an H100 fit)",
        )
    elif architecture not in ARCHITECTURES:
        add("error", f"unknown architecture {spec.architecture!r}; use one of {', '.join(ARCHITECTURES)}")
    else:
        source = calibration_source(name, architecture, calibration_sections or {})
        if source == "default" and calibration_sections:
            add("warning", f"no calibrated {architecture} GPU: kernel efficiencies come from `default` (an H100 fit)")
    memory, bandwidth, bf16 = spec.memory_bytes, spec.hbm_bandwidth_bytes_per_s, spec.peak_flops_per_s[DType.BF16]
    if memory < 1e9:
        add("error", f"memory_bytes {memory:g} is under 1 GB: give bytes (80 GB = 80e9), not GB")
    elif memory > 2e12:
        add("warning", f"memory_bytes {memory:g} is over 2 TB for one GPU")
    if bandwidth < 5e10:
        add("error", f"hbm_bandwidth_bytes_per_s {bandwidth:g} is under 50 GB/s: give bytes per second (3.35e12)")
    elif bandwidth > 3e13:
        add("warning", f"hbm_bandwidth_bytes_per_s {bandwidth:g} is over 30 TB/s for one GPU")
    for dtype, peak in spec.peak_flops_per_s.items():
        if peak < 1e12:
            add("error", f"peak_flops_per_s {dtype.value} {peak:g} is under 1 TFLOP/s: give FLOP/s (989e12)")
        elif peak > 5e16:
            add("warning", f"peak_flops_per_s {dtype.value} {peak:g} is over 50 PFLOP/s for one GPU")
    for check in (
        _ratio_check(spec.peak_flops_per_s, DType.FP8, DType.BF16, 1.5, 2.5),
        _ratio_check(spec.peak_flops_per_s, DType.FP4, DType.FP8, 1.5, 3.5),
    ):
        if check:
            add("warning", check)
    intensity = bf16 / bandwidth
    if bandwidth >= 5e10 and bf16 >= 1e12 and not 20 <= intensity <= 1500:
        add("warning", f"bf16 peak / HBM bandwidth is {intensity:.0f} FLOP/byte (datasheet GPUs: 100 to 600)")
    if architecture in BF16_FLOPS_PER_SM and "num_sms" in entry:
        per_sm = bf16 / spec.num_sms / BF16_FLOPS_PER_SM[architecture]
        if per_sm > 1.6:
            add("warning", f"bf16 peak per SM is {per_sm:.1f}x the {architecture} datasheet parts': a sparse figure?")
    if spec.intra_node_bandwidth_bytes_per_s > 2e12:
        add("warning", "intra_node_bandwidth_bytes_per_s is over 2 TB/s per direction")
    if spec.intra_node_bandwidth_bytes_per_s < 1e9 or spec.inter_node_bandwidth_bytes_per_s < 1e8:
        add("error", "link bandwidths are in bytes per second per direction (NVLink4: 450e9)")
    if spec.nvlink_domain_gpus and spec.gpus_per_node > spec.nvlink_domain_gpus:
        add("warning", f"gpus_per_node {spec.gpus_per_node} exceeds nvlink_domain_gpus {spec.nvlink_domain_gpus}")
    return out


def check_gpu_catalog(content: Any) -> list[GpuFinding]:
    """Findings for every entry of a gpus.yaml-shaped mapping (name -> datasheet entry)."""
    if not isinstance(content, Mapping) or not content:
        return [GpuFinding("-", "error", "a GPU catalog file is a mapping of GPU names to datasheet entries")]
    sections = dict.fromkeys(parse_yaml((DATA_DIR / "calibration.yaml").read_text(encoding="utf-8")) or {}, True)
    out: list[GpuFinding] = []
    for name, entry in content.items():
        out += check_gpu_entry(str(name).lower(), entry, calibration_sections=sections)
    return out


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The catalog from built-in data and $SPLAN_CATALOG_PATH, loaded once."""
    return load_catalog()


def load_hf_model_config(path: Path, *, name: str | None = None) -> ModelSpec:
    """Read a Hugging Face config.json from disk (never downloads) into a ModelSpec."""
    target = path / "config.json" if path.is_dir() else path
    content = read_structured_file(target)
    if not isinstance(content, dict):
        raise PlanningError(f"{target} is not a config.json object")
    return model_from_hf_config(content, name=name or target.parent.name or target.stem)
