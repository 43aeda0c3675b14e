"""The command line (python -m pykernels) and the benchmark's smoke mode."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pykernels

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)


def test_info_lists_versions_and_backends():
    result = run("-m", "pykernels", "info")
    assert result.returncode == 0, result.stderr
    assert f"pykernels  {pykernels.__version__}" in result.stdout
    assert "_C         built" in result.stdout
    for name in pykernels.backends():
        assert name in result.stdout.split("backends", 1)[1]


def test_check_passes_on_every_backend():
    result = run("-m", "pykernels", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("linear_act")]
    backends_checked = {line.split()[1] for line in lines}
    assert backends_checked == {b for b in pykernels.backends("cpu") if b != "torch"}
    assert len(lines) == 8 * len(backends_checked) and all(" pass" in ln for ln in lines)


def test_unknown_command_exits_2():
    result = run("-m", "pykernels", "launch")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize("how", [["-m", "bench.bench_linear_act"], ["bench/bench_linear_act.py"]])
def test_benchmark_quick_mode_writes_results(how, tmp_path):
    result = run(*how, "--quick", "--activation", "gelu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    (csv_path,) = tmp_path.glob("linear_act_*_quick.csv")
    rows = list(csv.DictReader(csv_path.open()))
    measured = {(r["op"], r["backend"], r["mode"]) for r in rows if r["ms"]}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert ("linear_act(gelu)", "eager", mode) in measured
        assert ("linear_act(gelu)", "cpu", mode) in measured
    assert all(float(r["ms"]) > 0 for r in rows if r["ms"])
    assert (tmp_path / csv_path.name.replace(".csv", ".md")).exists()
