"""The project against the peers of one shared-harness run: medians and ratios.

python bench/ratios.py bench/results/peers-YYYYMMDD-HHMM.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

PEERS = ("node-ws", "c-limit", "c-limit-coalesce", "flask-sock-naive")


def medians(path: str) -> dict:
    groups = defaultdict(list)
    for line in open(path):
        run = json.loads(line)
        if run.get("error") and not run.get("delivered"):
            continue
        groups[(run["target"], f"{run['clients']}:{run['broadcasts']}:{run['interval_ms']}")].append(run)

    def med(runs, key):
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    keys = ("deliveries_per_s", "loss", "p99_ms", "server_cpu_fanout_pct", "server_rss_per_conn_kb", "connect_s")
    return {group: {key: med(runs, key) for key in keys} | {"n": len(runs)} for group, runs in groups.items()}


def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


def main(path: str) -> None:
    m = medians(path)
    configs = sorted({cfg for _, cfg in m}, key=lambda c: tuple(map(int, c.split(":"))))
    print(f"Ratios from {path.rsplit('/', 1)[-1]} (medians; project / peer).\n")
    print(
        "| config | project deliveries/s | vs node-ws | vs c-limit | vs c-limit-coalesce | vs flask-sock-naive "
        "| project p99 ms | node-ws p99 ms | project srv CPU% | project loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        p = m.get(("project", cfg))
        if not p:
            continue
        peer = {name: m.get((name, cfg), {}) for name in PEERS}
        rate = p["deliveries_per_s"]
        print(
            f"| {cfg} | {rate:,.0f} | {ratio(rate, peer['node-ws'].get('deliveries_per_s'))} "
            f"| {ratio(rate, peer['c-limit'].get('deliveries_per_s'))} "
            f"| {ratio(rate, peer['c-limit-coalesce'].get('deliveries_per_s'))} "
            f"| {ratio(rate, peer['flask-sock-naive'].get('deliveries_per_s'))} "
            f"| {p['p99_ms']:.1f} | {peer['node-ws'].get('p99_ms') or 0:.1f} | {p['server_cpu_fanout_pct']:.0f} "
            f"| {p['loss']:.0f} |"
        )
    print("\n| target | KB per connection (1k) | connect 5k (s) | connect 10k (s) |")
    print("|---|---|---|---|")
    for name in ("project", *PEERS, "floor"):
        if not any(target == name for target, _ in m):
            continue
        cells = [
            m.get((name, cfg), {}).get(key)
            for cfg, key in (
                ("1000:100:0", "server_rss_per_conn_kb"),
                ("5000:20:0", "connect_s"),
                ("10000:10:0", "connect_s"),
            )
        ]
        print(f"| {name} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
