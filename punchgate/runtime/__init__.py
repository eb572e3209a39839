"""The trio runtime: the only part of punchgate that knows trio and libp2p exist."""
