"""punchgate: a peer-to-peer, NAT-traversing TCP tunnel mesh on libp2p."""

__version__ = "0.1.0"
