"""Prewarming advice: which checkpoints to copy into which server's DRAM or SSD now, which to evict, and how
long to keep idle instances of each model alive, to minimise the expected startup latency of the next cold starts.

The model behind the advice (deliberately simple, so that its numbers can be checked by hand):

- a cold start of checkpoint c finds the servers holding it busy independently, each with probability ``u``
  (the cluster's busy GPU share), and loads from the fastest tier among the holders that are not:
  ``E_c = (1 - u^nD) L_dram + u^nD (1 - u^nS) L_ssd + u^(nD + nS) L_remote`` with ``nD`` servers holding it in
  DRAM, ``nS`` more on SSD, and ``L_tier`` the mean load time from that tier over the cluster's servers;
- cold starts of c arrive at ``rate_c * exp(-rate_c * keep_alive_c)`` (no request within the keep-alive that
  would have found a warm instance);
- copies run one after another on each server, within ``max_copy_s_per_server``, and a copy that needs room
  evicts the entries whose loss is smallest (never one a demanded model needs more than the copy gains).

Keep-alive: keeping an idle instance of c alive longer costs GPU-seconds at ``gpus_c * rate_c * exp(-rate_c K)``
per second of K and saves startup seconds at ``rate_c^2 * E_c * exp(-rate_c K)``: the ratio does not depend on
K, so each model gets the longest or the shortest keep-alive. Models with the most startup saved per GPU-second
get the longest until the expected idle GPU-seconds reach those of ``default_keep_alive_s`` for every model; a
model with n running instances counts n of them, each seeing 1/n of its requests. ``evict=False`` copies only into
free room.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.placement.cluster import Cluster, Degree, DTypeField, Name, TierKind
from service.placement.estimators import ClusterView, checkpoint_bytes, shard_bytes
from service.planning.catalog import Catalog
from service.planning.specs import DType

MAX_DEMANDS = 4096
# Bounds on the busy share: a cluster shown entirely idle (or full) still sees some contention (or a free GPU).
MIN_BUSY_SHARE = 0.05
MAX_BUSY_SHARE = 0.95


class ModelDemand(BaseModel):
    """Recent (or forecast) request rate of one checkpoint and how its instances are laid out."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: Name = Field(description="catalog model name")
    checkpoint: Name | None = Field(default=None, description="checkpoint name in the tiers; default: model")
    weight_dtype: DTypeField = DType.BF16
    tp: Degree = 1
    pp: Degree = 1
    rate_per_s: Annotated[float, Field(ge=0.0)]


