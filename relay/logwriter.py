"""Log lines to stderr (or stdout) that never make the event loop wait for the reader.

A write to a pipe waits while the pipe is full, and it is full whenever the
process reading the logs does not keep up: journald under load, a container
runtime's log driver, a terminal scrolled back, ``gunicorn ... | less``. In
a gevent worker that wait is the whole worker's: every socket, ``/health``
and the broadcast endpoint stopped with it, and the master killed the worker
when its heartbeat stopped too. Lines are logged from event-loop callbacks
(a SUBSCRIBE, a close), where nothing may wait at all.

:class:`LineWriter` is the stream our JSON handler (and, in a worker,
gunicorn's handlers and gevent's report of a greenlet's uncaught exception)
writes to. ``write`` writes a line at once only where that cannot wait
(see :class:`LineWriter`), else queues it; one greenlet writes what is
queued, in order, through a thread of gevent's pool, which is the only one
that waits on a stalled reader. What a burst queues goes out whole records
at a time, up to a pipe's atomic size (``PIPE_BUF``, 4,096 bytes) a write,
so that no record shorter than that is split by another worker's writing to
the same pipe. Past ``MAX_WAITING_BYTES`` waiting, the oldest
lines are dropped, and the next batch written starts with a ``log.dropped``
line that says how many. Lines still queued when a worker exits are written
by :func:`flush_all` (``worker_exit``), which waits at most a few seconds
for a stalled reader. Anything else that writes to ``sys.stderr`` itself
(Python's warnings, a library's logger with no handler) still writes
directly: rare lines, not one per connect.

Outside a gevent-patched process (the ``flask`` commands, unit tests) there
is no loop to protect: :func:`stream_for` hands back the stream itself.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

import gevent
from gevent import get_hub, monkey

PIPE_BUF = select.PIPE_BUF  # what one write to a pipe keeps whole (Linux: 4,096 bytes)
MAX_WAITING_BYTES = 4 << 20  # ~15,000 lines of ~280 bytes: a connect storm's worth
_thread_ident = monkey.get_original("_thread", "get_ident")  # the OS thread's, not the greenlet's
_NOWAIT = "nowait" if hasattr(os, "RWF_NOWAIT") else None  # pwritev2's flag (Linux; pipes since 5.x)

_writers: dict[tuple[int, int], LineWriter] = {}  # by (device, inode) of the file


def stream_for(stream: TextIO) -> TextIO:
    """``stream`` itself outside a gevent-patched process, else this process's :class:`LineWriter` for the
    file it writes to: one per file, so that stderr and stdout sent to one pipe (``2>&1``, journald) keep
    one order."""
    if not monkey.is_module_patched("socket"):
        return stream
    try:
        fd = stream.fileno()
        status = os.fstat(fd)
    except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO): nothing to wait on
        return stream
    file = (status.st_dev, status.st_ino)
    writer = _writers.get(file)
    if writer is None or writer.pid != os.getpid():
        writer = _writers[file] = LineWriter(stream)
    return writer  # type: ignore[return-value]  # file-like: write, flush, fileno


def flush_all(timeout: float = 3.0) -> bool:
    """Write what every writer of this process still holds (a worker's last lines); True if all went out.

    Waits at most ``timeout`` in all: a reader that stays away must not keep a
    stopping worker from exiting."""
    deadline = time.monotonic() + timeout
    return all([writer.flush_waiting(max(0.0, deadline - time.monotonic())) for writer in list(_writers.values())])


class LineWriter:
    """A text stream whose ``write`` never waits; what it cannot write at once is written in order by one
    greenlet, through a pool thread.

    When nothing is queued, a line is written at once if that cannot wait: to
    a regular file (no reader to wait for), or to a pipe or socket with
    ``RWF_NOWAIT``, which answers "would wait" instead of waiting. That is
    one system call a line, as a plain write; a queue and a thread's round
    trip for every line cost ~8% of a connect storm (the shared harness,
    10,000 clients). Otherwise, and on a kernel that cannot say "would
    wait" for this file, the line is queued.

    Called from any greenlet or event-loop callback of the worker's loop. A
    thread that is not the loop's (one of gevent's pool) writes directly: it
    may wait, and it has no greenlet to hand the text to.
    """

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.pid = os.getpid()
        self._fd = stream.fileno()
        self._loop_thread = _thread_ident()
        # How a line may be written at once: "file", "nowait" (a pipe or socket), or None (always queued).
        self._at_once: str | None = "file" if stat.S_ISREG(os.fstat(self._fd).st_mode) else _NOWAIT
        self._waiting: deque[bytes] = deque()
        self._waiting_bytes = 0
        self._writer: gevent.Greenlet | None = None
        self.dropped = 0  # lines dropped since the last log.dropped line
        self.dropped_total = 0

    # -- the stream's interface -----------------------------------------------------------------

    def write(self, text: str) -> int:
        if _thread_ident() != self._loop_thread:
            self.stream.write(text)
            self.stream.flush()
            return len(text)
        data = text.encode("utf-8", "backslashreplace")
        if self._at_once is not None and self._writer is None and not self._waiting:  # nothing to keep order with
            data = self._write_at_once(data)
            if not data:
                return len(text)
        self._waiting.append(data)
        self._waiting_bytes += len(data)
        while self._waiting_bytes > MAX_WAITING_BYTES and len(self._waiting) > 1:
            self._waiting_bytes -= len(self._waiting.popleft())
            self.dropped += 1
            self.dropped_total += 1
        if self._writer is None:
            self._writer = gevent.spawn(self._write_waiting)
        return len(text)

    def _write_at_once(self, data: bytes) -> bytes:
        """Write what can be written of ``data`` without waiting; what is left (b"" if nothing)."""
        try:
            if self._at_once == "file":
                written = os.write(self._fd, data)
            else:
                written = os.pwritev(self._fd, [data], -1, os.RWF_NOWAIT)
        except BlockingIOError:  # the reader is behind: the queue and its thread take it from here
            return data
        except OSError as problem:
            if self._at_once == "nowait" and problem.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._at_once = None  # this kernel cannot say "would wait" for this file: always queued
                return data
            self.dropped += 1  # the reader is gone, or the descriptor closed: nowhere to write it
            self.dropped_total += 1
            return b""
        return data[written:]

    def flush(self) -> None:
        """Nothing: logging's handlers call this after every line, and the line is on its way."""

    def fileno(self) -> int:
        return self._fd

    @property
    def waiting(self) -> int:
        """Lines queued and not handed to the pool's thread yet."""
        return len(self._waiting)

    # -- writing ----------------------------------------------------------------------------------

    def flush_waiting(self, timeout: float) -> bool:
        """Wait, at most ``timeout``, until everything queued so far is written (True) or not (False)."""
        deadline = time.monotonic() + timeout
        while (self._waiting or self._writer is not None) and time.monotonic() < deadline:
            if self._writer is None:
                self._writer = gevent.spawn(self._write_waiting)
            self._writer.join(max(0.0, deadline - time.monotonic()))
        return not self._waiting and self._writer is None

    def _write_waiting(self) -> None:
        """The writer greenlet: hand what is queued to a pool thread, a batch at a time, until none is left.

        The batch is packed into writes in the thread: after a stall it can be megabytes, and the
        loop gets the interpreter back from a thread every few milliseconds. Nothing escapes from
        here (gevent would print it to stderr, through this writer): a batch that could not be
        written is counted as dropped."""
        try:
            while self._waiting:
                records = self._take()
                try:
                    lost = get_hub().threadpool.apply(write_records, (self._fd, records))
                except Exception:  # the pool is gone (the process is ending): nowhere to write from
                    lost = len(records)
                self.dropped += lost
                self.dropped_total += lost
        finally:
            self._writer = None  # nothing switches between the last check and here: no line is left behind

    def _take(self) -> list[bytes]:
        """Everything queued, after a ``log.dropped`` line if lines were dropped before it."""
        records = list(self._waiting)
        self._waiting.clear()
        self._waiting_bytes = 0
        if self.dropped:
            from .eventlog import line  # (eventlog writes through this module)

            message = f"{self.dropped} log lines dropped: the process reading this log did not keep up"
            records.insert(0, (line("log.dropped", "error", count=self.dropped, message=message) + "\n").encode())
            self.dropped = 0
        return records


def write_records(fd: int, records: list[bytes], write: Callable[[int, memoryview], int] = os.write) -> int:
    """In a pool thread: ``records`` (each what one ``write`` call queued: a line, or a traceback's lines)
    in order, packed whole into writes of at most PIPE_BUF bytes, which a pipe never interleaves with
    another process's; a record longer than that goes alone. A descriptor someone made non-blocking is
    waited on here. Returns how many records were lost: all that were not written once the reader is
    gone (EPIPE) or the descriptor closed."""
    pending: list[bytes] = []
    size = 0
    sent = 0  # records written whole so far
    try:
        for index, data in enumerate(records):
            if pending and size + len(data) > PIPE_BUF:
                _write_all(fd, b"".join(pending), write)
                sent = index
                pending, size = [], 0
            pending.append(data)
            size += len(data)
        if pending:
            _write_all(fd, b"".join(pending), write)
        return 0
    except OSError:
        return len(records) - sent


def _write_all(fd: int, data: bytes, write: Callable[[int, memoryview], int]) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[write(fd, view) :]  # a write may take only some of it (a signal): the rest follows
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
