"""Reading punchgate's logs, for the analysis scripts ``scripts/log_*.py`` (standard library only).

Theory of operation. A log is a sequence of lines in one of punchgate's two formats
(``punchgate/logs.py``), and a file may mix them (``cat`` of several logs):

* JSON: one object per line, ``{"event": ..., "level": ..., "timestamp": ..., <fields>}``;
  py-libp2p's lines carry a ``logger`` field too.
* console: structlog's ``ConsoleRenderer`` without colour (colour codes are stripped if a
  terminal's output was captured)::

      2026-11-29T09:07:42.776493Z [info     ] listening on                   address=/ip4/...
      <timestamp> [<level, padded>] <event, padded to 30> [<logger>] key=value key=value

  A value is printed bare when it is a string with no space, quote or ``=``, else as
  Python's ``repr`` (strings in quotes, lists, numbers, ``True``, ``None``); bare values
  that read as Python literals (numbers, booleans) are taken as such. The event text
  ends where a run of ``key=value`` pairs that reaches the end of the line begins.
  Lines that continue an event (a traceback, a library message with a line break)
  are attached to it as ``detail``.

Every other line (garbage, truncated JSON, another program's output) is counted as
skipped, never fatal. Events are kept whatever their name: the reports use the ones
they know and ignore the rest, and take every field as optional.

A source (file or stdin) is cut into *sections*, one per run of a node: a new section
starts at each ``punchgate starting`` event after the first, so a log appended to
across restarts, or several logs concatenated on stdin, give one section each.

``run_script`` is the command-line behaviour shared by the scripts: read ``logs/*.log``
(or a file, or ``-`` for stdin), analyse each section, print a text report or, with
``--json``, one JSON object, and keep the same report next to the logs.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONSOLE = re.compile(
    r"^(?P<ts>\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)"
    r" \[(?P<level>[a-z]+) *\] (?P<rest>.*)$"
)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*=")
_LOGGER_SUFFIX = re.compile(r"^(?P<event>.*?) *\[(?P<logger>[A-Za-z_][\w.-]*)\]$")
# structlog pads the event to 30 columns, so key=value pairs start at column 31 or later.
_EVENT_WIDTH = 30
_TRACEBACK_START = ("Traceback (most recent call last)", "During handling of the above exception",
                    "The above exception was the direct cause", "Exception Group Traceback",
                    "\u256d", "\u2502", "\u2570", "+-", "| ")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:: .*)?$")
_MAX_LITERAL = 100_000  # longer bare values are kept as text
_SAMPLES = 3  # skipped lines quoted in the report, per section


class UsageError(Exception):
    """Bad arguments: exit status 2."""


class RunError(Exception):
    """Could not run (nothing to read, unreadable file, missing matplotlib): exit status 1."""


@dataclass
class Event:
    name: str
    fields: dict[str, Any]
    time: float | None  # Unix time in seconds, None if the line had no readable timestamp
    level: str | None
    logger: str | None  # py-libp2p's (and other libraries') lines name their logger
    line: int  # 1-based line number in its source

    def get(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key, default)
        return default if value is None else value

    def number(self, key: str) -> float | None:
        """A numeric field as a number (None if missing or not a number)."""
        value = self.fields.get(key)
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return value
        if isinstance(value, str):
            try:
                parsed = float(value)
            except ValueError:
                return None
            return parsed if math.isfinite(parsed) else None
        return None

    def text(self, key: str) -> str | None:
        value = self.fields.get(key)
        return None if value is None else str(value)


@dataclass
class Section:
    """The lines of one run of one node (see the module docstring)."""

    source: str  # the path as read, or "<stdin>"
    run: int = 1  # 1-based, within its source
    runs: int = 1
    events: list[Event] = field(default_factory=list)
    lines: int = 0
    skipped: int = 0  # malformed or foreign lines
    continuation: int = 0  # lines attached to the event before them
    samples: list[str] = field(default_factory=list)  # the first few skipped lines
    json_lines: int = 0
    console_lines: int = 0

    @property
    def label(self) -> str:
        base = "stdin" if self.source == "<stdin>" else Path(self.source).name.removesuffix(".log")
        return base if self.runs == 1 else f"{base}#{self.run}"

    @property
    def peer_id(self) -> str | None:
        started = self.first("punchgate starting")
        if started is not None and started.text("peer_id"):
            return started.text("peer_id")
        stopped = self.first("stopped")
        return stopped.text("peer_id") if stopped is not None else None

    def named(self, *names: str) -> list[Event]:
        return [e for e in self.events if e.name in names]

    def first(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)

    @property
    def start(self) -> float | None:
        return next((e.time for e in self.events if e.time is not None), None)

    @property
    def end(self) -> float | None:
        return next((e.time for e in reversed(self.events) if e.time is not None), None)

    def header(self) -> dict[str, Any]:
        """What every report says about the section it read."""
        return {
            "source": self.source,
            "label": self.label,
            "run": self.run,
            "runs": self.runs,
            "peer_id": self.peer_id,
            "lines": self.lines,
            "events": len(self.events),
            "skipped_lines": self.skipped,
            "skipped_samples": list(self.samples),
            "continuation_lines": self.continuation,
            "format": _format_name(self.json_lines, self.console_lines),
            "first_time": iso(self.start),
            "last_time": iso(self.end),
        }


def _format_name(json_lines: int, console_lines: int) -> str | None:
    if json_lines and console_lines:
        return "mixed"
    if json_lines:
        return "json"
    if console_lines:
        return "console"
    return None


# ---------------------------------------------------------------- parsing lines


def parse_timestamp(text: Any) -> float | None:
    """ISO 8601 (what structlog writes) or Unix seconds, as Unix seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # structlog writes UTC
    return moment.timestamp()


def iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_json_line(line: str, number: int) -> Event | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        return None
    fields = dict(obj)
    name = fields.pop("event")
    level = fields.pop("level", None)
    logger = fields.pop("logger", None)
    timestamp = fields.pop("timestamp", None)
    return Event(
        name=name,
        fields=fields,
        time=parse_timestamp(timestamp),
        level=level if isinstance(level, str) else None,
        logger=logger if isinstance(logger, str) else None,
        line=number,
    )


def parse_console_line(line: str, number: int) -> Event | None:
    match = _CONSOLE.match(_ANSI.sub("", line))
    if match is None:
        return None
    rest = match["rest"]
    head, fields = rest.rstrip(), {}
    for position in _pair_starts(rest):
        pairs = parse_pairs(rest[position:])
        if pairs is not None:
            head, fields = rest[:position].rstrip(), pairs
            break
    logger = None
    named = _LOGGER_SUFFIX.match(head)
    if named is not None:
        head, logger = named["event"].rstrip(), named["logger"]
    if not head:
        return None
    return Event(
        name=head,
        fields=fields,
        time=parse_timestamp(match["ts"]),
        level=match["level"],
        logger=logger,
        line=number,
    )


def _pair_starts(rest: str) -> Iterator[int]:
    """Where a ``key=value`` run may start: after a space, at column 31 or later."""
    position = rest.find(" ", _EVENT_WIDTH - 1)
    while position != -1:
        start = position + 1
        if start < len(rest) and _KEY.match(rest, start):
            yield start
        position = rest.find(" ", start)


def parse_pairs(text: str) -> dict[str, Any] | None:
    """``key=value key=value`` up to the end of ``text``, or None if it is not exactly that."""
    pairs: dict[str, Any] = {}
    position, length = 0, len(text)
    while position < length:
        key = _KEY.match(text, position)
        if key is None:
            return None
        start = key.end()
        end = _value_end(text, start)
        if end is None:
            return None
        pairs[text[key.start():start - 1]] = _value(text[start:end])
        if end < length:
            if text[end] != " ":
                return None
            end += 1
        position = end
    return pairs


_CLOSING = {"(": ")", "[": "]", "{": "}", "<": ">"}
_STRUCTURED = frozenset("'\"([{<")  # a value starting with one of these is a repr to scan
_BARE_BREAKS = frozenset("'\"()[]{}")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")
_CONSTANTS = {"True": True, "False": False, "None": None}


def _value_end(text: str, start: int) -> int | None:
    """The end of the value starting at ``start``: a space outside quotes and brackets."""
    if start < len(text) and text[start] not in _STRUCTURED:
        end = text.find(" ", start)  # a bare value (most of them): no quotes, no brackets
        if end == -1:
            end = len(text)
        return end if not _BARE_BREAKS.intersection(text[start:end]) else _scan_value_end(text, start)
    return _scan_value_end(text, start)