class PrewarmRequest(BaseModel):
    """What to prewarm for: demand per checkpoint and how much copying each server may do now."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    models: Annotated[list[ModelDemand], Field(min_length=1, max_length=MAX_DEMANDS)]
    max_copy_s_per_server: Annotated[float, Field(ge=0.0, le=86400.0)] = 120.0
    default_keep_alive_s: Annotated[float, Field(ge=0.0, le=86400.0)] = 60.0
    min_keep_alive_s: Annotated[float, Field(ge=0.0, le=86400.0)] = 5.0
    max_keep_alive_s: Annotated[float, Field(ge=0.0, le=86400.0)] = 600.0
    min_saving_s_per_hour: Annotated[float, Field(ge=0.0)] = Field(
        default=1.0, description="copies that save less startup latency per hour than this are not worth the traffic"
    )
    evict: bool = Field(
        default=True,
        description="false: copy only into free room (caches that loads keep refreshed hold what recent demand "
        "needs; evicting from them for a forecast lost startup in the replay)",
    )


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CopyAdvice(_Out):
    """Copy a checkpoint into a server tier now."""

    server: str
    checkpoint: str
    to_tier: TierKind
    from_tier: TierKind
    bytes: float
    copy_s: float
    startup_s_saved_per_hour: float


class EvictAdvice(_Out):
    """Drop a checkpoint from a server tier (to make room for a copy)."""

    server: str
    tier: TierKind
    checkpoint: str
    startup_s_lost_per_hour: float


class KeepAliveAdvice(_Out):
    """How long to keep an idle instance of a checkpoint alive."""

    checkpoint: str
    keep_alive_s: float
    rate_per_s: float
    expected_cold_start_s: float


class PrewarmAdvice(_Out):
    """Copies, evictions, keep-alive per checkpoint, and the expected cold-start latency before and after."""

    copies: list[CopyAdvice]
    evictions: list[EvictAdvice]
    keep_alive: list[KeepAliveAdvice]
    busy_share: float
    expected_cold_start_s_before: float
    expected_cold_start_s_after: float


@dataclass(slots=True)
class _Item:
    checkpoint: str
    size_bytes: float
    gpus: int
    rate_per_s: float
    tier_s: dict[TierKind, float]


@dataclass(slots=True)
class _Holdings:
    dram: dict[str, set[str]]
    ssd: dict[str, set[str]]

    def count(self, checkpoint: str) -> tuple[int, int]:
        """Servers holding it in DRAM, and those holding it on SSD only."""
        n_dram = sum(1 for held in self.dram.values() if checkpoint in held)
        n_ssd = sum(1 for s, held in self.ssd.items() if checkpoint in held and checkpoint not in self.dram[s])
        return n_dram, n_ssd


def expected_cold_start_s(item: _Item, *, n_dram: int, n_ssd: int, busy_share: float) -> float:
    """Expected load time of a cold start with the checkpoint held in DRAM by n_dram servers and on SSD by n_ssd."""
    u = busy_share
    p_dram = 1.0 - u**n_dram
    p_ssd = u**n_dram * (1.0 - u**n_ssd)
    p_remote = u ** (n_dram + n_ssd)
    return (
        p_dram * item.tier_s[TierKind.DRAM]
        + p_ssd * item.tier_s[TierKind.SSD]
        + p_remote * item.tier_s[TierKind.REMOTE]
    )


def _cold_rate_per_s(item: _Item, keep_alive_s: float) -> float:
    return item.rate_per_s * math.exp(-item.rate_per_s * keep_alive_s)


def advise_prewarm(cluster: Cluster, request: PrewarmRequest, *, catalog: Catalog, now_s: float) -> PrewarmAdvice:
    """Copies and evictions (greedy on startup seconds saved per copy second) and keep-alive per checkpoint."""
    view = ClusterView(cluster, now_s=now_s)
    static = view.static
    servers = [st.name for st in static.servers]
    total_gpus = sum(len(ids) for st in static.servers for ids in st.gpu_ids_by_type.values())
    free_gpus = sum(len(ids) for by_type in view.free.values() for ids in by_type.values())
    busy = min(MAX_BUSY_SHARE, max(MIN_BUSY_SHARE, 1.0 - free_gpus / max(1, total_gpus)))
    items: dict[str, _Item] = {}
    for demand in request.models:
        model = catalog.model(demand.model)
        name = demand.checkpoint or demand.model
        size = checkpoint_bytes(model, weight_dtype=demand.weight_dtype)
        shard = shard_bytes(model, weight_dtype=demand.weight_dtype, tp=demand.tp, pp=demand.pp)
        tier_s = {
            TierKind.DRAM: _mean(shard / view.pcie_rate[s] for s in servers),
            TierKind.SSD: _mean(
                max(size / view.ssd_rate[s], shard / view.pcie_rate[s]) if view.ssd_rate[s] > 0 else math.inf
                for s in servers
            ),
            TierKind.REMOTE: _mean(
                max(size / view.download_bytes_per_s(s), shard / view.pcie_rate[s]) for s in servers
            ),
        }
        if not math.isfinite(tier_s[TierKind.SSD]):
            tier_s[TierKind.SSD] = tier_s[TierKind.REMOTE]
        previous = items.get(name)
        rate = demand.rate_per_s + (previous.rate_per_s if previous else 0.0)
        items[name] = _Item(name, size, demand.tp * demand.pp, rate, tier_s)
    holdings = _Holdings(
        dram={st.name: set(st.dram) for st in static.servers},
        ssd={st.name: set(st.ssd) for st in static.servers},
    )
    mean_size = _mean(i.size_bytes for i in items.values())
    capacity = {(st.name, TierKind.DRAM): st.dram_capacity_bytes for st in static.servers if st.dram_capacity_bytes > 0}
    for s in cluster.servers:
        ssd = s.tier(TierKind.SSD)
        if ssd is not None:
            capacity[(s.name, TierKind.SSD)] = ssd.capacity_bytes

    def size_of(checkpoint: str) -> float:
        item = items.get(checkpoint)
        return item.size_bytes if item is not None else mean_size

    keep = dict.fromkeys(items, request.default_keep_alive_s)
    counts = {name: holdings.count(name) for name in items}

    def cost(name: str, n_dram: int, n_ssd: int) -> float:
        """Expected startup seconds per second of the checkpoint's cold starts with those holders."""
        item = items.get(name)
        if item is None:
            return 0.0
        rate = _cold_rate_per_s(item, keep[name])
        return rate * expected_cold_start_s(item, n_dram=n_dram, n_ssd=n_ssd, busy_share=busy)

    def change(name: str, server: str, tier: TierKind, add: bool) -> tuple[int, int]:
        """Holder counts after adding (or removing) the checkpoint in that server tier."""
        n_dram, n_ssd = counts.get(name, (0, 0))
        step = 1 if add else -1
        if tier is TierKind.DRAM:
            return n_dram + step, n_ssd - (step if name in holdings.ssd[server] else 0)
        if name in holdings.dram[server]:
            return n_dram, n_ssd
        return n_dram, n_ssd + step

    def loss_of(name: str, server: str, tier: TierKind) -> float:
        n_dram, n_ssd = counts.get(name, (0, 0))
        return cost(name, *change(name, server, tier, False)) - cost(name, n_dram, n_ssd)

    before = _weighted_cold_start(items, holdings, keep, busy)
    used = {
        (server, tier): sum(size_of(c) for c in (holdings.dram if tier is TierKind.DRAM else holdings.ssd)[server])
        for server, tier in capacity
    }
    budget = dict.fromkeys(servers, request.max_copy_s_per_server)
    copies: list[CopyAdvice] = []
    evictions: list[EvictAdvice] = []
    while True:
        best: tuple[float, str, str, TierKind, TierKind, float, list[tuple[str, float]], float] | None = None
        for name, item in items.items():
            if item.rate_per_s <= 0:
                continue
            base = cost(name, *counts[name])
            for tier in (TierKind.DRAM, TierKind.SSD):
                for server in servers:
                    held = holdings.dram[server] if tier is TierKind.DRAM else holdings.ssd[server]
                    if name in held or (server, tier) not in capacity:
                        continue
                    gain = base - cost(name, *change(name, server, tier, True))
                    if gain <= 0:
                        continue
                    from_tier, copy_s = _copy_source(view, server, item.size_bytes, tier, name in holdings.ssd[server])
                    # Evictions only lower the gain: a copy that cannot beat the best one even without them is out.
                    if copy_s > budget[server] or (best is not None and gain / max(copy_s, 1e-3) <= best[0]):
                        continue
                    room = capacity[(server, tier)] - used[(server, tier)]
                    victims: list[tuple[str, float]] = []
                    if room < item.size_bytes and not request.evict:
                        continue
                    if room < item.size_bytes:
                        found = _victims(
                            [(loss_of(c, server, tier), c, size_of(c)) for c in held], item.size_bytes - room
                        )
                        if found is None or sum(loss for _, loss in found) >= gain:
                            continue
                        victims = found
                    net = gain - sum(loss for _, loss in victims)
                    density = net / max(copy_s, 1e-3)
                    if best is None or density > best[0]:
                        best = (density, name, server, tier, from_tier, copy_s, victims, net)
        if best is None or best[7] * 3600.0 < request.min_saving_s_per_hour:
            break
        _, name, server, tier, from_tier, copy_s, victims, net = best
        held = holdings.dram[server] if tier is TierKind.DRAM else holdings.ssd[server]
        for victim, loss in victims:
            held.discard(victim)
            used[(server, tier)] -= size_of(victim)
            if victim in counts:
                counts[victim] = holdings.count(victim)
            evictions.append(
                EvictAdvice(server=server, tier=tier, checkpoint=victim, startup_s_lost_per_hour=loss * 3600.0)
            )
        held.add(name)
        used[(server, tier)] += items[name].size_bytes
        counts[name] = holdings.count(name)
        budget[server] -= copy_s
        copies.append(
            CopyAdvice(
                server=server,
                checkpoint=name,
                to_tier=tier,
                from_tier=from_tier,
                bytes=items[name].size_bytes,
                copy_s=copy_s,
                startup_s_saved_per_hour=net * 3600.0,
            )
        )
    running: dict[str, int] = {}
    for inst in cluster.instances:
        key = inst.checkpoint or inst.model
        running[key] = running.get(key, 0) + 1
    keep_alive = _keep_alive(items, holdings, busy, request, running)
    for advice in keep_alive:
        keep[advice.checkpoint] = advice.keep_alive_s
    after = _weighted_cold_start(items, holdings, keep, busy)
    return PrewarmAdvice(
        copies=copies,
        evictions=evictions,
        keep_alive=keep_alive,
        busy_share=busy,
        expected_cold_start_s_before=before,
        expected_cold_start_s_after=after,
    )


