"""`balora diagnose RUN_DIR`: one number per failure mode that BA-LoRA's regularizers target (arXiv 2408.04556, Sec. 1,
3.2), measured on held-out data and written to RUN_DIR/diagnostics.json. Formulas: docs/diagnostics.md.

- knowledge drift: mean KL(pre-trained ‖ fine-tuned) of the output distributions on inputs outside the training task
  (NLU: the validation inputs; NLG: the Alpaca demo data, response tokens), and for NLG the change in perplexity;
- representation collapse: entropy of the predicted-class distribution against that of the true labels, effective
  rank of the logits and of the final hidden features, and for NLG distinct-1/distinct-2 of sampled outputs;
- noise overfitting: with label noise, the share of flipped training rows predicted with their flipped label
  (memorisation), against the share of clean rows fitted.

The pre-trained model is the run's PeftModel under `disable_adapter()`: the saved adapter is a plain LoRA on the
original weights (rank 2r for PiSSA runs), so disabling it gives W exactly, and for classification the original head,
whose random initialisation is reproduced by seeding as training did before loading the base model. For a full
fine-tuning run it is the base model loaded (and seeded) beside the fine-tuned one (`rundir.pretrained_view`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from balora import rundir
from balora.experiment import ConfigError
from balora.io import DataError, data_dir, read_text, write_json_atomic
from balora.losses import nlg_valid_mask
from balora.prepare import prepare, training_seed
from balora.rundir import pretrained_view

MAX_RANK_ROWS = 512  # rows (examples or tokens) used for the effective ranks; an SVD of (512, V) stays cheap


# ------------------------------------------------------------------------------------------------ pure statistics


def mean_kl(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """(1/N) Σ_n KL(softmax(reference[n]) ‖ softmax(logits[n])), both (N, C), float32; 0 for N = 0."""
    if reference_logits.shape != logits.shape or logits.dim() != 2:
        raise ValueError(f"mean_kl expects two (N, C) tensors of one shape; got {tuple(reference_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / logits.shape[0]


def label_entropy(labels: Sequence[int] | np.ndarray, num_classes: int) -> float:
    """Entropy in nats of the empirical class distribution of `labels` (classes 0..num_classes-1)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: a one-class entropy is 0.0, not -0.0


def effective_rank(matrix: Tensor) -> float:
    """exp(−Σ p_i log p_i), p_i = σ_i / Σ_j σ_j, σ the singular values of `matrix` (Roy & Vetterli, 2007).

    Uncentred, float32. 1 for a rank-one matrix, min(N, D) for a flat spectrum; 0 for an all-zero matrix.
    """
    if matrix.dim() != 2:
        raise ValueError(f"effective_rank expects a 2-D matrix; got shape {tuple(matrix.shape)}")
    sigma = torch.linalg.svdvals(matrix.float())
    total = sigma.sum()
    if matrix.numel() == 0 or total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct unique n-grams / all n-grams over whitespace words of all `texts` (Li et al., 2016); 0 if none."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def fit_shares(predictions: Sequence[int], labels: Sequence[int], flipped: Sequence[int]) -> dict[str, float | None]:
    """Memorisation and clean fit on the training rows.

    `labels` are the labels trained on (flipped where noisy); `flipped` the positions of flipped rows.
    memorisation = share of flipped rows predicted with their flipped label; clean_fit = share of the other rows
    predicted with their label. A share over no rows is None.
    """
    pred, lab = np.asarray(predictions), np.asarray(labels)
    if pred.shape != lab.shape:
        raise ValueError(f"predictions and labels differ in length: {pred.shape} vs {lab.shape}")
    noisy = np.zeros(len(lab), dtype=bool)
    noisy[np.asarray(list(flipped), dtype=np.int64)] = True
    hit = pred == lab
    return {
        "memorisation": float(hit[noisy].mean()) if noisy.any() else None,
        "clean_fit": float(hit[~noisy].mean()) if (~noisy).any() else None,
        "flipped_rows": int(noisy.sum()),
        "clean_rows": int((~noisy).sum()),
    }


# ------------------------------------------------------------------------------------------------ model passes


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(dataset: Any, collator: Any, batch_size: int) -> Iterator[dict[str, Tensor]]:
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield collator(rows)


