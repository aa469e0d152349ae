"""Instructions per resume (callgrind): what the core spends on one client coming back after a deploy.

A reload's clients each resume: token, identity, session, the missed
broadcasts filtered for them and queued, CONNECTED. This runs that path in
process, without a web server (no handshake: ``bench/connect_instructions.py``
measures the connect through the whole stack): a started
:class:`relay.service.Realtime` over a fresh SQLite history and the bench
users, ``--missed`` broadcasts to one channel as in ``make bench-storm``, then
``--clients`` resumes over socketpairs, each reading its replay. It runs
under callgrind twice, with no resume and with ``--clients``, and prints the
difference per resume: a count that repeats, where the reload storm's wall
time here moves by ±25% from one run to the next.

    python bench/resume_instructions.py --clients 200 --missed 320    # ~2 min; needs valgrind

Measured 2026-12-03 (200 resumes of 320 missed broadcasts each): 2.97 M
instructions per resume, 1.63 M once each audience is decided once per
resume (interned filters) and the replay is queued as one write.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHANNEL = "system:announcements"


def resumes(workdir: Path, clients: int, missed: int) -> None:
    """The measured program: set up, then ``clients`` resumes (0: set-up only)."""
    import gevent

    from bench import run as bench
    from relay.broadcast import BroadcastRequest
    from relay.config import Settings
    from relay.envelope import Filter
    from relay.history import Session
    from relay.recovery import ResumeRequest
    from relay.service import Realtime

    env = bench.server_env(3001, workdir)  # the port is only read, never bound
    settings = Settings.from_env({**env, "LOG_LEVEL": "INFO"})
    rt = Realtime(settings)
    rt.start()
    assert rt.history is not None and rt.tokens is not None
    client_ids = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(clients)]
    sessions = [Session(client_id, f"bench-user-{n + 1}", (CHANNEL,)) for n, client_id in enumerate(client_ids)]
    rt.history.save_sessions(sessions, int(time.time() * 1000) + 600_000)
    start = rt.sequencer.position
    audience = Filter(channels=frozenset({CHANNEL}))
    for seq in range(missed):
        request = BroadcastRequest("ANNOUNCEMENT", {"message": "bench", "seq": seq, "pad": ""}, audience)
        rt.broadcast(request, source="bench", scope="bench")
    gevent.sleep(0.1)
    tokens = [rt.tokens.mint(session.user_id) for session in sessions]
    epoch = rt.sequencer.epoch
    assert epoch is not None
    replayed = 0
    last = f'"seq":{missed - 1},'.encode()
    for session, token in zip(sessions, tokens, strict=True):
        ours, theirs = socket.socketpair()
        resume = ResumeRequest(session.client_id, epoch, start)
        rt.open_socket(ours, token, remote="127.0.0.1", resume=resume)
        theirs.setblocking(False)
        chunks: list[bytes] = []
        for _ in range(1000):  # bounded: until the last missed broadcast has arrived
            gevent.sleep(0)
            try:
                chunks.append(theirs.recv(1 << 20))
            except BlockingIOError:
                continue
            if last in chunks[-1][-200:]:  # the client's side is measured too: kept cheap
                break
        replayed += b"".join(chunks).count(b'"ANNOUNCEMENT"')
        theirs.close()
    print(json.dumps({"resumed": clients, "replayed": replayed}), flush=True)


def measure(clients: int, missed: int, work: Path) -> int:
    out = work / f"cg.{clients}"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        __file__,
        "--inner",
        "--clients",
        str(clients),
        "--missed",
        str(missed),
        "--work",
        str(work),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    result = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not result:
        sys.exit(f"the measured run failed:\n{done.stderr[-2000:]}")
    if json.loads(result[-1])["replayed"] != clients * missed:
        sys.exit(f"not every missed broadcast was replayed: {result[-1]}")
    with open(glob.glob(str(out))[0]) as profile:
        return next(int(line.split()[1]) for line in profile if line.startswith(("summary:", "totals:")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--missed", type=int, default=320, help="broadcasts each client missed (the storm: ~320)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        resumes(Path(args.work) / str(args.clients), args.clients, args.missed)
        return
    if not shutil.which("valgrind"):
        sys.exit("needs valgrind (apt-get install valgrind)")
    work = Path(tempfile.mkdtemp(prefix="relay-resume-"))
    try:
        for folder in ("0", str(args.clients)):
            (work / folder).mkdir()
        base = measure(0, args.missed, work)
        full = measure(args.clients, args.missed, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per = (full - base) / args.clients
    print(json.dumps({"clients": args.clients, "missed": args.missed, "instructions_per_resume": round(per)}))


if __name__ == "__main__":
    main()
