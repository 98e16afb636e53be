"""The `balora` command: train, eval, export and demo (also `python -m balora ...`).

    balora train CONFIG.yaml [--resume] [--section.key value ...]
    balora eval CONFIG.yaml | --run RUN_DIR [--task gsm8k|math|mbpp|humaneval|perplexity] [--samples FILE]
    balora export RUN_DIR --to lora|merged OUT
    balora demo [--output-dir DIR]

Errors in the input (a bad config key, a malformed data row, a missing model) print one clear message and exit 2;
a failure while running exits 1; Ctrl-C exits 130 and a training run continues with --resume.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
GENERATION_TASKS = ("gsm8k", "math", "mbpp", "humaneval", "perplexity")


def _input_errors() -> tuple[type[BaseException], ...]:
    from balora.data.records import DataError
    from balora.experiment import ConfigError
    from balora.models import ModelLoadError

    return (ConfigError, DataError, ModelLoadError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    from balora.experiment import help_text

    parser = argparse.ArgumentParser(prog="balora", description="BA-LoRA fine-tuning for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="fine-tune from a YAML experiment", epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="balora train CONFIG.yaml [--resume] [--section.key value ...]",
    )
    train.add_argument("config", help="experiment YAML file (see configs/)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")

    ev = sub.add_parser("eval", help="evaluate a run, a base model, or completions made elsewhere")
    ev.add_argument("config", nargs="?", help="experiment YAML (evaluates the base model, no adapter)")
    ev.add_argument("--run", help="a run directory written by `balora train` (base model + its adapter)")
    ev.add_argument("--task", choices=GENERATION_TASKS, help="NLG benchmark; default: the config's validation split")
    ev.add_argument("--samples", help="score this JSONL of completions (task_id, completion); loads no model")
    ev.add_argument("--data-file", help="benchmark data file (default: the bundled copy where there is one)")
    ev.add_argument("--limit", type=int, help="evaluate the first N problems only")
    ev.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    ev.add_argument("--max-new-tokens", type=int, default=512, help="generation length (default 512)")
    ev.add_argument("--n-samples", type=int, default=1, help="samples per problem for pass@k (default 1: greedy)")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature when --n-samples > 1")
    ev.add_argument("--output-dir", help="where to write results (default: RUN_DIR/eval-TASK or eval-TASK)")

    ex = sub.add_parser("export", help="export a run's adapter as plain LoRA or as a merged model")
    ex.add_argument("run_dir", help="a run directory written by `balora train`")
    ex.add_argument("--to", choices=("lora", "merged"), required=True, help="lora: PEFT adapter on the original "
                    "base (rank 2r for PiSSA); merged: a full model with the adapter merged in")
    ex.add_argument("out", help="output folder")

    cmp = sub.add_parser(
        "compare", help="methods × seeds × label noise from one experiment, with diagnostics (resumable)",
        usage="balora compare CONFIG.yaml --methods lora,pissa,balora --seeds 3 [--label-noise 0,0.2,0.4] "
              "[--output-dir DIR] [--section.key value ...]",
    )
    cmp.add_argument("config", help="experiment YAML file (see configs/compare/)")
    cmp.add_argument("--methods", default="lora,pissa,balora", help="comma list of lora, pissa, balora, "
                     "balora-nosvd (balora without the SVD term), balora-featsvd (NLU: the SVD term on the pooled "
                     "features), full (full fine-tuning), dora, rslora, olora (PEFT's variants, no regularizers) and "
                     "balora+dora, balora+rslora, balora+olora; default lora,pissa,balora")
    cmp.add_argument("--full-learning-rate", type=float, help="learning rate of the `full` runs only (full "
                     "fine-tuning usually needs a 10-100x smaller one); default: the experiment's")
    cmp.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a comma list of seeds (default 3)")
    cmp.add_argument("--label-noise", default="0", help="comma list of label-noise rates (default 0)")
    cmp.add_argument("--output-dir", help="where runs and comparison.{md,json,png} go (default: the config's)")
    cmp.add_argument("--eval-task", choices=GENERATION_TASKS[:-1], help="NLG: benchmark scored after each run")
    cmp.add_argument("--eval-limit", type=int, help="NLG: first N benchmark problems only")
    cmp.add_argument("--eval-max-new-tokens", type=int, help="NLG: generation length (default: the task's)")
    cmp.add_argument("--drift-samples", type=int, default=64, help="NLG: Alpaca rows for the drift (default 64)")

    dg = sub.add_parser("diagnose", help="knowledge drift, representation collapse and noise memorisation of a run")
    dg.add_argument("run_dir", help="a run directory written by `balora train`")
    dg.add_argument("--drift-file", help="NLG: general instruction data for the drift (default: Alpaca demo data)")
    dg.add_argument("--drift-samples", type=int, default=64, help="NLG: rows of the drift data (default 64)")
    dg.add_argument("--batch-size", type=int, default=32, help="forward batch size (default 32)")

    demo = sub.add_parser("demo", help="offline demo: PiSSA vs BA-LoRA on MiniLM + SST-2 (a few minutes on a CPU)")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="demo experiment (default configs/demo.yaml)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the two runs and plots go")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "compare"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "train":
            return cmd_train(args, rest)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "compare":
            return cmd_compare(args, rest, argv)
        if args.command == "diagnose":
            return cmd_diagnose(args)
        return cmd_demo(args)
    except KeyboardInterrupt:
        hint = {
            "train": "run the same command with --resume to continue from the last checkpoint",
            "compare": "run the same command again: finished runs are kept, the unfinished one is redone",
        }.get(args.command, "nothing was written for the unfinished step")
        print(f"\nbalora: interrupted; {hint}", file=sys.stderr)
        return 130
    except _input_errors() as error:
        print(f"balora: error: {error}", file=sys.stderr)
        return 2


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    import yaml

    from balora.experiment import load_experiment
    from balora.run import train_experiment

    experiment, _ = load_experiment(args.config, overrides)
    print("# resolved experiment\n" + yaml.safe_dump(experiment.to_dict(), sort_keys=False), flush=True)
    result = train_experiment(experiment, resume=args.resume)
    print(f"balora: done. {_headline(result['metrics'])}; run written to {result['run_dir']}")
    return 0


def _headline(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if k.startswith("eval_") and k.split("_", 1)[1] not in
             ("runtime", "samples_per_second", "steps_per_second")}
    return ", ".join(f"{k} = {v:.4f}" for k, v in shown.items()) or "no validation split"


def cmd_eval(args: argparse.Namespace) -> int:
    from balora.evaluate import evaluate_command

    result = evaluate_command(args)
    print(f"balora: {result}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from balora.evaluate import export_run

    out = export_run(Path(args.run_dir), args.to, Path(args.out))
    print(f"balora: exported {args.to} to {out}")
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[str], argv: list[str] | None) -> int:
    from balora.compare import compare, parse_methods, parse_noise, parse_seeds

    words = sys.argv[1:] if argv is None else argv
    result = compare(
        args.config, methods=parse_methods(args.methods), seeds=parse_seeds(args.seeds),
        noises=parse_noise(args.label_noise), output_dir=args.output_dir, overrides=overrides,
        eval_task=args.eval_task, eval_limit=args.eval_limit, eval_max_new_tokens=args.eval_max_new_tokens,
        diagnose_options={"drift_samples": args.drift_samples}, command=" ".join(["balora", *words]),
        full_learning_rate=args.full_learning_rate,
    )
    print(f"balora: compared {len(result['runs'])} runs; comparison.md, .json and .png in {result['output_dir']}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import json

    from balora.diagnose import diagnose_run

    result = diagnose_run(Path(args.run_dir), drift_file=args.drift_file, drift_samples=args.drift_samples,
                          batch_size=args.batch_size)
    shown = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(shown, indent=1))
    print(f"balora: diagnostics written to {Path(args.run_dir) / 'diagnostics.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from balora.demo import run_demo

    run_demo(Path(args.config), Path(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
