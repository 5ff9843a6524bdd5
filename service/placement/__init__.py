"""Pure placement domain: cluster state, startup-cost estimators, placement, fleet packing and trace replay."""

from service.placement.cluster import (
    Cluster,
    ClusterError,
    ClusterEvent,
    TierKind,
    apply_events,
    parse_cluster,
    parse_events,
)
from service.placement.estimators import EstimatorOptions, LoadEstimate, estimate_load
from service.placement.fleet import FleetDeployment, FleetPlan, pack_fleet
from service.placement.optimizer import Candidate, Exclusion, PlacementDecision, PlacementRequest, place, reserve

__all__ = [
    "Candidate",
    "Cluster",
    "ClusterError",
    "ClusterEvent",
    "EstimatorOptions",
    "Exclusion",
    "FleetDeployment",
    "FleetPlan",
    "LoadEstimate",
    "PlacementDecision",
    "PlacementRequest",
    "TierKind",
    "apply_events",
    "estimate_load",
    "pack_fleet",
    "parse_cluster",
    "parse_events",
    "place",
    "reserve",
]
