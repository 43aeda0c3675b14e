"""The command line (python -m pykernels): info, check, bench, bad input to demo; the
benchmarks' smoke mode. The demo itself runs in test_demo.py."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def assert_one_line_error(result, *fragments):
    """Bad command-line input: exit status 2 and a single line on stderr, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_demo_missing_data_dir(tmp_path):
    result = run("-m", "pykernels", "demo", "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "--data", "no such directory")
    assert not (tmp_path / "out").exists()  # nothing is written before the input is checked


def test_demo_malformed_data(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    result = run("-m", "pykernels", "demo", "--data", str(tmp_path), "--out",
                 str(tmp_path / "out"))
    assert_one_line_error(result, "train-images-idx3-ubyte", "not an IDX file")


def test_demo_unwritable_out(tmp_path):
    regular = tmp_path / "file.txt"
    regular.write_text("a file, not a folder")
    result = run("-m", "pykernels", "demo", "--quick", "--out", str(regular / "sub"))
    assert_one_line_error(result, "--out", "cannot write")


@pytest.mark.parametrize("name, message", [
    ("nope", "unknown backend"),
    pytest.param("cuda", "not available on cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="cuda is available here")),
])
def test_demo_bad_backend(tmp_path, name, message):
    result = run("-m", "pykernels", "demo", "--backend", name, "--out", str(tmp_path))
    assert_one_line_error(result, f"--backend {name!r}", message, "auto")


def test_bench_help_and_unknown_family():
    result = run("-m", "pykernels", "bench", "--help")
    assert result.returncode == 0 and "e2e" in result.stdout
    assert_one_line_error(run("-m", "pykernels", "bench", "attention", "nope"),
                          "unknown benchmark 'nope'")


def test_bench_outside_a_checkout(tmp_path):
    """Installed without the repository's bench/: a clear error, not an import failure."""
    shutil.copytree(ROOT / "pykernels", tmp_path / "pykernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pykernels", "bench", "--quick"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert_one_line_error(result, "bench/bench_linear_act.py", "checkout")


def test_bench_command_runs_e2e_quick(tmp_path):
    result = run("-m", "pykernels", "bench", "e2e", "--quick", "--out", str(tmp_path),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (csv_path,) = tmp_path.glob("e2e_*_quick.csv")
    rows = {r["backend"]: r for r in csv.DictReader(csv_path.open()) if r["op"] == "train_step"}
    assert {"fused", "eager"} <= set(rows)
    assert all(float(r["ms"]) > 0 and float(r["tflops"]) > 0 for r in rows.values())
    assert float(rows["eager"]["ratio_vs_eager"]) == 1.0
