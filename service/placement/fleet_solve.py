"""The joint fleet solve: one strategy and GPU type per deployment at the lowest total cost, by mixed-integer LP.

Each option is one candidate strategy of one deployment on one GPU type, with its instances per period (sized to the
period's rate) and its cost over the horizon. HiGHS (scipy.optimize.milp) picks one option per deployment, or leaves
it unserved, within the GPUs per type in every period, and, on a cluster, within the aligned slots of each instance
size. When everything cannot be served, deployments are served by priority: the highest level's unserved count is
minimised first and held, then the next level's, then the cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp  # type: ignore[import-untyped]
from scipy.sparse import csr_array, lil_array  # type: ignore[import-untyped]

# HiGHS stops at this relative gap between the plan's cost and its dual bound.
MIP_REL_GAP = 1e-4
# Wall-clock limit of one HiGHS solve; the plan reports the gap reached when it stops.
SOLVE_TIME_LIMIT_S = 20.0


@dataclass(frozen=True, slots=True)
class Option:
    """One deployment served by one candidate strategy on one GPU type."""

    deployment: int
    gpu_type: str
    gpus_per_instance: int
    instances_by_period: tuple[int, ...]
    cost_usd: float
    candidate: int = 0

    @property
    def gpus_by_period(self) -> tuple[int, ...]:
        """GPUs the option holds in each period."""
        return tuple(n * self.gpus_per_instance for n in self.instances_by_period)

    @property
    def peak_gpus(self) -> int:
        """GPUs at the busiest period."""
        return max(self.gpus_by_period)


@dataclass(slots=True)
class Solution:
    """The chosen option per served deployment, and how good the optimum is known to be."""

    chosen: dict[int, int] = field(default_factory=dict)
    unserved: list[int] = field(default_factory=list)
    cost_usd: float = 0.0
    mip_gap: float | None = None
    dual_bound_usd: float | None = None
    status: str = "optimal"
    solves: int = 0
    solve_s: float = 0.0


def instances_needed(rate_rps: float, goodput_per_instance_rps: float) -> int:
    """Instances of one strategy that serve a rate (at least one: a served deployment keeps one running)."""
    return max(1, math.ceil(rate_rps / goodput_per_instance_rps - 1e-9))


def aligned_slots(free_by_server: Sequence[Mapping[str, int]], sizes: Sequence[int]) -> dict[tuple[str, int], int]:
    """Per (GPU type, instance size s): GPUs usable by instances of s or more GPUs, s * sum over servers of
    floor(free / s); an instance lives on one server."""
    slots: dict[tuple[str, int], int] = {}
    for free in free_by_server:
        for gpu_type, count in free.items():
            for size in sizes:
                slots[(gpu_type, size)] = slots.get((gpu_type, size), 0) + size * (count // size)
    return slots


def solve_fleet(
    options: Sequence[Option],
    *,
    priorities: Sequence[int],
    capacity_by_type: Mapping[str, int],
    slots: Mapping[tuple[str, int], int] | None = None,
) -> Solution:
    """Lowest-cost choice of one option per deployment within the GPU counts, serving by priority when short."""
    started = time.perf_counter()
    n_dep = len(priorities)
    n_opt = len(options)
    periods = len(options[0].instances_by_period) if options else 1
    n_var = n_opt + n_dep
    rows: list[tuple[dict[int, float], float, float]] = []
    for d in range(n_dep):
        rows.append(({**{j: 1.0 for j, o in enumerate(options) if o.deployment == d}, n_opt + d: 1.0}, 1.0, 1.0))
    for gpu_type, cap in capacity_by_type.items():
        for p in range(periods):
            coeffs = {j: float(o.gpus_by_period[p]) for j, o in enumerate(options) if o.gpu_type == gpu_type}
            if coeffs:
                rows.append((coeffs, -np.inf, float(cap)))
    for (gpu_type, size), cap in (slots or {}).items():
        for p in range(periods):
            coeffs = {
                j: float(o.gpus_by_period[p])
                for j, o in enumerate(options)
                if o.gpu_type == gpu_type and o.gpus_per_instance >= size
            }
            if coeffs:
                rows.append((coeffs, -np.inf, float(cap)))
    cost = np.zeros(n_var)
    cost[:n_opt] = [o.cost_usd for o in options]
    solution = Solution()

    def run(objective: np.ndarray, extra: list[tuple[dict[int, float], float, float]], u_upper: float) -> object:
        all_rows = rows + extra
        matrix = lil_array((len(all_rows), n_var))
        lower = np.empty(len(all_rows))
        upper = np.empty(len(all_rows))
        for i, (coeffs, lo, hi) in enumerate(all_rows):
            for j, value in coeffs.items():
                matrix[i, j] = value
            lower[i], upper[i] = lo, hi
        ub = np.ones(n_var)
        ub[n_opt:] = u_upper
        solution.solves += 1
        return milp(
            objective,
            integrality=np.ones(n_var),
            bounds=Bounds(np.zeros(n_var), ub),
            constraints=LinearConstraint(csr_array(matrix), lower, upper),
            options={"mip_rel_gap": MIP_REL_GAP, "time_limit": SOLVE_TIME_LIMIT_S},
        )

    result = run(cost, [], 0.0)
    extra: list[tuple[dict[int, float], float, float]] = []
    if getattr(result, "x", None) is None:
        # Not everything fits: hold each priority level's fewest unserved, highest level first, then the cost.
        for level in sorted(set(priorities), reverse=True):
            members = [d for d in range(n_dep) if priorities[d] == level]
            objective = np.zeros(n_var)
            objective[[n_opt + d for d in members]] = 1.0
            staged = run(objective, extra, 1.0)
            assert getattr(staged, "x", None) is not None, "leaving deployments unserved is always feasible"
            short = round(float(staged.fun))  # type: ignore[attr-defined]
            extra.append(({n_opt + d: 1.0 for d in members}, -np.inf, float(short)))
        result = run(cost, extra, 1.0)
    x = result.x  # type: ignore[attr-defined]
    if x is None:
        solution.status = "no solution within the time limit"
        solution.unserved = list(range(n_dep))
        solution.solve_s = time.perf_counter() - started
        return solution
    for j, option in enumerate(options):
        if x[j] > 0.5:
            solution.chosen[option.deployment] = j
    solution.unserved = [d for d in range(n_dep) if d not in solution.chosen]
    solution.cost_usd = float(sum(options[j].cost_usd for j in solution.chosen.values()))
    solution.mip_gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    bound = getattr(result, "mip_dual_bound", None)
    solution.dual_bound_usd = float(bound) if bound is not None else None
    solution.status = "optimal" if result.status == 0 else str(result.message)  # type: ignore[attr-defined]
    solution.solve_s = time.perf_counter() - started
    return solution


def greedy_fleet(
    options: Sequence[Option], *, priorities: Sequence[int], capacity_by_type: Mapping[str, int]
) -> Solution:
    """The earlier rule, as a baseline: by priority then listed order, each deployment takes its option with the
    fewest GPUs at peak (then the lowest cost) among those still fitting the GPUs left."""
    periods = len(options[0].instances_by_period) if options else 1
    left = {t: [c] * periods for t, c in capacity_by_type.items()}
    by_deployment: dict[int, list[int]] = {}
    for j, option in enumerate(options):
        by_deployment.setdefault(option.deployment, []).append(j)
    solution = Solution(status="greedy")
    order = sorted(range(len(priorities)), key=lambda d: (-priorities[d], d))
    for d in order:
        ranked = sorted(by_deployment.get(d, []), key=lambda j: (options[j].peak_gpus, options[j].cost_usd))
        for j in ranked:
            option = options[j]
            room = left.get(option.gpu_type, [0] * periods)
            if all(g <= r for g, r in zip(option.gpus_by_period, room, strict=True)):
                left[option.gpu_type] = [r - g for g, r in zip(option.gpus_by_period, room, strict=True)]
                solution.chosen[d] = j
                break
        else:
            solution.unserved.append(d)
    solution.cost_usd = float(sum(options[j].cost_usd for j in solution.chosen.values()))
    return solution


def gpus_used(
    options: Sequence[Option], chosen: Mapping[int, int], gpu_types: Sequence[str], periods: int
) -> dict[str, list[int]]:
    """GPUs of each type held in each period by the chosen options."""
    used = {t: [0] * periods for t in gpu_types}
    for j in chosen.values():
        option = options[j]
        row = used.setdefault(option.gpu_type, [0] * periods)
        for p, g in enumerate(option.gpus_by_period):
            row[p] += g
    return used
