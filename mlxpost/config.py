"""Typed run configuration: defaults < recipe YAML < command line.

A run is described by one :class:`RunConfig` made of sections (``model``,
``lora``, ``data``, ``train``, ``output``). Recipes are YAML files with the
same nesting; ``--set section.key=value`` overrides any field. Unknown keys
and wrongly typed values are errors that name the key (and, for recipes, the
file and line)::

    recipes/x.yaml:7: train.lr: expected a number, got 'fast'
    --set lora.rnk=8: unknown key 'lora.rnk' (did you mean 'lora.rank'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


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
    attention_chunk: int = -1  # query chunk of training passes (positions); -1: auto (CPU: 96, GPU: off); 0: off
    compile: bool = True
    eval_every: int = 50  # optimizer steps; 0 = only at the end
    eval_at_start: bool = True  # validation loss of the untrained adapter, as a baseline
    eval_batches: int = -1  # -1 = the whole validation set
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    early_stopping_min_delta: float = 0.0
    save_every: int = 100  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    report_every: int = 10


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


@dataclass
class DPOConfig:
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    beta: float = 0.1  # strength of the tie to the reference (IPO: its tau)
    label_smoothing: float = 0.0  # sigmoid: conservative DPO; robust: assumed rate of flipped labels (< 0.5)


@dataclass
class ORPOConfig:
    lam: float = 0.1  # lambda: weight of the odds-ratio term next to the NLL of chosen (TRL calls it beta)


@dataclass
class CPOConfig:
    beta: float = 0.1
    alpha: float = 1.0  # weight of the behaviour-cloning term (NLL of chosen)
    label_smoothing: float = 0.0


@dataclass
class SimPOConfig:
    beta: float = 2.0  # scale of the length-normalized reward
    gamma: float = 0.5  # target reward margin
    alpha: float = 0.0  # optional NLL of chosen (0 = pure SimPO)
    label_smoothing: float = 0.0


@dataclass
class PreferenceConfig:
    from_run: str | None = None  # SFT run (or adapter dir) merged into the base: the start and the reference
    precompute_ref: bool = False  # reference log-probs once before training, cached beside the data
    ref_cache_dir: str | None = None  # where to cache them (default: .mlxpost-cache beside the data)
    # The prompt once per pair, both replies after it, in the packed batches where that costs less:
    # auto = when the model passes the check, on = the check must pass (else an error), off = never.
    share_prompt: str = "auto"  # auto | on | off
    # Health checks (live and in the summary).
    kl_max: float = 0.1  # drift: KL estimate to the reference (nats per token)
    collapse_loss: float = 0.05  # collapse: preference loss below this with accuracy 1.0 early on
    collapse_fraction: float = 0.05  # "early on": this fraction of the steps
    rejected_drop: float = 2.0  # rejected log-prob per token fallen this far below its start, still falling
    chosen_drop: float = 0.1  # chosen log-prob per token fallen this far below its start, with rejected
    # Quality gate on the validation pairs at the end.
    gate_min_margin: float = 0.0  # mean reward margin must exceed this
    gate_min_accuracy: float = 0.6  # fraction of pairs ranked right must reach this


@dataclass
class GRPOConfig:
    group_size: int = 8  # completions sampled per prompt
    prompts_per_step: int = 2  # prompts per optimizer step
    micro_batch: int | None = None  # completions per forward pass (None: all of the step's, at most 16)
    num_iterations: int = 1  # optimizer steps per rollout (> 1: the ratio to the sampling policy is clipped)
    epsilon_low: float = 0.2  # clip range below 1
    epsilon_high: float = 0.2  # clip range above 1 (DAPO: 0.28)
    beta: float = 0.0  # KL penalty (k3) against the reference (adapters off); 0 = no reference pass
    loss_norm: str = "grpo"  # grpo (per sequence) | dapo (per token) | dr_grpo (constant)
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated: bool = False  # no loss on completions that hit max_new_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_prompt_len: int = 512  # longer prompts are dropped (counted)
    stop: list = field(default_factory=list)  # stop strings
    rewards: list = field(default_factory=list)  # "name[@weight]": built-in, file.py:function or module:function
    all_equal_warn: float = 0.8  # warn when this fraction of groups has equal rewards for 5 steps running
    eval_prompts: int = 64  # validation prompts answered (greedy) before and after training
    from_run: str | None = None  # an earlier run (SFT, DPO, ...) merged into the base: the start and the reference


@dataclass
class RLVRConfig:
    verifier: str = "arithmetic"  # arithmetic | exact | file.py:function | module:function
    step_weight: float = 1.0  # lam: penalty on the tokens of a wrong step (see mlxpost.rl)
    final_weight: float = 1.0  # weight of the final-answer score in the completion's reward
    gate_step_acc: float = 0.8  # end-of-run gates on the validation prompts
    gate_final_acc: float = 0.9


# Sections that belong to one method (or to a family); other methods refuse them.
METHOD_SECTIONS = {
    "dpo": ("dpo", "preference"),
    "orpo": ("orpo", "preference"),
    "cpo": ("cpo", "preference"),
    "simpo": ("simpo", "preference"),
    "grpo": ("grpo",),
    "rlvr": ("grpo", "rlvr"),
}
PREFERENCE_METHODS = ("dpo", "orpo", "cpo", "simpo")
RL_METHODS = ("grpo", "rlvr")
_OWNED = {s for secs in METHOD_SECTIONS.values() for s in secs}


@dataclass
class RunConfig:
    method: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    cpo: CPOConfig = field(default_factory=CPOConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rlvr: RLVRConfig = field(default_factory=RLVRConfig)

    def sections(self) -> list[str]:
        """The sections that apply to this run's method."""
        own = METHOD_SECTIONS.get(self.method, ())
        return [f.name for f in dataclasses.fields(self) if f.name not in _OWNED or f.name in own]

    def to_dict(self) -> dict:
        """The configuration of this method (sections of other methods left out)."""
        full = dataclasses.asdict(self)
        return {k: full[k] for k in self.sections()}