@torch.no_grad()
def classifier_pass(model: torch.nn.Module, dataset: Any, collator: Any, *, batch_size: int = 64,
                    pretrained: bool = False) -> tuple[Tensor, Tensor]:
    """(logits (N, C), pooled features (N, H)) of a classification model, in eval mode. The features are the input of
    its classification head (`balora.nlu.pooled`: a (B, T, H) head input is averaged over the attention mask)."""
    from balora.nlu import capture_input, locate_head, pooled

    logits, features = [], []
    device = _device(model)
    context = pretrained_view(model) if pretrained else contextlib.nullcontext(model)
    with context as model:
        head = locate_head(model)  # the reference of a full fine-tuning run is a model of its own
        for batch in _batches(dataset.remove_columns(["labels"]), collator, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            with capture_input(head.module) as captured:
                out = model(**batch)
            logits.append(out.logits.float().cpu())
            features.append(pooled(captured[-1], batch.get("attention_mask")).float().cpu())
    return torch.cat(logits), torch.cat(features)


def nlu_diagnostics(experiment: Any, model: Any, tokenizer: Any, run_dir: Path, batch_size: int) -> dict[str, Any]:
    prepared = prepare(experiment, model=model, tokenizer=tokenizer)  # the run's data, subset and flipped labels
    spec, collator = prepared.spec, prepared.collator
    if spec.regression:
        raise ConfigError(f"diagnose covers classification tasks; {spec.name!r} is a regression task")
    if not prepared.eval:
        raise ConfigError("diagnose needs a validation split; set data.validation_file")
    val = next(iter(prepared.eval.values()))
    logits, features = classifier_pass(model, val, collator, batch_size=batch_size)
    pre_logits, pre_features = classifier_pass(model, val, collator, batch_size=batch_size, pretrained=True)
    predicted = logits.argmax(-1).numpy()
    result: dict[str, Any] = {
        "task": "nlu",
        "examples": len(val),
        "drift_kl": float(mean_kl(pre_logits, logits)),
        # 1 - cosine of each row's pooled features to the pre-trained model's (the head does not enter)
        "features_drift": float((1 - F.cosine_similarity(pre_features, features, dim=-1)).mean()),
        "predicted_class_entropy": label_entropy(predicted, spec.num_labels),
        "true_label_entropy": label_entropy(val["labels"], spec.num_labels),
        "logits_effective_rank": effective_rank(logits[:MAX_RANK_ROWS]),
        "features_effective_rank": effective_rank(features[:MAX_RANK_ROWS]),
        "pretrained_features_effective_rank": effective_rank(pre_features[:MAX_RANK_ROWS]),
    }
    if experiment.data.label_noise > 0:
        _check_flipped(run_dir, prepared.flipped)
    encoded = prepared.train
    train_logits, _ = classifier_pass(model, encoded, collator, batch_size=batch_size)
    result.update(fit_shares(train_logits.argmax(-1).tolist(), encoded["labels"], prepared.flipped))
    result["label_noise"] = experiment.data.label_noise
    return result


def _check_flipped(run_dir: Path, flipped: list[int]) -> None:
    """The rows flipped now must be those the run trained on (same seed, subset and p): else the figures lie."""
    path = run_dir / rundir.FLIPPED
    if not path.is_file():
        raise DataError(f"{path} is missing: the run has label noise but no record of its flipped rows")
    saved = json.loads(read_text(path))["flipped_indices"]
    if saved != flipped:
        raise DataError(f"{path} does not match the rows flipped by the run's config (seed, subset, p); "
                         "the data files changed since training")


# ------------------------------------------------------------------------------------------------ NLG


@torch.no_grad()
def nlg_drift(model: Any, dataset: Any, collator: Any, *, batch_size: int = 4) -> dict[str, Any]:
    """Per-token KL(pre ‖ fine) and NLL on supervised (response) tokens; logits and final hidden rows for ranks."""
    device = _device(model)
    kl_sum = nll_ft = nll_pre = 0.0
    tokens = 0
    rows_logits: list[Tensor] = []
    rows_hidden: list[Tensor] = []
    for batch in _batches(dataset, collator, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        mask = nlg_valid_mask(labels)  # (B, T): positions whose next token is supervised
        out = model(**batch, output_hidden_states=True)
        with pretrained_view(model) as reference:
            pre = reference(**batch).logits[mask].float()  # (M, V)
        ft = out.logits[mask].float()  # (M, V)
        target = labels[:, 1:][mask[:, :-1]]  # (M,): the token each valid position predicts
        kl_sum += float(mean_kl(pre, ft)) * ft.shape[0]
        nll_ft += float(F.cross_entropy(ft, target, reduction="sum"))
        nll_pre += float(F.cross_entropy(pre, target, reduction="sum"))
        tokens += ft.shape[0]
        room = MAX_RANK_ROWS - sum(r.shape[0] for r in rows_logits)
        if room > 0:
            rows_logits.append(ft[:room].cpu())
            rows_hidden.append(out.hidden_states[-1][mask][:room].float().cpu())
    if tokens == 0:
        raise ValueError("no supervised tokens in the drift data; raise data.max_length")
    ppl_ft, ppl_pre = math.exp(nll_ft / tokens), math.exp(nll_pre / tokens)
    return {
        "tokens": tokens,
        "drift_kl": kl_sum / tokens,
        "nll_pretrained": nll_pre / tokens,
        "nll_finetuned": nll_ft / tokens,
        "perplexity_pretrained": ppl_pre,
        "perplexity_finetuned": ppl_ft,
        "perplexity_change": ppl_ft - ppl_pre,
        "logits_effective_rank": effective_rank(torch.cat(rows_logits)),
        "features_effective_rank": effective_rank(torch.cat(rows_hidden)),
    }


@torch.no_grad()
def sample_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, seed: int) -> list[str]:
    """One sampled completion (temperature 1, top-p 1) per prompt, one prompt at a time, seeded."""
    device = _device(model)
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            out = model.generate(**ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def retention_sets(experiment: Any, *, task_file: Path | None, mbpp_file: Path | None) -> dict[str, Any]:
    """The teacher-forced retention sets besides the drift data: name -> (file, format) for the task's own references
    (`task_file`, else the experiment's `data.validation_file`, else the bundled GSM8K test for GSM8K training data)
    and MBPP reference solutions (`mbpp_file`, else the bundled copy). A set whose file is unknown is left out."""
    sets: dict[str, Any] = {}
    bundled = data_dir()
    if task_file is None and experiment.data.validation_file:
        task_file = Path(experiment.data.validation_file)
    if task_file is None and experiment.data.format == "gsm8k" and bundled is not None:
        task_file = bundled / "gsm8k" / "test.jsonl"
    if task_file is not None:
        sets["task"] = (Path(task_file), experiment.data.format)
    if mbpp_file is None and bundled is not None:
        mbpp_file = bundled / "mbpp" / "mbpp.jsonl"
    if mbpp_file is not None:
        sets["mbpp"] = (Path(mbpp_file), "mbpp")
    return sets


def _mbpp_rows(path: Path) -> Any:
    """MBPP problems as instruction rows: the problem text is the instruction, the reference code the response."""
    from datasets import Dataset

    from balora.data.instruct import load_instruct
    from balora.io import iter_records

    rows = []
    for where, rec in iter_records(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not isinstance(rec.get("code"), str):
            raise DataError(f"{path} {where}: an MBPP row needs text 'text' and 'code' fields")
        rows.append({"instruction": rec["text"], "output": rec["code"].replace("\r\n", "\n")})
    return load_instruct(Dataset.from_list(rows), format="alpaca")[0]


def _instruct_rows(path: Path, fmt: str, limit: int) -> Any:
    from balora.data.instruct import load_instruct

    rows = _mbpp_rows(path) if fmt == "mbpp" else load_instruct(path, format=fmt)[0]
    return rows.select(range(min(limit, len(rows))))


def nlg_diagnostics(experiment: Any, model: Any, tokenizer: Any, *, drift_file: Path, drift_samples: int,
                    batch_size: int, generations: int, max_new_tokens: int,
                    retention: dict[str, Any] | None = None) -> dict[str, Any]:
    """NLG diagnostics. `retention` (name -> (file, format)): besides the drift data (Alpaca, reported as
    `alpaca_*`), the first `drift_samples` rows of each set are scored teacher-forced on their reference responses:
    `<name>_nll` (mean NLL per response token, fine-tuned), `<name>_nll_pretrained`, `<name>_kl` (KL(pre ‖ fine)
    per token) and `<name>_nll_change` (relative change of the NLL)."""
    from balora.data.instruct import CausalLMCollator, tokenize_instruct
    from balora.data.templates import render_prompt, response_prefix

    rows = _instruct_rows(drift_file, "alpaca", drift_samples)
    template = experiment.data.template
    collator = CausalLMCollator(tokenizer.pad_token_id)
    encoded, _ = tokenize_instruct(rows, tokenizer, max_length=experiment.data.max_length, template=template)
    result: dict[str, Any] = {"task": "nlg", "drift_file": str(drift_file), "examples": len(encoded)}
    result.update(nlg_drift(model, encoded, collator, batch_size=batch_size))
    scored = {"alpaca": (str(drift_file), result)}
    for name, (path, fmt) in (retention or {}).items():
        encoded_set, _ = tokenize_instruct(_instruct_rows(path, fmt, drift_samples), tokenizer,
                                           max_length=experiment.data.max_length, template=template)
        scored[name] = (str(path), nlg_drift(model, encoded_set, collator, batch_size=batch_size))
    result["retention"] = {}
    for name, (path, figures) in scored.items():
        result["retention"][name] = {"file": path, "tokens": figures["tokens"]}
        result[f"{name}_nll"] = figures["nll_finetuned"]
        result[f"{name}_nll_pretrained"] = figures["nll_pretrained"]
        result[f"{name}_kl"] = figures["drift_kl"]
        result[f"{name}_nll_change"] = figures["nll_finetuned"] / figures["nll_pretrained"] - 1.0
    prompts = [render_prompt(i, x or None, template=template, tokenizer=tokenizer) + response_prefix(template)
               for i, x in zip(rows["instruction"][:generations], rows["input"][:generations], strict=True)]
    seed = training_seed(experiment)
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    with pretrained_view(model) as reference:
        pre_texts = sample_texts(reference, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    result.update({
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "pretrained_distinct_1": distinct_n(pre_texts, 1), "pretrained_distinct_2": distinct_n(pre_texts, 2),
        "samples": texts,
        "memorisation": None, "clean_fit": None,  # no labels to flip in instruction data
    })
    return result


# ------------------------------------------------------------------------------------------------ entry point


def diagnose_run(run_dir: str | Path, *, drift_file: str | Path | None = None, drift_samples: int = 64,
                 batch_size: int = 32, generations: int = 8, max_new_tokens: int = 48,
                 task_file: str | Path | None = None, mbpp_file: str | Path | None = None) -> dict[str, Any]:
    """Compute the diagnostics of a finished run and write them to RUN_DIR/diagnostics.json; returns them.

    NLG: `task_file` / `mbpp_file` name the retention sets (`retention_sets`); `drift_samples` rows of each."""
    run_dir = Path(run_dir)
    experiment, model, tokenizer = rundir.load_run(run_dir, reference=True)
    if experiment.is_nlg:
        if drift_file is None:
            if data_dir() is None:
                raise ConfigError("no bundled Alpaca demo data outside a source checkout; pass --drift-file")
            drift_file = data_dir() / "alpaca_demo" / "alpaca_en_demo.json"  # type: ignore[operator]
        sets = retention_sets(experiment, task_file=None if task_file is None else Path(task_file),
                              mbpp_file=None if mbpp_file is None else Path(mbpp_file))
        result = nlg_diagnostics(experiment, model, tokenizer, drift_file=Path(drift_file),
                                 drift_samples=drift_samples, batch_size=max(1, batch_size // 8),
                                 generations=generations, max_new_tokens=max_new_tokens, retention=sets)
    else:
        result = nlu_diagnostics(experiment, model, tokenizer, run_dir, batch_size)
    result["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / rundir.DIAGNOSTICS, result)
    return result
