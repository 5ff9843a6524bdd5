"""Ready-to-run launch configs (engine commands, Kubernetes manifests) for a plan's chosen strategy."""

from __future__ import annotations

from service.launch.bundle import launch_bundle, write_launch_bundle
from service.launch.engines import ENGINES, LaunchError

__all__ = ["ENGINES", "LaunchError", "launch_bundle", "write_launch_bundle"]
