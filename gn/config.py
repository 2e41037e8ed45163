"""Typed, frozen run configuration.

A run is described by one `Config`: the model, the data, the training loop and
the list of methods to run. YAML files state only what differs from the
defaults (and from the model preset); `--set key.path=value` overrides single
keys. Everything is validated before any compute: unknown keys (with the nearest
valid key suggested), invalid values and cross-field constraints raise
`gn.errors.ConfigError`.

    cfg = load_config("configs/quickstart.yaml", overrides=["train.steps=10"])
    entry = cfg.method("adamw")          # a MethodEntry with resolved hyperparameters
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from gn.data.config import DataConfig
from gn.data.sources import trained_vocab
from gn.errors import ConfigError, os_error, require, suggest
from gn.methods import registry
from gn.methods.registry import TARGET_FROM, MethodEntry
from gn.model.config import PRESETS as MODEL_PRESETS, preset_values
from gn.model.config import ModelConfig
from gn.structs import build_dataclass, check_keys, plain

# train.stop_reads: which validation losses stop_at_target waits for.
STOP_READS = ("target", "all")


# train.loggers: each logger, the package it needs and how to install it (gn/train/loggers.py).
LOGGERS = {"tensorboard": ("tensorboardX", 'pip install -e ".[tb]" (or pip install tensorboardX)'),
           "wandb": ("wandb", "pip install wandb")}


def check_loggers(names) -> None:
    """ConfigError for an unknown logger or one whose package is not installed (before any compute)."""
    for name in names:
        require(name in LOGGERS,
                f"train.loggers: unknown logger '{name}'.{suggest(name, sorted(LOGGERS))} Valid loggers are "
                f"{', '.join(sorted(LOGGERS))}.")
        module, how = LOGGERS[name]
        require(importlib.util.find_spec(module) is not None,
                f"train.loggers asks for '{name}', but the package '{module}' is not installed: {how}, "
                f"or remove '{name}' from train.loggers.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop, shared by every method.

    `batch_size` is in sequences per (outer) step; `grad_accum` splits each
    step's batch into that many micro-batches (for batches larger than memory).
    `target_losses` are validation losses whose first crossing is reported as
    steps and tokens to target.
    """

    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 25
    eval_batch_size: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    target_losses: tuple[float, ...] = ()
    ema_decay: float = 0.0            # per sequential update: a GN outer step of N updates applies decay^N
    noise_scale_every: int = 0        # >0: log the gradient noise scale B_simple every k steps
    divergence_margin: float = 1.0    # diverged when val loss > initial + margin (nats); 0 = only non-finite
    log_every: int = 1
    progress: bool = True
    init_from: str | None = None      # another run's workdir: start from its final parameters
    # Early stops (used by `gn sweep`): a token budget (0 = none) and stopping
    # after the evaluation at which every target loss has been reached.
    max_tokens: int = 0
    stop_at_target: bool = False
    # The validation loss that stop_at_target and summary.json's *_to_target read: "ema" (the weight
    # average; the paper evaluates and stops on it), "raw" (the parameters), "both" (stop once both have
    # reached every target, to-target from raw: the behaviour before this option), "auto" (ema when
    # ema_decay > 0, else raw). A method entry may set its own `target_from`.
    target_from: str = "auto"
    # What stop_at_target waits for: "target" (the losses target_from reads) or "all" (every evaluated
    # validation loss, the raw parameters' and the EMA's, so that either can be analysed afterwards;
    # `gn sweep` sets it). It changes when a run stops, never its trajectory.
    stop_reads: str = "target"
    # > 0: stop ("stalled") after this many consecutive rejected steps (a GN line search that keeps
    # θ); a resumed run counts the rejected steps already in its metrics. 0: never.
    stop_after_rejected: int = 0
    # Metric destinations beside metrics.jsonl: "tensorboard" (WORKDIR/tb), "wandb" (gn/train/loggers.py).
    loggers: tuple[str, ...] = ()
    # Parameter sharding (gn/train/mesh.py): the mesh is (data = devices / fsdp, fsdp); with fsdp > 1
    # every parameter, optimizer-state and EMA leaf of at least fsdp_min_size elements is split over
    # the fsdp axis along its largest divisible dimension. 1 = data parallelism only (replicated).
    fsdp: int = 1
    fsdp_min_size: int = 1024
    # The learning rate (every scalar of the methods' schedules) an argument of the compiled step
    # instead of a constant folded into it (gn/optim/schedules.py), for the first-order and statistics
    # methods: one program, compiled once, serves every learning rate of a sweep. Off by default: XLA
    # compiles a different program, so some methods' numbers change at float32 rounding (docs/benchmarks.md).
    compile_reuse: bool = False

    def validate(self) -> None:
        """Raise ConfigError on invalid values."""
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size",
                    "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, key)
            require(value > 0, f"train.{key} must be a positive integer, got {value}.")
        require(self.batch_size % self.grad_accum == 0,
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                f"({self.grad_accum}): each step is split into equal micro-batches.")
        require(self.divergence_margin >= 0,
                f"train.divergence_margin must be >= 0 (0 = only non-finite values), got {self.divergence_margin}.")
        require(self.noise_scale_every >= 0,
                f"train.noise_scale_every must be >= 0 (0 disables), got {self.noise_scale_every}.")
        require(0.0 <= self.ema_decay < 1.0,
                f"train.ema_decay must be in [0, 1) (0 disables the EMA), got {self.ema_decay}.")
        for t in self.target_losses:
            require(math.isfinite(t) and t > 0, f"train.target_losses must be positive numbers, got {t}.")
        require(self.max_tokens >= 0, f"train.max_tokens must be >= 0 (0 = no budget), got {self.max_tokens}.")
        require(not self.stop_at_target or bool(self.target_losses),
                "train.stop_at_target needs train.target_losses: there is no target to stop at.")
        check_target_from(self.target_from, self.ema_decay, "train.target_from")
        require(self.stop_reads in STOP_READS, f"train.stop_reads must be one of {', '.join(STOP_READS)}, "
                f"got {self.stop_reads!r}." + suggest(str(self.stop_reads), STOP_READS))
        require(type(self.stop_after_rejected) is int and self.stop_after_rejected >= 0,
                f"train.stop_after_rejected must be an integer >= 0 (0 = never), got {self.stop_after_rejected!r}.")
        require(len(set(self.loggers)) == len(self.loggers), f"train.loggers lists a logger twice: {self.loggers}.")
        check_loggers(self.loggers)
        require(self.fsdp >= 1, f"train.fsdp must be a positive integer (1 = no parameter sharding), got {self.fsdp}.")
        require(self.fsdp_min_size >= 0,
                f"train.fsdp_min_size must be >= 0 (elements; smaller leaves are replicated), got {self.fsdp_min_size}.")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: model, data, training loop and methods."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    methods: tuple[MethodEntry, ...] = ()

    def method(self, name: str) -> MethodEntry:
        """The entry called `name`, or a registered method with its defaults."""
        for entry in self.methods:
            if entry.name == name:
                return entry
        if name in registry.names():
            return registry.resolve_entry({"name": name})
        valid = sorted({e.name for e in self.methods} | set(registry.names()))
        raise ConfigError(
            f"Unknown method '{name}'.{suggest(name, valid)} Valid names are the config's methods "
            f"({', '.join(e.name for e in self.methods) or 'none'}) or any registered method: "
            f"{', '.join(registry.names())}."
        )

    def to_dict(self) -> dict:
        return {
            "model": plain(dataclasses.asdict(self.model)),
            "data": plain(dataclasses.asdict(self.data)),
            "train": plain(dataclasses.asdict(self.train)),
            "methods": [m.to_dict() for m in self.methods],
        }


