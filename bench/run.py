"""`make bench`: fan-out, latency, connect rate, memory and CPU, for both brokers, history on and off;
and the reconnect storm.

For every (repetition, configuration, broker, history) it starts a fresh
``gunicorn -k gevent wsgi:app`` (one worker, pinned to CPU 0; Redis pinned
there too when the broker is Redis), runs ``bench/loadgen`` pinned to CPU 1,
and stops everything by PID. "history off" is ``WS_RECOVERY_WINDOW_MS=0``
(no offsets, nothing stored): the cost of the delivery guarantee is the
ratio of the two. It prints tables of medians and writes every run plus the
medians to ``bench/results/bench-<stamp>.json`` (and the tables to
``bench/results/latest.md``).

Configurations are ``clients:broadcasts:interval_ms``; interval 0 means
back-to-back (each POST awaited), > 0 an open loop at that period.

The connect storm (``--connect-storm``): 10,000 clients connect and
subscribe, 200 at a time, while ``/health`` is polled every 50 ms and a probe
broadcast is sent every second; it reports the connect time, the ``/health``
latency during it, and how long the probes took to reach the clients already
subscribed. ``--floor`` runs it against ``bench/floor`` (gunicorn, Flask and
Flask-Sock doing the upgrade, and nothing of ours): the stack's own cost.

The reload storm (``--storm``): 10,000 subscribed clients, broadcasts at 50/s, a
SIGHUP after 1 s; every client is closed with 1012, comes back after
0.25-1 s and resumes; it reports the time until every client was back and
recovered, what each replayed, loss and duplicates, the server's CPU and the
``/health`` latency through it.

    python bench/run.py                       # the full suite (~25 min)
    python bench/run.py --quick               # one rep of two small configs
    python bench/run.py --configs 10000:10:0 --brokers memory --history on --reps 1
    python bench/run.py --storm --brokers memory,redis --reps 1 [--storm-rate 50]
    python bench/run.py --connect-storm --brokers memory --reps 3 [--floor]

Loopback only; every process is bounded in time and stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prepare_users import prepare  # noqa: E402
from relay.tokens import TokenService  # noqa: E402

BENCH = ROOT / "bench"
LOADGEN = BENCH / ".build" / "loadgen"
RESULTS = BENCH / "results"
DEFAULT_CONFIGS = "1000:100:0 1000:100:20 5000:20:0 10000:10:0"
STORM = {"clients": 10_000, "rate": 50, "seconds": 8, "after_ms": 1000}
CONNECT_STORM = {"clients": 10_000, "probe_every_ms": 1000}
TOKEN_SECRET = "bench-token-secret-0123456789abcdefghijkl"
ADMIN_SECRET = "bench-admin-secret-0123456789abcdefghijkl"
COLUMNS = [
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("loss", "loss", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("server_cpu_fanout_pct", "srv CPU%", "{:.0f}"),
    ("extra_cpu_fanout_pct", "redis CPU%", "{:.0f}"),
    ("loadgen_cpu_fanout_pct", "lg CPU%", "{:.0f}"),
    ("server_kb_per_conn", "KB/conn", "{:.1f}"),
    ("connect_s", "connect s", "{:.2f}"),
    ("health_max_ms", "/health max ms", "{:.1f}"),
    ("post_p50_ms", "POST p50 ms", "{:.2f}"),
    ("post_p99_ms", "POST p99 ms", "{:.2f}"),
]
STORM_COLUMNS = [
    ("back_s", "back and recovered s", "{:.1f}"),
    ("recovered", "recovered", "{:,.0f}"),
    ("not_recovered", "not recovered", "{:,.0f}"),
    ("replayed_mean", "replayed per client (mean)", "{:.0f}"),
    ("replayed_max", "max", "{:.0f}"),
    ("loss", "lost", "{:,.0f}"),
    ("duplicates", "duplicates", "{:,.0f}"),
    ("post_retries", "POST retries", "{:,.0f}"),
    ("server_cpu_storm_pct", "srv CPU% in the storm", "{:.0f}"),
    ("server_cpu_before_pct", "srv CPU% before", "{:.0f}"),
    ("storm_health_p99_ms", "/health p99 ms", "{:.0f}"),
    ("storm_health_max_ms", "/health max ms", "{:.0f}"),
    ("connect_s", "first connect s", "{:.1f}"),
]
CONNECT_COLUMNS = [
    ("connect_s", "connect s", "{:.2f}"),
    ("server_cpu_connect_s", "srv CPU s", "{:.2f}"),
    ("connect_health_p99_ms", "/health p99 ms", "{:.0f}"),
    ("connect_health_max_ms", "/health max ms", "{:.0f}"),
    ("probes_accepted", "probes", "{:.0f}"),
    ("probe_p50_ms", "probe p50 ms", "{:.1f}"),
    ("probe_p99_ms", "probe p99 ms", "{:.1f}"),
    ("probe_max_ms", "probe max ms", "{:.1f}"),
    ("server_kb_per_conn", "KB/conn", "{:.1f}"),
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def build_loadgen() -> None:
    source = BENCH / "loadgen.c"
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= source.stat().st_mtime:
        return
    LOADGEN.parent.mkdir(exist_ok=True)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("bench needs a C compiler (apt-get install gcc) to build bench/loadgen.c")
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(LOADGEN), str(source)], check=True)


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(p) for p in listing.read().split()]
    except OSError:
        return []


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not become healthy")


def warm_up(port: int, token: str) -> None:
    """One socket through every code path, so that first-use costs stay out of the per-connection memory."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws?token={quote(token, safe='')}", open_timeout=10) as ws:
        ws.recv(timeout=5)
        ws.send(json.dumps({"type": "SUBSCRIBE", "data": {"channels": ["system:announcements"]}}))
        ws.recv(timeout=5)


