"""Summarize an Autobahn fuzzing-client report (reports/index.json): counts per verdict, every failure listed."""

from __future__ import annotations

import json
import sys
from collections import Counter


def main(path: str) -> int:
    with open(path) as file:
        report = json.load(file)
    (agent, cases), *_ = report.items()
    verdicts = Counter()
    problems = []
    non_strict, informational = [], []
    for case, result in sorted(cases.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]):
        verdict = result["behavior"]
        close = result["behaviorClose"]
        verdicts[verdict] += 1
        if verdict not in ("OK", "NON-STRICT", "INFORMATIONAL") or close not in ("OK", "INFORMATIONAL"):
            problems.append(f"{case}: {verdict} (close: {close})")
        if verdict == "NON-STRICT":
            non_strict.append(case)
        if verdict == "INFORMATIONAL":
            informational.append(case)
    print(f"Autobahn fuzzing client against {agent}: {len(cases)} cases")
    for verdict, count in sorted(verdicts.items()):
        print(f"  {verdict:<14} {count}")
    if informational:
        print("INFORMATIONAL (no verdict to pass or fail):", ", ".join(informational))
    if non_strict:
        print("NON-STRICT:", ", ".join(non_strict))
    for problem in problems:
        print("FAILED", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
