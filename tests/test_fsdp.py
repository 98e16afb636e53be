"""Sharded training as users launch it: `accelerate launch --config_file configs/accelerate/fsdp.yaml -m balora train`.

Two CPU processes (gloo) run the shipped FSDP2 config, overriding only the process count and the precision
(`LAUNCH_OVERRIDES`), with rank 0 alone holding the loaded weights (memory-efficient loading: rank 1 has meta
tensors). The reference is one plain process with the same global batch, split into the same two micro-batches by
gradient accumulation: the BA-LoRA regularizers are per-micro-batch statistics (docs/scaling.md), so one process with
accumulation computes exactly the objective of two processes. See tests/_fsdp_worker.py for what the worker records.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from balora import BALoRAConfig

from cli_fixtures import nlg_experiment, save_tiny_llama, write_alpaca

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
LAUNCH_OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no"]  # CPU processes: 2 of them, float32
WORKER = str(ROOT / "tests" / "_fsdp_worker.py")
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONPATH": str(ROOT / "src")}
BALORA = {"method": "balora", "consistency_schedule": "constant", "regularizer_schedule": "constant", "svd_top_k": 2}
TERMS = ("task_loss", "consistency_loss", "diversity_loss", "svd_loss")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_process(out: Path, *argv: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, WORKER, str(out), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _fsdp(out: Path, *argv: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--config_file", str(FSDP_CONFIG), *LAUNCH_OVERRIDES,
           "--main_process_port", str(_free_port()), WORKER, str(out), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait(*procs: subprocess.Popen) -> None:
    """Wait for every launch; on a timeout or a failure, end the others' whole process groups (launcher + ranks)."""
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, output[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _steps(run_dir: Path) -> list[dict]:
    return [h for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("fsdp")
    llama = save_tiny_llama(tmp / "llama")
    train = write_alpaca(tmp / "data")  # 24 rows, none dropped at max_length 64: 4 steps of 4 rows, no short batch
    one = nlg_experiment(tmp, llama, train, name="one", balora=BALORA,
                         training={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    two = nlg_experiment(tmp, llama, train, name="two", balora=BALORA,
                         training={"per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 2})
    procs = [_one_process(tmp / "rec-one", "train", str(one)), _fsdp(tmp / "rec-two", "train", str(two))]
    _wait(*procs)
    ranks = [torch.load(tmp / "rec-two" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single = torch.load(tmp / "rec-one" / "rank0.pt", weights_only=False)
    return SimpleNamespace(tmp=tmp, llama=llama, train=train, one=tmp / "one", two=tmp / "two", ranks=ranks,
                           single=single)


def test_fsdp_matches_one_process_with_the_same_global_batch(runs):
    assert runs.single["fsdp"] is False and all(r["fsdp"] is True for r in runs.ranks)
    one, two = _steps(runs.one), _steps(runs.two)
    assert [h["step"] for h in one] == [h["step"] for h in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
        assert all(math.isfinite(b[k]) for k in TERMS), b
        assert b["lambda_consistency"] > 0 and b["lambda_diversity"] > 0 and b["lambda_svd"] > 0
    assert one[-1]["loss"] < one[0]["loss"]


def test_rank0_only_weights_end_identical_on_every_rank_and_equal_one_process(runs):
    rank0, rank1 = runs.ranks
    assert rank0["meta"] == []
    assert any(name.endswith("q_proj.base_layer.weight") for name in rank1["meta"]), rank1["meta"][:5]
    single = runs.single["state"]
    assert set(rank0["state"]) == set(rank1["state"]) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(rank1["state"][name], rank0["state"][name], rtol=0, atol=0, msg=name)
        # Frozen entries (W_res, the teacher's A0/B0) are bit-identical; trained ones within float noise.
        torch.testing.assert_close(rank0["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # PiSSA did run: W_res + scaling · B0 A0 is the loaded W, and W_res is not W.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(runs.llama).state_dict()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    w_res = rank1["state"][prefix + "base_layer.weight"]
    a0, b0 = rank1["state"][prefix + "lora_A.teacher.weight"], rank1["state"][prefix + "lora_B.teacher.weight"]
    original = loaded["model.layers.0.self_attn.q_proj.weight"]
    scaling = BALoRAConfig(r=2, **BALORA).scaling
    torch.testing.assert_close(w_res + scaling * b0 @ a0, original, rtol=1e-5, atol=1e-6)
    assert (w_res - original).abs().max() > 1e-2


def test_teacher_gives_the_untouched_models_logits_under_sharding(runs):
    from transformers import AutoModelForCausalLM

    untouched = AutoModelForCausalLM.from_pretrained(runs.llama).eval()
    for rank in runs.ranks:  # the teacher forward of the last step (step 4), inside the FSDP-wrapped model
        with torch.no_grad():
            expected = untouched(**rank["teacher_inputs"]).logits
        torch.testing.assert_close(rank["teacher_logits"], expected, rtol=1e-5, atol=1e-5)


def test_saved_adapter_is_gathered_and_equals_one_process(runs):
    one = load_file(runs.one / "adapter" / "adapter_model.safetensors")
    two = load_file(runs.two / "adapter" / "adapter_model.safetensors")
    assert set(one) == set(two) and len(one) == 28  # 2 layers × 7 projections × (A, B)
    for name in one:
        assert two[name].shape == one[name].shape  # gathered: whole matrices, not one rank's shard
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    config = json.loads((runs.two / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4  # the PiSSA adapter saved as a LoRA on the original weights: rank 2r


def test_resume_from_a_sharded_checkpoint_continues_the_run(runs):
    resumed = runs.tmp / "resumed"
    shutil.copytree(runs.two / "checkpoint-2", resumed / "checkpoint-2")  # as if interrupted after step 2
    assert (resumed / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # the sharded (DCP) checkpoint
    config = nlg_experiment(runs.tmp, runs.llama, runs.train, name="resumed", balora=BALORA,
                            training={"per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 2})
    _wait(_fsdp(runs.tmp / "rec-resumed", "train", str(config), "--resume"))
    full, again = _steps(runs.two), _steps(resumed)
    assert [h["step"] for h in again] == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's trainer state
    for a, b in zip(full[2:], again[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    first = load_file(runs.two / "adapter" / "adapter_model.safetensors")
    second = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- rank-0 init without a Trainer: 2 gloo processes under torchrun, and the single-process errors --------------
@pytest.fixture(scope="module")
def rank0_init(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("rank0-init")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "_rank0_init_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_ranks_that_loaded_different_weights_all_get_rank_0s_init(rank0_init):
    from balora import get_balora_model

    from conftest import tiny_llama

    torch.manual_seed(0)  # rank 0's weights; rank 1 loaded seed 1's
    expected = get_balora_model(tiny_llama(), BALoRAConfig(method="balora", r=2)).state_dict()
    rank0, rank1 = (rank["different"] for rank in rank0_init)
    assert set(rank0) == set(rank1) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)  # broadcast: bit-identical
        # This process's SVD may run with another thread count than the worker's: equal up to float rounding.
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_meta_weights_that_nothing_would_fill_are_a_clear_error(rank0_init):
    for rank in rank0_init:
        assert "ranks [1] hold meta" in rank["meta_without_fsdp"]
        assert "cpu_ram_efficient_loading" in rank["meta_without_fsdp"]
        assert "rank 0 holds meta" in rank["meta_on_rank0"]


def test_single_process_meta_or_zero3_partitioned_weights_are_a_clear_error():
    from balora import get_balora_model

    from conftest import tiny_llama

    with pytest.raises(ValueError, match="on the meta device"):
        get_balora_model(tiny_llama().to("meta"), BALoRAConfig(r=2))
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.weight.ds_id = 7  # what DeepSpeed's zero.Init leaves on a partitioned one
    with pytest.raises(ValueError, match="zero3_init_flag: false"):
        get_balora_model(model, BALoRAConfig(r=2))
