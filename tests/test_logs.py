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


def test_library_errors_pass_but_refused_dht_queries_to_client_peers_do_not(captured):
    library = logging.getLogger("libp2p.host.basic_host")
    library.error(KAD_REFUSED)  # a DHT query to a client-mode peer: normal, not an error
    library.error("Failed to open stream to peer 12D3KooWExample: connection refused")
    library.info("chatter below the library threshold")
    get_logger("punchgate.test").info("our event")
    assert events(captured) == ["Failed to open stream to peer 12D3KooWExample: connection refused", "our event"]


def test_debug_level_shows_everything(captured):
    configure_logging("json", "debug", stream=captured)
    logging.getLogger("libp2p.host.basic_host").error(KAD_REFUSED)
    assert events(captured) == [KAD_REFUSED]
