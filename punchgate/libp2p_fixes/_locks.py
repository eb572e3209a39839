"""A lock for the inner layers of the write path that does not yield when free.

Every ``async with trio.Lock()`` is a checkpoint (a scheduler pass, ~8 us on
the machines we measured), even when nobody else holds the lock; a stream
write used to pass five of them. ``InnerLock`` skips that pass when the lock
is free. Use it only where the same code path also goes through a lock or an
I/O call that does yield (the connection's write lock, the socket send), so
other tasks still get their turn once per write.
"""

from __future__ import annotations

from types import TracebackType

import trio


class InnerLock:
    """``trio.Lock`` semantics; acquiring it uncontended is not a checkpoint."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
