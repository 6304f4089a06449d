# SPDX-License-Identifier: MIT
"""One connection to moed: the handle, its arena blocks and the routing of
completions to the requests that wait for them.

Split from client.py so that the public class reads as the API and this
file as the mechanism.  Everything here is internal.

Lifetime rule (the safe choice of the brief): the arena stays mapped while
any array that points into it lives.  Client.close() marks the session
closed and lets the requests in flight complete; moe_client_disconnect()
runs when the last call in progress has returned, no request is in flight
and the last arena array has been garbage collected, whichever comes last.
"""
from __future__ import annotations

import bisect
import collections
import errno
import itertools
import os
import threading
import time
import weakref
from ctypes import byref, c_void_p

from . import _lib
from .errors import MoedError

# Incremented in a child after fork(): a handle must not be used across
# fork (libmoeclient(3), GUARANTEES), and a child must not free or
# disconnect what belongs to its parent's session.
_fork_gen = [0]
_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _fork_gen[0] += 1
    for s in list(_sessions):
        s.disconnected = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Block:
    """A block of the arena, exposed to numpy as a flat uint8 buffer.

    numpy arrays made from it keep it alive through their .base chain; a
    weakref.finalize on it returns the memory to the arena (moe_client_free)
    once no array uses it."""

    __slots__ = ("__array_interface__", "__weakref__")

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                    "data": (ptr, False), "version": 3}


class Pending:
    """The state of one moed.Request: its pieces in flight and the arrays
    they use (held here so that nothing is freed while moed writes it)."""

    __slots__ = ("remaining", "res", "keep", "where")

    def __init__(self, keep: tuple, where: str) -> None:
        self.remaining = 0
        self.res = 0
        self.keep = keep        # the arrays of the request, until it completes
        self.where = where      # "layer 3, 5 tokens": for error messages