# ---------------------------------------------------------------------------
# Type checking of values
# ---------------------------------------------------------------------------


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


def _fields(obj) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def known_keys(cfg: RunConfig | None = None) -> list[str]:
    cfg = cfg or RunConfig()
    keys = []
    for name in _fields(cfg):
        if name not in cfg.sections() and name != "method":
            continue
        sub = getattr(cfg, name)
        if dataclasses.is_dataclass(sub):
            keys += [f"{name}.{k}" for k in _fields(sub)]
        else:
            keys.append(name)
    return keys


def _unknown(key: str, where: str, cfg: RunConfig) -> ConfigError:
    close = difflib.get_close_matches(key, known_keys(cfg), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def set_value(cfg: RunConfig, key: str, value: Any, where: str, raw: str | None = None) -> None:
    """Set ``section.field`` (or a top-level field) with type checking.

    ``raw``: the text as typed on the command line; a string field takes it
    as is when YAML read something else (``--set output.name=2024-01-01``).
    """
    parts = key.split(".")
    if parts[0] in _OWNED and parts[0] not in METHOD_SECTIONS.get(cfg.method, ()):
        users = [m for m, secs in METHOD_SECTIONS.items() if parts[0] in secs]
        raise ConfigError(f"{where}: '{key}' is a setting of {' / '.join(users)}, not of {cfg.method}")
    target = cfg
    for i, part in enumerate(parts):
        fields = _fields(target)
        if part not in fields:
            raise _unknown(key, where, cfg)
        if i == len(parts) - 1:
            tp = fields[part].type
            sub = getattr(target, part)
            if dataclasses.is_dataclass(sub):
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


# ---------------------------------------------------------------------------
# YAML recipes (with line numbers) and --set overrides
# ---------------------------------------------------------------------------


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


def load_recipe(path: str | Path, cfg: RunConfig | None = None) -> RunConfig:
    """Apply a YAML recipe on top of ``cfg`` (defaults when None)."""
    cfg = cfg or RunConfig()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe not found: {path}")
    text = path.read_text()
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
        set_value(cfg, key, value, f"{path}:{line}")
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
    """Defaults < recipe < command-line options (``cli``: dotted key -> value) < ``--set``."""
    cfg = RunConfig(method=method)
    if method in PREFERENCE_METHODS:
        # LoRA preference tuning moves far less than SFT: a gentler default.
        cfg.train.lr = 5e-5
    if method in RL_METHODS:
        cfg.train.lr = 2e-5
        cfg.train.eval_at_start = False
        cfg.data.valid_fraction = 0.0
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
    "method": ("sft",) + PREFERENCE_METHODS + RL_METHODS,
    "dpo.loss": ("sigmoid", "ipo", "hinge", "robust"),
    "grpo.loss_norm": ("grpo", "dapo", "dr_grpo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "lora.type": ("lora", "dora"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.overflow": ("truncate", "drop"),
    "data.chat_template": ("auto", "none"),
    "data.batching": ("auto", "pack", "pad"),
    "preference.share_prompt": ("auto", "on", "off"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.optimizer": ("adamw", "adam", "sgd"),
}

POSITIVE = ("lora.rank", "data.max_seq_len", "train.batch_size", "train.grad_accum", "train.lr",
            "train.report_every", "sample.max_tokens", "model.quantize_group_size")
NON_NEGATIVE = ("train.eval_every", "train.save_every", "train.keep_checkpoints", "train.warmup_steps",
                "train.weight_decay", "train.early_stopping_patience", "train.early_stopping_min_delta",
                "sample.temperature")
FRACTIONS = ("train.warmup_ratio", "train.min_lr_ratio")


def _get(cfg: RunConfig, key: str):
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: RunConfig) -> None:
    for key, choices in CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {v!r}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {_get(cfg, key)}")
    for key in FRACTIONS:
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key}: must be between 0 and 1, got {_get(cfg, key)}")
    if cfg.train.max_grad_norm is not None and cfg.train.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm: must be positive (or null for no clipping), "
                          f"got {cfg.train.max_grad_norm}")
    if cfg.train.attention_chunk < -1:
        raise ConfigError(f"train.attention_chunk: must be -1 (auto), 0 (off) or a length, "
                          f"got {cfg.train.attention_chunk}")
    if cfg.preference.share_prompt == "on" and cfg.train.grad_checkpoint:
        raise ConfigError("preference.share_prompt=on cannot be combined with train.grad_checkpoint (a recomputed "
                          "block would rotate the rejected reply at the wrong positions); set one of them off")
    if cfg.preference.share_prompt == "on" and cfg.data.batching == "pad":
        raise ConfigError("preference.share_prompt=on needs packed pair batches: set data.batching to pack or auto")
    if cfg.data.pack_len is not None and cfg.data.pack_len <= 1:
        raise ConfigError(f"data.pack_len: must be more than 1, got {cfg.data.pack_len}")
    if cfg.model.quantize not in (None, 2, 3, 4, 6, 8):
        raise ConfigError(f"model.quantize: expected 2, 3, 4, 6 or 8 bits, got {cfg.model.quantize}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 <= cfg.data.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction: must be in [0, 1), got {cfg.data.valid_fraction}")
    if cfg.train.steps is not None and cfg.train.steps <= 0:
        raise ConfigError(f"train.steps: must be positive, got {cfg.train.steps}")
    if cfg.train.epochs <= 0:
        raise ConfigError(f"train.epochs: must be positive, got {cfg.train.epochs}")
    t = cfg.lora.targets
    if not (isinstance(t, str) or (isinstance(t, list) and all(isinstance(x, str) for x in t))):
        raise ConfigError(f"lora.targets: expected all-linear, attention, mlp or a list of names, got {t!r}")
    cfg.lora.resolved_scale()
    if cfg.method in PREFERENCE_METHODS:
        _validate_preference(cfg)
    if cfg.method in RL_METHODS:
        _validate_rl(cfg)


