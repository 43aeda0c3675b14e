"""Writes the GPU "auto" order of pykernels from one GPU run's evidence (issue 12).

    python -m bench.auto_order --junit JUNIT.xml [...] --results DIR [--out FILE]

A kernel backend (cuda, triton) is eligible on CUDA only if the cuda-marked tests that
name it as a parameter ran, at least one passed and none failed (pytest's JUnit XML). The
eligible ones are ranked by the geometric mean, over every (benchmark, shape, mode) that
all of them timed in half precision, of their time relative to the fastest; the torch
composition ends the order as the fallback. float32 keeps its evidence-free order (the
GPU benchmarks time bf16). pykernels.backends reads the file at import; by default it is
bench/results/auto_order.json, committed with the run's results.
"""

import argparse
import csv
import datetime
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

KERNEL_BACKENDS = ("cuda", "triton")
HALF = ("float16", "bfloat16")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "auto_order.json"


def test_evidence(junit_paths):
    """{backend: {"passed": n, "failed": n}} from the tests whose parameters name it."""
    counts = {b: {"passed": 0, "failed": 0} for b in KERNEL_BACKENDS}
    cases = [c for path in junit_paths for c in ET.parse(path).iter("testcase")]
    for case in cases:
        params = re.search(r"\[(.*)\]$", case.get("name", ""))
        named = set(params.group(1).split("-")) if params else set()
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else None if case.find("skipped") is not None else "passed")
        for backend in KERNEL_BACKENDS:
            if outcome and backend in named:
                counts[backend][outcome] += 1
    return counts


def speed_evidence(csv_paths, backends):
    """{backend: geometric mean of ms / fastest ms} over the half-precision measurements
    that every backend in ``backends`` has; {} when they share none."""
    times = {}
    for path in csv_paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["backend"] in backends and row["dtype"] in HALF and row["ms"]:
                    key = (Path(path).name, row["op"], row["shape"], row["dtype"], row["mode"])
                    times.setdefault(key, {})[row["backend"]] = float(row["ms"])
    shared = [t for t in times.values() if set(t) == set(backends)]
    if not shared:
        return {}
    return {b: math.exp(sum(math.log(t[b] / min(t.values())) for t in shared) / len(shared))
            for b in backends}


def auto_order(junit_paths, csv_paths):
    """The file's content: the half-precision order on CUDA and the evidence behind it."""
    tests = test_evidence(junit_paths)
    eligible = [b for b in KERNEL_BACKENDS
                if tests[b]["passed"] > 0 and tests[b]["failed"] == 0]
    speed = speed_evidence(csv_paths, eligible) if len(eligible) > 1 else {}
    ranked = sorted(eligible, key=lambda b: speed.get(b, 1.0))
    if len(eligible) > 1 and not speed:
        ranked = [b for b in ("triton", "cuda") if b in eligible]  # no shared timing: no rank
    return {"order": {"cuda/half": ranked + ["torch"]},
            "evidence": {"tests": tests, "relative_time": speed},
            "date": datetime.date.today().isoformat()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", required=True, nargs="+",
                        help="pytest --junitxml files of the cuda-marked tests")
    parser.add_argument("--results", required=True, help="folder of the benchmark CSVs")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    csv_paths = sorted(p for p in Path(args.results).rglob("*.csv") if "_cpu" not in p.name)
    content = auto_order(args.junit, csv_paths)
    Path(args.out).write_text(json.dumps(content, indent=1) + "\n")
    print(f"auto_order: {args.out}: cuda/half -> {content['order']['cuda/half']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