class Session:
    """A moe_client handle and what the Python side keeps about it."""

    def __init__(self, lib: "_lib.Library", handle: int, socket: str) -> None:
        self.lib = lib
        self.h = handle
        self.socket = socket
        self.gen = _fork_gen[0]
        self.pid = os.getpid()
        self.lock = threading.Lock()      # busy, closed, starts/ends, inflight
        self.busy = 0                     # calls in progress
        self.closed = False
        self.disconnected = False
        self.starts: list[int] = []       # live arena blocks, sorted by address
        self.ends: list[int] = []
        self.freeq: collections.deque[int] = collections.deque()
        # Completion routing (libmoeclient(3): moe_client_wait() hands each
        # completion to whichever thread asks first).  One thread at a time,
        # the reaper, sits in moe_client_wait(); it files what it reaps in
        # the Pending of its request and wakes the others.
        self.cv = threading.Condition(threading.Lock())
        self.reaping = False
        self.reaped = 0
        self.inflight: dict[int, Pending] = {}
        self.comp = _lib.Completion()
        self.comp_ref = byref(self.comp)
        self.ids = itertools.count(1)
        _sessions.add(self)

    # ---------------------------------------------------------------- calls

    def enter(self) -> None:
        """Start a call: refuse it on a closed or inherited session."""
        if self.freeq:
            self.drain()
        with self.lock:
            if self.closed or self.disconnected:
                raise self._closed_error()
            self.busy += 1

    def leave(self) -> None:
        with self.lock:
            self.busy -= 1
            if self.closed:
                self._maybe_disconnect_locked()
        if self.freeq:
            self.drain()

    def _closed_error(self) -> MoedError:
        if self.gen != _fork_gen[0]:
            return MoedError(-errno.ECHILD,
                             f"this Client was connected to {self.socket} by process {self.pid} "
                             "before a fork(); a handle cannot cross fork: connect a new "
                             "moed.Client in the child")
        return MoedError(-errno.ESHUTDOWN, f"the Client of {self.socket} is closed; "
                         "connect a new moed.Client")

    def error(self, code: int, what: str) -> MoedError:
        return MoedError(code, f"{what}: {self.lib.strerror(code)}")

    # ---------------------------------------------------------------- arena

    def alloc(self, nbytes: int, what: str) -> Block:
        """@nbytes of the arena as a Block (64-byte aligned)."""
        p = c_void_p()
        rc = self.lib.moe_client_alloc(self.h, nbytes, byref(p))
        if rc < 0:
            if rc == -errno.ENOMEM:
                raise MoedError(rc, f"{what}: the arena has no room for {nbytes} bytes "
                                f"({self.lib.strerror(rc)}); free arena arrays (del them), "
                                "or connect with a larger arena_bytes")
            raise self.error(rc, what)
        ptr = p.value
        blk = Block(ptr, nbytes)
        with self.lock:
            i = bisect.bisect(self.starts, ptr)
            self.starts.insert(i, ptr)
            self.ends.insert(i, ptr + nbytes)
        weakref.finalize(blk, self._finalize_block, ptr)
        return blk

    def in_arena(self, ptr: int, nbytes: int) -> bool:
        """Do [ptr, ptr + nbytes) lie inside one live block?"""
        with self.lock:
            i = bisect.bisect(self.starts, ptr) - 1
            return i >= 0 and ptr + nbytes <= self.ends[i]

    def _finalize_block(self, ptr: int) -> None:
        # Runs from the garbage collector, maybe while this very thread holds
        # self.lock: queue the pointer and free only if the lock is free.
        self.freeq.append(ptr)
        self.drain()

    def drain(self) -> None:
        """Free the queued blocks (if self.lock is free; its holder drains
        otherwise, in leave())."""
        while self.freeq:
            if not self.lock.acquire(blocking=False):
                return
            try:
                while self.freeq:
                    ptr = self.freeq.popleft()
                    i = bisect.bisect(self.starts, ptr) - 1
                    if i >= 0 and self.starts[i] == ptr:
                        del self.starts[i]
                        del self.ends[i]
                    if not self.disconnected:
                        self.lib.moe_client_free(self.h, ptr)
                if self.closed:
                    self._maybe_disconnect_locked()
            finally:
                self.lock.release()

    # ---------------------------------------------------------------- requests

    def submit(self, req: "_lib.Request", pend: Pending) -> None:
        """Queue @req as a piece of @pend; when the ring is full, reap
        completions (or let the reaper do it) and try again."""
        ud = next(self.ids)
        req.user_data = ud
        with self.cv:
            self.inflight[ud] = pend
            pend.remaining += 1
        while True:
            rc = self.lib.moe_client_submit(self.h, byref(req))
            if rc != -errno.EAGAIN:
                break
            self.wait_any(0.001)
        if rc < 0:
            with self.cv:
                del self.inflight[ud]
                pend.remaining -= 1
            raise self.error(rc, f"moe_client_submit ({pend.where})")

    def wait(self, pend: Pending | None, timeout: float | None) -> bool:
        """Wait until @pend has completed (None: until any completion is
        reaped), at most @timeout seconds (None: no limit).  True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cv = self.cv
        with cv:
            seen = self.reaped
            while True:
                if pend is not None and pend.remaining == 0:
                    return True
                if pend is None and self.reaped != seen:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self.reaping:
                    cv.wait(left)
                    continue
                self.reaping = True
                cv.release()
                try:
                    ms = -1 if left is None else max(1, int(left * 1000 + 0.999))
                    rc = self.lib.moe_client_wait(self.h, self.comp_ref, ms)
                    ud, res = self.comp.user_data, self.comp.res
                finally:
                    cv.acquire()
                    self.reaping = False
                    cv.notify_all()
                if rc == 0:
                    p = self.inflight.pop(ud, None)
                    if p is not None:
                        if res < 0 and p.res == 0:
                            p.res = res
                        p.remaining -= 1
                        if p.remaining == 0:
                            p.keep = ()     # the Request holds its results
                    self.reaped += 1
                elif rc != -errno.ETIMEDOUT and rc != -errno.EAGAIN:
                    raise self.error(rc, "moe_client_wait")

    def wait_any(self, timeout: float | None) -> bool:
        return self.wait(None, timeout)

    # ---------------------------------------------------------------- end

    def close(self, wait: bool = True) -> None:
        """Refuse new calls; with @wait, let the requests in flight
        complete first; disconnect once nothing uses the session."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        if wait and not self.disconnected:
            try:
                while self.inflight:
                    self.wait_any(None)
            except MoedError:
                with self.cv:
                    self.inflight.clear()   # moed is gone: nothing will write
        self.drain()
        with self.lock:
            self._maybe_disconnect_locked()

    def _maybe_disconnect_locked(self) -> None:
        if self.disconnected or self.busy or self.starts or self.inflight:
            return
        self.disconnected = True
        self.lib.moe_client_disconnect(self.h)
