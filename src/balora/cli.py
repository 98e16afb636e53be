"""The `balora` command (also `python -m balora ...`): argparse lives here, and only here; every command below it
takes typed arguments and returns data, which this module prints.

    balora train CONFIG.yaml [--resume | --overwrite] [--section.key value ...]
    balora eval CONFIG.yaml | --run RUN_DIR [--task gsm8k|math|mbpp|humaneval|perplexity] [--samples FILE]
    balora export RUN_DIR --to lora|merged OUT
    balora compare CONFIG.yaml --methods lora,pissa,balora --seeds 3 [--label-noise 0,0.2,0.4]
    balora diagnose RUN_DIR
    balora demo [--output-dir DIR] [--overwrite]

Errors in the input (a bad config key or value, a malformed or missing data file, a missing model, an output folder
that is taken) print one message naming the problem and the fix, and exit 2; a failure while running exits 1;
Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from balora.io import REPO_ROOT

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _input_errors() -> tuple[type[BaseException], ...]:
    from balora.eval.isolation import IsolationUnavailable
    from balora.experiment import ConfigError
    from balora.io import DataError
    from balora.models import ModelLoadError

    return (ConfigError, DataError, ModelLoadError, IsolationUnavailable)


def build_parser() -> argparse.ArgumentParser:
    from balora.compare import METHODS
    from balora.eval.problems import TASKS
    from balora.experiment import help_text

    benchmarks = tuple(TASKS)  # the CLI's choices are the registries' keys
    generation = tuple(name for name, spec in TASKS.items() if spec.kind != "perplexity")
    parser = argparse.ArgumentParser(prog="balora", description="BA-LoRA fine-tuning for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="fine-tune from a YAML experiment", epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="balora train CONFIG.yaml [--resume | --overwrite] [--section.key value ...]",
    )
    train.add_argument("config", help="experiment YAML file (see configs/)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="delete the run already in output_dir, then train "
                       "(without it a non-empty output_dir is refused)")

    ev = sub.add_parser("eval", help="evaluate a run, a base model, or completions made elsewhere")
    ev.add_argument("config", nargs="?", help="experiment YAML (evaluates the base model, no adapter)")
    ev.add_argument("--run", help="a run directory written by `balora train` (base model + its adapter)")
    ev.add_argument("--task", choices=benchmarks, help="NLG benchmark; default: the config's validation split")
    ev.add_argument("--samples", help="score this JSONL of completions (task_id, completion); loads no model")
    ev.add_argument("--data-file", help="benchmark data file (default: the bundled copy where there is one)")
    ev.add_argument("--limit", type=int, help="evaluate the first N problems only")
    ev.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    ev.add_argument("--max-new-tokens", type=int, default=512, help="generation length (default 512)")
    ev.add_argument("--n-samples", type=int, default=1, help="samples per problem for pass@k (default 1: greedy)")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature when --n-samples > 1")
    ev.add_argument("--output-dir", help="where to write results (default: RUN_DIR/eval-TASK or eval-TASK)")
    ev.add_argument("--isolation", choices=("auto", "strict", "off"), default="auto",
                    help="code tasks: run generated code in Linux namespaces (bubblewrap); auto falls back to the "
                    "in-process guards with a warning, strict refuses without namespaces (default auto)")

    ex = sub.add_parser("export", help="export a run's adapter as plain LoRA or as a merged model")
    ex.add_argument("run_dir", help="a run directory written by `balora train`")
    ex.add_argument("--to", choices=("lora", "merged"), required=True, help="lora: PEFT adapter on the original "
                    "base (rank 2r for PiSSA); merged: a full model with the adapter merged in")
    ex.add_argument("out", help="output folder (missing or empty)")

    cmp = sub.add_parser(
        "compare", help="methods × seeds × label noise from one experiment, with diagnostics (resumable)",
        usage="balora compare CONFIG.yaml --methods lora,pissa,balora --seeds 3 [--label-noise 0,0.2,0.4] "
              "[--output-dir DIR] [--section.key value ...]",
    )
    cmp.add_argument("config", help="experiment YAML file (see configs/compare/)")
    cmp.add_argument("--methods", default="lora,pissa,balora", help=f"comma list of {', '.join(METHODS)} "
                     "(balora-nosvd: balora without the SVD term; balora-featsvd, NLU: the SVD term on the pooled "
                     "features; full: full fine-tuning); default lora,pissa,balora")
    cmp.add_argument("--full-learning-rate", type=float, help="learning rate of the `full` runs only (full "
                     "fine-tuning usually needs a 10-100x smaller one); default: the experiment's")
    cmp.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a comma list of seeds (default 3)")
    cmp.add_argument("--label-noise", default="0", help="comma list of label-noise rates (default 0)")
    cmp.add_argument("--output-dir", help="where runs and comparison.{md,json,png} go (default: the config's)")
    cmp.add_argument("--eval-task", choices=generation, help="NLG: benchmark scored after each run")
    cmp.add_argument("--eval-limit", type=int, help="NLG: first N benchmark problems only")
    cmp.add_argument("--eval-max-new-tokens", type=int, help="NLG: generation length (default: the task's)")
    cmp.add_argument("--drift-samples", type=int, default=64, help="NLG: rows of each drift / retention set (Alpaca, "
                     "the task's test references, MBPP; default 64)")
    cmp.add_argument("--diagnose-generations", type=int, default=8, help="NLG: sampled completions per run for "
                     "distinct-n (default 8; 0 skips sampling)")
    cmp.add_argument("--class-imbalance", help="comma list of minority-class shares, e.g. 0.1,0.05: the least "
                     "frequent class is subsampled to that share of the training rows (validation untouched)")
    cmp.add_argument("--learning-rates", help="comma list, e.g. 1e-4,3e-4,1e-3: choose each method's rate on "
                     "--dev-rows rows held out of the training rows (seed = the first seed), then run the seeds at it")
    cmp.add_argument("--dev-rows", type=int, help="training rows held out for --learning-rates (never the "
                     "validation set)")
    cmp.add_argument("--rates-from", help="reuse the learning rates another comparison chose (its comparison.json)")
    cmp.add_argument("--sweep", help="balora.KEY=v1,v2,...: extra runs of --sweep-method with that key set to each "
                     "value (e.g. balora.consistency_weight=0,0.1,0.4), and a trade-off plot (tradeoff.png)")
    cmp.add_argument("--sweep-method", default="balora", help="the method the sweep varies (default balora)")

    dg = sub.add_parser("diagnose", help="knowledge drift, representation collapse and noise memorisation of a run")
    dg.add_argument("run_dir", help="a run directory written by `balora train`")
    dg.add_argument("--drift-file", help="NLG: general instruction data for the drift (default: Alpaca demo data)")
    dg.add_argument("--drift-samples", type=int, default=64, help="NLG: rows of the drift data and of each retention "
                    "set (default 64)")
    dg.add_argument("--task-file", help="NLG: the task's test references for task_nll (default: data.validation_file, "
                    "or the bundled GSM8K test for GSM8K training data)")
    dg.add_argument("--mbpp-file", help="NLG: MBPP rows for mbpp_nll / mbpp_kl (default: the bundled copy)")
    dg.add_argument("--batch-size", type=int, default=32, help="forward batch size (default 32)")

    demo = sub.add_parser("demo", help="offline demo: PiSSA vs BA-LoRA on MiniLM + SST-2 (a few minutes on a CPU)")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="demo experiment (default configs/demo.yaml)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the two runs and plots go")
    demo.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier demo there")
    return parser


_INTERRUPTED = {
    "train": "with a checkpoint written, run the same command with --resume to continue from it (a run without one "
             "leaves nothing behind)",
    "compare": "run the same command again: finished runs are kept, the unfinished one is redone",
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "compare"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    commands = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "compare": cmd_compare,
                "diagnose": cmd_diagnose, "demo": cmd_demo}
    try:
        return commands[args.command](args, rest, argv)
    except KeyboardInterrupt:
        hint = _INTERRUPTED.get(args.command, "nothing was written for the unfinished step")
        print(f"\nbalora: interrupted; {hint}", file=sys.stderr)
        return 130
    except _input_errors() as error:
        print(f"balora: error: {error}", file=sys.stderr)
        return 2


def cmd_train(args: argparse.Namespace, overrides: list[str], argv: Any = None) -> int:
    import yaml

    from balora.experiment import load_experiment
    from balora.train import train_experiment

    experiment, _ = load_experiment(args.config, overrides)
    print("# resolved experiment\n" + yaml.safe_dump(experiment.to_dict(), sort_keys=False), flush=True)
    result = train_experiment(experiment, resume=args.resume, overwrite=args.overwrite)
    print(f"balora: done. {_headline(result.metrics)}; run written to {result.run_dir}")
    return 0


def _headline(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if k.startswith("eval_") and k.split("_", 1)[1] not in
             ("runtime", "samples_per_second", "steps_per_second")}
    return ", ".join(f"{k} = {v:.4f}" for k, v in shown.items()) or "no validation split"


def cmd_eval(args: argparse.Namespace, rest: Any = None, argv: Any = None) -> int:
    from balora.evaluate import evaluate, score_completions
    from balora.experiment import ConfigError

    if args.samples:
        if not args.task or args.task == "perplexity":
            raise ConfigError("--samples needs --task gsm8k, math, mbpp or humaneval (the benchmark they answer)")
        result = score_completions(args.task, args.samples, data_file=args.data_file, output_dir=args.output_dir,
                                   isolation=args.isolation)
    else:
        result = evaluate(run=args.run, config=args.config, task=args.task, data_file=args.data_file,
                          limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          n_samples=args.n_samples, temperature=args.temperature, output_dir=args.output_dir,
                          isolation=args.isolation)
    if args.task:
        keys = [k for k in result.figures if k.startswith(("accuracy", "pass@", "perplexity"))]
        shown = ", ".join(f"{k} = {result.figures[k]:.4f}" for k in keys)
        print(f"balora: {args.task}: {shown}; results in {result.out_dir}")
    else:
        shown = ", ".join(f"{k} = {v:.4f}" for k, v in result.figures.items()
                          if isinstance(v, float) and "runtime" not in k and "per_second" not in k)
        print(f"balora: {shown}; metrics in {result.out_dir / 'metrics.json'}")
    return 0


def cmd_export(args: argparse.Namespace, rest: Any = None, argv: Any = None) -> int:
    from balora.rundir import export_run

    out = export_run(args.run_dir, args.to, args.out)
    print(f"balora: exported {args.to} to {out}")
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[str], argv: list[str] | None) -> int:
    from balora.compare import (
        compare,
        parse_imbalance,
        parse_methods,
        parse_noise,
        parse_rates,
        parse_seeds,
        parse_sweep,
    )
    from balora.diagnose import diagnose_run
    from balora.train import train_experiment

    words = sys.argv[1:] if argv is None else argv
    result = compare(
        args.config, train=train_experiment, diagnose=diagnose_run, methods=parse_methods(args.methods),
        seeds=parse_seeds(args.seeds), noises=parse_noise(args.label_noise), output_dir=args.output_dir,
        overrides=overrides, eval_task=args.eval_task, eval_limit=args.eval_limit,
        eval_max_new_tokens=args.eval_max_new_tokens, diagnose_options={"drift_samples": args.drift_samples,
                                                             "generations": args.diagnose_generations},
        command=" ".join(["balora", *words]), full_learning_rate=args.full_learning_rate,
        imbalances=parse_imbalance(args.class_imbalance),
        learning_rates=None if args.learning_rates is None else parse_rates(args.learning_rates, "--learning-rates"),
        dev_rows=args.dev_rows, sweep=parse_sweep(args.sweep, args.sweep_method) if args.sweep else (),
        rates_from=args.rates_from,
    )
    print(f"balora: compared {len(result['runs'])} runs; comparison.md, .json and .png in {result['output_dir']}")
    return 0


def cmd_diagnose(args: argparse.Namespace, rest: Any = None, argv: Any = None) -> int:
    from balora.diagnose import diagnose_run
    from balora.rundir import DIAGNOSTICS

    result = diagnose_run(args.run_dir, drift_file=args.drift_file, drift_samples=args.drift_samples,
                          batch_size=args.batch_size, task_file=args.task_file, mbpp_file=args.mbpp_file)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    print(f"balora: diagnostics written to {args.run_dir}/{DIAGNOSTICS}")
    return 0


def cmd_demo(args: argparse.Namespace, rest: Any = None, argv: Any = None) -> int:
    from pathlib import Path

    from balora.demo import run_demo
    from balora.train import train_experiment

    run_demo(Path(args.config), Path(args.output_dir), train=train_experiment, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
