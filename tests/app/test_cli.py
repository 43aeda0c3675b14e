"""The command line (python -m pykernels): info, check, bench, bad input to demo; the
benchmarks' smoke mode; the timing verdict rule they share. The demo itself runs in
test_demo.py."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pykernels
from pykernels.app import timing

ROOT = Path(__file__).resolve().parents[2]


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


def test_import_pykernels_leaves_the_app_out():
    """The library does not load the application (CLI, demo, data, timings)."""
    result = run("-c", "import sys, pykernels; "
                       "assert not any(m.startswith('pykernels.app') for m in sys.modules)")
    assert result.returncode == 0, result.stderr


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


# --- the verdict rule of timing.py, on synthetic numbers (nothing timed) ------------------

@pytest.mark.parametrize("rounds, target, expected", [
    ([1.10, 1.20, 1.25, 1.30, 1.40], 1.0, timing.PASS),  # the whole spread above
    ([0.80, 0.85, 0.88, 0.90, 0.95], 1.0, timing.FAIL),  # the whole spread below
    ([0.90, 0.97, 1.05, 1.08, 1.20], 1.0, timing.NOISE),  # straddles, median above
    ([0.80, 0.92, 0.96, 1.02, 1.10], 1.0, timing.NOISE),  # straddles, median below
    ([0.50, 1.00, 1.00, 1.10, 1.20], 1.0, timing.PASS),  # lower quartile on the target
])
def test_verdict_at_least(rounds, target, expected):
    assert timing.verdict(timing.spread(rounds), target) == expected


@pytest.mark.parametrize("rounds, expected", [
    ([0.5, 0.6, 0.6, 0.7, 0.9], timing.PASS),
    ([1.3, 1.4, 1.5, 1.6, 1.7], timing.FAIL),
    ([0.9, 1.1, 1.2, 1.3, 1.4], timing.NOISE),
])
def test_verdict_at_most(rounds, expected):
    assert timing.verdict(timing.spread(rounds), 1.2, at_most=True) == expected


def test_spread_is_the_median_and_quartiles_of_the_rounds():
    assert timing.spread([5.0, 1.0, 3.0, 2.0, 4.0]) == timing.Spread(3.0, 2.0, 4.0, 5)
    assert timing.spread([2.0]) == timing.Spread(2.0, 2.0, 2.0, 1)
    # speed-ups are taken round by round: a slow round slows both variants alike
    speedup = timing.ratio([2.0, 4.0, 2.2, 2.0, 6.0], [1.0, 2.0, 1.0, 1.0, 3.0])
    assert speedup.median == 2.0 and (speedup.lo, speedup.hi) == (2.0, 2.0)
    with pytest.raises(ValueError, match="different runs"):
        timing.ratio([1.0, 2.0], [1.0])


def test_interleaved_runs_at_least_min_rounds_in_turn():
    order = []
    samples = timing.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                 rounds=2, repeats={"b": 3}, budget_s=0.0)
    assert [len(s) for s in samples.values()] == [timing.MIN_ROUNDS] * 2
    # each round starts one variant later: no variant always follows the same one
    a_first, b_first = ["a", "b", "b", "b"], ["b", "b", "b", "a"]
    assert order == (a_first + b_first) * (timing.MIN_ROUNDS // 2) + a_first


def test_interleaved_drops_a_failing_variant_when_asked():
    def broken():
        raise RuntimeError("no kernel")

    failures = []
    samples = timing.interleaved({"ok": lambda: None, "broken": broken}, rounds=5,
                                 on_error=lambda name, e: failures.append((name, str(e))))
    assert list(samples) == ["ok"] and len(samples["ok"]) == 5
    assert failures == [("broken", "no kernel")]
    with pytest.raises(RuntimeError, match="no kernel"):
        timing.interleaved({"broken": broken}, rounds=5)


def test_bench_report_checks_judges_by_the_spread(capsys):
    from bench import common

    def measured(*rounds):
        return common.Measured(timing.spread(list(rounds)))

    lines = common.report_checks([
        ("above", {"a": measured(1.2, 1.3, 1.4, 1.5, 1.6), "b": 1.1}, 1.0),
        ("straddles", {"a": measured(0.9, 0.95, 1.0, 1.05, 1.1)}, 1.0),
        ("one below", {"a": measured(1.2, 1.3, 1.4, 1.5, 1.6), "b": 0.9}, 1.0),
        ("memory", {"a": 0.5}, 0.7, "at_most"),
        ("not measured", {}, 1.0),
    ])
    assert [line.split("  ")[0] for line in lines] == [
        "PASS", "within noise", "FAIL", "PASS", "SKIP"]
    assert "IQR 0.95-1.05, 5 rounds" in lines[1]
    assert capsys.readouterr().out.splitlines() == lines
