"""Data parallelism with torchrun works unchanged: 2 CPU processes (gloo) follow the 1-process loss curve."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    """A port nobody listens on now: tests running in parallel (pytest -n) must not share a rendezvous port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(tmp_path: Path, processes: int, batch: int, method: str) -> list[dict]:
    out = tmp_path / f"log-{processes}-{method}.json"
    worker = [str(ROOT / "tests" / "_ddp_worker.py"), str(out), str(batch), method]
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(_free_port()),
            *worker,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [h for h in json.loads(out.read_text()) if "loss" in h]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one = _run(tmp_path, 1, 4, "pissa")
    two = _run(tmp_path, 2, 2, "pissa")
    assert [h["step"] for h in one] == [h["step"] for h in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert one[-1]["loss"] < one[0]["loss"]


def test_two_processes_train_with_all_three_terms(tmp_path):
    logs = _run(tmp_path, 2, 2, "balora")
    for entry in logs:
        for key in ("task_loss", "consistency_loss", "diversity_loss", "svd_loss"):
            assert math.isfinite(entry[key]), (key, entry)
