"""Time scoring all 974 MBPP reference solutions: the previous sandbox layout vs the isolated one, side by side.

    PYTHONPATH=src nice -n 10 python benchmarks/bench_sandbox.py --workers 2 --out benchmarks/results/sandbox.json

"guards only, one process": each sample is one program (solution + asserts) in the in-process guards, as before
issue 13 (`run_program(str, isolation="off")`). "namespaces + checker": the solution runs under bubblewrap
(PID/network/mount namespaces, unprivileged uid) and the asserts run in a separate checker process
(`run_program(TestedProgram, isolation="strict")`), as `balora eval` scores MBPP now. Both configurations run in the
same process, one after the other, with the same workers and timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from balora.eval.code import mbpp_program, mbpp_tested
from balora.eval.isolation import probe
from balora.eval.sandbox import run_many

MBPP = Path(__file__).resolve().parents[1] / "data" / "mbpp" / "mbpp.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="per program (task 123 needs ~5 s of CPU)")
    parser.add_argument("--limit", type=int, help="first N problems only (a quick check)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()][: args.limit]
    configs = {
        "guards only, one process": ([mbpp_program(r, r["code"]) for r in rows], "off"),
        "namespaces + checker": ([mbpp_tested(r, r["code"]) for r in rows], "strict"),
    }
    report = {"n_programs": len(rows), "workers": args.workers, "timeout_s": args.timeout, "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg(), "bubblewrap": probe().detail,
              "python": platform.python_version(), "results": {}}  # fmt: skip
    for name, (programs, isolation) in configs.items():
        start = time.monotonic()
        results = run_many(programs, workers=args.workers, progress=False, timeout=args.timeout, isolation=isolation)
        seconds = time.monotonic() - start
        failed = sorted(r["task_id"] for r, x in zip(rows, results, strict=True) if not x.passed)
        report["results"][name] = {"seconds": round(seconds, 1), "ms_per_program": round(1000 * seconds / len(rows)),
                                   "failed_task_ids": failed}  # fmt: skip
        print(f"{name}: {seconds:.1f} s ({1000 * seconds / len(rows):.0f} ms per program), failed: {failed}")
    report["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
