"""Logging: structlog for our events, the same renderer for py-libp2p's stdlib logging.

Console format on a terminal, one JSON object per line with ``--log-format json``; both
go to stderr. py-libp2p configures its ``libp2p`` logger on import (no handler, no
propagation), which makes Python's last-resort handler print its warnings raw on
stderr; :func:`configure_logging` takes that logger back into our configuration. At the
default level (info) the library's chatter is kept to errors; ``PUNCHGATE_LOG=debug``
lets all of it through, rendered like our own events.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

# Third-party loggers that speak too much at info level.
# Loggers of other libraries (by first name part; "py" is py.warnings, for warnings.warn()).
LIBRARY_LOGGERS = ("py", "libp2p", "aioquic", "zeroconf", "async_service", "multiaddr", "quic", "trio_websocket")


# Library messages that report what our own events already report, at the right level
# and in one line: a failed dial ("bootstrap dial failed", a session's reason), a peer
# that does not speak a protocol (it is asked another way), a failed hole punch ("hole
# punch"), a requester's broken AutoNAT or relay stream, the end of every hop stream.
# They are shown only with PUNCHGATE_LOG=debug. (logger name or prefix, message start)
REPORTED_BY_US: tuple[tuple[str, str], ...] = (
    ("libp2p.transport.tcp.tcp", "Failed to open TCP stream"),
    ("libp2p.transport.tcp.tcp", "Unexpected error opening TCP stream"),
    ("libp2p.host.basic_host", "Failed to open stream to peer"),
    ("libp2p.relay.circuit_v2.protocol", ""),
    ("libp2p.relay.circuit_v2.dcutr", ""),
    ("libp2p.relay.circuit_v2.transport", ""),
    ("libp2p.host.autonat.autonat", "Error handling AutoNAT stream"),
)


def configure_logging(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream if stream is not None else sys.stderr
    numeric = logging.getLevelName(level.upper())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer()
        shared_tail: list[structlog.typing.Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        shared_tail = []

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *shared_tail, renderer],
    )
    library_level = numeric if numeric <= logging.DEBUG else logging.ERROR
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    # A filter, not logger levels: some library modules set their own logger's level on import.
    handler.addFilter(lambda record: _keep(record, library_level))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)

    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.NOTSET)
    logging.captureWarnings(True)


def _keep(record: logging.LogRecord, library_level: int) -> bool:
    if record.name.split(".", 1)[0] not in LIBRARY_LOGGERS:
        return True
    if library_level > logging.DEBUG and _reported_by_us(record):
        return False
    return record.levelno >= library_level


def _reported_by_us(record: logging.LogRecord) -> bool:
    for name, start in REPORTED_BY_US:
        ours = record.name == name or record.name.startswith(name + ".")
        if ours and (not start or record.getMessage().startswith(start)):
            return True
    return False


def get_logger(name: str = "punchgate") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
