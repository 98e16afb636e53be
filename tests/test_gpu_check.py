"""benchmarks/gpu_check.sh, prepared for a GPU machine: its --dry-run runs every section on a tiny CPU model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_fixtures import REPO_ROOT


def _run(tmp_path, *args):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    return subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # about 25 s of CPU: every section, twice through the Trainer
def test_dry_run_runs_every_section(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is True
    assert [row["init"] for row in result["init"]] == ["exact SVD", "randomized niter 16"]
    assert all(row["max_abs_logit_change"] < 0.05 for row in result["init"])  # bf16 rounding, not a wrong init
    teacher = result["teacher_bf16"]
    assert teacher["teacher_bitwise_unchanged_after_training"] and teacher["student_moved_max_abs"] > 0
    assert [m["method"] for m in result["training"]] == ["pissa", "balora"]
    for method in result["training"]:
        assert method["steps"] == 2 and method["all_losses_finite"] and method["median_step_s"] > 0
    balora = result["training"][1]["last"]
    assert balora["svd_loss"] is not None and balora["diversity_loss"] is not None, "balora must run its terms"
    assert result["generation"]["accuracy"] == 0.0 and "meaningless" in result["generation"]["note"]
    assert "# GPU check on CPU" in (tmp_path / "gpu_check.md").read_text()


def test_refuses_to_run_the_real_check_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    done = _run(tmp_path)
    assert done.returncode != 0 and "no CUDA device; use --dry-run" in done.stderr
