"""Fleet planning: candidate strategies per deployment and GPU type from the goodput search, one joint cost-optimal
solve over all of them, then (on a cluster) the packer's server assignment."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.placement.cluster import Cluster
from service.placement.estimators import ClusterView
from service.placement.fleet import MAX_DEPLOYMENTS, FleetDeployment, pack_fleet
from service.placement.fleet_candidates import (
    SearchRunner,
    candidate_tasks,
    run_sequentially,
    search_spec,
)
from service.placement.fleet_solve import (
    Option,
    Solution,
    aligned_slots,
    gpus_used,
    greedy_fleet,
    held_instances,
    solve_fleet,
)
from service.planning.catalog import Catalog
from service.planning.plan_spec import SearchSpec, SloSpec, WorkloadSpec
from service.planning.search import Checkpoint
from service.planning.specs import PlanningError
from service.planning.workload import LengthDistribution

MAX_FLEET_DEPLOYMENTS = 1000
# Work budget of one fleet plan: distinct candidate searches (deployment classes x GPU types), each one goodput
# search of a few layouts (about 1-8 s of one core, bench/RESULTS.md issue 17).
FLEET_MAX_CANDIDATE_SEARCHES = 1000
MAX_PERIODS = 168


class FleetDeploymentSpec(BaseModel):
    """One model to serve: its traffic (a rate, or a rate per period), its SLOs and its priority."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=200)
    engine: str = "vllm"
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    workload: WorkloadSpec
    slo: SloSpec
    search: SearchSpec = SearchSpec(modes=["collocated"], pp=[1], simulate_top=3, requests=100)
    gpu_types: list[str] | None = Field(default=None, description="restrict to these GPU types of the fleet")
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="higher is served first when the fleet is too small"
    )
    rate_profile: list[float] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PERIODS,
        description="requests per second in each period (e.g. 24 hourly rates), instead of workload.rate",
    )

    @model_validator(mode="after")
    def _needs_rate(self) -> FleetDeploymentSpec:
        if self.workload.arrival == "closed" or (self.workload.rate is None and self.rate_profile is None):
            raise ValueError(
                "a fleet deployment needs an open-loop workload with a rate (requests per second) or a rate_profile"
            )
        if self.rate_profile is not None and any(not 0 <= r <= 100_000 for r in self.rate_profile):
            raise ValueError("rate_profile rates must be between 0 and 100000 requests per second")
        return self

    def rates(self, periods: int) -> list[float]:
        """Requests per second in each of the fleet's periods."""
        if self.rate_profile is not None:
            return list(self.rate_profile)
        return [float(self.workload.rate or 0.0)] * periods


