"""The memory of peers kept next to the identity: format, bounds, bad files set aside."""

from __future__ import annotations

import os
import stat

from hypothesis import given, settings
from hypothesis import strategies as st

from punchgate import memory
from punchgate.memory import MAX_ADDRS, MAX_PEERS, Memory, UnusableMemory

ME = "12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"
OTHER = "12D3KooWQnehJeoXypseeeDkDJAxk83w2qqr3W3xXMnnbBKRoHAw"


def test_round_trip_through_the_file_owner_only(tmp_path):
    path = memory.path_for(tmp_path / "id.key")
    assert path.name == "id.key.peers"
    kept = Memory(ME).remember(OTHER, ("/ip4/198.51.100.7/tcp/4001",), "ssh", False, 1000.0)
    kept = kept.remember("boot", ("/ip4/198.51.100.9/tcp/4001",), None, True, 1001.0)
    memory.save(path, kept)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded, warning = memory.load(path, ME)
    assert warning is None and loaded == kept
    assert loaded.peers[OTHER].services == ("ssh",) and loaded.peers["boot"].bootstrap


def test_no_file_is_an_empty_memory(tmp_path):
    assert memory.load(tmp_path / "none.peers", ME) == (Memory(ME), None)


def test_a_corrupt_or_foreign_file_is_set_aside_with_a_warning(tmp_path):
    for content in ("{not json", memory.Memory(OTHER).to_json(), '{"format": "something else"}', "\udcff"):
        path = tmp_path / "id.key.peers"
        path.write_text(content, errors="surrogateescape")
        loaded, warning = memory.load(path, ME)
        assert loaded == Memory(ME) and warning is not None and "set aside" in warning, (content, warning)
        assert not path.exists()
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("id.key.peers.corrupt-")]
        assert aside, "the bad file must be kept, renamed"
        for p in aside:
            p.unlink()


def test_the_memory_is_bounded_and_keeps_the_most_recently_useful():
    kept = Memory(ME)
    for i in range(MAX_PEERS + 20):
        kept = kept.remember(f"peer{i}", tuple(f"/ip4/10.0.0.{a}/tcp/1" for a in range(20)), "svc", False, float(i))
    assert len(kept.peers) == MAX_PEERS
    assert "peer0" not in kept.peers and f"peer{MAX_PEERS + 19}" in kept.peers
    assert all(len(r.addrs) <= MAX_ADDRS for r in kept.peers.values())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
).map(lambda value: __import__("json").dumps({"format": memory.FORMAT, "owner": ME, "peers": value}))))
def test_any_file_content_gives_a_memory_or_a_clear_refusal(text):
    try:
        parsed = memory.parse(text, ME)
    except UnusableMemory as exc:
        assert str(exc)
    else:
        assert ME not in parsed.peers and len(parsed.peers) <= 2 * MAX_PEERS


def test_addresses_are_kept_once_without_the_peers_own_p2p_part():
    kept = Memory(ME).remember(OTHER, ("/ip4/198.51.100.7/tcp/4001", f"/ip4/198.51.100.7/tcp/4001/p2p/{OTHER}"), "ssh", False, 1.0)
    assert kept.peers[OTHER].addrs == ("/ip4/198.51.100.7/tcp/4001",)
