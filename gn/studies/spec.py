"""The sweep spec: a frozen, validated description of a batch-size × learning-rate study.

A spec YAML (unknown keys are errors, with the nearest valid key suggested):

    base: ../configs/synthetic.yaml   # a config path relative to the spec, or
    config: {...}                     # an inline config mapping (exactly one of the two)
    tokens: 2000000                   # training-token budget per run: train.steps = ceil(tokens / (B·seq_len))
    batch_sizes: [64, 128, 256]       # sequences per outer step
    seeds: [0, 1]
    lr: {center: 3.0e-3, base_batch: 64, points: 3, factor: 2}   # or {values: [...]}; power from the method
    warmup_tokens: 65536              # fixed warmup in tokens, converted to warmup_steps per batch size
    warmup_updates: 4                 # or: fixed warmup in sequential updates (the default from a warm start)
    scale_b2: false                   # true: b2' = b2^(B/B0), the half-life of the second moment constant in tokens
    schedule: constant                # constant lr after warmup (no horizon), or cosine / wsd (tied to the horizon)
    ema_halflife_updates: 4           # weight averaging, evaluated at every evaluation (train.ema_decay); default 4
    eval_every_tokens: 0              # > 0: evaluate at least every this many tokens at every batch size
    min_evals: 8                      # evaluations before the expected crossing (default 8; 0: no rule)
    crossing_tokens: 65536            # tokens the sweep's fastest run needs to its first target (a pilot's);
                                      # default: `tokens`, the budget
    targets: [2.0, 1.5]               # train.target_losses
    stop_at_target: true              # stop a run after the evaluation at which the raw parameters and
                                      # the EMA have both reached every target (train.stop_reads: all)
    stop_after_rejected: 3            # stop a run after 3 consecutive rejected GN steps (stalled; default 0: never)
    vary: {train.grad_accum: [1, 2], methods.adamw.weight_decay: [0.0, 0.1]}
    slurm: {time: "02:00:00", gpus: 1}  # extra `#SBATCH --key=value` lines for --emit slurm
    methods:
      - name: adamw                   # display name; `method:` the registered name (default: name)
        weight_decay: 0.1             # any other key is a fixed hyperparameter of the method
        lr: {center: 1.0e-3}          # merged over the spec-level rule
      - name: gn
        b_inner: 32                   # GN: inner_steps = B / b_inner; the lr grid is inner_learning_rate
                                      # (first-order: the small-batch control, B / b_inner updates per step)
                                      # or n_inner: 8: N fixed, b_inner = B / N (the batch grows through
                                      # the inner batch; the control: N updates of B / N per outer step)
        batch_sizes: [256, 512]       # per-method grid overrides: batch_sizes, seeds, lr, vary
        vary: {ls_grid: [5, 10]}

The lr centre at batch B is lr0·(B/B0)^p: p = 0.5 for Adam-like and Muon-like
methods, 1.0 for SGD-like ones (sgd, lars), 0.0 for Gauss-Newton (its inner
batch b_inner is fixed; the batch grows through the number of inner steps), unless
the rule states `power` (each method's config declares its p, `lr_batch_power`).
The base config's own `methods:` list is replaced by the sweep's. `vary` takes any
hyperparameter of the method, e.g. `vary: {precondition_frequency: [1, 2, 10]}` for SOAP.

Defaults that keep the baselines fair (each overridable by stating the key):

- Warmup from a warm start. When the base config sets `train.init_from` and the spec
  states neither `warmup_tokens` nor `warmup_updates`, every method with a
  `warmup_steps` hyperparameter (the first-order and FOG methods; GN has none) warms
  up over `WARM_START_WARMUP_UPDATES` = 4 sequential updates at every batch size.
  Fresh Adam moments make the first update ±lr in every coordinate: from the CPU warm
  start (val 2.64) AdamW at B = 2048, lr 8.4e-3, went to 3.24 at step 1 without warmup
  and decreased monotonically with 4 warmup updates (2.385 at step 5 against 2.530);
  SOAP's spike fell from 3.23 to 2.77, Muon (which barely spikes, 2.66) lost ~0.07 nats
  at step 5. The transient counts updates (the moment EMAs' memory), not tokens: no
  single token count serves B = 32 and B = 2048. At B = 32 (lr 5.9e-3) val at step 30
  was 2.333 / 2.329 / 2.358 / 2.479 with 0 / 4 / 16 / 64 warmup updates, and the 4
  updates of B = 2048 are 256 at B = 32 in tokens. So the default is fixed in
  updates; a spec that wants a warmup fixed in tokens states `warmup_tokens`. A method entry's own
  `warmup_steps` wins over the default. Without `train.init_from` the methods' own
  `warmup_steps` stay (0 unless set).
- Weight averaging: `ema_halflife_updates` defaults to `DEFAULT_EMA_HALFLIFE_UPDATES` = 4
  unless the base config sets `train.ema_decay`; 0 turns it off. The trainer logs both
  val_loss and val_loss_ema. The half-life counts sequential updates (train.ema_decay is
  applied per update), so the EMA lags a one-update method by about h/ln 2 updates while a
  GN outer step of N updates washes it out: a long half-life handicaps first-order methods
  at large batches. Measured from the CPU warm start (AdamW, 4 warmup updates, steps to
  2.2 / 1.9): B = 32, raw 43 / 90, EMA h = 4: 40 / 78, h = 16: 49 / 84; B = 2048, raw 8 / 14.3,
  h = 4: 11.5 / 18.1, h = 16: > 24 / > 24. 4 is the half-life that helps at small batches and
  costs least at large ones; read crossings from the better of the raw and averaged
  losses (or report both), never from the EMA alone.
- Evaluation cadence: `train.eval_every` (outer steps) is the largest cadence giving at
  least `min_evals` (8) evaluations within `crossing_tokens` (default: the budget) at each
  batch size, i.e. floor(crossing_tokens / (min_evals · B · seq_len)) and at least 1
  (every step), or the `eval_every_tokens` cadence where that is denser. Tokens to a
  target grow with the batch (E = E_min(1 + B/B_crit)), so a `crossing_tokens` measured
  at the smallest batch of a pilot (or any lower bound on E_min) gives every run at least
  `min_evals` evaluations before its crossing, or an evaluation at every step. The runner
  records the evaluations each run made up to each target and warns when a crossing
  had fewer than `min_evals` at a cadence coarser than every step.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from gn.errors import ConfigError, require, suggest
from gn.config import config_from_dict, merge_raw, read_config_yaml
from gn.methods import registry
from gn.studies.spec_values import _check, _int, _list, _num, _round

SPEC_KEYS = ("base", "config", "methods", "batch_sizes", "seeds", "tokens", "lr", "warmup_tokens", "warmup_updates",
             "scale_b2", "schedule", "ema_halflife_updates", "eval_every_tokens", "min_evals", "crossing_tokens",
             "targets", "stop_at_target", "stop_after_rejected", "vary", "slurm")
ENTRY_KEYS = ("name", "method", "lr", "b_inner", "n_inner", "batch_sizes", "seeds", "vary")
LR_KEYS = ("center", "base_batch", "power", "points", "factor", "values")
SECTIONS = ("model", "data", "train")
GN_FAMILY = "gauss_newton"
HORIZON_SCHEDULES = ("cosine", "wsd", "global_cosine", "global_inner_cosine")
# Warmup of warm-started runs (train.init_from) when the spec states none, in sequential updates
# (measurements and the reason it is not in tokens: the module docstring).
WARM_START_WARMUP_UPDATES = 4
# Weight averaging when the spec states no ema_halflife_updates and the base config no train.ema_decay
# (why 4: the module docstring).
DEFAULT_EMA_HALFLIFE_UPDATES = 4.0
DEFAULT_MIN_EVALS = 8


def default_power(registered: str, family: str | None = None) -> float:
    """The exponent p of the lr rule lr0·(B/B0)^p for a registered method: its config's
    `lr_batch_power` (0.5 Adam-like, 1.0 SGD-like, 0.0 Gauss-Newton at a fixed b_inner)."""
    del family
    return registry.get(registered).lr_batch_power


@dataclasses.dataclass(frozen=True)
class LrRule:
    """Learning rates per batch size: an explicit list, or `points` values spaced
    by `factor` around the centre lr0·(B/B0)^p."""

    values: tuple[float, ...] = ()
    center: float | None = None
    base_batch: int | None = None
    power: float = 0.5
    points: int = 1
    factor: float = 2.0

    def grid(self, batch_size: int) -> tuple[float, ...]:
        """The learning rates tried at `batch_size` (rounded to 6 significant digits)."""
        if self.values:
            return tuple(self.values)
        mid = self.center * (batch_size / self.base_batch) ** self.power
        return tuple(_round(mid * self.factor ** (i - (self.points - 1) / 2)) for i in range(self.points))


@dataclasses.dataclass(frozen=True)
class SweepMethod:
    """One method of the sweep with its own grids."""

    name: str
    registered: str
    family: str
    options: Mapping[str, Any]               # fixed hyperparameters, set directly in the run's entry
    lr: LrRule
    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    vary: tuple[tuple[str, tuple], ...]      # (option name or section.key, values)
    b_inner: int | None = None
    n_inner: int | None = None               # instead of b_inner: N fixed, b_inner = B / N

    def inner_batch(self, batch_size: int) -> int | None:
        """The inner batch at outer batch B (GN's b_inner, the control's own batch); None: plain."""
        if self.n_inner:
            return batch_size // self.n_inner
        return self.b_inner

    @property
    def is_gn(self) -> bool:
        return self.family == GN_FAMILY

    @property
    def lr_key(self) -> str:
        """The hyperparameter the lr grid sets."""
        return registry.get(self.registered).lr_key


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A whole sweep: the base config (raw, without methods) and the methods' grids."""

    name: str
    base: Mapping[str, Any]
    seq_len: int
    methods: tuple[SweepMethod, ...]
    tokens: int
    warmup_tokens: int = 0
    warmup_updates: int | None = None        # set: every method's warmup_steps (in its own updates)
    warmup_default: bool = False             # warmup_updates is the warm-start default, not stated
    scale_b2: bool = False
    schedule: str = "constant"
    ema_halflife_updates: float = 0.0        # 0: the base config's train.ema_decay (or none)
    eval_every_tokens: int = 0
    min_evals: int = 0
    crossing_tokens: int = 0                 # 0: the budget, `tokens`
    targets: tuple[float, ...] = ()
    stop_at_target: bool = False
    stop_after_rejected: int = 0
    slurm: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def eval_every(self, batch_size: int) -> int:
        """train.eval_every (outer steps) at this batch size: the largest cadence with at least
        `min_evals` evaluations within `crossing_tokens`, or the denser `eval_every_tokens` one;
        0 when the spec sets neither (the base config's cadence stays)."""
        per_step = batch_size * self.seq_len
        cadences = []
        if self.min_evals > 0:
            cadences.append(max(1, (self.crossing_tokens or self.tokens) // (self.min_evals * per_step)))
        if self.eval_every_tokens > 0:
            cadences.append(max(1, round(self.eval_every_tokens / per_step)))
        return min(cadences, default=0)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec YAML."""
    p = Path(path)
    require(p.is_file(), f"Sweep spec '{p}' does not exist.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Sweep spec '{p}' is not valid YAML: {exc}") from None
    require(isinstance(raw, dict), f"Sweep spec '{p}' must hold a mapping at the top level.")
    return spec_from_dict(raw, root=p.parent, name=p.stem)


def spec_from_dict(raw: Mapping[str, Any], *, root: Path = Path("."), name: str = "sweep") -> SweepSpec:
    """Build a SweepSpec from a raw mapping; `root` resolves a relative `base:` path."""

    _check(raw, SPEC_KEYS, "sweep spec")
    base = _base_config(raw, root)
    seq_len = config_from_dict(base).data.seq_len       # the base itself must be a valid config
    tokens = _int(raw.get("tokens"), "tokens", minimum=1)
    schedule = raw.get("schedule", "constant")
    require(isinstance(schedule, str), f"'schedule' must be a schedule name, got {schedule!r}.")
    targets = tuple(_num(t, "targets") for t in _list(raw.get("targets", []), "targets", allow_empty=True))
    stop = raw.get("stop_at_target", False)
    require(isinstance(stop, bool), f"'stop_at_target' must be true or false, got {stop!r}.")
    require(not stop or targets or base.get("train", {}).get("target_losses"),
            "'stop_at_target: true' needs 'targets' (or train.target_losses in the base config).")
    scale_b2 = raw.get("scale_b2", False)
    require(isinstance(scale_b2, bool), f"'scale_b2' must be true or false, got {scale_b2!r}.")
    slurm = raw.get("slurm") or {}
    require(isinstance(slurm, Mapping), "'slurm' must be a mapping of sbatch options.")
    entries = _list(raw.get("methods"), "methods")
    vary = _vary(raw.get("vary") or {}, "vary", allow_sections=True)
    methods = tuple(_method(e, i, raw, vary) for i, e in enumerate(entries))
    names = [m.name for m in methods]
    require(len(set(names)) == len(names), f"Method names in the sweep must be unique, got {names}.")
    for key, _ in vary:
        if key.startswith("methods."):
            target = key.split(".")[1]
            require(target in names, f"vary key '{key}' names no sweep method.{suggest(target, names)} "
                                     f"Methods: {', '.join(names)}.")
    train = base.get("train") or {}
    require(not ("warmup_tokens" in raw and "warmup_updates" in raw),
            "Give one of 'warmup_tokens' (fixed in tokens) or 'warmup_updates' (fixed in sequential updates).")
    warmup_updates, warmup_default = None, False
    if "warmup_updates" in raw:
        warmup_updates = _int(raw["warmup_updates"], "warmup_updates", minimum=0)
    elif "warmup_tokens" not in raw and train.get("init_from"):
        warmup_updates, warmup_default = WARM_START_WARMUP_UPDATES, True
    if "ema_halflife_updates" in raw:
        ema = _num(raw["ema_halflife_updates"], "ema_halflife_updates", minimum=0.0)
    else:
        ema = 0.0 if train.get("ema_decay") else DEFAULT_EMA_HALFLIFE_UPDATES   # the base's own EMA stays
    crossing = _int(raw.get("crossing_tokens", 0), "crossing_tokens", minimum=0)
    require(crossing <= tokens, f"'crossing_tokens' ({crossing}) must not exceed the budget 'tokens' ({tokens}).")
    return SweepSpec(
        name=name, base=base, seq_len=seq_len, methods=methods, tokens=tokens,
        warmup_tokens=_int(raw.get("warmup_tokens", 0), "warmup_tokens", minimum=0),
        warmup_updates=warmup_updates, warmup_default=warmup_default, scale_b2=scale_b2,
        schedule=schedule, ema_halflife_updates=ema,
        eval_every_tokens=_int(raw.get("eval_every_tokens", 0), "eval_every_tokens", minimum=0),
        min_evals=_int(raw.get("min_evals", DEFAULT_MIN_EVALS), "min_evals", minimum=0), crossing_tokens=crossing,
        targets=targets, stop_at_target=stop,
        stop_after_rejected=_int(raw.get("stop_after_rejected", 0), "stop_after_rejected", minimum=0),
        slurm={str(k): str(v) for k, v in slurm.items()})


def _base_config(raw: Mapping, root: Path) -> dict:
    """The base config: `base:` (a config file, its own `base:` chain followed) and/or an
    inline `config:` mapping merged over it."""

    require("base" in raw or "config" in raw,
            "A sweep spec needs 'base' (a config path relative to the spec), an inline 'config' mapping, "
            "or both (the inline mapping is merged over the base).")
    base: dict = {}
    if "base" in raw:
        path = root / str(raw["base"])
        require(path.is_file(), f"Sweep base config '{path}' does not exist ('base' is relative to the spec file).")
        base = read_config_yaml(path)
    if "config" in raw:
        require(isinstance(raw["config"], Mapping), "'config' must be a config mapping.")
        base = merge_raw(base, copy.deepcopy(dict(raw["config"])))
    base.pop("methods", None)          # replaced by the sweep's methods
    return base


def _method(entry: Any, i: int, spec: Mapping, global_vary: tuple) -> SweepMethod:

    where = f"methods[{i}]"
    require(isinstance(entry, Mapping) and isinstance(entry.get("name"), str) and entry["name"],
            f"'{where}' must be a mapping with a non-empty 'name', got {entry!r}.")
    name = entry["name"]
    where = f"methods.{name}"
    reg = registry.get(entry.get("method", name))
    require("batch_size" not in entry, f"{where}: 'batch_size' is set by the sweep; use 'batch_sizes: [...]'.")
    options = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    base_entry = registry.resolve_entry({"name": name, "method": reg.name, **options}, where=where)
    known = base_entry.hparams.to_dict()
    gn = reg.family == GN_FAMILY
    managed = ("inner_learning_rate", "inner_steps") if gn else ("learning_rate",)
    for key in managed:
        require(key not in options, f"{where}: '{key}' is set by the sweep (the lr grid, or B / b_inner); remove it.")
    for key in ("warmup_tokens", "warmup_updates"):       # (warmup_tokens: 0 leaves the method's own)
        require("warmup_steps" not in options or not (spec.get(key) or (key == "warmup_updates" and key in spec)),
                f"{where}: 'warmup_steps' conflicts with the spec's '{key}'.")
    b_inner, n_inner = entry.get("b_inner"), entry.get("n_inner")
    require(b_inner is None or n_inner is None,
            f"{where}: give 'b_inner' (N = B / b_inner: the batch grows through N) or 'n_inner' "
            f"(b_inner = B / N: the batch grows through the inner batch), not both.")
    if n_inner is not None:
        n_inner = _int(n_inner, f"{where}.n_inner", minimum=1)
    elif gn or b_inner is not None:
        # GN: the inner batch. A first-order method: the small-batch control, B / b_inner updates of
        # b_inner sequences per outer step (the trainer's per-method batch_size).
        b_inner = _int(b_inner, f"{where}.b_inner", minimum=1)
    lr = _lr_rule({**_lr_base(spec.get("lr")), **_lr_override(entry.get("lr"))}, where, reg.name, reg.family)
    vary = _vary(entry.get("vary") or {}, f"{where}.vary", allow_sections=False)
    vary += tuple((k.split(".", 2)[2], v) for k, v in global_vary if k.startswith(f"methods.{name}."))
    vary += tuple((k, v) for k, v in global_vary if not k.startswith("methods."))
    for key, _ in vary:
        if "." not in key:
            require(key in known, f"{where}.vary: unknown hyperparameter '{key}' for method "
                                               f"'{reg.name}'.{suggest(key, known)}")
            require(key not in ("learning_rate", "inner_learning_rate", "inner_steps", "batch_size"),
                    f"{where}.vary: '{key}' is set by the sweep's own grids.")
    batch_sizes = tuple(_int(b, f"{where}.batch_sizes", minimum=1)
                        for b in _list(entry.get("batch_sizes", spec.get("batch_sizes")), f"{where}.batch_sizes"))
    if b_inner is not None:
        bad = [b for b in batch_sizes if b % b_inner]
        require(not bad, f"{where}: batch sizes {bad} are not divisible by b_inner ({b_inner}); "
                         f"a GN outer step reads B / b_inner inner batches.")
    if n_inner is not None:
        bad = [b for b in batch_sizes if b % n_inner]
        require(not bad, f"{where}: batch sizes {bad} are not divisible by n_inner ({n_inner}); "
                         f"an outer step reads n_inner inner batches of B / n_inner.")
    seeds = tuple(_int(s, f"{where}.seeds", minimum=0)
                  for s in _list(entry.get("seeds", spec.get("seeds", [0])), f"{where}.seeds"))
    return SweepMethod(name=name, registered=reg.name, family=reg.family, options=options, lr=lr,
                       batch_sizes=batch_sizes, seeds=seeds, vary=vary, b_inner=b_inner, n_inner=n_inner)


def _lr_base(raw: Any) -> dict:
    require(raw is None or isinstance(raw, Mapping), f"'lr' must be a mapping ({', '.join(LR_KEYS)}), got {raw!r}.")
    return dict(raw or {})


def _lr_override(raw: Any) -> dict:
    """A method's `lr:` merged over the spec's: stating `values` or `center` replaces the other form."""
    out = _lr_base(raw)
    if "values" in out:
        out = {"center": None, **out}      # base_batch stays: scale_b2 uses it
    elif "center" in out:
        out = {"values": None, **out}
    return out


def _lr_rule(raw: dict, where: str, registered: str, family: str) -> LrRule:
    _check(raw, LR_KEYS, f"{where}.lr")
    raw = {k: v for k, v in raw.items() if v is not None}
    require(("values" in raw) != ("center" in raw),
            f"{where}.lr needs exactly one of 'values' (a list) or 'center' (with base_batch), got {raw}.")
    power = _num(raw.get("power", default_power(registered, family)), f"{where}.lr.power")
    base_batch = raw.get("base_batch")
    base_batch = None if base_batch is None else _int(base_batch, f"{where}.lr.base_batch", minimum=1)
    if "values" in raw:
        values = tuple(_num(v, f"{where}.lr.values", minimum=0.0, strict=True)
                       for v in _list(raw["values"], f"{where}.lr.values"))
        return LrRule(values=values, base_batch=base_batch, power=power)
    require(base_batch is not None, f"{where}.lr: 'center' needs 'base_batch' (the batch B0 at which lr0 holds).")
    points = _int(raw.get("points", 1), f"{where}.lr.points", minimum=1)
    factor = _num(raw.get("factor", 2.0), f"{where}.lr.factor")
    require(factor > 1.0, f"{where}.lr.factor must be > 1, got {factor}.")
    return LrRule(center=_num(raw["center"], f"{where}.lr.center", minimum=0.0, strict=True), base_batch=base_batch,
                  power=power, points=points, factor=factor)


def _vary(raw: Any, where: str, *, allow_sections: bool) -> tuple[tuple[str, tuple], ...]:
    require(isinstance(raw, Mapping), f"'{where}' must be a mapping of key -> list of values.")
    out = []
    for key, values in raw.items():
        key = str(key)
        head = key.split(".")[0]
        if allow_sections:
            require(head in SECTIONS + ("methods",) and key.count(".") >= (2 if head == "methods" else 1),
                    f"{where}: key '{key}' must look like train.<key>, model.<key>, data.<key> or "
                    f"methods.<name>.<key>.")
            require(key not in ("train.batch_size", "train.steps", "train.seed", "train.target_losses",
                                "train.stop_at_target", "train.ema_decay", "train.eval_every"),
                    f"{where}: '{key}' is set by the sweep itself (batch_sizes, tokens, seeds, targets, ...).")
        else:
            require("." not in key, f"{where}: key '{key}' must be a hyperparameter name of the method.")
        out.append((key, tuple(_list(values, f"{where}.{key}"))))
    return tuple(out)