def server_env(port: int, workdir: Path, log_level: str = "INFO", history: str = "on") -> dict:
    """The environment of a bench server: development mode, bench secrets, its files under ``workdir``."""
    db = workdir / "bench.db"
    if not db.exists():
        prepare(str(db), 10_000)
    env = {
        **os.environ,
        "APP_ENV": "development",
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "WS_TOKEN_SECRET": TOKEN_SECRET,
        "WS_ADMIN_SECRET": ADMIN_SECRET,
        "SECRET_KEY": "bench-session-key-0123456789abcdefghijklmn",
        "REALTIME_DB": str(db),
        "REALTIME_INSTANCE_PATH": str(workdir / "instance"),
        "LOG_LEVEL": log_level,
        "WEB_CONCURRENCY": "1",
        "WS_RECOVERY_WINDOW_MS": "120000" if history == "on" else "0",
        "REALTIME_HISTORY_DB": str(workdir / f"history-{port}.db"),  # a fresh stream each run
    }
    env.pop("REDIS_URL", None)
    return env


def gunicorn_command(port: int, floor: bool) -> tuple[list[str], Path]:
    """The server's command line and folder: the project, or ``bench/floor`` configured as
    gunicorn.conf.py configures the project (the floor has no gunicorn.conf.py of its own)."""
    command = [str(ROOT / ".venv" / "bin" / "gunicorn"), "-k", "gevent"]
    if not floor:
        return [*command, "wsgi:app"], ROOT
    floor_args = ["-w", "1", "--worker-connections", "20000", "--backlog", "4096", "-b", f"127.0.0.1:{port}"]
    return [*command, *floor_args, "wsgi:app"], BENCH / "floor"


def write_tokens(path: Path, user_numbers: range) -> None:
    """One URL-quoted token per line for ``bench-user-<n>``, as bench/loadgen reads them."""
    tokens = TokenService(TOKEN_SECRET, 600_000)
    path.write_text("".join(quote(tokens.mint(f"bench-user-{n}"), safe="") + "\n" for n in user_numbers))