def _mean(values: Iterable[float]) -> float:
    data = list(values)
    return float(sum(data) / len(data)) if data else 0.0


def _copy_source(view: ClusterView, server: str, size: float, tier: TierKind, on_ssd: bool) -> tuple[TierKind, float]:
    """Where a copy into ``tier`` reads from and how long it takes."""
    if tier is TierKind.DRAM and on_ssd and view.ssd_rate[server] > 0:
        return TierKind.SSD, size / view.ssd_rate[server]
    return TierKind.REMOTE, size / view.download_bytes_per_s(server)


def _victims(entries: list[tuple[float, str, float]], needed_bytes: float) -> list[tuple[str, float]] | None:
    """Entries (loss, name, size) to evict for ``needed_bytes`` of room, least loss first; None when all of
    them are not enough."""
    chosen: list[tuple[str, float]] = []
    freed = 0.0
    for loss, name, size in sorted(entries):
        if freed >= needed_bytes:
            break
        chosen.append((name, loss))
        freed += size
    return chosen if freed >= needed_bytes else None


def _weighted_cold_start(items: dict[str, _Item], holdings: _Holdings, keep: dict[str, float], busy: float) -> float:
    """Mean expected cold-start latency, weighted by each checkpoint's cold-start rate."""
    total = weight = 0.0
    for name, item in items.items():
        rate = _cold_rate_per_s(item, keep[name])
        n_dram, n_ssd = holdings.count(name)
        total += rate * expected_cold_start_s(item, n_dram=n_dram, n_ssd=n_ssd, busy_share=busy)
        weight += rate
    return total / weight if weight > 0 else 0.0


