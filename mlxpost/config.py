"""Typed run configuration: defaults < recipe YAML < command line.

A run is described by one :class:`RunConfig` made of sections (``model``,
``lora``, ``data``, ``train``, ``output``, ``sample``, and those its method
declares, e.g. ``dpo`` and ``preference``). Recipes are YAML files with the
same nesting; ``--set section.key=value`` overrides any field. Unknown keys
and wrongly typed values are errors that name the key (and, for recipes, the
file and line)::

    recipes/x.yaml:7: train.lr: expected a number, got 'fast'
    --set lora.rnk=8: unknown key 'lora.rnk' (did you mean 'lora.rank'?)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, MlxpostError
from .methods import METHODS
from .methods import get as get_method
from .methods.base import Method, check_choice, check_fraction, check_non_negative, check_positive
from .steer.vectors import META_FILE, parse_steer


@dataclass
class ModelConfig:
    path: str = "default"  # HF repo id, local HF directory, .gguf file, or "default" (SmolLM2-135M-Instruct)
    revision: str | None = None
    dtype: str = "auto"  # auto: float32 on MLX's CPU backend, else bfloat16
    quantize: int | None = None  # 4 or 8: quantize the block linears after loading (QLoRA)
    quantize_group_size: int = 64
    trust_remote_code: bool = False


@dataclass
class LoRAConfig:
    type: str = "lora"  # lora | dora
    rank: int = 8
    alpha: float | None = None  # scale = alpha / rank; default alpha = 2 * rank
    scale: float | None = None  # mlx-lm's convention; give alpha or scale, not both
    dropout: float = 0.0
    targets: Any = "all-linear"  # all-linear | attention | mlp | [names]
    num_layers: int = -1  # adapt the last N blocks; -1 = all
    init: str | None = None  # start from this adapter directory (mlx-lm or PEFT layout)

    def resolved_scale(self) -> float:
        if self.scale is not None and self.alpha is not None:
            raise ConfigError("lora: give alpha or scale, not both")
        if self.scale is not None:
            return float(self.scale)
        alpha = self.alpha if self.alpha is not None else 2.0 * self.rank
        return float(alpha) / self.rank


@dataclass
class DataConfig:
    path: str | None = None  # .jsonl file or directory with train.jsonl / valid.jsonl; None = bundled example
    valid: str | None = None  # separate validation file
    valid_fraction: float = 0.05  # held out of train when no validation file exists (0 = none)
    max_seq_len: int = 1024
    overflow: str = "truncate"  # truncate | drop
    skip_bad_rows: bool = False
    chat_template: str = "auto"  # auto | none (plain text for prompt/completion rows)
    add_eos: bool = True
    batching: str = "auto"  # auto | pack | pad
    pack_len: int | None = None  # tokens per packed row; None: the longest example (rounded up to 32)
    max_examples: int | None = None  # use only the first N training examples


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; None: derived from epochs
    epochs: float = 1.0
    batch_size: int = 4  # rows per micro-batch (pad: examples; pack: packed rows)
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    bias_correction: bool = True  # MLX's Adam defaults to False; we say it explicitly
    max_grad_norm: float | None = 1.0
    seed: int = 0
    grad_checkpoint: bool = False
    split_rows: bool = False  # one backward pass per row (a pair's two sides apart): one row's peak, +1 forward
    max_memory_gb: float = -1.0  # peak-memory budget (GB) for checkpointing / micro-batch; -1: auto; 0: none
    attention_chunk: int = -1  # query chunk of training passes (positions); -1: auto (CPU: 96, GPU: off); 0: off
    compile: bool = True
    eval_every: int = 50  # optimizer steps; 0 = only at the end
    eval_at_start: bool = True  # validation loss of the untrained adapter, as a baseline
    eval_batches: int = -1  # -1 = the whole validation set
    measure_every: int = 0  # steps between held-out measurements while training (0: before and after only)
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    early_stopping_min_delta: float = 0.0
    save_every: int = 100  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    report_every: int = 10
    stuck_steps: int = 10  # warn when the loss has not changed (or the gradient vanished) this long; 0 = off
    eval_tasks: list = field(default_factory=list)  # evaluation tasks run before and after training (mlxpost eval)
    eval_limit: int | None = None  # ... on the first N samples of each
    eval_allow_code_exec: bool = False  # ... letting humaneval run the code the model writes
    eval_min_retention: float = 0.95  # ... each metric after training kept at least this share of before
    report_to: str = "none"  # experiment tracker: none | tensorboard | wandb | trackio | mlflow


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str | None = None  # run directory name; default: method-timestamp
    overwrite: bool = False


@dataclass
class SampleConfig:
    prompts: list = field(default_factory=list)  # generated before and after training
    max_tokens: int = 64
    temperature: float = 0.0
    steer: list = field(default_factory=list)  # VEC_DIR@λ[:layer]: the samples are steered (as generate --steer)


COMMON_SECTIONS = {"model": ModelConfig, "lora": LoRAConfig, "data": DataConfig, "train": TrainConfig,
                   "output": OutputConfig, "sample": SampleConfig}


class RunConfig:
    """A run's settings: the common sections, and the sections of its method.

    Which sections a method adds (``dpo`` and ``preference`` for DPO, ...) is
    declared by the method (:attr:`mlxpost.methods.base.Method.sections`).
    Changing ``method`` replaces the method's sections with the new
    method's defaults; the common ones are kept.
    """

    def __init__(self, method: str = "sft"):
        for name, cls in COMMON_SECTIONS.items():
            setattr(self, name, cls())
        self.method = ""
        self._own: list[str] = []
        self.set_method(method)

    def set_method(self, name: str) -> None:
        if name == self.method:
            return
        sections = get_method(name).sections
        for s in self._own:
            delattr(self, s)
        self.method = name
        self._own = list(sections)
        for s, cls in sections.items():
            setattr(self, s, cls())

    def sections(self) -> list[str]:
        """The sections that apply to this run's method."""
        return list(COMMON_SECTIONS) + self._own

    def to_dict(self) -> dict:
        """The configuration of this method (sections of other methods left out)."""
        return {"method": self.method, **{s: dataclasses.asdict(getattr(self, s)) for s in self.sections()}}

    def __repr__(self) -> str:
        return f"RunConfig({self.to_dict()!r})"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
            type(None): "null", Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp) -> Any:
    """Return ``value`` as type ``tp`` or raise ValueError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except ValueError:
                pass
        raise ValueError
    if origin is list or tp is list:
        if isinstance(value, list):
            return value
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise ValueError


def _fields(obj) -> dict[str, Any]:
    """Field name -> type, of a section or of a :class:`RunConfig` (``method`` and its sections)."""
    if isinstance(obj, RunConfig):
        return {"method": str, **{s: type(getattr(obj, s)) for s in obj.sections()}}
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def known_keys(cfg: RunConfig | None = None) -> list[str]:
    cfg = cfg or RunConfig()
    keys = ["method"]
    for name in cfg.sections():
        keys += [f"{name}.{k}" for k in _fields(getattr(cfg, name))]
    return keys


def _unknown(key: str, where: str, cfg: RunConfig) -> ConfigError:
    close = difflib.get_close_matches(key, known_keys(cfg), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def set_value(cfg: RunConfig, key: str, value: Any, where: str, raw: str | None = None) -> None:
    """Set ``section.field`` (or ``method``) with type checking.

    ``raw``: the text as typed on the command line; a string field takes it
    as is when YAML read something else (``--set output.name=2024-01-01``).
    """
    parts = key.split(".")
    if parts[0] != "method" and parts[0] not in cfg.sections():
        users = [m.name for m in METHODS.values() if parts[0] in m.sections]
        if users:
            raise ConfigError(f"{where}: '{key}' is a setting of {' / '.join(users)}, not of {cfg.method}")
        raise _unknown(key, where, cfg)
    if key == "method":
        if value not in METHODS:
            raise ConfigError(f"{where}: method: expected one of {', '.join(METHODS)}, got {value!r}")
        cfg.set_method(value)
        return
    target = cfg
    for i, part in enumerate(parts):
        fields = _fields(target)
        if part not in fields:
            raise _unknown(key, where, cfg)
        if i == len(parts) - 1:
            tp = fields[part]
            if dataclasses.is_dataclass(getattr(target, part)):
                raise ConfigError(f"{where}: '{key}' is a section; set its keys ({key}.<name>)")
            try:
                setattr(target, part, _coerce(value, tp))
            except ValueError:
                try:
                    if raw is None:
                        raise ValueError
                    setattr(target, part, _coerce(raw, tp))
                except ValueError:
                    raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}") from None
            return
        target = getattr(target, part)
        if not dataclasses.is_dataclass(target):
            raise _unknown(key, where, cfg)


def _yaml_items(node, prefix: str = ""):
    """Flatten a YAML mapping node into (dotted key, python value, line)."""
    for k_node, v_node in node.value:
        key = f"{prefix}{k_node.value}"
        if isinstance(v_node, yaml.MappingNode) and prefix == "":
            yield from _yaml_items(v_node, key + ".")
        else:
            yield key, _construct(v_node), k_node.start_mark.line + 1


def _construct(node):
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


# TRL's config names (TrainingArguments, SFTConfig, DPOConfig, GRPOConfig, ...) that mean exactly one of our
# keys, accepted at the top level of a recipe so that a TRL config carries over. "{m}.x": the method's
# own section holding x (beta is dpo.beta, cpo.beta, simpo.beta, grpo.beta; ORPO's is orpo.lam).
TRL_NAMES = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.steps",
    "max_length": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len",
    "seed": "train.seed",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "lr_scheduler_type": "train.schedule",
    "adam_beta1": "train.beta1",
    "adam_beta2": "train.beta2",
    "adam_epsilon": "train.eps",
    "gradient_checkpointing": "train.grad_checkpoint",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "logging_steps": "train.report_every",
    "save_total_limit": "train.keep_checkpoints",
    "report_to": "train.report_to",
    "beta": "{m}.beta",
    "label_smoothing": "{m}.label_smoothing",
    "rpo_alpha": "{m}.rpo_alpha",
    "simpo_gamma": "{m}.gamma",
    "cpo_alpha": "{m}.alpha",
    "num_generations": "{m}.group_size",
    "max_completion_length": "{m}.max_new_tokens",
    "max_prompt_length": "{m}.max_prompt_len",
    "num_iterations": "{m}.num_iterations",
    "temperature": "{m}.temperature",
    "top_p": "{m}.top_p",
    "top_k": "{m}.top_k",
    "min_p": "{m}.min_p",
    "mask_truncated_completions": "{m}.mask_truncated",
    "epsilon_high": "{m}.epsilon_high",
}

# TRL names that have no one-to-one key here, and what to write instead.
TRL_NOT_ONE_TO_ONE = {
    "epsilon": "TRL's epsilon sets both clip bounds: write grpo.epsilon_low (and grpo.epsilon_high)",
    "optim": "train.optimizer takes adamw, adam or sgd",
    "bf16": "the dtype is model.dtype (auto, float32, bfloat16, float16)",
    "fp16": "the dtype is model.dtype (auto, float32, bfloat16, float16)",
    "packing": "packing is data.batching: pack (or auto)",
    "per_device_eval_batch_size": "evaluation uses train.batch_size",
    "output_dir": "the run directory is output.dir + output.name (or --out/--name)",
    "eval_strategy": "evaluation runs every train.eval_every steps",
    "save_strategy": "checkpoints are saved every train.save_every steps",
    "loss_type": "the loss is dpo.loss (sigmoid, ipo, hinge, robust) or grpo.loss_norm (grpo, dapo, dr_grpo)",
    "use_peft": "mlxpost always trains a LoRA/DoRA adapter (lora.*)",
    "lora_r": "write lora.rank",
    "lora_alpha": "write lora.alpha",
}


def trl_key(key: str, method: str, where: str) -> str:
    """Our dotted key for a top-level TRL config name in a recipe (other keys come back unchanged).

    >>> trl_key("learning_rate", "sft", "r.yaml:1"), trl_key("beta", "orpo", "r.yaml:2"), trl_key("train.lr", "sft", "")
    ('train.lr', 'orpo.lam', 'train.lr')
    """
    if "." in key or key == "method":
        return key
    if key in TRL_NOT_ONE_TO_ONE:
        raise ConfigError(f"{where}: {key}: a TRL setting with no one-to-one mlxpost key; {TRL_NOT_ONE_TO_ONE[key]}")
    target = TRL_NAMES.get(key)
    if target is None or not target.startswith("{m}"):
        return target or key
    leaf = target.split(".", 1)[1]
    if method == "orpo" and key == "beta":
        return "orpo.lam"  # ORPO's lambda is TRL's beta
    for section, cls in get_method(method).sections.items():
        if leaf in {f.name for f in dataclasses.fields(cls)}:
            return f"{section}.{leaf}"
    raise ConfigError(f"{where}: {key}: a TRL setting that {method} has no counterpart for")


def load_recipe(path: str | Path, cfg: RunConfig | None = None) -> RunConfig:
    """Apply a YAML recipe on top of ``cfg`` (defaults when None).

    Top-level TRL config names (:data:`TRL_NAMES`: ``learning_rate``,
    ``per_device_train_batch_size``, ``beta``, ``num_generations``, ...) are
    read as the keys they mean; TRL names without a one-to-one key
    (:data:`TRL_NOT_ONE_TO_ONE`) stop with what to write instead.
    """
    cfg = cfg or RunConfig()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        return cfg
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (model:, lora:, data:, train:, ...)")
    for key, value, line in _yaml_items(root):
        where = f"{path}:{line}"
        key = trl_key(key, cfg.method, where)
        if key == "train.report_to" and isinstance(value, list):  # TRL allows a list of trackers
            if len(value) != 1:
                raise ConfigError(f"{where}: report_to: mlxpost reports to one tracker; got {value}")
            value = value[0]
        set_value(cfg, key, value, where)
    return cfg


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict,)):
        value = raw
    return key, value


def build_config(recipe: str | Path | None = None, sets: list[str] = (), cli: dict[str, Any] | None = None,
                 method: str = "sft") -> RunConfig:
    """Defaults < the method's defaults < recipe < command-line options (``cli``: dotted key -> value) < ``--set``."""
    cfg = RunConfig(method=method)
    for key, value in get_method(method).defaults.items():
        set_value(cfg, key, value, f"the defaults of {method}")
    if recipe:
        cfg = load_recipe(recipe, cfg)
        if cfg.method != method:
            raise ConfigError(f"{recipe}: this recipe is for '{cfg.method}', not '{method}'")
    for key, value in (cli or {}).items():
        if value is not None:
            set_value(cfg, key, value, f"--{key.split('.')[-1].replace('_', '-')}")
    for item in sets:
        key, value = parse_set(item)
        set_value(cfg, key, value, f"--set {item}", raw=item.split("=", 1)[1])
    validate(cfg)
    return cfg


