"""launch_bundle: every file that starts a plan's strategy on each engine; write_launch_bundle writes them."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from service.catalog.loader import default_catalog
from service.launch.commands import EngineLaunch, RouterCommands, engine_launch
from service.launch.engines import ENGINES, LaunchError
from service.launch.k8s import manifests
from service.launch.plan import read_plan
from service.launch.readme import readme
from service.launch.render import SCRIPT_NAMES, cluster_env, router_script, server_script
from service.planning.catalog import Catalog


def _engines(engines: Sequence[str] | None) -> list[str]:
    if engines is None:
        return list(ENGINES)
    asked = [engines] if isinstance(engines, str) else list(engines)
    if not asked:
        raise LaunchError(f"no engine asked for; known: {', '.join(ENGINES)}")
    chosen: list[str] = []
    for engine in asked:
        name = engine.strip().lower() if isinstance(engine, str) else engine
        if name not in ENGINES:
            raise LaunchError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def _options_file(engine: str, role: str, rank: int, options: dict[str, Any]) -> str:
    header = (
        f"# --extra_llm_api_options of the {engine} {role} servers of strategy {rank}: LLM API keys the flags cannot\n"
        "# set. Keys here override trtllm-serve's flags (kv_cache_config replaces the flag-built one).\n"
    )
    return header + yaml.safe_dump(options, sort_keys=False)


def launch_bundle(
    spec: dict[str, Any],
    result: dict[str, Any],
    *,
    strategy_rank: int = 1,
    engines: Sequence[str] | None = None,
    catalog: Catalog | None = None,
) -> dict[str, str]:
    """Relative path -> content: per engine its launch scripts and config files, Kubernetes manifests, a README.md."""
    chosen = _engines(engines)
    plan = read_plan(spec, result, strategy_rank, catalog if catalog is not None else default_catalog())
    files: dict[str, str] = {}
    sections: list[tuple[EngineLaunch, RouterCommands | None, RouterCommands | None]] = []
    for engine in chosen:
        launch = engine_launch(plan, engine)
        files[f"{engine}/cluster.env"] = cluster_env(plan, launch)
        for server in launch.servers:
            files[f"{engine}/{SCRIPT_NAMES[server.pool.role]}"] = server_script(plan, launch, server)
            if server.options_file:
                text = _options_file(engine, server.pool.role, plan.rank, server.options_yaml)
                files[f"{engine}/{server.options_file}"] = text
        router, script = router_script(plan, launch)
        if router is not None:
            files[f"{engine}/router.sh"] = script
        k8s_router, text = manifests(plan, launch)
        files[f"k8s/{engine}.yaml"] = text
        sections.append((launch, router, k8s_router))
    files["README.md"] = readme(plan, sections, [*files, "README.md"])
    return dict(sorted(files.items()))


def write_launch_bundle(bundle: dict[str, str], directory: Path) -> list[Path]:
    """Write the bundle's files under ``directory`` (scripts executable); returns the paths written."""
    written: list[Path] = []
    for relative, content in bundle.items():
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise LaunchError(f"bundle path {relative!r} is not a relative path inside the bundle")
        path = directory.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        if path.suffix == ".sh":
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        written.append(path)
    return written
