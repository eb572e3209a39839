"""punchgate's transports (theory of operation to come with the TCP move)."""

RECEIVE_WINDOW = 16 * 1024 * 1024
