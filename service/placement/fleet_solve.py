"""The joint fleet solve: instances of each candidate strategy per deployment at the lowest total cost, by MILP.

An option is one candidate strategy of one deployment on one GPU type, with the rate one instance serves within the
SLOs and its cost per period. HiGHS (scipy.optimize.milp) chooses, per deployment and period, an integer count of
instances of each option whose goodputs together cover the period's rate (at least one instance), or leaves the
deployment unserved, within the GPUs per type in every period and, on a cluster, within the aligned slots of each
instance size. Instances of several options may serve one deployment behind a router that splits the rate in
proportion to each instance's goodput (``mix``); without mixing each deployment takes one option. When everything
cannot be served, deployments are served by priority: the highest level's unserved count is minimised first and
held, then the next level's, then the cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp  # type: ignore[import-untyped]
from scipy.sparse import coo_array  # type: ignore[import-untyped]

# HiGHS stops at this relative gap between the plan's cost and its dual bound.
MIP_REL_GAP = 1e-3
# Wall-clock limit of one HiGHS solve; the plan reports the gap reached when it stops.
SOLVE_TIME_LIMIT_S = 20.0
# Relative slack of the cover test: a rate that is an exact multiple of the goodput is covered by that many.
COVER_RTOL = 1e-9


@dataclass(frozen=True, slots=True)
class Option:
    """One deployment's candidate strategy on one GPU type, sized per instance."""

    deployment: int
    gpu_type: str
    gpus_per_instance: int
    goodput_rps: float
    instance_cost_usd: float
    candidate: int = 0

    def instances_for(self, rates: Sequence[float]) -> tuple[int, ...]:
        """Instances of this option alone that serve each period's rate."""
        return tuple(instances_needed(r, self.goodput_rps) for r in rates)


@dataclass(slots=True)
class Solution:
    """Instances per option and period of each served deployment, and how good the optimum is known to be."""

    instances: dict[int, dict[int, tuple[int, ...]]] = field(default_factory=dict)
    unserved: list[int] = field(default_factory=list)
    cost_usd: float = 0.0
    mip_gap: float | None = None
    dual_bound_usd: float | None = None
    status: str = "optimal"
    solves: int = 0
    solve_s: float = 0.0


def instances_needed(rate_rps: float, goodput_per_instance_rps: float) -> int:
    """Instances of one strategy that serve a rate (at least one: a served deployment keeps one running)."""
    return max(1, math.ceil(rate_rps / goodput_per_instance_rps - COVER_RTOL))


def covers(options: Sequence[Option], counts: Mapping[int, Sequence[int]], rates: Sequence[float]) -> bool:
    """Whether instances per option (by period) serve every period's rate, with at least one instance."""
    for p, rate in enumerate(rates):
        capacity = sum(options[j].goodput_rps * n[p] for j, n in counts.items())
        if sum(n[p] for n in counts.values()) < 1 or capacity < rate * (1 - COVER_RTOL):
            return False
    return True


def held_instances(counts: Sequence[int], *, hold_peak: bool) -> tuple[int, ...]:
    """Instances holding GPUs in each period: as run, or (on a cluster, where they stay put) the peak all day."""
    return (max(counts),) * len(counts) if hold_peak else tuple(counts)


def aligned_slots(free_by_server: Sequence[Mapping[str, int]], sizes: Sequence[int]) -> dict[tuple[str, int], int]:
    """Per (GPU type, instance size s): GPUs usable by instances of s or more GPUs, s * sum over servers of
    floor(free / s); an instance lives on one server."""
    slots: dict[tuple[str, int], int] = {}
    for free in free_by_server:
        for gpu_type, count in free.items():
            for size in sizes:
                slots[(gpu_type, size)] = slots.get((gpu_type, size), 0) + size * (count // size)
    return slots


class _Rows:
    """Sparse constraint rows, added one at a time, turned into one LinearConstraint."""

    def __init__(self) -> None:
        self.row: list[int] = []
        self.col: list[int] = []
        self.val: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, coeffs: Mapping[int, float], lower: float, upper: float) -> None:
        index = len(self.lower)
        for j, value in coeffs.items():
            self.row.append(index)
            self.col.append(j)
            self.val.append(value)
        self.lower.append(lower)
        self.upper.append(upper)

    def constraint(self, n_var: int) -> LinearConstraint:
        matrix = coo_array((self.val, (self.row, self.col)), shape=(len(self.lower), n_var)).tocsr()
        return LinearConstraint(matrix, np.array(self.lower), np.array(self.upper))


