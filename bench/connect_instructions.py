"""Instructions per connect (callgrind): the one measure of the connect path that this noisy machine repeats.

Starts the service (or, with --floor, ``bench/floor``) under ``valgrind
--tool=callgrind``, warms it with one socket, zeroes the counters, connects
and subscribes N clients with ``bench/loadgen`` (50 at a time, no /health
polls), dumps, and prints the worker's instructions per connect. A change to
the connect path is worth keeping when this number falls; wall-clock times
here move by ±25% between runs.

    python bench/connect_instructions.py --clients 300 [--floor] [--browser-headers]    # ~1 min; needs valgrind

Measured 2026-12-03 (300 clients): the floor 1.71 M, the project 2.53 M (2.65 M before the
after-request hooks left answered upgrades alone).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as bench  # noqa: E402
from relay.tokens import TokenService  # noqa: E402

# Work that runs on a timer, not per connect: under valgrind the run lasts a minute or more, and
# keep-alive pings and identity re-checks of the sockets already open add to the count with the
# run's length. Held off, the count still moves by ~2% from run to run (2026-12-05).
QUIET_TIMERS = {"WS_PING_INTERVAL_MS": "3600000", "WS_CLIENT_IDLE_MS": "3600000", "WS_IDENTITY_RECHECK_MS": "3600000"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--floor", action="store_true", help="bench/floor instead of the project")
    parser.add_argument("--browser-headers", action="store_true", help="upgrades with a browser's 13 headers, not 5")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("needs valgrind (apt-get install valgrind)")
    bench.build_loadgen()
    work = Path(tempfile.mkdtemp(prefix="relay-callgrind-"))
    port = bench.free_port()
    command, folder = bench.gunicorn_command(port, args.floor)
    callgrind = ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={work}/cg.%p"]
    server = subprocess.Popen(
        bench.pinned(0, [*callgrind, sys.executable, *command, "--timeout", "600"]),
        cwd=folder,
        env={**bench.server_env(port, work), **QUIET_TIMERS},
        stdout=open(work / "server.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        bench.wait_healthy(port, server, timeout=400)
        bench.warm_up(port, TokenService(bench.TOKEN_SECRET, 600_000).mint("bench-user-0"))
        token_file = work / "tokens.txt"
        bench.write_tokens(token_file, range(1, args.clients + 1))
        worker = bench.children(server.pid)[0]
        subprocess.run(["callgrind_control", "--zero", str(worker)], check=True, capture_output=True)
        loadgen = [str(bench.LOADGEN), "--port", str(port), "--tokens", str(token_file)]
        loadgen += ["--clients", str(args.clients), "--admin-secret", bench.ADMIN_SECRET, "--pids", str(worker)]
        loadgen += ["--broadcasts", "1", "--warmup", "0", "--concurrency", "50", "--health-every-ms", "0"]
        loadgen += ["--drain-timeout-ms", "1000", "--browser-headers", str(int(args.browser_headers))]
        done = subprocess.run(bench.pinned(1, loadgen), capture_output=True, text=True, timeout=900)
        subprocess.run(["callgrind_control", "--dump=connects", str(worker)], check=True, capture_output=True)
        time.sleep(2)
        dumps = sorted(glob.glob(f"{work}/cg.{worker}.*"), key=os.path.getmtime)
        total = next(int(line.split()[1]) for line in open(dumps[-1]) if line.startswith(("summary:", "totals:")))
        result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        print(
            json.dumps(
                {
                    "target": "floor" if args.floor else "project",
                    "browser_headers": args.browser_headers,
                    "clients": args.clients,
                    "subscribed": result.get("subscribed"),
                    "instructions_per_connect": round(total / args.clients),
                    "profile": dumps[-1],
                }
            )
        )
    finally:
        bench.stop(server, timeout=60)


if __name__ == "__main__":
    main()
