"""A private event loop on its own thread: how synchronous code runs Postroom's async core.

Blocking callers (a Django view, a Flask request, a script, many threads at once) hand a
coroutine to the loop with :meth:`Portal.call` and wait for its result; coroutines of other
event loops (an async view, Jupyter) await it with :meth:`Portal.acall`. Either way the
coroutine runs on this one loop, so loop-bound resources (the group committer, an HTTP
connection pool) are only ever used from the loop that created them, and a caller that is
itself inside a running event loop can still call synchronously: its loop is not the one that
does the work.

A child process (``fork``, e.g. gunicorn ``--preload`` or Celery's prefork pool) does not
inherit the thread; the owner must notice the new pid (:attr:`Portal.pid`) and make a new
portal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from postroom.exceptions import PostroomError

T = TypeVar("T")


class Portal:
    def __init__(self, name: str = "postroom-portal") -> None:
        self.pid = os.getpid()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        # Commits run one at a time (the store serialises writers), so one worker thread for
        # asyncio.to_thread is enough and keeps the hand-off warm.
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="postroom-io")
        )
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def on_portal(self) -> bool:
        """True when called from the portal's own thread."""
        return threading.get_ident() == self._thread.ident

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self._thread.is_alive() or self.loop.is_closed():
            coro.close()
            raise PostroomError("this Mailer is closed; create a new one",
                                code="mailer.closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal and block until it is done; its result or exception."""
        if self.on_portal():
            coro.close()
            # Blocking the loop that must run the coroutine would wait forever.
            raise PostroomError("a synchronous call was made from Postroom's own event loop "
                                "thread; use the async method there", code="mailer.reentrant")
        fut = self._submit(coro)
        while True:
            try:
                return fut.result(timeout=5.0)
            except concurrent.futures.TimeoutError:
                if fut.done():  # the coroutine's own TimeoutError (the same class)
                    raise
                # Slow is fine (a busy disk); a portal stopped under us would never answer.
                if not self._thread.is_alive():
                    fut.cancel()
                    raise PostroomError("this Mailer was closed while the call was waiting",
                                        code="mailer.closed") from None

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from any event loop; it runs on the portal."""
        if self.on_portal():
            return await coro
        return await asyncio.wrap_future(self._submit(coro))

    def stop(self) -> None:
        """Stop the loop and wait for its thread (call from outside the portal)."""
        if self._thread.is_alive() and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
