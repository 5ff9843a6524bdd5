"""Launch bundles refuse plans they cannot read (one line naming what is wrong) and size multi-node instances."""

from __future__ import annotations

from typing import Any

import pytest

from service.launch import LaunchError
from service.launch.plan import nodes_for, read_plan
from service.planning.catalog import Catalog
from tests.test_launch import dense, spec_for, strategy

SPEC = spec_for("llama-3.1-70b")


def _refusal(spec: Any, result: Any, catalog: Catalog, rank: int = 1) -> str:
    with pytest.raises(LaunchError) as refused:
        read_plan(spec, result, rank, catalog)
    return str(refused.value)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({**dense(4), "tp": 0}, "the strategy's collocated tp must be a positive integer, got 0"),
        ({**dense(4), "tp": 2.5}, "the strategy's collocated tp must be a positive integer, got 2.5"),
        ({**dense(4), "pp": True}, "the strategy's collocated pp must be a positive integer, got True"),
        ({**dense(4), "replicas": "2"}, "the strategy's replicas must be a positive integer, got '2'"),
    ],
)
def test_a_layout_with_a_bad_degree_is_refused(catalog: Catalog, layout: dict[str, Any], message: str) -> None:
    assert _refusal(SPEC, {"strategies": [strategy(layout)]}, catalog) == message


def test_a_plan_without_mode_layout_gpu_or_model_is_refused(catalog: Catalog) -> None:
    good = strategy(dense(4))
    assert _refusal(SPEC, {"strategies": [{**good, "mode": "mixed"}]}, catalog) == (
        "strategy 1 has no mode (collocated or disaggregated) and layout"
    )
    disaggregated = {**good, "mode": "disaggregated", "layout": {"prefill": dense(2)}}
    assert _refusal(SPEC, {"strategies": [disaggregated]}, catalog) == (
        "the strategy's decode layout is missing or not a mapping"
    )
    assert _refusal({**SPEC, "gpu": None}, {"strategies": [good]}, catalog) == "the plan spec names no gpu"
    assert _refusal({**SPEC, "gpu": "tpu"}, {"strategies": [good]}, catalog).startswith("unknown GPU 'tpu'")
    no_model = {k: v for k, v in SPEC.items() if k != "model"}
    assert _refusal(no_model, {"strategies": [good]}, catalog) == "the plan spec names neither model nor model_config"
    assert _refusal(SPEC, {"strategies": ["first"]}, catalog) == "strategy 1 of the plan is not a mapping"
    assert _refusal(SPEC, ["not", "a", "mapping"], catalog) == (
        "launch needs the plan spec and the plan result as mappings"
    )


def test_a_strategy_is_found_by_its_rank_field_first(catalog: Catalog) -> None:
    second, first = {**strategy(dense(8)), "rank": 2}, {**strategy(dense(4)), "rank": 1}
    assert read_plan(SPEC, {"strategies": [second, first]}, 1, catalog).pools[0].layout.tp == 4
    assert read_plan(SPEC, {"strategies": [second, first]}, 2, catalog).pools[0].layout.tp == 8


@pytest.mark.parametrize(
    ("gpus", "per_node", "nodes"),
    [(8, 8, 1), (16, 8, 2), (12, 8, 2), (24, 16, 2), (20, 8, 4), (7, 4, 7)],
)
def test_an_instance_spans_the_fewest_nodes_that_split_it_evenly(gpus: int, per_node: int, nodes: int) -> None:
    # 20 GPUs at 8 per node: 3 nodes do not split 20 evenly, 4 nodes of 5 do; 7 GPUs only split 7 ways.
    assert nodes_for(gpus, per_node) == nodes


@pytest.mark.parametrize(("isl", "longest"), [(2048, 2048), ("uniform:100:3000", 3000), ("uniform:9:1", 0), (None, 0)])
def test_the_longest_prompt_comes_from_the_workload(catalog: Catalog, isl: Any, longest: int) -> None:
    # An unreadable length (uniform 9..1) or none leaves it unknown (0).
    spec = {**SPEC, "workload": {"isl": isl, "osl": 64}}
    assert read_plan(spec, {"strategies": [strategy(dense(4))]}, 1, catalog).max_input_tokens == longest