def _scan_value_end(text: str, start: int) -> int | None:
    stack: list[str] = []
    position, length = start, len(text)
    while position < length:
        char = text[position]
        if char in "'\"":
            end = _string_end(text, position)
            if end is None:
                return None
            position = end
            continue
        if char in "([{" or (char == "<" and position == start):
            stack.append(_CLOSING[char])
        elif stack and char == stack[-1]:
            stack.pop()
        elif char in ")]}" and not stack:
            return None
        elif char == " " and not stack:
            return position
        position += 1
    return position if not stack else None


def _string_end(text: str, start: int) -> int | None:
    quote = text[start]
    position = start + 1
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == quote:
            return position + 1
        position += 1
    return None


def _value(raw: str) -> Any:
    """A console value as what was logged: numbers, booleans, None, quoted strings, lists
    and dicts as Python values; anything else (a bare string) as it is."""
    if not raw or len(raw) > _MAX_LITERAL:
        return raw
    if raw in _CONSTANTS:
        return _CONSTANTS[raw]
    number = _NUMBER.fullmatch(raw)
    if number is not None:
        return float(raw) if number.group(1) or number.group(2) else int(raw)
    if raw[0] not in _STRUCTURED:
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _continues(line: str, in_traceback: bool) -> tuple[bool, bool]:
    """Whether a line that is not an event continues the event before it; and whether a
    traceback is (still) being read after it."""
    if line.startswith(_TRACEBACK_START):
        return True, True
    if line[:1] in (" ", "\t"):
        return True, in_traceback
    if in_traceback and _EXCEPTION_LINE.match(line):
        return True, False  # "ValueError: ..." ends a traceback
    return False, False


def read_sections(lines: Iterable[str], source: str) -> list[Section]:
    sections = [Section(source)]
    current = sections[0]
    last_event: Event | None = None  # the console event continuation lines attach to
    in_traceback = False
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            current.lines += 1
            continue
        event = None
        if line.lstrip().startswith("{"):
            event = parse_json_line(line, number)
            kind = "json"
        if event is None:
            event = parse_console_line(line, number)
            kind = "console"
        if event is None:
            continued, in_traceback = _continues(line, in_traceback) if last_event else (False, False)
            current.lines += 1
            if continued and last_event is not None:
                current.continuation += 1
                detail = last_event.fields.get("detail")
                last_event.fields["detail"] = line if not isinstance(detail, str) else f"{detail}\n{line}"
            else:
                current.skipped += 1
                last_event = None
                if len(current.samples) < _SAMPLES:
                    current.samples.append(line[:120])
            continue
        if event.name == "punchgate starting" and any(e.name == "punchgate starting" for e in current.events):
            current = Section(source)
            sections.append(current)
        current.lines += 1
        current.events.append(event)
        if kind == "json":
            current.json_lines += 1
            last_event = None  # JSON lines carry their traceback in one field
        else:
            current.console_lines += 1
            last_event = event
        in_traceback = False
    for index, section in enumerate(sections, 1):
        section.run, section.runs = index, len(sections)
    return sections


def read_file(path: Path) -> list[Section]:
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            return read_sections(handle, str(path))
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_stdin() -> list[Section]:
    import io

    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="")
    return read_sections(stream, "<stdin>")


