"""Self-contained HTML reports of plans and fleet plans (inline CSS and SVG, nothing fetched)."""

from __future__ import annotations

from service.reporting.fleet_report import render_fleet_report
from service.reporting.plan_report import render_plan_report

__all__ = ["render_fleet_report", "render_plan_report"]