def run_one(
    clients: int,
    broadcasts: int,
    interval: int,
    broker: str,
    args,
    workdir: Path,
    history: str = "on",
    storm=None,
    probe_every_ms: int = 0,
) -> dict:
    port = free_port()
    env = server_env(port, workdir, args.log_level, history)
    redis = server = None
    log_file = open(workdir / f"server-{port}.log", "ab")
    try:
        if broker == "redis":
            redis_port = free_port()
            redis = subprocess.Popen(
                pinned(
                    0,
                    [
                        "redis-server",
                        "--port",
                        str(redis_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(workdir),
                    ],
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            time.sleep(0.3)
        command, folder = gunicorn_command(port, args.floor)
        server = subprocess.Popen(
            pinned(0, command),
            cwd=folder,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(port, server)
        warm_up(port, TokenService(TOKEN_SECRET, 600_000).mint("bench-user-0"))
        token_file = workdir / "tokens.txt"
        write_tokens(token_file, range(clients))
        pids = [server.pid, *children(server.pid)]
        argv = [
            str(LOADGEN),
            "--port",
            str(port),
            "--tokens",
            str(token_file),
            "--clients",
            str(clients),
            "--admin-secret",
            ADMIN_SECRET,
            "--pids",
            " ".join(map(str, pids)),
            "--extra-pids",
            str(redis.pid) if redis else "",
            "--payload-bytes",
            str(args.payload_bytes),
        ]
        if probe_every_ms:
            argv += ["--probe-every-ms", str(probe_every_ms), "--drain-timeout-ms", "3000"]
        if storm is None:
            argv += ["--broadcasts", str(broadcasts), "--interval-ms", str(interval), "--warmup", "5"]
        else:
            argv += ["--storm-hup-pid", str(server.pid), "--storm-rate", str(storm["rate"])]
            argv += ["--storm-seconds", str(storm["seconds"]), "--storm-after-ms", str(storm["after_ms"])]
        command = pinned(1, argv)
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"the load generator printed no result: {done.stderr[-500:]}")
        result = json.loads(lines[-1])
    except Exception as problem:  # one failed run is reported, the suite goes on
        result = {"clients": clients, "broadcasts": broadcasts, "interval_ms": interval, "error": str(problem)}
    finally:
        stop(server)
        stop(redis)
        log_file.close()
    return {"broker": broker, "history": history, **result}


def median_of(runs: list[dict], key: str):
    values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
    return statistics.median(values) if values else None


def table(rows: list[dict], columns=COLUMNS, storm: bool = False) -> str:
    head = "| broker | history | " + ("" if storm else "clients × broadcasts @ interval | ")
    head += " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "---|" * (len(columns) + (2 if storm else 3))
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append(
                "–"
                if value is None or (key == "extra_cpu_fanout_pct" and row["broker"] == "memory")
                else fmt.format(value)
            )
        config = "" if storm else f"{row['clients']:,} × {row['broadcasts']} @ {row['interval_ms']} ms | "
        lines.append(f"| {row['broker']} | {row['history']} | {config}" + " | ".join(cells) + " |")
    return "\n".join(lines)


def history_cost(rows: list[dict]) -> str:
    """History on / off, per broker and configuration: what the delivery guarantee costs."""
    lines = [
        "| broker | clients × broadcasts @ interval | deliveries/s on / off | POST p50 ms on / off | "
        "POST p99 ms on / off |",
        "|---|---|---|---|---|",
    ]
    for on in (r for r in rows if r["history"] == "on"):
        off = next(
            (
                r
                for r in rows
                if r["history"] == "off"
                and all(r[k] == on[k] for k in ("broker", "clients", "broadcasts", "interval_ms"))
            ),
            None,
        )
        if off is None or not on.get("deliveries_per_s") or not off.get("deliveries_per_s"):
            continue
        ratio = on["deliveries_per_s"] / off["deliveries_per_s"]

        def pair(key: str, on=on, off=off) -> str:
            return f"{on.get(key) or 0:.2f} / {off.get(key) or 0:.2f}"

        lines.append(
            f"| {on['broker']} | {on['clients']:,} × {on['broadcasts']} @ {on['interval_ms']} ms | "
            f"{ratio:.2f}× | {pair('post_p50_ms')} | {pair('post_p99_ms')} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} vCPU {cpu}, Linux {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--brokers", default="memory,redis")
    parser.add_argument("--history", default="on,off", help="on, off or both: the delivery guarantee")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=0)
    parser.add_argument("--log-level", default="INFO", help="the service's LOG_LEVEL (INFO, as shipped)")
    parser.add_argument("--quick", action="store_true", help="one rep of 1000:100:0 and 1000:100:20")
    parser.add_argument("--storm", action="store_true", help="the reload storm instead of the fan-out suite")
    parser.add_argument("--connect-storm", action="store_true", help="the connect storm instead of the fan-out suite")
    parser.add_argument("--floor", action="store_true", help="with --connect-storm: bench/floor, not the project")
    parser.add_argument(
        "--storm-rate", type=int, default=STORM["rate"], help="with --storm: live broadcasts per second through it"
    )
    args = parser.parse_args()
    if args.floor and not args.connect_storm:
        parser.error("--floor goes with --connect-storm (the floor only connects)")
    if args.storm_rate < 1:
        parser.error("--storm-rate must be at least 1 (without broadcasts there is nothing to recover)")
    STORM["rate"] = args.storm_rate
    kind = "storm" if args.storm else "connect" if args.connect_storm else "bench"
    if args.quick:
        args.configs, args.reps = "1000:100:0 1000:100:20", 1
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    histories = [h.strip() for h in args.history.split(",") if h.strip() in ("on", "off")]
    if args.storm:
        histories = ["on"]  # without history there is nothing to resume
    if args.connect_storm:
        histories = histories[:1]
    if "redis" in brokers and not shutil.which("redis-server"):
        sys.exit("the Redis runs need redis-server (apt-get install redis-server), or pass --brokers memory")
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split()]
    if args.storm:
        configs = [(STORM["clients"], STORM["rate"] * STORM["seconds"], 0)]
    if args.connect_storm:
        configs = [(CONNECT_STORM["clients"], 1, 0)]
    if args.floor:
        brokers, histories = ["floor"], ["–"]  # neither broker nor history: the stack alone

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 12_000:
        log(f"warning: the open-file limit is {hard}; 10,000-client runs need more than 10,000")
    build_loadgen()
    runs = []
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as scratch:
        workdir = Path(scratch)
        for rep in range(1, args.reps + 1):
            for clients, broadcasts, interval in configs:
                for broker in brokers:
                    # ABBA: on/off in odd reps, off/on in even ones, so drift over a run (a warming
                    # machine, a noisy neighbour) does not always favour the same side.
                    for history in histories if rep % 2 else histories[::-1]:
                        name = kind if kind != "bench" else f"{clients}x{broadcasts}@{interval}ms"
                        log(f"rep {rep}  {broker:<6} history {history:<3} {name}")
                        storm = STORM if args.storm else None
                        probes = CONNECT_STORM["probe_every_ms"] if args.connect_storm else 0
                        run = run_one(clients, broadcasts, interval, broker, args, workdir, history, storm, probes)
                        run["rep"] = rep
                        runs.append(run)
                        keys = {
                            "storm": ("back_s", "recovered", "loss", "storm_health_max_ms"),
                            "connect": ("connect_health_max_ms", "probe_max_ms"),
                            "bench": ("deliveries_per_s", "loss", "p99_ms"),
                        }[kind]
                        log(f"   -> { ({k: run.get(k) for k in (*keys, 'connect_s', 'error')}) }")
                        time.sleep(1)
    columns = {"storm": STORM_COLUMNS, "connect": CONNECT_COLUMNS, "bench": COLUMNS}[kind]
    medians = []
    for clients, broadcasts, interval in configs:
        for broker in brokers:
            for history in histories:
                group = [
                    r
                    for r in runs
                    if r["broker"] == broker
                    and r["history"] == history
                    and r.get("clients") == clients
                    and (kind != "bench" or (r.get("broadcasts") == broadcasts and r.get("interval_ms") == interval))
                ]
                row = {
                    "broker": broker,
                    "history": history,
                    "clients": clients,
                    "broadcasts": broadcasts,
                    "interval_ms": interval,
                    "runs": len(group),
                    "errors": sum(1 for r in group if r.get("error")),
                }
                for key, _, _ in columns:
                    row[key] = median_of(group, key)
                medians.append(row)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    report = {
        "machine": machine(),
        "stamp": stamp,
        "reps": args.reps,
        "log_level": args.log_level,
        "storm": STORM if args.storm else CONNECT_STORM if args.connect_storm else None,
        "medians": medians,
        "runs": runs,
    }
    (RESULTS / f"{kind}-{stamp}.json").write_text(json.dumps(report, indent=2))
    text = (
        f"Medians of {args.reps} run(s), {stamp}, {machine()}; server (and Redis) pinned to CPU 0, "
        f"load generator to CPU 1, LOG_LEVEL={args.log_level}.\n\n{table(medians, columns, kind != 'bench')}\n"
    )
    if args.storm:
        text += (
            f"\n{STORM['clients']:,} clients subscribed, broadcasts at {STORM['rate']}/s for {STORM['seconds']} s, "
            f"SIGHUP after {STORM['after_ms']} ms; clients come back after 0.25-1 s and resume; "
            "/health polled every 50 ms from the SIGHUP on.\n"
        )
    elif args.connect_storm:
        text += (
            f"\n{CONNECT_STORM['clients']:,} clients connect and subscribe (200 at a time); /health every 50 ms "
            f"and a probe broadcast every {CONNECT_STORM['probe_every_ms']} ms meanwhile; probe latency is from "
            "its POST to its arrival at each client already subscribed.\n"
        )
    elif "on" in histories and "off" in histories:
        text += f"\nThe delivery guarantee's cost (history on / off):\n\n{history_cost(medians)}\n"
    (RESULTS / f"latest-{kind}.md").write_text(text)
    print(text)
    failed = [r for r in runs if r.get("error")]
    if failed:
        log(f"{len(failed)} run(s) reported errors: see bench/results/{kind}-{stamp}.json")
        sys.exit(1)


if __name__ == "__main__":
    main()