# ---------------------------------------------------------------- figures


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, interpolating linearly between the
    two nearest ranks (numpy's default method)."""
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """count, min, mean, median, p95, p99, max of some values (None for each if there are none)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "min": None, "mean": None, "median": None, "p95": None, "p99": None, "max": None}
    return {
        "count": len(ordered),
        "min": round(ordered[0], digits),
        "mean": round(sum(ordered) / len(ordered), digits),
        "median": round(percentile(ordered, 50), digits),
        "p95": round(percentile(ordered, 95), digits),
        "p99": round(percentile(ordered, 99), digits),
        "max": round(ordered[-1], digits),
    }


def short_peer(peer_id: Any) -> str:
    text = str(peer_id) if peer_id is not None else "?"
    return text if len(text) <= 16 else ".." + text[-8:]


class PeerNames:
    """Peer IDs shown with the label of the log that belongs to them, when we read it."""

    def __init__(self, sections: Iterable[Section]) -> None:
        self.labels: dict[str, str] = {}
        for section in sections:
            if section.peer_id:
                self.labels.setdefault(section.peer_id, section.label)

    def label(self, peer_id: Any) -> str | None:
        return self.labels.get(str(peer_id))

    def show(self, peer_id: Any) -> str:
        label = self.label(peer_id)
        return f"{label} ({short_peer(peer_id)})" if label else short_peer(peer_id)


def fmt_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    text = f"{int(count):,} B"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{text} ({count / size:.1f} {unit})"
    return text


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def fmt_number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def table(headers: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    """Columns aligned; numbers (and "-") to the right."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_looks_numeric(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]
    out = []
    for index, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append((indent + "  ".join(parts)).rstrip())
        if index == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


def _looks_numeric(cell: str) -> bool:
    return cell == "-" or bool(re.fullmatch(r"[-+]?[\d,]+(\.\d+)?( ?(%|ms|s|B))?", cell))


# ---------------------------------------------------------------- figures several reports use


def _count(counter: dict[str, int], key: Any) -> None:
    key = "-" if key is None else str(key)
    counter[key] = counter.get(key, 0) + 1


def _bytes(event: Event, key: str) -> int:
    value = event.number(key)
    return int(value) if value is not None else 0


def tunnel_figures(section: Section) -> dict[str, Any]:
    """Tunnels per service, on the serving side (``tunnel ...`` events) and on the using
    side (``client tunnel ...``): counts, reasons, bytes each way, durations, and each
    closed tunnel (for plots)."""
    served: dict[str, dict[str, Any]] = {}
    used: dict[str, dict[str, Any]] = {}

    def serving(name: Any) -> dict[str, Any]:
        return served.setdefault(str(name) if name is not None else "-", {
            "accepted": 0, "rejected": 0, "closed": 0, "errors": 0, "interrupted": 0,
            "bytes_to_service": 0, "bytes_from_service": 0,
            "rejections": {}, "error_reasons": {}, "peers": {}, "targets": [], "tunnels": [],
        })

    def using(name: Any) -> dict[str, Any]:
        return used.setdefault(str(name) if name is not None else "-", {
            "opened": 0, "rejected": 0, "errors": 0, "closed": 0, "interrupted": 0,
            "bytes_to_remote": 0, "bytes_from_remote": 0,
            "rejections": {}, "error_reasons": {}, "paths": {}, "peers": {}, "binds": [], "tunnels": [],
            "setup_ms": [],
        })

    for event in section.events:
        service = event.fields.get("service")
        if event.name == "tunnel accepted":
            entry = serving(service)
            entry["accepted"] += 1
            _count(entry["peers"], event.get("peer"))
            target = event.text("target")
            if target and target not in entry["targets"]:
                entry["targets"].append(target)
        elif event.name == "tunnel rejected":
            entry = serving(service)
            entry["rejected"] += 1
            _count(entry["rejections"], event.get("reason"))
        elif event.name == "tunnel closed":
            entry = serving(service)
            entry["closed"] += 1
            sent, received = _bytes(event, "bytes_to_service"), _bytes(event, "bytes_from_service")
            entry["bytes_to_service"] += sent
            entry["bytes_from_service"] += received
            if event.fields.get("error"):
                entry["errors"] += 1
                _count(entry["error_reasons"], event.get("error"))
            if event.fields.get("interrupted") is True:
                entry["interrupted"] += 1
            entry["tunnels"].append({
                "time": iso(event.time), "peer": event.get("peer"), "bytes_to_service": sent,
                "bytes_from_service": received, "duration_s": event.number("duration_s"),
                "error": event.fields.get("error"),
            })
        elif event.name == "client tunnel opened":
            entry = using(service)
            entry["opened"] += 1
            _count(entry["paths"], event.get("path"))
            _count(entry["peers"], event.get("peer"))
            if event.number("setup_ms") is not None:
                entry["setup_ms"].append(event.number("setup_ms"))
            bind = event.text("bind")
            if bind and bind not in entry["binds"]:
                entry["binds"].append(bind)
        elif event.name == "client tunnel rejected":
            entry = using(service)
            entry["rejected"] += 1
            _count(entry["rejections"], event.get("reason"))
        elif event.name == "client tunnel error":
            entry = using(service)
            entry["errors"] += 1
            _count(entry["error_reasons"], event.get("reason"))
        elif event.name == "client tunnel closed":
            entry = using(service)
            entry["closed"] += 1
            sent, received = _bytes(event, "bytes_to_remote"), _bytes(event, "bytes_from_remote")
            entry["bytes_to_remote"] += sent
            entry["bytes_from_remote"] += received
            if event.fields.get("error"):
                entry["errors"] += 1
                _count(entry["error_reasons"], event.get("error"))
            if event.fields.get("interrupted") is True:
                entry["interrupted"] += 1
            entry["tunnels"].append({
                "time": iso(event.time), "peer": event.get("peer"), "path": event.get("path"),
                "bytes_to_remote": sent, "bytes_from_remote": received,
                "duration_s": event.number("duration_s"), "error": event.fields.get("error"),
            })
    for entry in served.values():
        entry["duration_s"] = describe(t["duration_s"] for t in entry["tunnels"] if t["duration_s"] is not None)
    for entry in used.values():
        entry["duration_s"] = describe(t["duration_s"] for t in entry["tunnels"] if t["duration_s"] is not None)
        entry["setup_ms"] = describe(entry["setup_ms"])
    return {"served": served, "used": used}


def ping_figures(section: Section) -> dict[str, dict[str, Any]]:
    """Per peer: pings, failures (with reasons), RTT statistics and each ping (for plots)."""
    peers: dict[str, dict[str, Any]] = {}
    for event in section.named("ping"):
        entry = peers.setdefault(str(event.get("peer", "-")), {"pings": 0, "ok": 0, "failed": 0, "reasons": {},
                                                               "samples": []})
        entry["pings"] += 1
        rtt = event.number("rtt_ms")
        ok = event.fields.get("ok")
        if ok is False or (ok is None and rtt is None):
            entry["failed"] += 1
            _count(entry["reasons"], event.get("reason"))
            entry["samples"].append({"time": event.time, "ok": False, "rtt_ms": None})
        else:
            entry["ok"] += 1
            entry["samples"].append({"time": event.time, "ok": True, "rtt_ms": rtt})
    for entry in peers.values():
        entry["failure_rate"] = round(entry["failed"] / entry["pings"], 4) if entry["pings"] else None
        entry["rtt_ms"] = describe(s["rtt_ms"] for s in entry["samples"] if s["rtt_ms"] is not None)
    return peers


def problems(section: Section, limit: int = 12) -> dict[str, Any]:
    """Errors and warnings: counts per level, and the most frequent (level, event) pairs with
    a first example of their reason."""
    by_level: dict[str, int] = {}
    kinds: dict[tuple[str, str], dict[str, Any]] = {}
    for event in section.events:
        level = (event.level or "").lower()
        if level not in ("warning", "error", "critical", "exception"):
            continue
        _count(by_level, level)
        kind = kinds.setdefault((level, event.name), {
            "level": level, "event": event.name, "count": 0, "logger": event.logger,
            "first_time": iso(event.time), "example": None,
        })
        kind["count"] += 1
        if kind["example"] is None:
            kind["example"] = event.text("reason") or event.text("error") or event.text("exception")
    ordered = sorted(kinds.values(), key=lambda k: (-k["count"], k["first_time"] or ""))
    return {"by_level": by_level, "kinds": ordered[:limit], "kinds_total": len(ordered)}


# ---------------------------------------------------------------- command line


@dataclass
class Script:
    """One analysis script: its name, and how it turns a section into figures and text."""

    name: str  # "summary" -> scripts/log_summary.py, logs/summary.txt
    description: str
    analyse: Callable[[Section, PeerNames], dict[str, Any]]  # JSON-compatible figures
    render: Callable[[dict[str, Any]], list[str]]  # the text for one section's figures
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    # Called after the report is printed (plots): (arguments, report, sections, pyplot or None).
    after: Callable[[argparse.Namespace, dict[str, Any], list[Section], Any], None] | None = None
    # Called with the arguments before anything is read (it may raise UsageError).
    before: Callable[[argparse.Namespace], None] | None = None

    @property
    def prog(self) -> str:
        return f"log_{self.name}.py"


def load_pyplot() -> Any:
    """matplotlib's pyplot with a file-only backend, or a one-line RunError."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise RunError(
            "--plot needs matplotlib, which is not installed here"
            " (pip install matplotlib, or pip install 'punchgate[analysis]')"
        ) from None
    return pyplot


def save_figure(figure: Any, path: str) -> None:
    """Write a PNG atomically: a failed save leaves nothing behind."""
    target = Path(path)
    try:
        handle, temporary = _temporary_next_to(target)
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(handle, "wb") as out:
            figure.savefig(out, format="png", dpi=100)
        os.replace(temporary, target)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _temporary_next_to(path: Path) -> tuple[int, str]:
    """A new file in ``path``'s directory, with the permissions a plain open() would give."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    return handle, temporary


def write_atomically(path: Path, text: str) -> None:
    handle, temporary = _temporary_next_to(path)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def resolve_input(argument: str | None, name: str, suffix: str) -> tuple[list[Path] | None, Path | None, str]:
    """(files to read or None for stdin, where to keep the report or None, what was read)."""
    if argument == "-":
        return None, None, "<stdin>"
    if argument is None:
        directory = Path("logs")
        if not directory.is_dir():
            raise RunError(
                f"no logs/ directory in {Path.cwd()}; give a log file, a directory, or - for stdin"
            )
    else:
        path = Path(argument)
        if not path.exists():
            raise UsageError(f"{argument!r} does not exist (give a log file, a directory, or - for stdin)")
        if not path.is_dir():
            return [path], path.with_name(f"{path.stem}.{name}.{suffix}"), str(path)
        directory = path
    files = sorted(p for p in directory.glob("*.log") if p.is_file())
    if not files:
        raise RunError(f"no *.log files in {directory}/ (run ./scripts/e2e_tunnel_test.sh, or give a file)")
    return files, directory / f"{name}.{suffix}", str(directory)


def build_report(script: Script, sections: list[Section], read: str) -> dict[str, Any]:
    names = PeerNames(sections)
    nodes = []
    for section in sections:
        node = section.header()
        node.update(script.analyse(section, names))
        nodes.append(node)
    return {
        "report": script.name,
        "input": read,
        "files": sorted({s.source for s in sections}),
        "lines": sum(s.lines for s in sections),
        "events": sum(len(s.events) for s in sections),
        "skipped_lines": sum(s.skipped for s in sections),
        "nodes": nodes,
    }


def render_report(script: Script, report: dict[str, Any]) -> str:
    title = f"punchgate {script.name} report: {report['input']}"
    out = [title, "=" * len(title), ""]
    out.append(
        f"{len(report['files'])} file(s), {report['lines']:,} lines, {report['events']:,} events,"
        f" {report['skipped_lines']:,} lines skipped (not punchgate log lines)"
    )
    for node in report["nodes"]:
        out.append("")
        heading = f"{node['label']}: {node['peer_id'] or 'peer ID unknown'}"
        out += [heading, "-" * len(heading)]
        if not node["events"]:
            out.append(f"  no punchgate events ({node['lines']:,} lines, {node['skipped_lines']:,} skipped)")
            out += [f"    skipped: {s!r}" for s in node["skipped_samples"]]
            continue
        span = _span(node)
        out.append(
            f"  {node['source']}, {node['format']} format, {node['lines']:,} lines, {node['events']:,} events,"
            f" {node['skipped_lines']:,} skipped{span}"
        )
        out += [f"    skipped: {s!r}" for s in node["skipped_samples"]]
        out += script.render(node)
    return "\n".join(out).rstrip() + "\n"


def _span(node: dict[str, Any]) -> str:
    first, last = node.get("first_time"), node.get("last_time")
    if not first or not last:
        return ""
    start, end = parse_timestamp(first), parse_timestamp(last)
    if start is None or end is None:
        return ""
    seconds = end - start
    return f"; {first} .. {last} ({fmt_seconds(seconds)})"


def run_script(script: Script, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=script.prog, description=script.description)
    parser.add_argument(
        "path", nargs="?",
        help="a log file, a directory of *.log files, or - for stdin (default: logs/)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    if script.add_arguments is not None:
        script.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if script.before is not None:
            script.before(args)
        plot_to = getattr(args, "plot", None)
        if plot_to is not None and not Path(plot_to).parent.is_dir():
            raise UsageError(f"--plot {plot_to}: directory {Path(plot_to).parent} does not exist")
        pyplot = load_pyplot() if plot_to else None
        files, keep, read = resolve_input(args.path, script.name, "json" if args.json else "txt")
        sections = read_stdin() if files is None else [s for f in files for s in read_file(f)]
        report = build_report(script, sections, read)
        text = json.dumps(report, indent=2) + "\n" if args.json else render_report(script, report)
        sys.stdout.write(text)
        sys.stdout.flush()
        if keep is not None:
            try:
                write_atomically(keep, text)
                print(f"{script.prog}: report kept in {keep}", file=sys.stderr)
            except OSError as exc:
                print(f"{script.prog}: warning: could not keep the report in {keep}: {exc.strerror or exc}",
                      file=sys.stderr)
        if script.after is not None:
            script.after(args, report, sections, pyplot)
    except UsageError as exc:
        print(f"{script.prog}: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"{script.prog}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
