"""The "auto" backend on CUDA picks only paths with evidence (issue 12), tested on the CPU:
the availability of the CUDA backends is faked, and the GPU results file is written here
by bench/auto_order.py from a made-up JUnit report and benchmark CSV."""

import csv
import importlib
import json
import warnings

import pytest
import torch

from bench import auto_order

# The module (pykernels.backends as an attribute is the function of that name).
backends = importlib.import_module("pykernels.backends")

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture
def gpu_here(monkeypatch):
    """Every backend available on CUDA tensors, as on a GPU machine with triton and _C."""
    monkeypatch.setattr(backends, "_available", lambda name, device_type: True)


def use_order(monkeypatch, path):
    monkeypatch.setattr(backends, "_AUTO_ORDER", backends.load_auto_order(path))


def test_without_gpu_results_half_goes_to_triton_and_float32_to_torch(gpu_here, monkeypatch,
                                                                      tmp_path):
    use_order(monkeypatch, tmp_path / "absent.json")
    for dtype in HALF:
        assert backends.resolve(None, "cuda", dtype) == "triton"
    assert backends.resolve(None, "cuda", torch.float32) == "torch"
    # The cuda kernels stay one explicit request away.
    assert backends.resolve("cuda", "cuda", torch.bfloat16) == "cuda"
    assert backends.resolve(None, "cpu", torch.float32) == "cpu"


def test_without_triton_half_falls_back_to_torch_never_to_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "_available", lambda name, device_type: name != "triton")
    use_order(monkeypatch, tmp_path / "absent.json")
    assert backends.resolve(None, "cuda", torch.float16) == "torch"


def write_gpu_run(tmp_path, outcomes, ms):
    """A JUnit report with one test per (backend, outcome) and a benchmark CSV of ms."""
    cases = "".join(
        f'<testcase classname="tests.test_linear_act" name="test_gpu[gelu-bfloat16-{b}]">'
        + {"passed": "", "failed": "<failure message='x'/>", "skipped": "<skipped/>"}[o]
        + "</testcase>"
        for b, o in outcomes)
    junit = tmp_path / "pytest-cuda.xml"
    junit.write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
    results = tmp_path / "results"
    results.mkdir()
    with open(results / "linear_act_nvidia-h200.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["op", "backend", "shape", "dtype", "mode", "ms"])
        w.writeheader()
        for shape, by_backend in ms.items():
            for b, t in by_backend.items():
                w.writerow(dict(op="linear_act(gelu)", backend=b, shape=shape,
                                dtype="bfloat16", mode="fwd+bwd", ms=t))
    out = tmp_path / "auto_order.json"
    assert auto_order.main(["--junit", str(junit), "--results", str(results),
                            "--out", str(out)]) == 0
    return out


def test_gpu_results_where_cuda_passes_and_is_fastest_put_cuda_first(gpu_here, monkeypatch,
                                                                     tmp_path):
    # cuda is faster on one shape, slower on the other: 1/2 and 1.5 -> geomean 0.87 of triton.
    out = write_gpu_run(tmp_path, [("cuda", "passed"), ("triton", "passed")],
                        {"4096x1024x4096": {"cuda": 1.0, "triton": 2.0, "eager": 3.0},
                         "1x16x16": {"cuda": 0.3, "triton": 0.2}})
    content = json.loads(out.read_text())
    assert content["order"]["cuda/half"] == ["cuda", "triton", "torch"]
    assert content["evidence"]["relative_time"]["cuda"] == pytest.approx(1.5 ** 0.5)
    use_order(monkeypatch, out)
    for dtype in HALF:
        assert backends.resolve(None, "cuda", dtype) == "cuda"
    assert backends.resolve(None, "cuda", torch.float32) == "torch"


@pytest.mark.parametrize("cuda_outcome", ["failed", "skipped"])
def test_gpu_results_keep_cuda_out_without_passing_tests(gpu_here, monkeypatch, tmp_path,
                                                         cuda_outcome):
    out = write_gpu_run(tmp_path, [("cuda", cuda_outcome), ("triton", "passed")],
                        {"4096x1024x4096": {"cuda": 1.0, "triton": 2.0}})
    assert json.loads(out.read_text())["order"]["cuda/half"] == ["triton", "torch"]
    use_order(monkeypatch, out)
    assert backends.resolve(None, "cuda", torch.bfloat16) == "triton"


def test_gpu_results_slower_cuda_ranks_after_triton(gpu_here, monkeypatch, tmp_path):
    out = write_gpu_run(tmp_path, [("cuda", "passed"), ("triton", "passed")],
                        {"4096x1024x4096": {"cuda": 3.0, "triton": 2.0}})
    assert json.loads(out.read_text())["order"]["cuda/half"] == ["triton", "cuda", "torch"]


@pytest.mark.parametrize("text", ["{not json", '{"order": {"cuda/half": ["fast"]}}',
                                  '{"order": {"cpu/float": ["torch"]}}', '{"order": []}'])
def test_malformed_results_file_is_reported_and_ignored(gpu_here, monkeypatch, tmp_path, text):
    path = tmp_path / "auto_order.json"
    path.write_text(text)
    with pytest.warns(UserWarning, match="evidence-free"):
        use_order(monkeypatch, path)
    assert backends.resolve(None, "cuda", torch.float16) == "triton"


def test_committed_results_file_if_any_is_well_formed():
    # A bench/results/auto_order.json that a GPU run committed must load without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.load_auto_order()
