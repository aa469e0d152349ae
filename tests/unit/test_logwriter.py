"""relay.logwriter: log lines queue instead of waiting for a pipe's reader, and reach it whole and in order."""

from __future__ import annotations

import errno
import json
import os
import threading

import gevent
import pytest

from relay import logwriter
from relay.logwriter import PIPE_BUF, LineWriter


@pytest.fixture
def pipe():
    """A pipe whose reader reads only when the test says: (writer's stream, read end)."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    yield stream, read_end
    stream.close()
    os.close(read_end)


def _read_all(fd: int) -> bytes:
    """What the pipe holds now (the read end made non-blocking)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def _lines(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"event": "ws.connect", "n": i, "pad": "x" * 200}) + "\n" for i in range(start, start + n)]


def test_a_write_returns_at_once_while_the_pipe_is_full_and_the_lines_follow_in_order(pipe):
    stream, read_end = pipe
    writer = LineWriter(stream)
    sent = _lines(1000)  # ~230 KB: a pipe holds 64 KB
    for line in sent:
        writer.write(line)  # from the loop's thread: a blocking write would hang the test here
    gevent.sleep(0.2)
    assert writer.waiting or writer._writer is not None  # (the pool's thread waits on the pipe, not us)
    received = b""
    for _ in range(200):  # bounded: the reader comes back and takes everything
        received += _read_all(read_end)
        if received.count(b"\n") == len(sent):
            break
        gevent.sleep(0.02)
    assert received.decode().splitlines(keepends=True) == sent
    assert writer.flush_waiting(5)


def test_past_the_bound_the_oldest_lines_are_dropped_and_the_next_write_says_how_many(pipe, monkeypatch):
    stream, read_end = pipe
    monkeypatch.setattr(logwriter, "MAX_WAITING_BYTES", 20_000)
    writer = LineWriter(stream)
    sent = _lines(600)  # 139 KB: the pipe and the pool thread's write hold ~70, the queue keeps 20
    for start in range(0, len(sent), 30):  # handed over 7 KB at a time, as a loop's passes would
        for line in sent[start : start + 30]:
            writer.write(line)
        gevent.sleep(0.02)
    assert writer.dropped > 0 and writer.waiting * 232 <= 20_000
    dropped = writer.dropped
    received = b""
    for _ in range(200):
        received += _read_all(read_end)
        if received.endswith(sent[-1].encode()):
            break
        gevent.sleep(0.02)
    records = [json.loads(line) for line in received.decode().splitlines()]
    [notice] = [r for r in records if r.get("event") == "log.dropped"]
    assert notice["count"] == dropped and notice["level"] == "error" and "did not keep up" in notice["message"]
    before, after = records[: records.index(notice)], records[records.index(notice) + 1 :]
    assert [r["n"] for r in before] == list(range(len(before)))  # what the pipe took, in order
    assert [r["n"] for r in after] == list(range(len(before) + dropped, len(sent)))  # then the newest, in order


def test_flush_waiting_gives_up_on_a_reader_that_stays_away(pipe):
    stream, read_end = pipe
    writer = LineWriter(stream)
    for line in _lines(1000):
        writer.write(line)
    assert writer.flush_waiting(0.3) is False  # a stopping worker does not wait forever
    threading.Thread(target=_drain, args=(read_end,), daemon=True).start()  # ends when the pipe closes
    assert writer.flush_waiting(10) is True


def _drain(fd: int) -> None:
    os.set_blocking(fd, True)
    while os.read(fd, 1 << 16):
        pass


@pytest.mark.parametrize(
    "sizes",
    [
        [100] * 200,  # many short lines: several to a write
        [5000, 10, 10],  # a line longer than PIPE_BUF: alone in its write
        [4095, 1, 4096, 300],  # exactly at the bound
    ],
)
def test_each_write_holds_whole_records_and_at_most_pipe_buf_bytes_unless_one_record_is_longer(sizes):
    writes: list[bytes] = []
    records = [b"y" * (size - 1) + b"\n" for size in sizes]
    assert logwriter.write_records(99, records, lambda fd, data: writes.append(bytes(data)) or len(data)) == 0
    assert b"".join(writes) == b"".join(records)
    for chunk in writes:
        assert len(chunk) <= PIPE_BUF or chunk in records


