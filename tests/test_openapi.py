"""openapi/openapi.json is the app's document, and operation ids stay stable."""

from __future__ import annotations

import json

from service.cli_service import OPENAPI_PATH, openapi_document

OPERATION_IDS = {
    "createPlan",
    "listPlans",
    "getPlan",
    "cancelPlan",
    "createEstimate",
    "listModels",
    "listGpus",
    "listEngines",
    "livez",
    "readyz",
    "metrics",
    "putCluster",
    "getCluster",
    "postClusterEvents",
    "createPlacement",
}


def test_committed_document_matches_the_app() -> None:
    assert OPENAPI_PATH.read_text(encoding="utf-8") == openapi_document(), "run `splan openapi` and commit"


def test_operation_ids_are_stable() -> None:
    document = json.loads(openapi_document())
    found = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert found >= OPERATION_IDS
    assert len(found) == sum(len(path) for path in document["paths"].values())
