"""scripts/gpu_run.sh's dry run on a machine without a GPU, and the per-test timeout it
uses (PYKERNELS_TEST_TIMEOUT, tests/conftest.py)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_run.sh"


def run_script(tmp_path, env_changes, *args):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
@pytest.mark.parametrize("args", [(), ("--smoke", "attention")])
def test_without_a_gpu_it_stops_at_the_guard_before_building(tmp_path, args):
    proc, seconds = run_script(tmp_path, {}, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "STOP: no NVIDIA GPU visible" in proc.stderr
    out = tmp_path / "out"
    assert not (out / "build.log").exists()  # nothing built, no test run
    assert "STOP" in (out / "summary.txt").read_text()
    assert seconds < 60


def test_without_nvcc_it_names_what_is_missing(tmp_path):
    # A PATH with an nvidia-smi that answers, bash and the basic tools, and no nvcc.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "readlink", "mkdir", "tee", "cat"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    proc, _ = run_script(tmp_path, {"PATH": str(bin_dir), "CUDA_HOME": None})
    assert proc.returncode == 2
    assert "STOP: nvcc is not on PATH" in proc.stderr


def test_per_test_timeout_fails_a_slow_test(tmp_path):
    # The subject lives outside the suite (so the suite never collects a test that only
    # sleeps); tests/conftest.py, which holds the timeout hook, joins as a plugin.
    subject = tmp_path / "test_subject.py"
    subject.write_text("import time\n\n\ndef test_sleeps():\n    time.sleep(30)\n")
    env = {**os.environ, "PYKERNELS_TEST_TIMEOUT": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "-p", "conftest", str(subject)],
        cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout
    assert "timed out after 1 s (PYKERNELS_TEST_TIMEOUT)" in proc.stdout
    assert "1 failed" in proc.stdout
    assert time.monotonic() - start < 25  # well before the 30 s sleep would end
