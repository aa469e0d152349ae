"""Instructions per connect (callgrind): the one measure of the connect path that this noisy machine repeats.

Starts the service (or, with --floor, ``bench/floor``) under ``valgrind
--tool=callgrind``, warms it with one socket, zeroes the counters, connects
and subscribes N clients with ``bench/loadgen`` (50 at a time, no /health
polls), dumps, and prints the worker's instructions per connect. A change to
the connect path is worth keeping when this number falls; wall-clock times
here move by ±25% between runs.

    python bench/connect_instructions.py --clients 300 [--floor]    # ~1 min; needs valgrind

Measured 2026-12-03: the floor 1.75 M, the project 2.72 M.
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
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as bench  # noqa: E402
from bench.prepare_users import prepare  # noqa: E402
from relay.tokens import TokenService  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--floor", action="store_true", help="bench/floor instead of the project")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("needs valgrind (apt-get install valgrind)")
    bench.build_loadgen()
    work = Path(tempfile.mkdtemp(prefix="relay-callgrind-"))
    prepare(str(work / "bench.db"), 10_000)
    port = bench.free_port()
    env = {
        **os.environ,
        "APP_ENV": "development",
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "WS_TOKEN_SECRET": bench.TOKEN_SECRET,
        "WS_ADMIN_SECRET": bench.ADMIN_SECRET,
        "SECRET_KEY": "bench-session-key-0123456789abcdefghijklmn",
        "REALTIME_DB": str(work / "bench.db"),
        "REALTIME_INSTANCE_PATH": str(work / "instance"),
        "REALTIME_HISTORY_DB": str(work / "history.db"),
        "LOG_LEVEL": "INFO",
        "WEB_CONCURRENCY": "1",
    }
    env.pop("REDIS_URL", None)
    gunicorn = [sys.executable, str(bench.ROOT / ".venv" / "bin" / "gunicorn"), "-k", "gevent", "--timeout", "600"]
    if args.floor:
        gunicorn += ["-w", "1", "--worker-connections", "20000", "--backlog", "4096", "-b", f"127.0.0.1:{port}"]
    command = ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={work}/cg.%p"]
    server = subprocess.Popen(
        bench.pinned(0, [*command, *gunicorn, "wsgi:app"]),
        cwd=bench.BENCH / "floor" if args.floor else bench.ROOT,
        env=env,
        stdout=open(work / "server.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        bench.wait_healthy(port, server, timeout=400)
        tokens = TokenService(bench.TOKEN_SECRET, 600_000)
        bench.warm_up(port, tokens.mint("bench-user-0"))
        token_file = work / "tokens.txt"
        token_file.write_text(
            "".join(quote(tokens.mint(f"bench-user-{i}"), safe="") + "\n" for i in range(1, args.clients + 1))
        )
        worker = bench.children(server.pid)[0]
        subprocess.run(["callgrind_control", "--zero", str(worker)], check=True, capture_output=True)
        loadgen = [str(bench.LOADGEN), "--port", str(port), "--tokens", str(token_file)]
        loadgen += ["--clients", str(args.clients), "--admin-secret", bench.ADMIN_SECRET, "--pids", str(worker)]
        loadgen += ["--broadcasts", "1", "--warmup", "0", "--concurrency", "50", "--health-every-ms", "0"]
        loadgen += ["--drain-timeout-ms", "1000"]
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