def _keep_alive(
    items: dict[str, _Item], holdings: _Holdings, busy: float, request: PrewarmRequest, running: dict[str, int]
) -> list[KeepAliveAdvice]:
    """Longest keep-alive for the checkpoints that save most startup per idle GPU-second, within the idle
    GPU-seconds a uniform ``default_keep_alive_s`` would spend."""

    def idle_gpus(item: _Item, keep_s: float) -> float:
        # Expected GPUs held idle: each of the n running instances sees 1/n of the requests, and each idle
        # period lasts min(next arrival, keep-alive); a busy model's n instances all wait out their keep-alive.
        n = max(1, running.get(item.checkpoint, 0))
        return item.gpus * n * (1.0 - math.exp(-item.rate_per_s / n * keep_s))

    budget = sum(idle_gpus(i, request.default_keep_alive_s) for i in items.values())
    cold: dict[str, float] = {}
    for name, item in items.items():
        n_dram, n_ssd = holdings.count(name)
        cold[name] = expected_cold_start_s(item, n_dram=n_dram, n_ssd=n_ssd, busy_share=busy)
    order = sorted(items.values(), key=lambda i: (-(i.rate_per_s * cold[i.checkpoint] / i.gpus), i.checkpoint))
    spent = sum(idle_gpus(i, request.min_keep_alive_s) for i in items.values())
    keep: dict[str, float] = {}
    for item in order:
        low = idle_gpus(item, request.min_keep_alive_s)
        high = idle_gpus(item, request.max_keep_alive_s)
        if item.rate_per_s <= 0 or spent - low + high <= budget:
            chosen = request.max_keep_alive_s if item.rate_per_s > 0 else request.min_keep_alive_s
        else:
            # The marginal checkpoint gets the keep-alive that uses up what is left of the budget.
            left = budget - (spent - low)
            share = min(max(left / item.gpus, 0.0), 1.0 - 1e-12)
            chosen = max(request.min_keep_alive_s, -math.log(1.0 - share) / item.rate_per_s) if share > 0 else 0.0
            chosen = min(max(chosen, request.min_keep_alive_s), request.max_keep_alive_s)
        spent += idle_gpus(item, chosen) - low
        keep[item.checkpoint] = chosen
    return [
        KeepAliveAdvice(
            checkpoint=name,
            keep_alive_s=keep[name],
            rate_per_s=item.rate_per_s,
            expected_cold_start_s=cold[name],
        )
        for name, item in sorted(items.items())
    ]
