"""`BALoRAConfig`: the adapter and the loss settings of BA-LoRA, validated on creation.

Presets from the paper (arXiv 2408.04556, Section 4 and Appendix): NLU λ = (0.15, 0.03, 0.03), k = 5; NLG
λ = (0.025, 0.005, 0.005), k = 10, K = 20, T = 2. The NLG preset also turns on the weight schedules of the paper's
public training script (λ1 cosine-decays to 0.1·λ1; λ2 and λ3 are 0 for the first 20 % of steps, then ramp linearly
over 5 %).

Fields left as `None` are filled from the preset of the chosen `method` and task by `resolve()`, which
`get_balora_model` calls once the task (NLU or NLG) is known from the model class.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from balora.io import write_json_atomic

Method = Literal["lora", "pissa", "balora", "full"]
Task = Literal["nlu", "nlg"]
InitMethod = Literal["lora", "pissa", "olora", "corda"]
CordaMethod = Literal["ipm", "kpm"]
ConsistencySchedule = Literal["constant", "cosine"]
RegularizerSchedule = Literal["constant", "two_phase"]
SvdLossMethod = Literal["auto", "randomized", "exact", "hidden"]
LossImpl = Literal["fused", "reference"]
SvdInput = Literal["logits", "features"]
Preset = Literal["default", "paper"]
ConsistencyTarget = Literal["initial_head", "current_head", "features"]

CONFIG_NAME = "balora_config.json"

# (λ1, λ2, λ3, svd_top_k, consistency schedule, regularizer schedule): the paper's values.
PRESETS: dict[Task, tuple[float, float, float, int, ConsistencySchedule, RegularizerSchedule]] = {
    "nlu": (0.15, 0.03, 0.03, 5, "constant", "constant"),
    "nlg": (0.025, 0.005, 0.005, 10, "cosine", "two_phase"),
}
# NLU (consistency_target, svd_input) of each preset. "paper": the paper's literal reading (KL to the pre-trained
# model's logits through the initial head; SVD of the batch logits). "default": chosen by measurement
# (benchmarks/results/nlu_defaults.md).
NLU_PRESETS: dict[Preset, tuple[ConsistencyTarget, SvdInput]] = {
    "paper": ("initial_head", "logits"),
    "default": ("features", "features"),
}


@dataclass
class BALoRAConfig:
    """Settings of a BA-LoRA (or LoRA / PiSSA baseline) fine-tune. Every field has help text in its metadata."""

    preset: Preset = field(
        default="default",
        metadata={
            "help": "Where fields left unset come from: default (balora's NLU choices, measured: "
            "benchmarks/results/nlu_defaults.md) or paper (the paper's literal reading: NLU consistency to the "
            "initial head's logits, SVD on the logits). NLG is the same in both (the paper's public script)."
        },
    )
    method: Method = field(
        default="balora",
        metadata={
            "help": "lora: B=0 init, no regularizers; pissa: PiSSA init, no regularizers; balora: PiSSA + 3 terms; "
            "full: full fine-tuning baseline (no adapter: every weight trains, no regularizers; give "
            "BALoRATrainer the plain model)."
        },
    )
    task: Task | None = field(
        default=None,
        metadata={"help": "nlu (sequence classification/regression) or nlg (causal LM); None: from model."},
    )
    # -- adapter -------------------------------------------------------------------------------------------------
    r: int = field(default=8, metadata={"help": "Adapter rank r."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; scaling = alpha / r. None: alpha = r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (off in the teacher)."})
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={
            "help": "Module names (suffixes) or a regex to adapt; 'all-linear' = every Linear/Conv1D but the head."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full (a sequence-classification head is added)."}
    )
    init: InitMethod | None = field(
        default=None,
        metadata={"help": "Adapter init: lora (B = 0), pissa (top-r SVD), olora (QR, PEFT's) or corda (PEFT's "
                  "context-oriented SVD, calibrated on training rows). None: from method."},
    )
    corda_method: CordaMethod = field(
        default="ipm",
        metadata={"help": "init corda: ipm (instruction-previewed: the adapter takes the directions the training data "
                  "excites most) or kpm (knowledge-preserved: the least, leaving the rest frozen)."},
    )
    corda_samples: int = field(
        default=256, metadata={"help": "init corda: training rows run through the model for the covariance."}
    )
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA (PEFT's use_dora): a trained magnitude per output, direction by LoRA."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA scaling alpha / sqrt(r) instead of alpha / r."})
    init_niter: int | None = field(
        default=None,
        metadata={"help": "PiSSA init: None = exact SVD; an int = randomized SVD with that many power iterations."},
    )
    init_oversample: int = field(default=8, metadata={"help": "PiSSA randomized init: extra sketch columns."})
    seed: int = field(default=0, metadata={"help": "Seed of the randomized PiSSA init."})
    init_cache: str | None = field(
        default=None,
        metadata={
            "help": "PiSSA init cache: null = run the SVD every time; 'auto' = the balora cache folder "
            "($BALORA_CACHE/pissa_init); or a folder. Keyed by the target weights' content and every init setting."
        },
    )
    # -- loss ----------------------------------------------------------------------------------------------------
    consistency_weight: float | None = field(default=None, metadata={"help": "λ1: weight of the consistency term."})
    diversity_weight: float | None = field(default=None, metadata={"help": "λ2: weight of the diversity term."})
    svd_weight: float | None = field(default=None, metadata={"help": "λ3: weight of the SVD term."})
    temperature: float = field(default=2.0, metadata={"help": "T: softmax temperature of the consistency KL."})
    svd_top_k: int | None = field(default=None, metadata={"help": "k: singular values the SVD term concentrates on."})
    entropy_top_k: int = field(default=20, metadata={"help": "K: candidate tokens of the NLG diversity entropy."})
    svd_oversample: int = field(
        default=20,
        metadata={
            "help": "NLG randomized SVD term: sketch size q = k + this (paper: 5; 20 makes the explicit gradient's "
            "cosine to the exact one >= 0.999 on a decaying spectrum, see benchmarks/results/losses.md)."
        },
    )
    svd_loss_niter: int = field(default=2, metadata={"help": "NLG randomized SVD term: power iterations."})
    svd_method: SvdLossMethod = field(
        default="auto",
        metadata={
            "help": "NLG SVD term: randomized (paper), exact on the logits, hidden (exact from the final hidden "
            "states; needs a frozen bias-free head), or auto (hidden where the head allows it, else randomized)."
        },
    )
    svd_input: SvdInput | None = field(
        default=None,
        metadata={
            "help": "NLU SVD term on: logits (paper) or features (the batch's inputs to the classifier's last "
            "Linear, i.e. the pooled features; k = svd_top_k then means something on a 2-class task). "
            "None: from the preset."
        },
    )
    consistency_target: ConsistencyTarget | None = field(
        default=None,
        metadata={
            "help": "NLU consistency term against: initial_head (the pre-trained model's logits, paper), "
            "current_head (the current head on the pre-trained features, detached) or features (1 - cosine of "
            "the pooled features to the pre-trained ones). None: from the preset. Regression refuses "
            "initial_head (it pulls every prediction toward the initial head's output)."
        },
    )
    loss_impl: LossImpl = field(
        default="fused",
        metadata={
            "help": "NLG: fused (one chunked pass, closed-form gradients) or reference (the plain functions of "
            "balora.losses, autograd)."
        },
    )
    consistency_schedule: ConsistencySchedule | None = field(
        default=None, metadata={"help": "λ1 over training: constant or cosine decay to final ratio. None: preset."}
    )
    consistency_final_ratio: float = field(default=0.1, metadata={"help": "Cosine schedule: final λ1 / λ1."})
    regularizer_schedule: RegularizerSchedule | None = field(
        default=None, metadata={"help": "λ2, λ3 over training: constant or two_phase (off, then linear ramp)."}
    )
    regularizer_start: float = field(default=0.2, metadata={"help": "two_phase: fraction of steps with λ2 = λ3 = 0."})
    regularizer_ramp: float = field(
        default=0.05, metadata={"help": "two_phase: fraction of steps of the linear ramp."}
    )

    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "NLU: learning rate of the fully trained classification head (a fresh layer usually wants a "
            "larger one than the adapters); None: training.learning_rate."
        },
    )
    teacher_cache: bool = field(
        default=False,
        metadata={
            "help": "NLU: keep each training row's teacher logits after its first forward and reuse them in later "
            "epochs (keyed by the row's token ids, so changed data or tokenizer never hits a stale entry)."
        },
    )

    svd_niter: int | None = field(
        default=None, metadata={"help": "Deprecated: the old name of init_niter (read into it, with a warning)."}
    )

    def __post_init__(self) -> None:
        _check_choice("method", self.method, ("lora", "pissa", "balora", "full"))
        if self.method == "full" and self.init is not None:
            raise ValueError("method='full' trains the weights themselves: there is no adapter to initialise; "
                             "remove init")
        if self.task is not None:
            _check_choice("task", self.task, ("nlu", "nlg"))
        if self.init is not None:
            _check_choice("init", self.init, ("lora", "pissa", "olora", "corda"))
        _check_choice("corda_method", self.corda_method, ("ipm", "kpm"))
        _check_int("corda_samples", self.corda_samples, 1)
        _check_choice("svd_method", self.svd_method, ("auto", "randomized", "exact", "hidden"))
        _check_choice("loss_impl", self.loss_impl, ("fused", "reference"))
        _check_choice("preset", self.preset, ("default", "paper"))
        if self.svd_input is not None:
            _check_choice("svd_input", self.svd_input, ("logits", "features"))
        if self.consistency_target is not None:
            _check_choice("consistency_target", self.consistency_target, ("initial_head", "current_head", "features"))
        if self.task == "nlg" and self.consistency_target not in (None, "initial_head"):
            raise ValueError(
                f"consistency_target={self.consistency_target!r} is for NLU; the NLG consistency term compares "
                "token distributions with the pre-trained model's. Leave it unset"
            )
        if self.svd_input == "features" and self.task == "nlg":
            raise ValueError(_FEATURES_NLG)
        if self.consistency_schedule is not None:
            _check_choice("consistency_schedule", self.consistency_schedule, ("constant", "cosine"))
        if self.regularizer_schedule is not None:
            _check_choice("regularizer_schedule", self.regularizer_schedule, ("constant", "two_phase"))
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError(
                "target_modules is empty; name the modules to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'"
            )
        if self.init_cache is not None and (not isinstance(self.init_cache, str) or not self.init_cache.strip()):
            raise ValueError(f"init_cache must be null, 'auto' or a folder path; got {self.init_cache!r}")
        _check_int("r", self.r, 1)
        _check_int("init_oversample", self.init_oversample, 0)
        _check_int("entropy_top_k", self.entropy_top_k, 1)
        _check_int("svd_oversample", self.svd_oversample, 0)
        _check_int("svd_loss_niter", self.svd_loss_niter, 0)
        if self.svd_niter is not None:  # the old name of init_niter (the loss's is svd_loss_niter)
            if self.init_niter is not None and self.init_niter != self.svd_niter:
                raise ValueError(f"svd_niter={self.svd_niter!r} and init_niter={self.init_niter!r} disagree; "
                                 "svd_niter is the old name of init_niter: keep init_niter only")
            warnings.warn("BALoRAConfig.svd_niter is renamed init_niter (the PiSSA init's power iterations); "
                          "svd_niter will be removed", FutureWarning, stacklevel=3)
            self.init_niter, self.svd_niter = self.svd_niter, None
        if self.init_niter is not None:
            _check_int("init_niter", self.init_niter, 0)
        if self.svd_top_k is not None:
            _check_int("svd_top_k", self.svd_top_k, 1)
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        for name in ("consistency_weight", "diversity_weight", "svd_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0 (0 turns the term off); got {value!r}")
        if self.head_learning_rate is not None and not (
            math.isfinite(self.head_learning_rate) and self.head_learning_rate > 0
        ):
            raise ValueError(f"head_learning_rate must be > 0 or None; got {self.head_learning_rate!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0; got {self.temperature!r}")
        for name in ("consistency_final_ratio", "regularizer_start", "regularizer_ramp"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
        if self.teacher_cache and self.task == "nlg":
            raise ValueError(
                "teacher_cache is for NLU only (NLG teacher logits are (T, V) per row, too large to keep); "
                "set it false"
            )
        if self.method != "balora" and any(
            getattr(self, n) for n in ("consistency_weight", "diversity_weight", "svd_weight")
        ):
            raise ValueError(
                f"method={self.method!r} trains without regularizers, but a regularizer weight is set; use "
                "method='balora' (and init='lora' for an ablation on a LoRA-initialised adapter)"
            )

    # ------------------------------------------------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return float(self.r if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def resolve(self, task: Task) -> BALoRAConfig:
        """A copy with the task set and every `None` filled from the method's preset for that task."""
        if self.task is not None and self.task != task:
            raise ValueError(f"config says task={self.task!r} but the model is a {task!r} model")
        if self.svd_input == "features" and task == "nlg":
            raise ValueError(_FEATURES_NLG)
        if task == "nlg" and self.consistency_target not in (None, "initial_head"):
            raise ValueError(f"consistency_target={self.consistency_target!r} is for NLU models; leave it unset")
        l1, l2, l3, k, c_sched, r_sched = PRESETS[task]
        target, svd_input = NLU_PRESETS[self.preset] if task == "nlu" else ("initial_head", "logits")
        on = self.method == "balora"

        def pick(value: Any, preset: Any) -> Any:
            return preset if value is None else value

        return dataclasses.replace(
            self,
            task=task,
            init=None if self.method == "full" else pick(self.init, "lora" if self.method == "lora" else "pissa"),
            consistency_weight=pick(self.consistency_weight, l1 if on else 0.0),
            diversity_weight=pick(self.diversity_weight, l2 if on else 0.0),
            svd_weight=pick(self.svd_weight, l3 if on else 0.0),
            svd_top_k=pick(self.svd_top_k, k),
            consistency_schedule=pick(self.consistency_schedule, c_sched),
            regularizer_schedule=pick(self.regularizer_schedule, r_sched),
            consistency_target=pick(self.consistency_target, target),
            svd_input=pick(self.svd_input, svd_input),
        )

    def weights_at(self, progress: float) -> tuple[float, float, float]:
        """(λ1, λ2, λ3) at `progress` = step / total steps in [0, 1], following the schedules."""
        if self.consistency_weight is None or self.diversity_weight is None or self.svd_weight is None:
            raise ValueError("call resolve(task) before weights_at(): the loss weights are not set yet")
        p = min(max(progress, 0.0), 1.0)
        l1 = self.consistency_weight
        if self.consistency_schedule == "cosine":
            floor = self.consistency_final_ratio * l1
            l1 = floor + (l1 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
        ramp = 1.0
        if self.regularizer_schedule == "two_phase":
            if p < self.regularizer_start:
                ramp = 0.0
            elif self.regularizer_ramp > 0:
                ramp = min(1.0, (p - self.regularizer_start) / self.regularizer_ramp)
        return l1, self.diversity_weight * ramp, self.svd_weight * ramp

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        del values["svd_niter"]  # deprecated, always None once read into init_niter
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BALoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BALoRAConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def save(self, directory: str | Path, **extra: Any) -> Path:
        """Write `balora_config.json`; `extra` keys are stored with a leading underscore and ignored by `load`."""
        path = Path(directory) / CONFIG_NAME
        write_json_atomic(path, {**self.to_dict(), **{f"_{k}": v for k, v in extra.items()}})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> BALoRAConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; is this a balora run or adapter directory?")
        values = json.loads(path.read_text())
        return cls.from_dict({k: v for k, v in values.items() if not k.startswith("_")})


_FEATURES_NLG = (
    "svd_input='features' is for NLU (sequence classification); the NLG SVD term acts on the logits, and "
    "svd_method='hidden' already computes it exactly from the final hidden states. Set svd_input='logits'"
)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}; got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
