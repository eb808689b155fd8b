"""The run half of scripts/gpu-check.sh where there is no GPU, and its
report over every section it can hold."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
from report import write_report  # noqa: E402


def has_gpu():
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def test_run_without_a_gpu_says_so_and_does_not_pass(tmp_path):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([str(ROOT / "scripts/gpu-check.sh"), "run", "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), "--pack", str(tmp_path / "no-pack")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "NO GPU" in r.stdout
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["verdict"] == "no-gpu"
    assert summary["gpu"] is None and summary["no_gpu_reason"]
    assert "Verdict: no-gpu" in (tmp_path / "out/report.md").read_text()


def test_report_renders_every_stage():
    gib = 1 << 30
    summary = {
        "verdict": "fail", "exit_code": 1, "seconds": 301.5, "dry_run": False,
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "memory_used_mib": 0,
                "memory_free_mib": 81000, "driver": "580.159.04", "count": 1, "bus": "0"},
        "cpu": {"cores": 16, "model": "x86"}, "python": "3.12.3",
        "build": {"commit": "abc1234", "built": "2026-12-06", "compute_cap": "90", "nvcc": "V13.0.88"},
        "stages": {
            "models": {"status": "pass", "seconds": 3.0},
            "tests": {"status": "fail", "seconds": 50, "why": "failed: device", "binaries": {
                "fused": {"status": "pass", "seconds": 2.0, "result": "test result: ok. 6 passed"},
                "device": {"status": "fail", "seconds": 9.0, "result": ["thread panicked"]}}},
            "serve": {"status": "pass", "checks": [{"name": "chat completion", "ok": True, "detail": ""}],
                      "figures": {"chat_cold_s": 1.2, "driver_free_bytes": {"start": 80 * gib, "loaded": 79 * gib}}},
            "lifecycle": {"status": "fail", "why": "failed: scale to zero",
                          "checks": [{"name": "scale to zero", "ok": False, "detail": "['chat-b']"}],
                          "figures": {"budget_bytes": 3 * gib, "sleep_wake": "absent"}},
            "decode": {"status": "pass", "d2d_bytes_per_s": 3.0e12, "peer": "transformers 5.17.0",
                       "write_seconds": 30.0,
                       "loads": [{"load": "first", "seconds": 4.0, "gb_per_s": 4.0, "free_before": 80 * gib,
                                  "free_after_load": 64 * gib}],
                       "unload": {"free_before_unload": 60 * gib, "free_after_unload": 79 * gib},
                       "batches": [{"batch": 1, "tokens_per_s": 150.0, "step_ms": 6.6, "roofline_steps_per_s": 190.0,
                                    "of_roofline": 0.79, "peer_tokens_per_s": 30.0, "ratio": 5.0,
                                    "agree_steps": 63, "steps": 64},
                                   {"batch": 16, "tokens_per_s": 2000.0, "step_ms": 8.0,
                                    "roofline_steps_per_s": 190.0, "of_roofline": 0.66}]},
            "images": {"status": "skipped", "why": "out of time"},
        },
    }
    text = write_report(summary)
    for part in ("Verdict: fail", "NVIDIA H100", "| tests | fail |", "6 passed", "FAILED scale to zero",
                 "79.00 GiB", "| 1 | 150.0 | 6.60 | 0.79 | 30.0 | 5.00 | 63 of 64 steps |", "| 16 | 2000.0",
                 "Not measured: out of time"):
        assert part in text, part
    dry = write_report({"verdict": "no-gpu", "gpu": None, "no_gpu_reason": "nvidia-smi: not found"})
    assert "GPU: none (nvidia-smi: not found)" in dry