def test_a_record_of_several_lines_is_never_cut_between_two_writes():
    """A traceback is one record of many lines: cut at a line's end, another worker's write could land inside it."""
    writes: list[bytes] = []
    traceback = b"Traceback (most recent call last):\n" + b"  File ...\n" * 200  # 2.4 KB
    records = [b"x" * 2000 + b"\n", traceback, b"after\n"]
    logwriter.write_records(99, records, lambda fd, data: writes.append(bytes(data)) or len(data))
    assert writes == [records[0], traceback + b"after\n"]


def test_a_partial_write_is_finished():
    writes: list[bytes] = []

    def take_half(fd, data):
        part = bytes(data[: max(1, len(data) // 2)])
        writes.append(part)
        return len(part)

    logwriter.write_records(99, [b"abcdefgh\n"], take_half)
    assert b"".join(writes) == b"abcdefgh\n" and len(writes) > 1


def test_a_descriptor_made_non_blocking_is_waited_on_not_given_up(pipe):
    """A parent process may share a non-blocking pipe: EAGAIN means wait, not lose the rest."""
    stream, read_end = pipe
    os.set_blocking(stream.fileno(), False)
    records = [line.encode() for line in _lines(1000)]  # 230 KB: the pipe fills several times
    done: list[int] = []
    writer = threading.Thread(target=lambda: done.append(logwriter.write_records(stream.fileno(), records)))
    writer.start()
    received = b""
    for _ in range(500):  # bounded: until the writer is done and everything read
        received += _read_all(read_end)
        if done and received.count(b"\n") == len(records):
            break
        threading.Event().wait(0.01)
    writer.join(5)
    assert done == [0] and received.splitlines(keepends=True) == records


def test_a_reader_that_is_gone_counts_what_was_not_written():
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: EPIPE
    try:
        assert logwriter.write_records(write_end, [line.encode() for line in _lines(50)]) == 50
    finally:
        os.close(write_end)


def test_stderr_and_stdout_on_one_pipe_share_one_writer_and_one_order(pipe, monkeypatch):
    stream, read_end = pipe
    monkeypatch.setattr(logwriter.monkey, "is_module_patched", lambda name: True)
    monkeypatch.setattr(logwriter, "_writers", {})
    other = os.fdopen(os.dup(stream.fileno()), "w")  # as 2>&1 makes fd 2 a copy of fd 1
    try:
        assert logwriter.stream_for(stream) is logwriter.stream_for(other)
        assert isinstance(logwriter.stream_for(stream), LineWriter)
    finally:
        other.close()


def test_a_thread_that_is_not_the_loops_writes_directly(pipe):
    stream, read_end = pipe
    writer = LineWriter(stream)
    other = threading.Thread(target=writer.write, args=("from a pool thread\n",))
    other.start()
    other.join(5)
    assert writer.waiting == 0 and writer._writer is None
    assert _read_all(read_end) == b"from a pool thread\n"


def test_outside_gevent_the_stream_is_used_as_it_is():
    import sys

    assert logwriter.stream_for(sys.stderr) is sys.stderr  # the test process is not patched (the flask commands)


def test_with_nothing_queued_a_line_is_written_at_once_where_that_cannot_wait(pipe, tmp_path):
    """One system call a line, as a plain write: a queue and a thread's round trip per line cost ~8% of a storm."""
    stream, read_end = pipe
    writer = LineWriter(stream)
    writer.write("to a pipe with room\n")  # RWF_NOWAIT: written, or "would wait"
    assert writer._writer is None and writer.waiting == 0
    assert _read_all(read_end) == b"to a pipe with room\n"  # before anything yielded
    with open(tmp_path / "log", "a") as file:
        to_file = LineWriter(file)
        to_file.write("to a file\n")
        assert to_file._writer is None and (tmp_path / "log").read_text() == "to a file\n"


def test_a_kernel_that_cannot_say_would_wait_gets_every_line_through_the_thread(pipe, monkeypatch):
    stream, read_end = pipe

    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(logwriter.os, "pwritev", unsupported)
    writer = LineWriter(stream)
    writer.write("one\n")
    writer.write("two\n")
    assert writer.waiting == 2 and writer._at_once is None
    assert writer.flush_waiting(5)
    assert _read_all(read_end) == b"one\ntwo\n"