CHOICES = {
    "lora.type": ("lora", "dora"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.overflow": ("truncate", "drop"),
    "data.chat_template": ("auto", "none"),
    "data.batching": ("auto", "pack", "pad"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.report_to": ("none", "tensorboard", "wandb", "trackio", "mlflow"),
}

POSITIVE = ("lora.rank", "data.max_seq_len", "train.batch_size", "train.grad_accum", "train.lr",
            "train.report_every", "sample.max_tokens", "model.quantize_group_size")

NON_NEGATIVE = ("train.eval_every", "train.measure_every", "train.save_every", "train.keep_checkpoints",
                "train.warmup_steps", "train.weight_decay", "train.early_stopping_patience",
                "train.early_stopping_min_delta", "sample.temperature", "train.stuck_steps")

FRACTIONS = ("train.warmup_ratio", "train.min_lr_ratio")


def check_steer(specs) -> None:
    """``sample.steer``: a list of ``VEC_DIR@λ[:layer]`` whose directories hold steering vectors."""
    if not isinstance(specs, list):
        raise ConfigError(f"sample.steer: expected a list of VEC_DIR@λ[:layer], got {specs!r}")
    for s in specs:
        try:
            path, _, _ = parse_steer(str(s))
        except MlxpostError as e:
            raise ConfigError(f"sample.steer: {e}") from None
        if not (Path(path) / META_FILE).is_file():
            raise ConfigError(f"sample.steer: {path} is not a steering-vector directory (mlxpost steer extract)")


def validate(cfg: RunConfig) -> None:
    """Check the common settings, then the method's own (:meth:`mlxpost.methods.base.Method.validate`)."""
    for key, choices in CHOICES.items():
        check_choice(cfg, key, choices)
    check_positive(cfg, *POSITIVE)
    check_non_negative(cfg, *NON_NEGATIVE)
    check_fraction(cfg, *FRACTIONS)
    if cfg.train.max_grad_norm is not None and cfg.train.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm: must be positive (or null for no clipping), "
                          f"got {cfg.train.max_grad_norm}")
    if cfg.train.max_memory_gb < 0 and cfg.train.max_memory_gb != -1:
        raise ConfigError(f"train.max_memory_gb: must be -1 (auto), 0 (no budget) or a size in GB, "
                          f"got {cfg.train.max_memory_gb}")
    if cfg.train.attention_chunk < -1:
        raise ConfigError(f"train.attention_chunk: must be -1 (auto), 0 (off) or a length, "
                          f"got {cfg.train.attention_chunk}")
    check_steer(cfg.sample.steer)
    if cfg.data.pack_len is not None and cfg.data.pack_len <= 1:
        raise ConfigError(f"data.pack_len: must be more than 1, got {cfg.data.pack_len}")
    if cfg.model.quantize not in (None, 2, 3, 4, 6, 8):
        raise ConfigError(f"model.quantize: expected 2, 3, 4, 6 or 8 bits, got {cfg.model.quantize}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.train.split_rows and cfg.lora.dropout:
        raise ConfigError(f"train.split_rows cannot be combined with lora.dropout={cfg.lora.dropout}: the pass that "
                          "weighs each row and the row's own backward pass would draw different dropout masks "
                          "(set one of them off)")
    if cfg.train.split_rows and not get_method(cfg.method).rows_apart:
        raise ConfigError(f"train.split_rows: {cfg.method}'s loss is not a function of per-row log-probs (only the "
                          "preference methods' is); lower train.batch_size for a micro-batch of one row instead")
    if not 0 <= cfg.data.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction: must be in [0, 1), got {cfg.data.valid_fraction}")
    if cfg.train.steps is not None and cfg.train.steps <= 0:
        raise ConfigError(f"train.steps: must be positive, got {cfg.train.steps}")
    if cfg.train.epochs <= 0:
        raise ConfigError(f"train.epochs: must be positive, got {cfg.train.epochs}")
    if not all(isinstance(x, str) and x.strip() for x in cfg.train.eval_tasks):
        raise ConfigError(f"train.eval_tasks: expected a list of task names (e.g. [arith, ppl:data/valid.jsonl]), "
                          f"got {cfg.train.eval_tasks!r}")
    if cfg.train.eval_limit is not None and cfg.train.eval_limit <= 0:
        raise ConfigError(f"train.eval_limit: must be positive (or null for every sample), got {cfg.train.eval_limit}")
    t = cfg.lora.targets
    if not (isinstance(t, str) or (isinstance(t, list) and all(isinstance(x, str) for x in t))):
        raise ConfigError(f"lora.targets: expected all-linear, attention, mlp or a list of names, got {t!r}")
    cfg.lora.resolved_scale()
    get_method(cfg.method).validate(cfg)


def method_of(cfg: RunConfig) -> Method:
    """The method a configuration is for: the shared pipeline runs its hooks."""
    return get_method(cfg.method)


# Settings that name files or directories (a method adds its own: Method.path_keys, Method.plugin_keys).
PATH_KEYS = ("data.path", "data.valid", "lora.init", "output.dir")


def absolute_spec(spec: str) -> str:
    """A ``file.py:function[@weight]`` spec with its file made absolute; names and ``module:function`` as they are.

    >>> absolute_spec("accuracy@0.5"), absolute_spec("my_pkg.rewards:score")
    ('accuracy@0.5', 'my_pkg.rewards:score')
    >>> absolute_spec("/srv/checks.py:verify")
    '/srv/checks.py:verify'
    """
    file, sep, rest = spec.partition(":")
    if sep and file.endswith(".py"):
        return f"{Path(file).expanduser().resolve()}:{rest}"
    return spec


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with its paths absolute (a model path only when it is a local file or directory).

    This is what config.yaml stores: ``--resume`` reads it, and a relative
    ``--data`` would name another file (or none) when the run is resumed
    from another directory. The run itself keeps the paths as typed, so
    its messages show them as the user wrote them.
    """
    cfg = copy.deepcopy(cfg)
    method = get_method(cfg.method)
    model = Path(cfg.model.path).expanduser()
    if cfg.model.path not in ("", "default") and model.exists():
        cfg.model.path = str(model.resolve())
    keys = PATH_KEYS + tuple(method.path_keys) + ((method.from_key,) if method.from_key else ())
    for key in keys:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if isinstance(v, str) and v and not v.startswith("hf:"):  # hf:ORG/NAME is a Hub dataset, not a path
            setattr(getattr(cfg, section), name, str(Path(v).expanduser().resolve()))
    for key in method.plugin_keys:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if isinstance(v, str):
            setattr(getattr(cfg, section), name, absolute_spec(v))
        elif isinstance(v, list):
            setattr(getattr(cfg, section), name, [absolute_spec(x) if isinstance(x, str) else x for x in v])
    return cfg


# Settings that say which run a config.yaml describes: never filled with a default.
IDENTITY_KEYS = ("model.path", "model.dtype", "model.quantize", "data.path", "data.valid", "lora.type", "lora.rank",
                 "lora.targets", "lora.num_layers", "train.seed", "train.batch_size", "train.grad_accum")


def check_complete(path: Path, data: Any) -> list[str]:
    """Refuse a run's config.yaml that is empty, has no valid method, lacks a section of its method, or lacks
    a setting that identifies the run (:data:`IDENTITY_KEYS`). Returns the other settings it lacks.

    Those take their defaults: a file written by an earlier version of
    mlxpost has no setting added since, and its run must stay resumable. The
    caller says which ones were filled. A file cut short (they are written
    atomically) loses whole sections or identifying keys, and is refused.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: empty or not a mapping of settings; --resume continues the run it describes "
                          "and cannot guess it (restore the file, or start a new run)")
    method = data.get("method")
    if method not in METHODS:
        raise ConfigError(f"{path}: no valid 'method' (got {method!r}); the file is incomplete or damaged")
    filled = []
    for section, keys in RunConfig(method).to_dict().items():
        if section == "method":
            continue
        given = data.get(section)
        if not isinstance(given, dict):
            raise ConfigError(f"{path}: the section {section} is missing; the file is incomplete or damaged, "
                              "and --resume will not fill it with defaults")
        missing = [f"{section}.{k}" for k in keys if k not in given]
        identity = [k for k in missing if k in IDENTITY_KEYS]
        if identity:
            raise ConfigError(f"{path}: {identity[0]} is missing; the file is incomplete or damaged, and "
                              "--resume will not fill it with a default")
        filled += missing
    return filled


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