class FleetSpec(BaseModel):
    """A fleet plan: deployments to serve, and the fleet (GPU counts by type, or a stored cluster)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["fleet"] = "fleet"
    deployments: list[FleetDeploymentSpec] = Field(min_length=1, max_length=MAX_FLEET_DEPLOYMENTS)
    gpus: dict[str, int] | None = Field(default=None, description="GPU counts by catalog type")
    cluster: str | None = Field(default=None, description="a cluster stored with PUT /v1/clusters/{name}")
    prices: dict[str, float] | None = Field(
        default=None, description="$ per GPU-hour by GPU type, over the catalog's price_per_hour_usd"
    )
    period_hours: float = Field(default=1.0, gt=0, le=168, description="length of one rate_profile period")
    mix_instances: bool = Field(
        default=True,
        description="serve a deployment with instances of several strategies or GPU types behind a router that "
        "splits its rate in proportion to each instance's goodput; false: one strategy per deployment",
    )

    @model_validator(mode="after")
    def _one_fleet(self) -> FleetSpec:
        if (self.gpus is None) == (self.cluster is None):
            raise ValueError("give the fleet as `gpus` (counts by type) or as a stored `cluster`, exactly one")
        if self.gpus is not None and any(count < 0 for count in self.gpus.values()):
            raise ValueError("GPU counts must not be negative")
        if self.prices is not None and any(not 0 < price <= 10_000 for price in self.prices.values()):
            raise ValueError("prices must be positive $ per GPU-hour (at most 10000)")
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError("deployment names must be unique")
        lengths = {len(d.rate_profile) for d in self.deployments if d.rate_profile is not None}
        if len(lengths) > 1:
            raise ValueError(f"every rate_profile must have the same number of periods (got {sorted(lengths)})")
        searches = count_candidate_searches(self)
        if searches > FLEET_MAX_CANDIDATE_SEARCHES:
            raise ValueError(budget_message(searches))
        return self

    @property
    def periods(self) -> int:
        """Periods of the rate profiles (1 when every deployment has a constant rate)."""
        return next((len(d.rate_profile) for d in self.deployments if d.rate_profile is not None), 1)


def budget_message(searches: int) -> str:
    """Why a fleet is refused: its candidate searches against the work budget."""
    return (
        f"the fleet needs {searches} candidate searches (distinct model, engine, dtypes, workload, SLOs and search "
        f"per GPU type), over the work budget of {FLEET_MAX_CANDIDATE_SEARCHES} candidate searches per fleet plan: "
        "share workloads and SLOs between deployments, restrict gpu_types, or split the fleet"
    )


def count_candidate_searches(spec: FleetSpec) -> int:
    """Distinct candidate searches the spec asks for (a stored cluster's types counted as one until it is read)."""
    fleet_types = sorted(t.lower() for t in spec.gpus) if spec.gpus is not None else ["cluster"]
    seen: set[str] = set()
    for deployment in spec.deployments:
        doc = deployment.model_dump(mode="json", exclude_none=True)
        types = [t.lower() for t in deployment.gpu_types] if deployment.gpu_types else fleet_types
        for gpu_type in types:
            seen.add(json.dumps(search_spec(doc, gpu_type), sort_keys=True))
    return len(seen)


def parse_fleet_spec(raw: Any) -> FleetSpec:
    """A validated fleet spec, or a one-line PlanningError."""
    try:
        return FleetSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise PlanningError(f"invalid fleet spec at {where}: {err['msg']}") from None


def fleet_gpu_types(spec: FleetSpec, cluster: Cluster | None) -> dict[str, int]:
    """GPU counts by type of the fleet."""
    if spec.gpus is not None:
        return {name.lower(): count for name, count in spec.gpus.items()}
    assert cluster is not None
    counts: dict[str, int] = {}
    for server in cluster.servers:
        for gpu in server.gpus:
            counts[gpu.type.lower()] = counts.get(gpu.type.lower(), 0) + 1
    return counts


def fleet_prices(spec: FleetSpec, catalog: Catalog, gpu_types: Sequence[str]) -> dict[str, float]:
    """$ per GPU-hour of each GPU type: the spec's price, else the catalog's."""
    overrides = {t.lower(): p for t, p in (spec.prices or {}).items()}
    return {t: overrides[t] if t in overrides else catalog.gpu(t).price_per_hour_usd for t in gpu_types}


def _types_for(deployment: FleetDeploymentSpec, available: Mapping[str, int]) -> list[str]:
    wanted = [t.lower() for t in deployment.gpu_types] if deployment.gpu_types else sorted(available)
    return [t for t in wanted if available.get(t, 0) > 0]


def _mean_output_tokens(deployment: FleetDeploymentSpec) -> float | None:
    osl = deployment.workload.osl
    if osl is None:
        return None
    return float(osl) if isinstance(osl, int) else LengthDistribution.parse(osl).mean_tokens()


def plan_fleet(
    spec: FleetSpec,
    *,
    catalog: Catalog,
    cluster: Cluster | None = None,
    now_s: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Checkpoint | None = None,
    run_searches: SearchRunner | None = None,
    reused: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Search candidates (through ``run_searches``: here, a pool, or workers), solve for the cheapest fleet that
    meets every SLO it can, and say what is short; ``reused`` tells how many searches came from the cache."""
    available = fleet_gpu_types(spec, cluster)
    prices = fleet_prices(spec, catalog, sorted(available))
    periods = spec.periods
    deployments = spec.deployments
    types_by_deployment = [_types_for(d, available) for d in deployments]
    docs = [d.model_dump(mode="json", exclude_none=True) for d in deployments]
    for d in deployments:
        catalog.model(d.model)
        catalog.engine(d.engine)
    tasks, keys = candidate_tasks(zip(docs, types_by_deployment, strict=True), catalog=catalog)
    if len(tasks) > FLEET_MAX_CANDIDATE_SEARCHES:
        raise PlanningError(budget_message(len(tasks)))
    total = len(tasks)

    def done(count: int) -> None:
        if progress is not None:
            progress(count, max(total, 1))

    done(0)
    if run_searches is None:

        def run_searches(ts: list[Any], cb: Callable[[int], None]) -> dict[str, dict[str, Any]]:
            return run_sequentially(ts, cb, catalog=catalog, checkpoint=checkpoint)

    results = run_searches(tasks, done)
    done(total)

    options: list[Option] = []
    candidates: list[dict[str, Any]] = []
    rates = [d.rates(periods) for d in deployments]
    for index, by_type in enumerate(keys):
        for gpu_type, key in by_type.items():
            for candidate in results[key]["options"]:
                gpi = int(candidate["gpus_per_instance"])
                per_instance = float(candidate["goodput_per_instance_rps"])
                instance_cost = gpi * prices[gpu_type] * spec.period_hours
                options.append(Option(index, gpu_type, gpi, per_instance, instance_cost, candidate=len(candidates)))
                candidates.append(candidate)
    priorities = [d.priority for d in deployments]
    view = ClusterView(cluster, now_s=now_s) if cluster is not None else None
    # Instances stay on a cluster's servers all day: there each option holds its peak, in aligned slots per size.
    hold_peak = view is not None
    slots: dict[tuple[str, int], int] | None = None
    if view is not None:
        free_by_server = [{t: len(ids) for t, ids in by_type.items()} for by_type in view.free.values()]
        capacity = {t: sum(f.get(t, 0) for f in free_by_server) for t in available}
        sizes = sorted({o.gpus_per_instance for o in options if o.gpus_per_instance > 1})
        slots = aligned_slots(free_by_server, sizes)
    else:
        capacity = dict(available)
    solution = solve_fleet(
        options,
        rates=rates,
        priorities=priorities,
        capacity_by_type=capacity,
        slots=slots,
        mix=spec.mix_instances,
        hold_peak=hold_peak,
    )
    greedy = greedy_fleet(options, rates=rates, priorities=priorities, capacity_by_type=capacity, hold_peak=hold_peak)

    unmet: list[dict[str, Any]] = []
    shortfall: list[dict[str, Any]] = []
    used = gpus_used(options, solution, sorted(available), periods, hold_peak=hold_peak)
    # On a cluster, what whole servers still hold for an instance of each size.
    slot_left = {
        (t, size): cap
        - sum(
            max(counts) * options[j].gpus_per_instance
            for by_option in solution.instances.values()
            for j, counts in by_option.items()
            if options[j].gpu_type == t and options[j].gpus_per_instance >= size
        )
        for (t, size), cap in (slots or {}).items()
    }
    for index, deployment in enumerate(deployments):
        if index in solution.instances:
            continue
        types = types_by_deployment[index]
        if not types:
            unmet.append({"name": deployment.name, "reason": "none of its gpu_types is in the fleet"})
            continue
        mine = [o for o in options if o.deployment == index]
        if not mine:
            reasons = [results[keys[index][t]]["reason"] for t in types]
            slo = deployment.slo
            unmet.append(
                {
                    "name": deployment.name,
                    "reason": f"no strategy on {', '.join(types)} meets TTFT {slo.ttft_ms:g} ms and TPOT "
                    f"{slo.tpot_ms:g} ms for {slo.attainment:.0%} of requests at any rate"
                    + (f" ({reasons[0]})" if reasons and reasons[0] else ""),
                }
            )
            continue
        short = _shortfall(deployment, mine, candidates, rates[index], capacity, used, slot_left, hold_peak)
        shortfall.extend(short)
        best = short[0]
        unmet.append({"name": deployment.name, "reason": best["reason"]})

    chosen_rows = [
        _deployment_row(
            deployments[index],
            [(options[j], candidates[options[j].candidate], counts) for j, counts in by_option.items()],
            rates[index],
            prices,
            spec.period_hours,
            hold_peak=hold_peak,
        )
        for index, by_option in sorted(solution.instances.items())
    ]
    placed_by_name = _pack(chosen_rows, deployments, catalog=catalog, cluster=cluster, now_s=now_s, unmet=unmet)
    for row in chosen_rows:
        packed = placed_by_name.get(row["name"])
        row["placed"] = packed is not None
        row["instances_placed"] = packed or []
    served = [row for row in chosen_rows if row["placed"]]
    hours = periods * spec.period_hours
    cost = sum(row["cost_usd"] for row in served)
    peak_by_type = {t: max(used.get(t, [0])) for t in sorted(available)}
    result: dict[str, Any] = {
        "kind": "fleet",
        "mix_instances": spec.mix_instances,
        "deployments": chosen_rows,
        "unmet": unmet,
        "shortfall": shortfall,
        "all_slos_met": not unmet,
        "gpus_available_by_type": dict(capacity),
        "gpus_used_by_type": peak_by_type,
        "total_gpus": sum(peak_by_type.values()),
        "prices_per_gpu_hour_usd": prices,
        "periods": periods,
        "period_hours": spec.period_hours,
        "cost_usd": cost,
        "cost_per_hour_usd": cost / hours,
        "peak_cost_per_hour_usd": max(
            (sum(used.get(t, [0] * periods)[p] * prices[t] for t in available) for p in range(periods)), default=0.0
        ),
        "solver": _solver_doc(solution, hours, mix=spec.mix_instances),
        "greedy": _greedy_doc(greedy, deployments, hours),
        "candidate_searches": {"total": total, "reused": reused() if reused is not None else 0},
    }
    if periods > 1:
        result["gpus_used_by_period"] = {t: used.get(t, [0] * periods) for t in sorted(available)}
    return result


Part = tuple[Option, Mapping[str, Any], tuple[int, ...]]


def _deployment_row(
    deployment: FleetDeploymentSpec,
    parts: Sequence[Part],
    rates: Sequence[float],
    prices: Mapping[str, float],
    period_hours: float,
    *,
    hold_peak: bool,
) -> dict[str, Any]:
    """One served deployment: its instances per option, the share of the rate the router gives each, its cost.

    The first option is the one serving the largest share at the busiest period; the row's strategy fields are
    its own, its counts (instances, GPUs, capacity) those of all options together.
    """
    periods = range(len(rates))
    busiest = max(periods, key=lambda p: rates[p])
    capacity = [sum(o.goodput_rps * n[p] for o, _, n in parts) for p in periods]

    def share(option: Option, counts: Sequence[int], p: int) -> float:
        # The router splits the rate in proportion to goodput, so each instance runs at the same fraction of it.
        return option.goodput_rps * counts[p] / capacity[p] if capacity[p] > 0 else 0.0

    ordered = sorted(
        parts, key=lambda part: (-share(part[0], part[2], busiest), -max(part[2]), part[0].gpu_type, part[0].candidate)
    )
    hours = len(rates) * period_hours
    held = [held_instances(n, hold_peak=hold_peak) for _, _, n in ordered]
    running = [sum(n[p] for _, _, n in ordered) for p in periods]
    gpus = [sum(h[p] * o.gpus_per_instance for h, (o, _, _) in zip(held, ordered, strict=True)) for p in periods]
    cost_usd = sum(o.instance_cost_usd * sum(n) for o, _, n in ordered)
    option_docs = []
    for (option, candidate, counts), kept in zip(ordered, held, strict=True):
        cost = option.instance_cost_usd * sum(counts)
        doc: dict[str, Any] = {
            "gpu_type": option.gpu_type,
            "strategy": candidate["strategy"],
            "tp": candidate["tp"],
            "pp": candidate["pp"],
            "attention_dp": candidate.get("attention_dp", 1),
            "moe_ep": candidate.get("moe_ep", 1),
            "gpus_per_instance": option.gpus_per_instance,
            "goodput_per_instance_rps": option.goodput_rps,
            "instances": max(kept),
            "gpus": max(kept) * option.gpus_per_instance,
            "rate_share": share(option, counts, busiest),
            "rate_per_instance_rps": rates[busiest] * option.goodput_rps / capacity[busiest]
            if counts[busiest]
            else 0.0,
            "ttft_ms": candidate.get("ttft_ms"),
            "tpot_ms": candidate.get("tpot_ms"),
            "price_per_gpu_hour_usd": prices[option.gpu_type],
            "cost_usd": cost,
            "cost_per_hour_usd": cost / hours,
        }
        if len(rates) > 1:
            doc["instances_by_period"] = list(counts)
            doc["rate_share_by_period"] = [share(option, counts, p) for p in periods]
        option_docs.append(doc)
    main = option_docs[0]
    cost_per_hour = cost_usd / hours
    osl = _mean_output_tokens(deployment)
    mean_rate = sum(rates) / len(rates)
    tokens_per_hour = mean_rate * osl * 3600.0 if osl else 0.0
    row: dict[str, Any] = {
        "name": deployment.name,
        "model": deployment.model,
        "priority": deployment.priority,
        **{k: main[k] for k in ("gpu_type", "strategy", "tp", "pp", "attention_dp", "gpus_per_instance")},
        "instances": max(sum(h[p] for h in held) for p in periods),
        "gpus": max(gpus),
        "goodput_per_instance_rps": main["goodput_per_instance_rps"],
        "capacity_rps": capacity[busiest],
        "required_rps": rates[busiest],
        "mixed": len(option_docs) > 1,
        "router": "goodput_weighted" if len(option_docs) > 1 else "round_robin",
        "options": option_docs,
        "ttft_ms": main["ttft_ms"],
        "tpot_ms": main["tpot_ms"],
        "price_per_gpu_hour_usd": main["price_per_gpu_hour_usd"],
        "cost_usd": cost_usd,
        "cost_per_hour_usd": cost_per_hour,
        "cost_per_million_output_tokens_usd": cost_per_hour / tokens_per_hour * 1e6 if tokens_per_hour > 0 else None,
    }
    if len(rates) > 1:
        row["instances_by_period"] = running
        row["rate_profile"] = list(rates)
    return row


def _shortfall(
    deployment: FleetDeploymentSpec,
    mine: Sequence[Option],
    candidates: Sequence[Mapping[str, Any]],
    rates: Sequence[float],
    capacity: Mapping[str, int],
    used: Mapping[str, list[int]],
    slot_left: Mapping[tuple[str, int], int],
    hold_peak: bool,
) -> list[dict[str, Any]]:
    """Per GPU type, what the deployment's smallest option needs against what the plan leaves free."""
    out: list[dict[str, Any]] = []
    for gpu_type in sorted({o.gpu_type for o in mine}):
        sized = [
            (o, held_instances(o.instances_for(rates), hold_peak=hold_peak)) for o in mine if o.gpu_type == gpu_type
        ]
        option, counts = min(sized, key=lambda s: (max(s[1]) * s[0].gpus_per_instance, s[0].instance_cost_usd))
        needed = [n * option.gpus_per_instance for n in counts]
        per_instance = option.goodput_rps
        row = used.get(gpu_type, [0] * len(rates))
        periods = range(len(rates))
        aligned = slot_left.get((gpu_type, option.gpus_per_instance))
        free = [capacity.get(gpu_type, 0) - row[p] for p in periods]
        if aligned is not None:
            # Only GPUs in whole-instance blocks of one server count for an instance that spans several.
            free = [min(f, aligned) for f in free]
        short = max(needed[p] - free[p] for p in periods)
        busiest = max(periods, key=lambda p: needed[p] - free[p])
        servable = min(rates[busiest], (free[busiest] // option.gpus_per_instance) * per_instance)
        strategy = candidates[option.candidate]["strategy"]
        out.append(
            {
                "name": deployment.name,
                "priority": deployment.priority,
                "gpu_type": gpu_type,
                "gpus_needed": needed[busiest],
                "gpus_free": free[busiest],
                "gpus_short": short,
                "required_rps": rates[busiest],
                "servable_rps": servable,
                "reason": (
                    f"short of {short} {gpu_type} GPUs: needs {needed[busiest]} "
                    f"({counts[busiest]} x {option.gpus_per_instance}-GPU {strategy}), the plan leaves "
                    f"{free[busiest]} free; those serve {servable:.2f} of its {rates[busiest]:.2f} req/s"
                ),
            }
        )
    out.sort(key=lambda s: (s["gpus_short"], -s["servable_rps"]))
    return out


def _pack(
    rows: list[dict[str, Any]],
    deployments: Sequence[FleetDeploymentSpec],
    *,
    catalog: Catalog,
    cluster: Cluster | None,
    now_s: float,
    unmet: list[dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Where each chosen deployment's instances go, option by option: on a cluster, the packer's servers and GPUs;
    on GPU counts, nowhere in particular (the solve already kept every period within the counts)."""
    if cluster is None:
        return {
            row["name"]: [
                {"server": None, "gpu_ids": [], "tier": None, "load_s": None, "option": k, "gpu_type": o["gpu_type"]}
                for k, o in enumerate(row["options"])
                for _ in range(o["instances"])
            ]
            for row in rows
        }
    by_name = {d.name: d for d in deployments}
    # Each option of a deployment is packed as a part of its own, under a name no user name can take.
    parts = {f"{i}/{k}": (row, k) for i, row in enumerate(rows) for k in range(len(row["options"]))}
    missed: dict[str, str] = {}
    while True:
        packing = pack_fleet(
            [
                FleetDeployment(
                    name=part,
                    model=row["model"],
                    gpu_type=row["options"][k]["gpu_type"],
                    gpus_per_instance=row["options"][k]["gpus_per_instance"],
                    instances=row["options"][k]["instances"],
                    weight_dtype=by_name[row["name"]].weight_dtype,  # type: ignore[arg-type]
                    tp=row["options"][k]["tp"],
                    pp=row["options"][k]["pp"],
                    engine=by_name[row["name"]].engine,
                )
                for part, (row, k) in parts.items()
                if row["name"] not in missed
            ],
            catalog=catalog,
            cluster=cluster,
            now_s=now_s,
            # The fleet plan's own work budget bounds its deployments; mixed ones pack as several parts.
            max_deployments=max(MAX_DEPLOYMENTS, len(parts)),
        )
        missing: dict[str, str] = {}
        for miss in packing.unplaced:
            row, k = parts[miss.name]
            reason = miss.reason if len(row["options"]) == 1 else f"option {k + 1}: {miss.reason}"
            missing.setdefault(row["name"], reason)
        missed.update(missing)
        # A deployment is placed whole or not at all: when a part of one did not fit, the parts placed before it
        # held GPUs others could use, so the packing runs again without that deployment (it ends: each run
        # leaves out at least one more deployment).
        if not any(parts[p.name][0]["name"] in missing for p in packing.placed):
            break
    for name, reason in missed.items():
        unmet.append({"name": name, "reason": reason})
    placed: dict[str, list[dict[str, Any]]] = {}
    for packed in sorted(packing.placed, key=lambda p: parts[p.name][1]):
        row, k = parts[packed.name]
        placed.setdefault(row["name"], []).extend(
            {**i.model_dump(mode="json"), "option": k, "gpu_type": packed.gpu_type} for i in packed.instances
        )
    return placed


def _solver_doc(solution: Solution, hours: float, *, mix: bool) -> dict[str, Any]:
    what = "instances of several strategies per deployment" if mix else "one strategy per deployment"
    return {
        "method": f"mixed-integer LP (HiGHS via scipy.optimize.milp), {what}",
        "status": solution.status,
        "mip_gap": solution.mip_gap,
        "dual_bound_cost_per_hour_usd": solution.dual_bound_usd / hours
        if solution.dual_bound_usd is not None
        else None,
        "solves": solution.solves,
        "solve_s": solution.solve_s,
    }


def _greedy_doc(greedy: Solution, deployments: Sequence[FleetDeploymentSpec], hours: float) -> dict[str, Any]:
    return {
        "rule": "by priority, each deployment's option with the fewest GPUs at peak (then cost) that still fits",
        "cost_usd": greedy.cost_usd,
        "cost_per_hour_usd": greedy.cost_usd / hours,
        "unserved": [deployments[d].name for d in greedy.unserved],
    }
