"""The GPU check: bf16 training, the teacher's exactness in bf16, PiSSA init time and batched generation.

    python benchmarks/gpu_check.py --out DIR [--model smollm2-135m | --model DIR --random-weights] [--steps 40]
    python benchmarks/gpu_check.py --dry-run --out DIR     # a tiny random model on the CPU, seconds: checks the script

Sections (each timed; results in DIR/gpu_check.json and DIR/gpu_check.md, with the card named):
1. PiSSA init of every projection (exact and randomized niter 16), and the largest logit change it causes in bf16;
2. the teacher in bf16: its logits against the untouched model's, and bitwise unchanged after training moved the
   adapter;
3. `--steps` training steps each for pissa and balora (bf16 weights, bf16 autocast, batch 8 × 256 GSM8K tokens):
   median step time, peak GPU memory, every logged loss finite;
4. greedy batched generation on the first 50 GSM8K test problems (one batch of 50, 256 new tokens): time and accuracy.

`--random-weights` builds the model from DIR/config.json with random weights (the device machine cannot receive the
540 MB checkpoint): step time, memory and exactness are properties of the architecture; accuracy is then
meaningless and is reported as such. Needs torch, transformers, peft and balora only (no datasets, no gguf).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from balora import BALoRAConfig, BALoRATrainer, get_balora_model, pretrained_teacher
from balora.data.templates import render_prompt, response_prefix

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "data" / "gsm8k"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows(split: str, n: int) -> list[dict[str, str]]:
    rows = []
    with (GSM8K / f"{split}.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def _tiny_model_and_tokenizer() -> tuple[Any, Any]:
    """--dry-run: a 2-layer Llama and a word-level tokenizer trained on GSM8K rows (no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [render_prompt(r["question"]) + response_prefix() + r["answer"] for r in _rows("train", 64)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>",
                                                                                             "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    if args.dry_run:
        model, tokenizer = _tiny_model_and_tokenizer()
    elif args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        from balora.models import load_model

        model, tokenizer = load_model(args.model, task="nlg", dtype="float32", device="cpu")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def train_rows(tokenizer: Any, n: int, max_length: int) -> list[dict[str, list[int]]]:
    """GSM8K rows as prompt + answer + eos, loss on the answer only (what `balora train` builds)."""
    rows = []
    for r in _rows("train", n):
        prompt = tokenizer(render_prompt(r["question"]) + response_prefix())["input_ids"]
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def time_init(model: Any, device: torch.device, batch: dict[str, torch.Tensor]) -> tuple[list[dict], Any]:
    with torch.no_grad():
        reference = model(**batch).logits.float()
    rows, kept = [], None
    for name, niter in (("exact SVD", None), ("randomized niter 16", 16)):
        fresh = copy.deepcopy(model)
        _sync(device)
        start = time.perf_counter()
        wrapped = get_balora_model(fresh, BALoRAConfig(r=16, target_modules=TARGETS, svd_niter=niter))
        _sync(device)
        seconds = time.perf_counter() - start
        wrapped.eval()
        with torch.no_grad():
            change = (wrapped(**batch).logits.float() - reference).abs().max().item()
        rows.append({"init": name, "seconds": round(seconds, 3), "max_abs_logit_change": change})
        kept = kept or (wrapped, reference)
    return rows, kept


def teacher_check(peft_model: Any, reference: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    with pretrained_teacher(peft_model):
        before = peft_model(**batch).logits
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    for _ in range(3):
        with torch.autocast(reference.device.type, dtype=torch.bfloat16):
            peft_model(**batch).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        student = peft_model(**batch).logits.float()
    with pretrained_teacher(peft_model):
        after = peft_model(**batch).logits
    return {"teacher_vs_original_max_abs": (before.float() - reference).abs().max().item(),
            "original_max_abs_logit": reference.abs().max().item(),
            "teacher_bitwise_unchanged_after_training": bool(torch.equal(before, after)),
            "student_moved_max_abs": (student - reference).abs().max().item()}


class _StepTimer:
    """A TrainerCallback recording each optimizer step's wall time (device synchronised)."""

    def __new__(cls, device: torch.device) -> Any:
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
                _sync(device)
                self.start = time.perf_counter()

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                _sync(device)
                self.times.append(time.perf_counter() - self.start)

        return Timer()


def train_method(method: str, model: Any, rows: list[dict], args: argparse.Namespace, device: torch.device,
                 out: Path) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    peft_model = get_balora_model(copy.deepcopy(model), BALoRAConfig(method=method, r=16, target_modules=TARGETS,
                                                                      svd_niter=16))
    timer = _StepTimer(device)
    training = TrainingArguments(
        output_dir=str(out / f"train-{method}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0, bf16=device.type == "cuda" or args.dry_run,
        use_cpu=device.type == "cpu", dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(args.tokenizer, padding=True, label_pad_token_id=-100)
    trainer = BALoRATrainer(model=peft_model, args=training, train_dataset=rows, data_collator=collator,
                            callbacks=[timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "task_loss" in e]
    keys = ("loss", "task_loss", "consistency_loss", "diversity_loss", "svd_loss")
    values = [e[k] for e in logs for k in keys if k in e]
    steady = timer.times[1:] or timer.times  # the first step includes warm-up
    return {"method": method, "steps": len(timer.times), "median_step_s": statistics.median(steady),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "all_losses_finite": bool(values) and all(math.isfinite(v) for v in values),
            "first": {k: logs[0].get(k) for k in keys}, "last": {k: logs[-1].get(k) for k in keys}}


def generation(model: Any, tokenizer: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from balora.eval.tasks import evaluate_generation

    tokenizer.padding_side = "left"
    summary = evaluate_generation(model, tokenizer, "gsm8k", out_dir=out / "gsm8k", data_file=GSM8K / "test.jsonl",
                                  limit=args.problems, batch_size=args.problems, max_new_tokens=args.new_tokens,
                                  progress=False)
    keep = ("accuracy", "n", "total_s", "generation_s")
    return {k: v for k, v in summary.items() if k in keep or k.endswith("_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or folder (with --random-weights: "
                        "a folder holding config.json and the tokenizer)")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dry-run", action="store_true", help="tiny random model on the CPU, 2 steps, 2 problems")
    parser.add_argument("--prepare", type=Path, help="write SmolLM2's config and tokenizer (no weights) to this "
                        "folder, for --model FOLDER --random-weights on a machine that cannot receive the weights")
    args = parser.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    if args.dry_run:
        args.steps, args.batch, args.max_length, args.problems, args.new_tokens = 2, 2, 64, 2, 8
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to check the script on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load(args, device, torch.bfloat16)
    args.tokenizer = tokenizer
    import peft
    import transformers

    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "model": "tiny random Llama (dry run)" if args.dry_run else args.model + (" (random weights)"
                                                                                  if args.random_weights else ""),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tokenizer")},
    }
    rows = train_rows(tokenizer, args.batch * args.steps, args.max_length)
    batch = padded_batch(rows[:4], tokenizer, device)
    result["init"], (peft_model, reference) = time_init(model, device, batch)
    result["teacher_bf16"] = teacher_check(peft_model, reference, batch)
    del peft_model
    result["training"] = [train_method(m, model, rows, args, device, args.out) for m in ("pissa", "balora")]
    result["generation"] = generation(model, tokenizer, args, args.out)
    meaningless = args.random_weights or args.dry_run
    result["generation"]["note"] = "random weights: accuracy meaningless" if meaningless else ""
    result["total_s"] = round(time.perf_counter() - start, 1)
    result["ok"] = (all(t["all_losses_finite"] for t in result["training"])
                    and result["teacher_bf16"]["teacher_bitwise_unchanged_after_training"])
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu_check.md").write_text(report(result))
    print(report(result))
    if not result["ok"]:
        raise SystemExit("gpu_check: FAILED (non-finite loss or the teacher moved); see gpu_check.json")


def prepare(folder: Path) -> None:
    """Copy the bundled SmolLM2's config and tokenizer files (a few MB) into `folder`."""
    import shutil

    from balora.models import gguf_float32_copy, resolve_model_path

    path, gguf_file = resolve_model_path("smollm2-135m")
    source = gguf_float32_copy(path, gguf_file) if gguf_file else Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.suffix in (".json", ".jinja", ".txt", ".model") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, folder / item.name)
    print(f"gpu_check: wrote {sorted(p.name for p in folder.iterdir())} to {folder}")


def padded_batch(rows: list[dict], tokenizer: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """A right-padded batch of `rows`' inputs (no labels), on `device`."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def report(r: dict[str, Any]) -> str:
    lines = [f"# GPU check on {r['card']}", "", f"Model {r['model']}; {r['versions']}; total {r['total_s']} s; "
             f"ok: {r['ok']}", "", "| PiSSA init | s | max abs logit change (bf16) |", "|---|---|---|"]
    lines += [f"| {i['init']} | {i['seconds']:.2f} | {i['max_abs_logit_change']:.3g} |" for i in r["init"]]
    t = r["teacher_bf16"]
    lines += ["", f"Teacher in bf16: max |teacher − original| {t['teacher_vs_original_max_abs']:.3g} (logits up to "
              f"{t['original_max_abs_logit']:.3g}); bitwise unchanged after training: "
              f"{t['teacher_bitwise_unchanged_after_training']} (student moved {t['student_moved_max_abs']:.3g})", "",
              "| method | steps | median step (s) | peak memory (GiB) | losses finite | task loss first → last |",
              "|---|---|---|---|---|---|"]
    for m in r["training"]:
        memory = "—" if m["peak_memory_gib"] is None else f"{m['peak_memory_gib']:.2f}"
        lines.append(f"| {m['method']} | {m['steps']} | {m['median_step_s']:.3f} | {memory} | "
                     f"{m['all_losses_finite']} | {m['first']['task_loss']:.3f} → {m['last']['task_loss']:.3f} |")
    g = r["generation"]
    lines += ["", f"Generation (GSM8K, greedy, one batch): {json.dumps(g)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
