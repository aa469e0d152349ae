"""Long loops on the event loop give way by time, not by count.

A fan-out to 10,000 connections, or the outbox writing them, is milliseconds
of CPU that must not keep ``/health``, a POST or a handshake waiting. Yielding
every N items (what this replaced) looks fair but costs a full turn of the
run queue per yield: during a connect storm, with a hundred handshakes ready
to run at about a millisecond each, a 5,000-recipient broadcast yielding every
500 took ten turns, and its frames reached the last clients 650 ms after its
POST. Yielding once a slice of time is used up bounds what others wait for
(one slice) and what the loop itself waits for (a turn per slice, not per
batch).
"""

from __future__ import annotations

from time import perf_counter

import gevent

SLICE_S = 0.005  # what a waiting request may be delayed by per turn; a turn costs the loop at least this much
CHECK_EVERY = 64  # items between looks at the clock (a clock read, even a call, per item costs more than a push)
PAUSE_S = 1e-6  # past by the time the loop looks: it polls without waiting, then resumes us


def pause() -> None:
    """Let the event loop make one pass (poll the sockets, run the timers and ready greenlets), then go on.

    Any positive delay does it: gevent resumes a sleeper only after the next
    pass. ``gevent.sleep(0)`` only lets other ready greenlets run, and gevent
    looks at the sockets again only every 50 such yields (see its
    documentation of ``sleep``): 50 slices of 5 ms would keep a socket waiting
    250 ms.
    """
    gevent.sleep(PAUSE_S)


class TimeSlice:
    """Past ``seconds`` since the start (or the last pause), ``check()`` pauses for one pass.

    A loop calls it every CHECK_EVERY items, not per item: on a fan-out a
    method call per recipient would cost more than the clock it saves::

        slice_ = TimeSlice()
        for count, conn in enumerate(conns, 1):
            ...
            if count % CHECK_EVERY == 0:
                slice_.check()

    ``at_most`` makes the slice elastic: after a pause, the next slice lasts
    as long as the pause did (at least ``seconds``, at most ``at_most``). On a
    quiet loop the pauses are short and so are the slices; when others keep
    the loop busy (a connect storm), the loop and this loop take turns of
    about the same length instead of this one getting ``seconds`` in every
    turn of theirs (the "other" here, say, is a hundred handshakes at a
    millisecond each).
    """

    __slots__ = ("seconds", "at_most", "_until")

    def __init__(self, seconds: float | None = None, *, at_most: float | None = None):
        self.seconds = SLICE_S if seconds is None else seconds
        self.at_most = self.seconds if at_most is None else max(at_most, self.seconds)
        self._until = perf_counter() + self.seconds

    def check(self) -> None:
        now = perf_counter()
        if now >= self._until:
            pause()
            resumed = perf_counter()
            self._until = resumed + min(max(resumed - now, self.seconds), self.at_most)