def solve_fleet(
    options: Sequence[Option],
    *,
    rates: Sequence[Sequence[float]],
    priorities: Sequence[int],
    capacity_by_type: Mapping[str, int],
    slots: Mapping[tuple[str, int], int] | None = None,
    mix: bool = True,
    hold_peak: bool = False,
) -> Solution:
    """Lowest-cost instances per option covering every deployment's rate within the GPU counts, serving by priority
    when short; ``hold_peak``: instances keep their GPUs all day (a cluster), counted at each option's peak."""
    started = time.perf_counter()
    n_dep = len(priorities)
    n_opt = len(options)
    periods = len(rates[0]) if rates else 1
    by_deployment: list[list[int]] = [[] for _ in range(n_dep)]
    for j, option in enumerate(options):
        by_deployment[option.deployment].append(j)
    # Variables: n[j, p] instances of option j in period p, u[d] deployment d unserved, then (one option per
    # deployment) z[j] option j chosen, then (held all day) m[j] instances of option j holding GPUs.
    first_u = n_opt * periods
    first_z = first_u + n_dep
    first_m = first_z + (0 if mix else n_opt)
    n_var = first_m + (n_opt if hold_peak else 0)
    # A minimal cover never runs more of one option than that option alone needs, nor more instances in all
    # than the option with the most would need alone: bounds that cut no optimum.
    alone = [options[j].instances_for(rates[options[j].deployment]) for j in range(n_opt)]
    upper_bound = np.ones(n_var)
    for j in range(n_opt):
        upper_bound[j * periods : (j + 1) * periods] = alone[j]
        if hold_peak:
            upper_bound[first_m + j] = max(alone[j])
    rows = _Rows()
    for d, mine in enumerate(by_deployment):
        for p in range(periods):
            rate = float(rates[d][p])
            cols = [j * periods + p for j in mine]
            rows.add(
                {**{c: options[j].goodput_rps for c, j in zip(cols, mine, strict=True)}, first_u + d: rate},
                rate,
                np.inf,
            )
            rows.add({**dict.fromkeys(cols, 1.0), first_u + d: 1.0}, 1.0, np.inf)
            # Chvatal-Gomory cuts of the cover: divided by one option's goodput, its coefficients and bound rounded
            # up (valid for whole instances). With them the LP knows one option alone needs ceil(rate / goodput)
            # instances, and HiGHS closes a tight fleet's gap in seconds instead of running into its time limit.
            for j in mine:
                need = float(alone[j][p])
                ratios = {
                    c: float(math.ceil(options[k].goodput_rps / options[j].goodput_rps - COVER_RTOL))
                    for c, k in zip(cols, mine, strict=True)
                }
                rows.add({**ratios, first_u + d: need}, need, np.inf)
            if mix and mine:
                most = float(max(alone[j][p] for j in mine))
                rows.add({**dict.fromkeys(cols, 1.0), first_u + d: most}, -np.inf, most)
        if not mix:
            rows.add({**{first_z + j: 1.0 for j in mine}, first_u + d: 1.0}, 1.0, 1.0)
            # One option alone runs exactly the instances it needs (presolve then substitutes the counts out).
            for j in mine:
                for p in range(periods):
                    rows.add({j * periods + p: 1.0, first_z + j: -float(alone[j][p])}, 0.0, 0.0)
    if hold_peak:
        for j in range(n_opt):
            for p in range(periods):
                rows.add({first_m + j: 1.0, j * periods + p: -1.0}, 0.0, np.inf)

    def gpu_rows(keep: list[int], cap: int) -> None:
        if not keep:
            return
        if hold_peak:
            rows.add({first_m + j: float(options[j].gpus_per_instance) for j in keep}, -np.inf, float(cap))
            return
        for p in range(periods):
            rows.add({j * periods + p: float(options[j].gpus_per_instance) for j in keep}, -np.inf, float(cap))

    for gpu_type, cap in capacity_by_type.items():
        gpu_rows([j for j, o in enumerate(options) if o.gpu_type == gpu_type], cap)
    for (gpu_type, size), cap in (slots or {}).items():
        gpu_rows([j for j, o in enumerate(options) if o.gpu_type == gpu_type and o.gpus_per_instance >= size], cap)
    cost = np.zeros(n_var)
    for j, option in enumerate(options):
        cost[j * periods : (j + 1) * periods] = option.instance_cost_usd
    base = rows.constraint(n_var)
    # A deployment without any option is unserved whatever else happens.
    no_option = [d for d in range(n_dep) if not by_deployment[d]]
    solution = Solution()

    def run(objective: np.ndarray, extra: list[tuple[dict[int, float], float, float]], u_upper: float) -> object:
        constraints = [base]
        if extra:
            staged = _Rows()
            for coeffs, lo, hi in extra:
                staged.add(coeffs, lo, hi)
            constraints.append(staged.constraint(n_var))
        lower = np.zeros(n_var)
        upper = upper_bound.copy()
        upper[first_u:first_z] = u_upper
        for d in no_option:
            lower[first_u + d] = upper[first_u + d] = 1.0
        solution.solves += 1
        return milp(
            objective,
            integrality=np.ones(n_var),
            bounds=Bounds(lower, upper),
            constraints=constraints,
            options={"mip_rel_gap": MIP_REL_GAP, "time_limit": SOLVE_TIME_LIMIT_S},
        )

    result = run(cost, [], 0.0)
    extra: list[tuple[dict[int, float], float, float]] = []
    if getattr(result, "x", None) is None:
        # Not everything fits: hold each priority level's fewest unserved, highest level first, then the cost.
        for level in sorted(set(priorities), reverse=True):
            members = [d for d in range(n_dep) if priorities[d] == level]
            objective = np.zeros(n_var)
            objective[[first_u + d for d in members]] = 1.0
            staged = run(objective, extra, 1.0)
            assert getattr(staged, "x", None) is not None, "leaving deployments unserved is always feasible"
            short = round(float(staged.fun))  # type: ignore[attr-defined]
            extra.append(({first_u + d: 1.0 for d in members}, -np.inf, float(short)))
        result = run(cost, extra, 1.0)
    x = result.x  # type: ignore[attr-defined]
    if x is None:
        solution.status = "no solution within the time limit"
        solution.unserved = list(range(n_dep))
        solution.solve_s = time.perf_counter() - started
        return solution
    counts = np.rint(x[:first_u]).astype(int).reshape(n_opt, periods) if n_opt else np.zeros((0, periods), int)
    for d, mine in enumerate(by_deployment):
        if x[first_u + d] > 0.5:
            continue
        used = {j: tuple(int(n) for n in counts[j]) for j in mine if counts[j].any()}
        solution.instances[d] = used
    solution.unserved = [d for d in range(n_dep) if d not in solution.instances]
    solution.cost_usd = solution_cost(options, solution)
    solution.mip_gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    bound = getattr(result, "mip_dual_bound", None)
    solution.dual_bound_usd = float(bound) if bound is not None else None
    solution.status = "optimal" if result.status == 0 else str(result.message)  # type: ignore[attr-defined]
    solution.solve_s = time.perf_counter() - started
    return solution


