"""The set of live tunnel sessions, so that shutdown can close every one of them.

Sessions start in tasks owned by others (libp2p runs stream handlers in its own
nursery; listeners run connection handlers in ours), so each session registers its
cancel scope here for its lifetime. :meth:`SessionRegistry.close_all` cancels them
(each session then closes its ends cleanly, see ``pipe.close_ends``) and waits for
them to finish, at most ``grace`` seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class RegistryClosed(Exception):
    """The node is shutting down and takes no new sessions."""


class SessionRegistry:
    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()
        self.closing = False

    def __len__(self) -> int:
        return len(self._scopes)

    @contextmanager
    def session(self) -> Iterator[trio.CancelScope]:
        if self.closing:
            raise RegistryClosed("shutting down")
        scope = trio.CancelScope()
        self._scopes.add(scope)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)
            if not self._scopes:
                self._idle.set()

    async def close_all(self, grace: float) -> None:
        self.closing = True
        for scope in list(self._scopes):
            scope.cancel()
        with trio.move_on_after(grace):
            await self._idle.wait()