def _validate_rl(cfg: RunConfig) -> None:
    g = cfg.grpo
    for key in ("grpo.group_size", "grpo.prompts_per_step", "grpo.num_iterations", "grpo.max_new_tokens",
                "grpo.max_prompt_len", "grpo.top_p"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    if g.group_size < 2:
        raise ConfigError(f"grpo.group_size: group-relative advantages need at least 2 completions per prompt, "
                          f"got {g.group_size}")
    for key in ("grpo.epsilon_low", "grpo.epsilon_high", "grpo.beta", "grpo.temperature", "rlvr.step_weight",
                "rlvr.final_weight"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {_get(cfg, key)}")
    if g.epsilon_low >= 1:
        raise ConfigError(f"grpo.epsilon_low: must be below 1, got {g.epsilon_low}")
    if g.top_p > 1:
        raise ConfigError(f"grpo.top_p: must be at most 1, got {g.top_p}")
    for key in ("grpo.all_equal_warn", "rlvr.gate_step_acc", "rlvr.gate_final_acc"):
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key}: must be between 0 and 1, got {_get(cfg, key)}")
    n = g.group_size * g.prompts_per_step
    if g.micro_batch is not None and (g.micro_batch <= 0 or n % g.micro_batch):
        raise ConfigError(f"grpo.micro_batch: must divide prompts_per_step x group_size = {n}, got {g.micro_batch}")
    if cfg.train.grad_accum != 1:
        raise ConfigError("train.grad_accum: for grpo/rlvr it follows from grpo.micro_batch (completions per "
                          "forward pass); leave it at 1")
    if not isinstance(g.stop, list) or not all(isinstance(x, str) for x in g.stop):
        raise ConfigError(f"grpo.stop: expected a list of strings, got {g.stop!r}")
    if not isinstance(g.rewards, list) or not all(isinstance(x, str) for x in g.rewards):
        raise ConfigError(f"grpo.rewards: expected a list of 'name[@weight]' strings, got {g.rewards!r}")
    if cfg.method == "grpo" and not g.rewards:
        raise ConfigError("grpo needs at least one reward: --reward accuracy, --reward path/to/file.py:function, ...")
    if cfg.data.batching == "pack":
        raise ConfigError("data.batching=pack: rollouts are batched with padding; use pad or auto")


def _validate_preference(cfg: RunConfig) -> None:
    positive = {"dpo": ("dpo.beta",), "orpo": ("orpo.lam",), "cpo": ("cpo.beta",), "simpo": ("simpo.beta",)}
    for key in positive[cfg.method] + ("preference.kl_max",):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    for key in ("cpo.alpha", "simpo.alpha", "simpo.gamma", "preference.rejected_drop", "preference.chosen_drop"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {_get(cfg, key)}")
    for key in ("preference.collapse_fraction", "preference.gate_min_accuracy"):
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key}: must be between 0 and 1, got {_get(cfg, key)}")
    for key in ("dpo.label_smoothing", "cpo.label_smoothing", "simpo.label_smoothing"):
        if not 0 <= _get(cfg, key) < 0.5:
            raise ConfigError(f"{key}: must be in [0, 0.5), got {_get(cfg, key)}")
    if cfg.method == "dpo" and cfg.dpo.loss in ("ipo", "hinge") and cfg.dpo.label_smoothing:
        raise ConfigError(f"dpo.label_smoothing applies to the sigmoid and robust losses, not {cfg.dpo.loss}")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
