"""``python -m pykernels demo --quick`` end to end, and the demo's data: IDX files and the
sequence-reversal task."""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pykernels
from pykernels.app import timing
from pykernels.app.data import IGNORE_INDEX, DataError, Reversal, load_mnist, read_idx
from pykernels.app.demo import _speed_summary

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo run for every test of its report: (process, report, out dir).

    Without a GPU it runs without Triton's interpreter (so its check covers the cpu
    backend only): test_cli's check test covers the interpreted Triton kernels, and this
    saves half the run."""
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "pykernels", "demo", "--quick", "--out", str(out)], cwd=ROOT,
        capture_output=True, text=True, env=env, timeout=600)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return result, report, out


def test_demo_quick_runs_and_passes(quick_demo):
    result, report, _ = quick_demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for heading in ("1/4", "2/4", "3/4", "4/4", "summary"):
        assert f"== {heading}" in result.stdout
    assert report["passed"] is True


def test_demo_report_has_every_section(quick_demo):
    _, report, _ = quick_demo
    assert {"date", "versions", "device", "backend", "dtype", "quick", "seed", "sizes",
            "check", "mlp", "transformer", "timings", "passed", "wall_s", "png"} <= set(report)
    assert report["quick"] is True and report["device"]["type"] in ("cpu", "cuda")
    assert report["versions"]["pykernels"] == pykernels.__version__
    assert isinstance(report["versions"]["torch"], str)


def test_demo_report_check_section(quick_demo):
    _, report, _ = quick_demo
    check = report["check"]
    assert check["passed"] is True
    ops = {r["op"] for r in check["results"]}
    assert ops == {"linear_act", "cross_entropy", "linear_cross_entropy", "attention"}
    for row in check["results"]:
        assert row["result"] == "pass" and 0 <= row["max_err"] <= row["tolerance"]


def _is_fraction(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_demo_report_training_sections(quick_demo):
    _, report, _ = quick_demo
    mlp, tf = report["mlp"], report["transformer"]
    assert mlp["passed"] is True and tf["passed"] is True
    for accuracies in (mlp["test_accuracy"], tf["test_token_accuracy"],
                       tf["test_sequence_accuracy"]):
        assert set(accuracies) == {"fused", "reference"}
        assert all(_is_fraction(a) for a in accuracies.values())
    assert mlp["test_accuracy"]["fused"] >= mlp["target"] == 0.95
    assert tf["test_token_accuracy"]["fused"] >= tf["target"] == 0.99
    assert len(mlp["epochs"]) == report["sizes"]["mlp_epochs"]
    # same initial weights and batches: the twins' losses track each other closely
    for section in (mlp, tf):
        curves = section["loss_curve"]
        assert len(curves["fused"]) == len(curves["reference"]) > 0
        assert all(math.isfinite(v) for v in curves["fused"])
        assert section["max_loss_gap"] < 1e-2


def test_demo_report_timings(quick_demo):
    _, report, _ = quick_demo
    rows = report["timings"]["ops"] + [report["timings"]["train_step"]]
    assert [r["op"] for r in rows[:4]] == ["linear_act(gelu)", "cross_entropy",
                                           "linear_cross_entropy", "attention(causal)"]
    for row in rows:
        assert row["fused_ms"] > 0 and row["eager_ms"] > 0
        assert row["rounds"] >= timing.MIN_ROUNDS
        lo, hi = row["speedup_vs_eager_iqr"]
        assert 0 < lo <= row["speedup_vs_eager"] <= hi
        assert row["fused_ms_iqr"][0] <= row["fused_ms"] <= row["fused_ms_iqr"][1]
        assert "verdict" not in row  # --quick sizes carry no speed target
    assert report["timings"]["target"] is None and report["timings"]["passed"] is True


@pytest.mark.parametrize("verdicts, line", [
    ([timing.PASS, timing.PASS], "PASS  "),
    ([timing.PASS, timing.NOISE], "within noise  "),
    ([timing.NOISE, timing.FAIL], "FAIL  "),
])
def test_demo_speed_summary(verdicts, line):
    timings = {"target": 1.0, "ops": [{"verdict": v} for v in verdicts]}
    assert _speed_summary(timings).startswith(line)


def test_demo_writes_a_png(quick_demo):
    _, report, out = quick_demo
    png = out / report["png"]
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


# --- IDX files -----------------------------------------------------------------------

def idx_bytes(array, code=0x08):
    """An IDX file's bytes: magic (0, 0, type code, ndim), big-endian dims, the values."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_mnist(directory, gz, n_train=6, n_test=4, size=(5, 3)):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_mnist_reads_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz)
    data = load_mnist(tmp_path)
    images = arrays["train-images-idx3-ubyte"]
    assert data.train_x.dtype == torch.float32 and data.train_x.shape == (6, 15)
    torch.testing.assert_close(data.train_x, torch.from_numpy(images.reshape(6, 15) / 255.0)
                               .float())
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.test_x.shape == (4, 15) and data.test_y.dtype == torch.int64
    assert data.num_features == 15


def test_read_idx_other_types_big_endian(tmp_path):
    values = np.arange(-6, 6, dtype=np.int16).reshape(3, 4) * 1000
    (tmp_path / "a.idx").write_bytes(idx_bytes(values, 0x0B))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), values)
    floats = np.linspace(-1, 1, 7, dtype=np.float32)
    (tmp_path / "f.idx").write_bytes(idx_bytes(floats, 0x0D))
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), floats)


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: b"\x01\x02" + raw[2:], "not an IDX file"),
    (lambda raw: raw[:2] + b"\x42" + raw[3:], "unknown IDX type code 0x42"),
    (lambda raw: raw[:-5], "truncated"),
    (lambda raw: raw + b"\x00", "too long"),
    (lambda raw: raw[:6], "truncated"),
    (lambda raw: b"", "not an IDX file"),
], ids=["magic", "type-code", "truncated-data", "extra-bytes", "truncated-header", "empty"])
def test_read_idx_rejects_malformed_files(tmp_path, corrupt, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(corrupt(idx_bytes(np.zeros((2, 3, 3), np.uint8) + 7)))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_a_broken_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.ones((4, 2), np.uint8)))[:-6])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_load_mnist_rejects_inconsistent_sets(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_mnist(tmp_path / "missing")
    with pytest.raises(DataError, match="has no train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    write_mnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        load_mnist(tmp_path)
    labels.write_bytes(idx_bytes(np.full(6, 12, dtype=np.uint8)))
    with pytest.raises(DataError, match="digits 0-9"):
        load_mnist(tmp_path)
    labels.unlink()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        idx_bytes(np.zeros((6, 2), np.uint8)))
    with pytest.raises(DataError, match=r"labels must be uint8 of shape \(N,\)"):
        load_mnist(tmp_path)


# --- the reversal task -----------------------------------------------------------------

def test_reversal_targets_are_the_reversed_digits():
    task = Reversal(length=7, vocab=5)
    idx, targets = task.batch(64, torch.Generator().manual_seed(0))
    assert idx.shape == targets.shape == (64, task.seq_len) and task.vocab_size == 6
    digits = idx[:, :7]
    assert digits.max() < 5 and (idx[:, 7] == 5).all()  # the separator
    assert (targets[:, :7] == IGNORE_INDEX).all()
    assert torch.equal(targets[:, 7:], digits.flip(1))
    assert torch.equal(idx[:, 8:], digits.flip(1)[:, :-1])  # teacher forcing
