"""Diagnostics: values against float64 references written here, the pre-trained model under `disable_adapter()`,
and zero drift for a run that did not move."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from balora.diagnose import diagnose_run, distinct_n, effective_rank, fit_shares, label_entropy, mean_kl
from balora.experiment import load_experiment
from balora.train import train_experiment
from test_compare import tiny_setup  # noqa: F401  (module-scoped fixture: a saved tiny BERT and data)


def test_mean_kl_matches_float64_reference() -> None:
    torch.manual_seed(1)
    p_logits, q_logits = torch.randn(7, 5) * 3, torch.randn(7, 5) * 3
    p, q = p_logits.double(), q_logits.double()
    log_p = p - torch.logsumexp(p, dim=1, keepdim=True)
    log_q = q - torch.logsumexp(q, dim=1, keepdim=True)
    reference = float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())
    assert float(mean_kl(p_logits, q_logits)) == pytest.approx(reference, rel=1e-5)
    assert float(mean_kl(p_logits, p_logits)) == pytest.approx(0.0, abs=1e-7)
    assert float(mean_kl(q_logits, p_logits)) != pytest.approx(reference, rel=1e-3)  # KL is not symmetric
    with pytest.raises(ValueError, match="same shape|one shape"):
        mean_kl(p_logits, q_logits[:, :3])


def test_label_entropy_and_effective_rank_match_references() -> None:
    labels = [0, 0, 0, 1, 2, 2]
    assert label_entropy(labels, 4) == pytest.approx(-(0.5 * math.log(0.5) + 2 * (1 / 6) * math.log(1 / 6)
                                                       + (1 / 3) * math.log(1 / 3) - (1 / 6) * math.log(1 / 6)))
    assert label_entropy([1, 1, 1], 2) == 0.0
    assert label_entropy([0, 1], 2) == pytest.approx(math.log(2))

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((9, 6)) @ np.diag([5.0, 2.0, 1.0, 0.5, 0.1, 0.0])
    sigma = np.linalg.svd(matrix, compute_uv=False)
    p = sigma[sigma > 1e-12] / sigma.sum()
    assert effective_rank(torch.tensor(matrix, dtype=torch.float32)) == pytest.approx(
        float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
    assert effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0, rel=1e-5)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_distinct_n_and_memorisation_on_hand_built_cases() -> None:
    texts = ["a b a b", "a c"]  # unigrams a b a b a c -> 3/6; bigrams ab ba ab ac -> 3/4
    assert distinct_n(texts, 1) == pytest.approx(0.5)
    assert distinct_n(texts, 2) == pytest.approx(0.75)
    assert distinct_n(["a"], 2) == 0.0

    labels = [1, 0, 1, 1, 0, 0, 1, 0]  # the labels trained on; rows 1, 4, 6 were flipped
    predictions = [1, 0, 0, 1, 1, 0, 1, 1]  # flipped rows: 1 ok, 4 no, 6 ok -> 2/3; clean: 0 ok 2 no 3 ok 5 ok 7 no
    shares = fit_shares(predictions, labels, [1, 4, 6])
    assert shares["memorisation"] == pytest.approx(2 / 3)
    assert shares["clean_fit"] == pytest.approx(3 / 5)
    assert (shares["flipped_rows"], shares["clean_rows"]) == (3, 5)
    assert fit_shares([0, 1], [0, 0], [])["memorisation"] is None


def test_disable_adapter_is_the_pretrained_model_after_pissa(tmp_path: Path) -> None:
    """The saved adapter applies to the original W, so under `disable_adapter()` the loaded run is the base model."""
    from peft import PeftModel

    from balora.adapter import get_balora_model, save_adapter
    from balora.config import BALoRAConfig

    from conftest import tiny_bert

    def tiny_bert_seq_cls(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return tiny_bert(num_labels=3).eval()

    ids = torch.randint(0, 50, (4, 9))
    base = tiny_bert_seq_cls(seed=3)
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    config = BALoRAConfig(method="pissa", r=4, target_modules=["query", "value", "dense"])
    model = get_balora_model(tiny_bert_seq_cls(seed=3), config).eval()
    with torch.no_grad():  # a "trained" adapter and head: move every trainable parameter
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
        trained = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_bert_seq_cls(seed=3), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-5)
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)
    assert (trained - reference).abs().max() > 1e-2  # the check above can fail


@pytest.fixture(scope="module")
def untrained_run(tiny_setup: Path) -> Path:  # noqa: F811
    """A balora run with label noise trained at learning rate 0: the adapter and head stay at their init."""
    out = tiny_setup / "untrained"
    experiment, _ = load_experiment(tiny_setup / "experiment.yaml", [
        "--balora.method", "balora", "--training.learning_rate", "0.0", "--data.label_noise", "0.25",
        "--output_dir", str(out)])
    train_experiment(experiment)
    return out


def test_untrained_run_has_zero_drift(untrained_run: Path) -> None:
    out = untrained_run
    result = diagnose_run(out)
    assert result["drift_kl"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((out / "diagnostics.json").read_text())["drift_kl"] == result["drift_kl"]
    flipped = json.loads((out / "flipped_rows.json").read_text())["flipped_indices"]
    assert result["flipped_rows"] == len(flipped) == 12 and result["clean_rows"] == 36
    assert 0.0 <= result["memorisation"] <= 1.0 and 0.0 <= result["clean_fit"] <= 1.0
    assert result["true_label_entropy"] <= math.log(2) + 1e-9
    assert 1.0 <= result["logits_effective_rank"] <= 2.0
    assert result["features_effective_rank"] == pytest.approx(result["pretrained_features_effective_rank"], rel=1e-4)


def test_diagnose_command(untrained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from balora.cli import main

    out = untrained_run
    (out / "diagnostics.json").unlink(missing_ok=True)
    assert main(["diagnose", str(out)]) == 0
    assert '"drift_kl"' in capsys.readouterr().out
    assert json.loads((out / "diagnostics.json").read_text())["task"] == "nlu"
    assert main(["diagnose", str(out.parent / "no-such-run")]) == 2


def test_trained_run_drifts(tiny_setup: Path) -> None:  # noqa: F811
    out = tiny_setup / "trained"
    experiment, _ = load_experiment(tiny_setup / "experiment.yaml", [
        "--balora.method", "lora", "--training.max_steps", "4", "--output_dir", str(out)])
    train_experiment(experiment)
    result = diagnose_run(out)
    assert result["drift_kl"] > 1e-6  # an untrained run gives ~1e-12
    assert result["memorisation"] is None and 0.0 <= result["clean_fit"] <= 1.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["label_noise"] == 0.0


def test_nlg_diagnostics_on_a_tiny_causal_lm(tmp_path: Path) -> None:
    """Instruction tuning with learning rate 0: no drift, no perplexity change, and the sampling figures computed."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "eval"))
    from tiny_lm import tiny_instruct_setup

    config = tiny_instruct_setup(tmp_path)
    out = tmp_path / "run"
    experiment, _ = load_experiment(config, ["--output_dir", str(out)])
    train_experiment(experiment)
    result = diagnose_run(out, drift_file=tmp_path / "train.json", drift_samples=4, generations=2, max_new_tokens=6)
    assert result["task"] == "nlg" and result["examples"] == 4 and result["tokens"] > 0
    assert result["drift_kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["perplexity_change"] == pytest.approx(0.0, abs=1e-3 * result["perplexity_pretrained"])
    assert len(result["samples"]) == 2 and 0.0 <= result["distinct_1"] <= 1.0
    assert result["distinct_1"] == result["pretrained_distinct_1"]  # same model, same seed, same samples
    assert result["memorisation"] is None