# ---------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, *, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (deltas from the defaults), apply `key.path=value`
    overrides, validate, and return the resolved `Config`."""
    raw = read_config_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def read_config_yaml(p: Path, seen: tuple = ()) -> dict:
    """Read a config file (raw, unvalidated); a top-level `base: other.yaml` (relative to this file)
    is read first and this file's keys are merged over it (lists replace)."""
    require(p.is_file(), f"Config file '{p}' does not exist.")
    require(p.resolve() not in seen, f"Config file '{p}' includes itself through 'base'.")
    try:
        raw = yaml.load(p.read_text(), Loader=UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise ConfigError(f"Config file '{p}' repeats the key '{exc.key}' on line {exc.line} "
                          f"(first given on line {exc.first}); state each key once.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{p}' is not valid YAML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"Config file '{p}' cannot be read: {exc.strerror or exc}.") from None
    require(raw is not None, f"Config file '{p}' is empty; state at least the keys that differ from the defaults.")
    require(isinstance(raw, dict), f"Config file '{p}' must hold a mapping at the top level.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return merge_raw(read_config_yaml(p.parent / str(base), seen + (p.resolve(),)), raw)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first})")
        self.key, self.line, self.first = key, line, first


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a key repeated within one mapping at any level
    (plain YAML keeps the last value silently). Keys merged in with `<<` may be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, line, seen[key])
                except TypeError:         # unhashable key: SafeLoader reports it itself
                    continue
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def merge_raw(base: dict, delta: dict) -> dict:
    """`delta` merged over `base`, recursively for mappings (lists replace)."""
    out = dict(base)
    for k, v in delta.items():
        out[k] = merge_raw(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw dict.

    `methods.<name>.<key>=value` sets an option of the `methods:` entry called
    <name>; when the config has no such entry and <name> is a registered
    method, an entry with its defaults is added first.
    """
    require("=" in item, f"Override '{item}' must look like key.path=value.")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    require(all(parts), f"Override '{item}' has an empty key component.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if parts[0] == "methods" and len(parts) > 1:
        _override_method(raw, parts[1:], value, item)
        return
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        require(isinstance(node, dict), f"Override '{item}': '{part}' is not a section.")
    node[parts[-1]] = value


def _override_method(raw: dict, parts: list[str], value: Any, item: str) -> None:
    require(len(parts) == 2, f"Override '{item}' must look like methods.<name>.<key>=value.")
    name, key = parts
    methods = raw.setdefault("methods", [])
    require(isinstance(methods, list), "'methods' must be a list of entries, each with a 'name'.")
    entry = next((m for m in methods if isinstance(m, dict) and m.get("name") == name), None)
    if entry is None:
        listed = [m.get("name") for m in methods if isinstance(m, dict)]
        require(name in registry.names(),
                f"Override '{item}': no method '{name}' in the config's methods "
                f"({', '.join(map(str, listed)) or 'none'}) and no registered method of that name."
                f"{suggest(name, listed + registry.names())}")
        entry = {"name": name}
        methods.append(entry)
    entry[key] = value


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a raw (YAML-shaped) mapping."""
    raw = dict(raw)
    check_keys(raw, [f.name for f in dataclasses.fields(Config)], "")
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.get("preset", ModelConfig.preset)
    if preset is not None:
        require(preset in MODEL_PRESETS,
                f"Unknown model preset '{preset}'.{suggest(str(preset), MODEL_PRESETS)} "
                f"Valid presets: {', '.join(MODEL_PRESETS)}.")
        model_raw = preset_values(preset, model_raw)
    model = build_dataclass(ModelConfig, model_raw, "model")
    data = build_dataclass(DataConfig, raw.get("data") or {}, "data")
    train = build_dataclass(TrainConfig, raw.get("train") or {}, "train")
    methods_raw = raw.get("methods") or []
    require(isinstance(methods_raw, list), "'methods' must be a list of entries, each with a 'name'.")
    methods = tuple(registry.resolve_entry(m, where=f"methods[{i}]") for i, m in enumerate(methods_raw))
    names = [m.name for m in methods]
    dup = {n for n in names if names.count(n) > 1}
    require(not dup, f"Method names in 'methods' must be unique; repeated: {', '.join(sorted(dup))}.")
    cfg = Config(model=model, data=data, train=train, methods=methods)
    validate(cfg)
    return cfg


def check_target_from(value: Any, ema_decay: float, where: str) -> None:
    """ConfigError naming the key unless `value` is a target reading this run can make."""
    require(value in TARGET_FROM, f"{where} must be one of {', '.join(TARGET_FROM)}, got {value!r}."
            + suggest(str(value), TARGET_FROM))
    require(value not in ("ema", "both") or ema_decay > 0,
            f"{where}: {value} reads the EMA's validation loss, but train.ema_decay is 0 (no EMA); set "
            "train.ema_decay > 0 or use raw.")


def target_keys(target_from: str, ema_decay: float) -> tuple[str, ...]:
    """The metrics a target is read from: stop_at_target waits for all of them; summary.json's
    *_to_target reads the first."""
    if target_from == "auto":
        target_from = "ema" if ema_decay > 0 else "raw"
    return {"ema": ("val_loss_ema",), "raw": ("val_loss",), "both": ("val_loss", "val_loss_ema")}[target_from]


def validate(cfg: Config) -> None:
    """Validate every section and the constraints between them."""
    cfg.model.validate()
    cfg.data.validate()
    cfg.train.validate()
    for entry in cfg.methods:
        if entry.target_from is not None:
            check_target_from(entry.target_from, cfg.train.ema_decay, f"methods.{entry.name}.target_from")
    require(cfg.data.seq_len <= cfg.model.max_seq_len,
            f"data.seq_len ({cfg.data.seq_len}) exceeds the model's maximum positions "
            f"model.max_seq_len ({cfg.model.max_seq_len}); lower data.seq_len or raise model.max_seq_len.")
    require(not cfg.model.attn_chunk or cfg.data.seq_len <= cfg.model.attn_chunk
            or cfg.data.seq_len % cfg.model.attn_chunk == 0,
            f"model.attn_chunk ({cfg.model.attn_chunk}) must divide data.seq_len ({cfg.data.seq_len}): "
            "attention is computed in equal chunks of queries.")
    trained = trained_vocab(cfg.data)
    if cfg.model.vocab_size is not None and trained is not None:
        require(cfg.model.vocab_size >= trained,
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"data.vocab_size ({cfg.data.vocab_size}); leave model.vocab_size unset to take it from the data.")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML (RunError when the OS refuses)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")      # never a half-written config.yaml
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise os_error(exc, f"writing the resolved config {path}") from None
