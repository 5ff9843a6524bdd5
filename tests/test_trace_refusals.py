"""Trace files and inline traces that cannot be replayed are refused with one line naming the request or file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.planning.specs import PlanningError
from service.planning.trace import MAX_TRACE_REQUESTS, read_trace, read_trace_records, trace_from_records


def _refusal(call: Any, *args: Any) -> str:
    with pytest.raises(PlanningError) as refused:
        call(*args)
    return str(refused.value)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "trace inline holds no requests"),
        (["0,10,5"], "trace inline: each request must be a mapping of column to value"),
        (
            [{"arrival_s": 0, "input_tokens": 10, "output_tokens": 5, "prefix_id": "a", "session_id": "s"}],
            "trace inline has both a prefix id (prefix_id) and a session id (session_id): keep one",
        ),
        (
            [
                {"arrival_s": 0, "input_tokens": 10, "output_tokens": 5},
                {"arrival_s": -1, "input_tokens": 10, "output_tokens": 5},
            ],
            "trace inline, request 2: arrival -1 s must be a finite time >= 0",
        ),
        (
            [{"arrival_s": "inf", "input_tokens": 10, "output_tokens": 5}],
            "trace inline, request 1: arrival inf s must be a finite time >= 0",
        ),
        (
            [{"arrival_s": 0, "input_tokens": 10, "output_tokens": 0}],
            "trace inline, request 1: input and output must be at least 1 token",
        ),
    ],
)
def test_a_trace_that_cannot_be_replayed_is_refused(records: list[Any], message: str) -> None:
    assert _refusal(trace_from_records, records) == message


def test_a_trace_over_the_limit_is_refused() -> None:
    records = [{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}] * (MAX_TRACE_REQUESTS + 1)
    message = f"trace inline holds {MAX_TRACE_REQUESTS + 1} requests; the limit is {MAX_TRACE_REQUESTS}"
    assert _refusal(trace_from_records, records) == message


def test_a_json_list_file_is_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    rows = [
        {"arrival_s": 1.0, "input_tokens": 30, "output_tokens": 3},
        {"arrival_s": 0, "input_tokens": 10, "output_tokens": 2},
    ]
    path.write_text(json.dumps(rows))
    assert read_trace_records(path) == rows
    trace = read_trace(path)
    # Replayed in arrival order, each request's lengths kept together.
    assert trace.arrival_s.tolist() == [0.0, 1.0]
    assert trace.input_tokens.tolist() == [10, 30]
    assert trace.output_tokens.tolist() == [2, 3]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("trace.jsonl", '{"arrival_s": 0}\n{"arrival_s": ', "cannot parse trace {path}: Expecting value at line 1"),
        ("trace.jsonl", '{"arrival_s": 0}\n[1, 2]\n', "trace {path}: each request must be a JSON object"),
        ("trace.json", "[1, 2]", "trace {path}: each request must be a JSON object"),
    ],
)
def test_a_trace_file_that_cannot_be_read_is_one_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert _refusal(read_trace_records, path) == message.format(path=path)
    missing = tmp_path / "none.csv"
    assert _refusal(read_trace_records, missing) == f"cannot read trace {missing}: No such file or directory"
