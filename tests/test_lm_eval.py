"""lm-evaluation-harness on `balora export`'s two outputs, offline, with the repository's task files.

The commands of docs/eval.md ("Scoring with lm-eval and evalplus") run as written, through lm_eval's own command-line
entry point, on a tiny random Llama trained for a few steps with PiSSA and exported `--to lora` (lm_eval's
`peft=ADAPTER` on the original base) and `--to merged`. The loglikelihood task gives one number per problem,
log p(answer | prompt): both exports must give the trained model's own value, computed here as lm_eval tokenizes
(context + continuation encoded together, the continuation's tokens scored), and the untrained base another one.
The generation task must run offline and give the same text through both exports.

Marked `slow` (about 40 s here: six lm_eval runs and a training run); run with `pytest -m slow tests/test_lm_eval.py`
after `pip install 'balora[lm-eval]'`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import balora.train
from balora.cli import main

from cli_fixtures import REPO_ROOT, nlg_experiment, save_tiny_llama, write_alpaca

pytest.importorskip("lm_eval", reason="pip install 'balora[lm-eval]'")
pytestmark = pytest.mark.slow
LIMIT = 3
ATOL = 1e-4  # float32; lm_eval batches and pads differently from the reference below


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm-eval")
    llama = save_tiny_llama(tmp / "llama")
    config = nlg_experiment(tmp, llama, write_alpaca(tmp / "alpaca", n=8), balora={"method": "pissa", "r": 3},
                            training={"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-2})
    captured, original = [], balora.train.get_balora_model

    def capture(*args, **kwargs):  # keep the model the run trained, to score it directly
        captured.append(original(*args, **kwargs))
        return captured[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(balora.train, "get_balora_model", capture)
        assert main(["train", str(config)]) == 0
    assert main(["export", str(tmp / "nlg"), "--to", "lora", str(tmp / "lora")]) == 0
    assert main(["export", str(tmp / "nlg"), "--to", "merged", str(tmp / "merged")]) == 0
    return {"tmp": tmp, "base": llama, "lora": tmp / "lora", "merged": tmp / "merged", "trained": captured[0].eval()}


def lm_eval(monkeypatch, out: Path, model_args: str, task: str, *extra: str) -> tuple[dict, list[dict]]:
    """`lm_eval --model hf --model_args ... --include_path configs/lm_eval --tasks TASK ...` from the repository
    root, offline, through lm_eval's console entry point; returns (results, logged samples in document order)."""
    from lm_eval.__main__ import cli_evaluate

    argv = ["lm_eval", "--model", "hf", "--model_args", model_args, "--include_path", "configs/lm_eval",
            "--tasks", task, "--device", "cpu", "--batch_size", "2", "--limit", str(LIMIT), "--log_samples",
            "--output_path", str(out), *extra]
    with monkeypatch.context() as mp:
        mp.chdir(REPO_ROOT)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(sys, "argv", argv)
        cli_evaluate()
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob(f"samples_{task}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    results = json.loads(results_file.read_text())
    assert results["n-samples"][task]["effective"] == LIMIT
    return results["results"][task], samples


def _loglikelihoods(samples: list[dict]) -> torch.Tensor:
    return torch.tensor([float(s["filtered_resps"][0][0]) for s in samples])


@torch.no_grad()
def _reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm_eval's HFLM computes it for a causal LM."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    logits = model(input_ids=torch.tensor([whole[:-1]])).logits.float()[0]  # (T - 1, V)
    logprobs = torch.log_softmax(logits, dim=-1)[n_context - 1:]
    target = torch.tensor(whole[n_context:])
    return float(logprobs.gather(1, target[:, None]).sum())


def test_loglikelihood_task_scores_the_trained_model_through_both_exports(exported, monkeypatch):
    tmp, task = exported["tmp"], "balora_gsm8k_answer"
    through_peft, peft_samples = lm_eval(monkeypatch, tmp / "ll-peft", f"pretrained={exported['base']},"
                                         f"peft={exported['lora']}", task)
    through_merged, merged_samples = lm_eval(monkeypatch, tmp / "ll-merged", f"pretrained={exported['merged']}", task)
    _, base_samples = lm_eval(monkeypatch, tmp / "ll-base", f"pretrained={exported['base']}", task)
    assert {"acc,none", "perplexity,none"} <= set(through_peft)

    tokenizer = AutoTokenizer.from_pretrained(exported["base"])
    pairs = [(s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]) for s in peft_samples]
    rows = [json.loads(line) for line in (REPO_ROOT / "data/gsm8k/test.jsonl").read_text().splitlines()[:LIMIT]]
    assert [c for _, c in pairs] == [" " + r["answer"].split("####")[-1].strip() for r in rows]
    assert all(ctx.endswith("####") and "### Response: " in ctx for ctx, _ in pairs)
    want = torch.tensor([_reference_loglikelihood(exported["trained"], tokenizer, *pair) for pair in pairs])
    torch.testing.assert_close(_loglikelihoods(peft_samples), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(_loglikelihoods(merged_samples), want, atol=ATOL, rtol=0)
    assert (_loglikelihoods(base_samples) - want).abs().max() > 100 * ATOL  # the adapter moved the scores
    assert through_merged["perplexity,none"] == pytest.approx(through_peft["perplexity,none"], rel=1e-4)


def test_generation_task_runs_offline_through_both_exports(exported, monkeypatch):
    tmp, task = exported["tmp"], "balora_gsm8k"
    gen = ("--gen_kwargs", "max_gen_toks=8")
    through_peft, peft_samples = lm_eval(monkeypatch, tmp / "gen-peft", f"pretrained={exported['base']},"
                                         f"peft={exported['lora']}", task, *gen)
    through_merged, merged_samples = lm_eval(monkeypatch, tmp / "gen-merged", f"pretrained={exported['merged']}",
                                             task, *gen)
    for results in (through_peft, through_merged):
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(results)
    assert [s["resps"] for s in peft_samples] == [s["resps"] for s in merged_samples]
    assert all(s["arguments"]["gen_args_0"]["arg_0"].endswith("### Response: Let's think step by step.")
               for s in peft_samples)
    model = AutoModelForCausalLM.from_pretrained(exported["merged"])  # the merged export is a plain checkpoint
    assert not any("lora" in name for name, _ in model.named_parameters())
