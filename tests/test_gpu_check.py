"""`benchmarks/gpu_check.py --cpu` runs its checks on the CPU and writes its JSON (CI's slow run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    checks = ("versions", "train", "grid", "extraction", "large_model", "resume_refused", "suite")
    assert report["ok"] is True and all(report[c]["ok"] for c in checks), {c: report[c].get("ok") for c in checks}
    assert report["device"] == "cpu" and report["versions"]["engine_numerics"] == {"float32_matmul": "ieee", "tf32": False}
    assert report["grid"]["runs"] == report["grid"]["runs_equal_within_one_image"] == 8
    assert set(report["extraction"]["runs"]) == {"workers_2", "workers_8"}
    assert all(r["images_per_second"] > 0 for r in report["extraction"]["runs"].values())
    assert report["extraction"]["all_features_finite"] is True
    assert report["large_model"]["images"] == 2 * 64 * 11
    assert "was started on cpu" in report["resume_refused"]["message"]
    assert "all checks passed" in res.stdout


@pytest.mark.slow
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0 and "no CUDA device" in res.stdout
    assert not (tmp_path / "x.json").exists()
