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


def read_structured_file(path: Path) -> Any:
    """Parse a YAML or JSON file, with a one-line error when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanningError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return parse_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PlanningError(f"cannot parse {path}: {first_line}") from None


def _coerce_numbers(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Cast numeric fields: YAML 1.1 reads exponents without a dot (3.35e12) as strings."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        if kinds.get(key) == "float" and isinstance(value, str | int):
            out[key] = float(value)
        elif kinds.get(key) == "int" and isinstance(value, str | float):
            out[key] = int(float(value))
    return out


def _model_from_entry(name: str, entry: Mapping[str, Any]) -> ModelSpec:
    fields_ = _coerce_numbers(ModelSpec, dict(entry))
    moe = fields_.pop("moe", None)
    mla = fields_.pop("mla", None)
    try:
        return ModelSpec(
            name=name,
            moe=MoESpec(**moe) if moe else None,
            mla=MLASpec(**mla) if mla else None,
            **fields_,
        )
    except TypeError as exc:
        raise PlanningError(f"model {name!r}: {exc}") from None


def _gpu_from_entry(name: str, entry: Mapping[str, Any]) -> GpuSpec:
    fields_ = _coerce_numbers(GpuSpec, dict(entry))
    try:
        fields_["peak_flops_per_s"] = {DType(k): float(v) for k, v in fields_.get("peak_flops_per_s", {}).items()}
        if "weight_only_dtypes" in fields_:
            fields_["weight_only_dtypes"] = tuple(DType(v) for v in fields_["weight_only_dtypes"])
        return GpuSpec(name=name, **fields_)
    except (TypeError, ValueError) as exc:
        raise PlanningError(f"gpu {name!r}: {exc}") from None


def _engine_from_entry(name: str, entry: Mapping[str, Any]) -> EngineSpec:
    fields_ = _coerce_numbers(EngineSpec, dict(entry))
    try:
        fields_["default_kv_dtype"] = {DType(k): DType(v) for k, v in fields_.get("default_kv_dtype", {}).items()}
        return EngineSpec(name=name, **fields_)
    except (TypeError, ValueError) as exc:
        raise PlanningError(f"engine {name!r}: {exc}") from None


def _merge_dir(directory: Path, raw: dict[str, dict[str, Any]]) -> None:
    for kind in ("models", "gpus", "engines", "calibration", "moe_calibration", "engine_calibration"):
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
        base = KernelCalibration().with_overrides(default_fields)
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
    return Catalog(
        models={k: _model_from_entry(k, v) for k, v in raw["models"].items()},
        gpus={k: _gpu_from_entry(k, v) for k, v in raw["gpus"].items()},
        engines={
            k: _engine_from_entry(k, {**v, **(raw["engine_calibration"].get(k) or {})})
            for k, v in raw["engines"].items()
        },
        calibration=base,
        gpu_calibration=per_gpu,
        moe_calibration=moe_base,
        gpu_moe_calibration=moe_per_gpu,
    )


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
