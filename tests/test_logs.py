"""What reaches the log: our events always, the library's only when they mean something."""

from __future__ import annotations

import io
import json
import logging

import pytest

from punchgate.logs import configure_logging, get_logger

KAD_REFUSED = (
    "Failed to open stream to peer 12D3KooWExample:\n  Error: protocols not supported: "
    "tried ['/ipfs/kad/1.0.0'], timeout=10s. Last error: protocol not supported: /ipfs/kad/1.0.0"
)


@pytest.fixture
def captured():
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    yield out
    configure_logging("console", "warning")  # as tests/conftest.py leaves it


def events(out: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in out.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        ("libp2p.host.basic_host", KAD_REFUSED),  # a DHT query to a client-mode peer: normal
        ("libp2p.host.basic_host", "Failed to open stream to peer 12D3KooWExample: connection refused"),
        ("libp2p.transport.tcp.tcp", "Failed to open TCP stream: all attempts to connect to 100.64.0.10:4001 failed"),
        ("libp2p.relay.circuit_v2.dcutr", "Error in DCUtR protocol with peer 12D3KooWExample: reset"),
        ("libp2p.relay.circuit_v2.protocol", "Error reading from hop stream from 12D3KooWExample: "),
    ],
)
def test_library_messages_we_report_ourselves_are_debug_only(captured, logger, message):
    logging.getLogger(logger).error(message)
    get_logger("punchgate.test").info("our event")
    assert events(captured) == ["our event"]


def test_other_library_errors_pass_and_chatter_does_not(captured):
    library = logging.getLogger("libp2p.network.swarm")
    library.error("something the library alone knows went wrong")
    library.info("chatter below the library threshold")
    get_logger("punchgate.test").info("our event")
    assert events(captured) == ["something the library alone knows went wrong", "our event"]


def test_debug_level_shows_everything(captured):
    configure_logging("json", "debug", stream=captured)
    logging.getLogger("libp2p.host.basic_host").error(KAD_REFUSED)
    assert events(captured) == [KAD_REFUSED]
