"""Request traces: arrival time, input and output tokens per request (and prefix or session ids), replayed as given."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.planning.specs import PlanningError
from service.planning.workload import FloatArray, IntArray

# Most requests one trace may hold (the CLI's limit; the API bounds its inline traces lower).
MAX_TRACE_REQUESTS = 20_000

# Accepted column names per role, in order of preference (matched case-insensitively, spaces as underscores).
ARRIVAL_COLUMNS = ("arrival_s", "arrival_time", "arrival_time_s", "timestamp", "timestamp_s", "arrival", "time_s")
# Millisecond columns are divided by 1000 (Mooncake traces give `timestamp` in ms under this name too: rename it).
ARRIVAL_MS_COLUMNS = ("arrival_ms", "timestamp_ms", "arrival_time_ms")
INPUT_COLUMNS = (
    "input_tokens",
    "prompt_tokens",
    "isl",
    "input_length",
    "input_len",
    "num_prompt_tokens",
    "context_tokens",
    "request_tokens",
)
OUTPUT_COLUMNS = (
    "output_tokens",
    "completion_tokens",
    "osl",
    "output_length",
    "output_len",
    "num_completion_tokens",
    "generated_tokens",
    "response_tokens",
)
# A prefix id groups requests that start with the same prefix (a system prompt, a few-shot block).
PREFIX_COLUMNS = ("prefix_id", "prefix_group", "system_prompt_id")
# A session id chains the turns of a conversation: each turn's prompt holds the previous turn's prompt and answer.
SESSION_COLUMNS = ("session_id", "conversation_id", "conv_id", "chat_id")
PREFIX_TOKEN_COLUMNS = ("prefix_tokens", "shared_prefix_tokens", "prefix_len", "prefix_length")


@dataclass(frozen=True, slots=True)
class Trace:
    """Requests as they came: arrival offsets, lengths, and what each may reuse of earlier requests' KV cache."""

    arrival_s: FloatArray
    input_tokens: IntArray
    output_tokens: IntArray
    # Prefix group of each request (-1: none); sessions and prefix ids share the numbering.
    prefix_group: IntArray
    # Leading prompt tokens that earlier requests of the group computed (what a warm cache can skip).
    shared_tokens: IntArray
    # Leading context tokens (prompt, and the answer for sessions) later requests of the group reuse.
    cacheable_tokens: IntArray
    # Role -> column name read, for the output ("arrival": "timestamp", ...).
    columns: dict[str, str] = field(default_factory=dict)
    source: str = "inline"

    @property
    def size(self) -> int:
        """Number of requests."""
        return int(self.input_tokens.size)

    @property
    def duration_s(self) -> float:
        """Seconds from the first arrival to the last."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if self.size else 0.0

    @property
    def rate_per_s(self) -> float:
        """Mean request rate of the trace as recorded (1 when every request arrives at once)."""
        return (self.size - 1) / self.duration_s if self.duration_s > 0 else 1.0

    @property
    def has_prefixes(self) -> bool:
        """Whether any request can reuse another's KV cache."""
        return bool(np.any(self.prefix_group >= 0))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: size, span, rate and the columns read."""
        return {
            "source": self.source,
            "requests": self.size,
            "duration_s": self.duration_s,
            "rate_per_s": self.rate_per_s,
            "columns": dict(self.columns),
            "prefix_groups": int(np.unique(self.prefix_group[self.prefix_group >= 0]).size),
        }


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _pick(keys: Mapping[str, str], names: Sequence[str]) -> str | None:
    return next((keys[n] for n in names if n in keys), None)


def trace_from_records(records: Sequence[Mapping[str, Any]], *, source: str = "inline") -> Trace:
    """A trace from parsed rows (CSV rows, JSONL objects or the API's list), sorted by arrival, pairs kept."""
    if not records:
        raise PlanningError(f"trace {source} holds no requests")
    if len(records) > MAX_TRACE_REQUESTS:
        raise PlanningError(f"trace {source} holds {len(records)} requests; the limit is {MAX_TRACE_REQUESTS}")
    if not all(isinstance(row, Mapping) for row in records):
        raise PlanningError(f"trace {source}: each request must be a mapping of column to value")
    # Columns in first-seen order over all rows (JSONL rows may leave an optional id out).
    seen: dict[str, None] = {}
    for row in records:
        seen.update(dict.fromkeys(str(k) for k in row))
    keys: dict[str, str] = {}
    for name in seen:
        keys.setdefault(_key(name), name)
    found = ", ".join(seen) or "none"
    arrival = _pick(keys, ARRIVAL_COLUMNS)
    arrival_ms = None if arrival else _pick(keys, ARRIVAL_MS_COLUMNS)
    wanted = {
        "arrival": (arrival or arrival_ms, ARRIVAL_COLUMNS + ARRIVAL_MS_COLUMNS),
        "input": (_pick(keys, INPUT_COLUMNS), INPUT_COLUMNS),
        "output": (_pick(keys, OUTPUT_COLUMNS), OUTPUT_COLUMNS),
    }
    for role, (column, names) in wanted.items():
        if column is None:
            raise PlanningError(
                f"trace {source} has no {role} column (accepted: {', '.join(names)}); columns found: {found}"
            )
    columns = {role: str(column) for role, (column, _) in wanted.items()}
    prefix = _pick(keys, PREFIX_COLUMNS)
    session = _pick(keys, SESSION_COLUMNS)
    prefix_tokens = _pick(keys, PREFIX_TOKEN_COLUMNS)
    if prefix and session:
        raise PlanningError(f"trace {source} has both a prefix id ({prefix}) and a session id ({session}): keep one")
    group_column = prefix or session
    if group_column:
        columns["session_id" if session else "prefix_id"] = group_column
    if prefix_tokens and group_column:
        columns["prefix_tokens"] = prefix_tokens
    n = len(records)
    arrival_s = np.empty(n, dtype=np.float64)
    inputs = np.empty(n, dtype=np.int64)
    outputs = np.empty(n, dtype=np.int64)
    group_names: list[str | None] = [None] * n
    given_prefix = np.zeros(n, dtype=np.int64)
    scale = 1e-3 if arrival_ms else 1.0
    for i, row in enumerate(records):
        try:
            t = float(row[columns["arrival"]]) * scale
            isl = float(row[columns["input"]])
            osl = float(row[columns["output"]])
            if prefix_tokens and group_column:
                given_prefix[i] = int(float(row.get(prefix_tokens) or 0))
        except (KeyError, TypeError, ValueError):
            raise PlanningError(
                f"trace {source}, request {i + 1}: arrival, input and output must be numbers "
                f"(columns {columns['arrival']}, {columns['input']}, {columns['output']})"
            ) from None
        if not (math.isfinite(t) and t >= 0):
            raise PlanningError(f"trace {source}, request {i + 1}: arrival {t:g} s must be a finite time >= 0")
        if not (isl >= 1 and osl >= 1):
            raise PlanningError(f"trace {source}, request {i + 1}: input and output must be at least 1 token")
        arrival_s[i], inputs[i], outputs[i] = t, int(isl), int(osl)
        if group_column:
            value = row.get(group_column)
            group_names[i] = None if value in (None, "") else str(value)
    # Replay in arrival order; a stable sort keeps each request's lengths together and ties in file order.
    order = np.argsort(arrival_s, kind="stable")
    arrival_s, inputs, outputs = arrival_s[order], inputs[order], outputs[order]
    ordered_names = [group_names[i] for i in order]
    given = given_prefix[order]
    group, shared, cacheable = _prefix_plan(ordered_names, inputs, outputs, given, session=session is not None)
    return Trace(arrival_s - arrival_s[0], inputs, outputs, group, shared, cacheable, columns, source)


def _prefix_plan(
    names: list[str | None], inputs: IntArray, outputs: IntArray, given: IntArray, *, session: bool
) -> tuple[IntArray, IntArray, IntArray]:
    """Group numbers and, per request, the prompt tokens it shares with its group and the tokens it leaves for later."""
    n = inputs.size
    group = np.full(n, -1, dtype=np.int64)
    shared = np.zeros(n, dtype=np.int64)
    cacheable = np.zeros(n, dtype=np.int64)
    numbers: dict[str, int] = {}
    members: dict[int, list[int]] = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        g = numbers.setdefault(name, len(numbers))
        group[i] = g
        members.setdefault(g, []).append(i)
    for indices in members.values():
        if session:
            # A turn's prompt holds the conversation so far: it shares the previous turn's prompt and answer.
            previous_context = 0
            for i in indices:
                shared[i] = min(int(inputs[i]), previous_context)
                cacheable[i] = int(inputs[i] + outputs[i])
                previous_context = int(inputs[i] + outputs[i])
            continue
        # A prefix id: the prefix length given per request, else the shortest prompt of the group (all of it is shared).
        explicit = given[indices]
        length = int(explicit.max()) if np.any(explicit > 0) else int(inputs[indices].min())
        for i in indices:
            own = int(given[i]) if given[i] > 0 else length
            shared[i] = cacheable[i] = min(int(inputs[i]), own)
    return group, shared, cacheable


def read_trace_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file (header row) or JSONL (one object per line; a .json file may hold a list)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanningError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    stripped = text.lstrip()
    if path.suffix in (".jsonl", ".json", ".ndjson") or stripped.startswith(("{", "[")):
        try:
            if stripped.startswith("["):
                loaded = json.loads(text)
                rows = list(loaded) if isinstance(loaded, list) else []
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise PlanningError(f"cannot parse trace {path}: {exc.msg} at line {exc.lineno}") from None
        if not all(isinstance(row, dict) for row in rows):
            raise PlanningError(f"trace {path}: each request must be a JSON object")
        return rows
    # Cells beyond the header land under the key None: not a column.
    return [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(text.splitlines())]


def read_trace(path: Path) -> Trace:
    """A trace from a CSV or JSONL file."""
    return trace_from_records(read_trace_records(path), source=str(path))