def solution_cost(options: Sequence[Option], solution: Solution) -> float:
    """Cost over the horizon of the instances a solution runs."""
    return float(
        sum(
            options[j].instance_cost_usd * sum(counts)
            for by_option in solution.instances.values()
            for j, counts in by_option.items()
        )
    )


def greedy_fleet(
    options: Sequence[Option],
    *,
    rates: Sequence[Sequence[float]],
    priorities: Sequence[int],
    capacity_by_type: Mapping[str, int],
    hold_peak: bool = False,
) -> Solution:
    """The earlier rule, as a baseline: by priority then listed order, each deployment takes its option with the
    fewest GPUs at peak (then the lowest cost) among those still fitting the GPUs left."""
    periods = len(rates[0]) if rates else 1
    left = {t: [c] * periods for t, c in capacity_by_type.items()}
    by_deployment: dict[int, list[int]] = {}
    for j, option in enumerate(options):
        by_deployment.setdefault(option.deployment, []).append(j)
    solution = Solution(status="greedy")
    order = sorted(range(len(priorities)), key=lambda d: (-priorities[d], d))
    for d in order:
        sized = {j: options[j].instances_for(rates[d]) for j in by_deployment.get(d, [])}

        def key(j: int, sized: dict[int, tuple[int, ...]] = sized) -> tuple[int, float]:
            return max(sized[j]) * options[j].gpus_per_instance, options[j].instance_cost_usd * sum(sized[j])

        for j in sorted(sized, key=key):
            option = options[j]
            gpus = [n * option.gpus_per_instance for n in held_instances(sized[j], hold_peak=hold_peak)]
            room = left.get(option.gpu_type, [0] * periods)
            if all(g <= r for g, r in zip(gpus, room, strict=True)):
                left[option.gpu_type] = [r - g for g, r in zip(gpus, room, strict=True)]
                solution.instances[d] = {j: sized[j]}
                break
        else:
            solution.unserved.append(d)
    solution.cost_usd = solution_cost(options, solution)
    return solution


def gpus_used(
    options: Sequence[Option],
    solution: Solution,
    gpu_types: Sequence[str],
    periods: int,
    *,
    hold_peak: bool = False,
) -> dict[str, list[int]]:
    """GPUs of each type held in each period by a solution's instances."""
    used = {t: [0] * periods for t in gpu_types}
    for by_option in solution.instances.values():
        for j, counts in by_option.items():
            option = options[j]
            row = used.setdefault(option.gpu_type, [0] * periods)
            for p, n in enumerate(held_instances(counts, hold_peak=hold_peak)):
                row[p] += n * option.gpus_per_instance
    return used
