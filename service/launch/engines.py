"""Engine argument names, versions and images, as recorded in service/launch/data/<engine>.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from service.planning.specs import PlanningError

ENGINES: tuple[str, ...] = ("vllm", "sglang", "trtllm")


class LaunchError(PlanningError):
    """A launch bundle that cannot be built as asked (bad rank, unknown engine, no strategies)."""


@dataclass(frozen=True, slots=True)
class Argument:
    """One command-line argument of an entry point, with its aliases and the values we emit."""

    name: str
    aliases: tuple[str, ...] = ()
    # Values the bundle emits for this argument, checked against the engine's choices; empty means free-form.
    values: tuple[str, ...] = ()
    # Set for spellings the engine still accepts but names a successor for.
    deprecated: str = ""


@dataclass(frozen=True, slots=True)
class EntryPoint:
    """How a program is invoked (``vllm serve``) and the arguments it accepts."""

    invocation: tuple[str, ...]
    version: str
    source: str
    arguments: tuple[Argument, ...]

    def argument(self, flag: str) -> Argument | None:
        """The argument ``flag`` names (by its name or an alias), if known."""
        for arg in self.arguments:
            if flag == arg.name or flag in arg.aliases:
                return arg
        return None


@dataclass(frozen=True, slots=True)
class EngineData:
    """Everything recorded about one engine: version, sources, image, entry points, YAML keys."""

    engine: str
    version: str
    read_on: str
    source: str
    files: tuple[str, ...]
    image: str
    entry_points: tuple[EntryPoint, ...]
    yaml_keys: dict[str, frozenset[str]]

    def entry_point(self, invocation: tuple[str, ...]) -> EntryPoint:
        """The entry point invoked exactly as ``invocation``."""
        for entry in self.entry_points:
            if entry.invocation == invocation:
                return entry
        raise KeyError(" ".join(invocation))


def _as_str_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    return tuple(str(v) for v in value)


def _parse(engine: str, raw: Any) -> EngineData:
    if not isinstance(raw, dict) or raw.get("engine") != engine:
        raise ValueError(f"service/launch/data/{engine}.yaml does not describe {engine}")
    version = str(raw["version"])
    entries: list[EntryPoint] = []
    for invocation, body in raw["entry_points"].items():
        arguments = tuple(
            Argument(
                name=str(name),
                aliases=_as_str_tuple((meta or {}).get("aliases")),
                values=_as_str_tuple((meta or {}).get("values")),
                deprecated=str((meta or {}).get("deprecated", "")),
            )
            for name, meta in body["arguments"].items()
        )
        entries.append(
            EntryPoint(
                invocation=tuple(str(invocation).split()),
                version=str(body.get("version", version)),
                source=str(body.get("source", raw["source"])).strip(),
                arguments=arguments,
            )
        )
    yaml_keys = {str(k): frozenset(str(v) for v in values) for k, values in (raw.get("yaml_keys") or {}).items()}
    return EngineData(
        engine=engine,
        version=version,
        read_on=str(raw["read_on"]),
        source=str(raw["source"]).strip(),
        files=_as_str_tuple(raw.get("files")),
        image=str(raw["image"]),
        entry_points=tuple(entries),
        yaml_keys=yaml_keys,
    )


@cache
def engine_data(engine: str) -> EngineData:
    """The recorded data of ``engine`` (one of ENGINES), read from the package once."""
    if engine not in ENGINES:
        raise LaunchError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    text = resources.files("service.launch").joinpath("data", f"{engine}.yaml").read_text(encoding="utf-8")
    return _parse(engine, yaml.safe_load(text))
