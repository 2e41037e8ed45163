"""The trainer loop's per-step work as ordered hooks with a cadence.

Modelled on levanter's trainer hooks (stanford-crfm/levanter: `Trainer.add_hook(fn, every=k)` in
src/levanter/trainer.py, `TrainerHooks.run_hooks(info, force=...)` over a `StepInfo`): the loop
(`gn.train.trainer.loop`) only runs a step and then `Hooks.run(StepInfo)`; evaluation, the
divergence check, the metrics log, early stops, the method's notes, checkpoints and the
progress bar are hooks registered by `default_hooks` (called by `setup`). Add your own with
`Session.add_hook(fn, every=k)` or `train(..., hooks=[Hook(fn, every=k)])`.

Cadence. `every=k` runs a hook after every step divisible by k (steps count from 1);
`at_last=True` also runs it on the run's last step (levanter's `force=True` after its last
step): train.steps (scaled, gn.train.run), or the step at which a hook asked to stop;
`every=0, at_last=True` runs it there only.

Stopping. A hook returns None, or a reason (a string) to stop the run after this step. The
first reason makes the step the last: the hooks after it still run, see `info.last` and
`info.stop`, and the loop ends after them; the reason is summary.json's `stop_reason`. (Only
the trainer's own reasons make the workdir finished, gn.train.workdirs.finished_summary: after
a user's stop, rerunning resumes from the newest checkpoint.) A diverged step (non-finite, or
a hook set `sess.divergence`) runs only the hooks registered with `on_diverged=True`.

Order (hooks run in registration order; `before=` inserts ahead of a named one). The
defaults, and why in this order:

1. evaluate    every eval_every·m steps (m = run.every, a small-batch method's steps per
               reference step) and the last: the validation loss (and the EMA's)
               goes into the record first, since the hooks after read it.
2. divergence  every step, also diverged ones: a non-finite step, or a validation loss above
               the initial one by train.divergence_margin, stops the run; after evaluate (it
               reads the loss), before metrics (the record says "diverged") and before any
               checkpoint (a diverged state is never saved).
3. metrics     every step, also diverged ones: the record to metrics.jsonl and train.loggers
               (TensorBoard, W&B), after everything that adds to it; the run's evaluation
               history (best, last) is updated from it.
4. early_stop  train.max_tokens, train.stop_after_rejected, train.stop_at_target (waiting for the
               losses train.stop_reads names): reads the history's best losses and rejected steps;
               before the checkpoint, so that the stopping step is saved.
5. notes       the method's one-line remarks (printed through the progress bar).
6. checkpoint  every checkpoint_every·m steps and the last (an early stop's included).
7. progress    the bar, last, with the record's numbers (not advanced at a stopping step).

User hooks go after these unless `before=` says otherwise (`Hook(fn, before="checkpoint")`:
a user hook that stops the run then has its step checkpointed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

from gn.config import target_keys
from gn.train import distributed

# The trainer's Session (gn.train.trainer), which holds the hooks: named, not imported, so the
# trainer imports this module and not the other way round.
Session = Any

HookFn = Callable[["StepInfo"], Optional[str]]


@dataclasses.dataclass
class StepInfo:
    """What the hooks of one step see."""

    step: int
    record: dict           # this step's metrics record (hooks before "metrics" may add to it)
    metrics: dict          # the method's metrics of the step (floats)
    sess: Session
    finite: bool = True    # False: the step's loss or parameters were non-finite and were dropped
    final: bool = False    # the run's last step (train.steps)
    stop: Optional[str] = None   # the first stop reason a hook gave this step

    @property
    def last(self) -> bool:
        """The run's last step: train.steps, or a hook asked to stop."""
        return self.final or self.stop is not None

    @property
    def diverged(self) -> bool:
        return not self.finite or self.sess.diverged


@dataclasses.dataclass
class Hook:
    """`fn(info)` after the steps of its cadence; returns None or a reason to stop."""

    fn: HookFn
    every: int = 1                  # steps between calls (0: only at_last)
    at_last: bool = False           # also on the run's last step
    on_diverged: bool = False       # also on a diverged step
    name: str = ""                  # unique in a registry ("": the function's name, made unique)
    start: Optional[Callable[[], None]] = None   # when the loop starts
    close: Optional[Callable[[], None]] = None   # when it ends (also on an exception)
    before: Optional[str] = None    # registered just before the hook of this name (default: last)

    def __post_init__(self):
        if self.every < 0 or (self.every == 0 and not self.at_last):
            raise ValueError(f"hook {self.name or self.fn}: every must be >= 1, or 0 with at_last=True; "
                             f"got every={self.every}, at_last={self.at_last}")

    def due(self, info: StepInfo) -> bool:
        if info.diverged and not self.on_diverged:
            return False
        return (self.every > 0 and info.step % self.every == 0) or (self.at_last and info.last)


class Hooks:
    """An ordered registry of hooks (levanter's TrainerHooks with stop reasons and names)."""

    def __init__(self, hooks: tuple[Hook, ...] = ()):
        self._hooks: list[Hook] = []
        for h in hooks:
            self.add(h)

    def add(self, hook: Hook, *, before: Optional[str] = None) -> Hook:
        """Register `hook` last, or just before the hook named `before` (else `hook.before`)."""
        if not hook.name:
            base = getattr(hook.fn, "__name__", "hook")
            hook.name = next(n for n in [base] + [f"{base}#{i}" for i in range(2, len(self._hooks) + 3)]
                             if n not in self.names())
        if hook.name in self.names():
            raise ValueError(f"a hook named {hook.name!r} is already registered ({self.names()})")
        before = before or hook.before
        self._hooks.insert(self._index(before) if before else len(self._hooks), hook)
        return hook

    def add_hook(self, fn: Optional[HookFn] = None, *, every: int = 1, at_last: bool = False,
                 on_diverged: bool = False, name: str = "", before: Optional[str] = None,
                 start: Optional[Callable[[], None]] = None, close: Optional[Callable[[], None]] = None):
        """Register `fn(info)` to run every `every` steps (a decorator when `fn` is omitted)."""
        def register(f: HookFn):
            self.add(Hook(f, every, at_last, on_diverged, name, start, close, before))
            return f

        return register if fn is None else register(fn)

    def remove(self, name: str) -> Hook:
        return self._hooks.pop(self._index(name))

    def names(self) -> list[str]:
        return [h.name for h in self._hooks]

    def __iter__(self) -> Iterator[Hook]:
        return iter(list(self._hooks))

    def __len__(self) -> int:
        return len(self._hooks)

    def _index(self, name: str) -> int:
        for i, h in enumerate(self._hooks):
            if h.name == name:
                return i
        raise KeyError(f"no hook named {name!r}; registered: {self.names()}")

    def start(self) -> None:
        for h in self._hooks:
            if h.start is not None:
                h.start()

    def close(self) -> None:
        """Every hook's close, even when one raises (the first error is raised after)."""
        error = None
        for h in self._hooks:
            try:
                if h.close is not None:
                    h.close()
            except Exception as exc:  # the others still close (a progress bar, a logger)
                error = error or exc
        if error is not None:
            raise error

    def run(self, info: StepInfo) -> Optional[str]:
        """Run the due hooks in order; the first stop reason given (None: go on)."""
        for h in list(self._hooks):
            if h.due(info):
                reason = h.fn(info)
                if reason and info.stop is None:
                    info.stop = str(reason)
        return info.stop


# --- the default hooks --------------------------------------------------------------------


@dataclasses.dataclass
class EvalHistory:
    """The validation losses the hooks need from the run so far (a resumed run's included)."""

    initial: float        # the step-0 validation loss: train.divergence_margin is measured from it
    last: float           # the latest one (the progress bar)
    best: dict            # {"val_loss": min, "val_loss_ema": min} over finite values (early stop)
    rejected_run: int = 0  # consecutive rejected steps (step_rejected) up to the latest (stop_after_rejected)

    @classmethod
    def of(cls, rows: list[dict]) -> "EvalHistory":
        evals = [r for r in rows if r.get("val_loss") is not None]
        last = evals[-1]["val_loss"] if evals else float("nan")
        initial = evals[0]["val_loss"] if evals else float("nan")
        best = {k: min((r[k] for r in evals if r.get(k) is not None and math.isfinite(r[k])), default=math.inf)
                for k in ("val_loss", "val_loss_ema")}
        history = cls(initial, last, best)
        for r in rows:
            if r.get("step", 0) > 0:
                history.count_rejected(r)
        return history

    def count_rejected(self, record: dict) -> None:
        self.rejected_run = self.rejected_run + 1 if record.get("step_rejected", 0) > 0 else 0

    def update(self, record: dict) -> None:
        for k in self.best:
            if record.get(k) is not None and math.isfinite(record[k]):
                self.best[k] = min(self.best[k], record[k])
        self.last = record.get("val_loss", self.last)
        self.count_rejected(record)


def default_hooks(sess: Session, save: Callable[[Session], None]) -> Hooks:
    """The trainer's hooks for `sess`, in the order of this module's docstring; `save(sess)`
    writes a checkpoint (gn.train.trainer.save_checkpoint)."""
    run, tcfg = sess.run, sess.run.cfg.train
    bar = _Progress(sess)
    hooks = Hooks()
    hooks.add_hook(_evaluate, every=tcfg.eval_every * run.every, at_last=True, name="evaluate")
    hooks.add_hook(_divergence, on_diverged=True, name="divergence")
    hooks.add_hook(_metrics, on_diverged=True, name="metrics")
    hooks.add_hook(_early_stop_hook, name="early_stop")
    hooks.add_hook(lambda info: bar.notes(info), name="notes")
    hooks.add_hook(lambda info: save(info.sess), every=tcfg.checkpoint_every * run.every, at_last=True,
                   name="checkpoint")
    hooks.add_hook(bar.update, name="progress", start=bar.start, close=bar.close)
    return hooks


def _evaluate(info: StepInfo) -> None:
    sess = info.sess
    info.record["val_loss"] = float(sess.evaluate(sess.state["params"], sess.val))
    if sess.ema_update is not None:
        info.record["val_loss_ema"] = float(sess.evaluate(sess.state["ema"], sess.val))


def _divergence(info: StepInfo) -> Optional[str]:
    sess, record = info.sess, info.record
    if not info.finite:
        what = "training loss" if not math.isfinite(info.metrics["train_loss"]) else "parameters"
        sess.divergence = f"non-finite {what} at step {info.step}"
    elif "val_loss" in record:
        sess.divergence = check_divergence(record["val_loss"], sess.history.initial,
                                           sess.run.cfg.train.divergence_margin, info.step)
    if not sess.divergence:
        return None
    record["diverged"] = True
    return "diverged"


def _metrics(info: StepInfo) -> None:
    info.sess.log.append(info.record)
    if not info.diverged:
        info.sess.history.update(info.record)


def _early_stop_hook(info: StepInfo) -> Optional[str]:
    sess = info.sess
    tcfg = sess.run.cfg.train
    return early_stop(tcfg, info.record, sess.history.best, stop_keys(tcfg, sess.run.entry.target_from),
                      rejected_run=sess.history.rejected_run)


def check_divergence(val: float, initial: float, margin: float, step: int) -> str:
    """Why the run diverged at this evaluation, or "": a non-finite validation loss, or one
    above the initial by more than `train.divergence_margin` nats (0 disables that check)."""
    if not math.isfinite(val):
        return f"non-finite validation loss at step {step}"
    if margin > 0 and math.isfinite(initial) and val > initial + margin:
        return (f"validation loss {val:.4g} at step {step} is above the initial {initial:.4g} by more than "
                f"train.divergence_margin = {margin:g}")
    return ""


def run_targets(run: Any) -> tuple[str, ...]:
    """The losses this run's targets are read from (the entry's target_from, else train.target_from)."""
    tcfg = run.cfg.train
    return target_keys(run.entry.target_from or tcfg.target_from, tcfg.ema_decay)


def early_stop(tcfg, record: dict, best: dict, keys: tuple[str, ...] = ("val_loss", "val_loss_ema"),
               rejected_run: int = 0) -> str | None:
    """Why the run stops after this step's record, or None.

    "max_tokens": the token budget is spent. "stalled": the last train.stop_after_rejected steps
    (`rejected_run` of them so far) were all rejected, θ unchanged. "targets_reached": at an
    evaluation, every target loss has been reached by each of `keys` that is evaluated
    (train.stop_reads: the losses of train.target_from, or all of them; `best` holds their minima so far).
    """
    if tcfg.max_tokens and record["tokens"] >= tcfg.max_tokens:
        return "max_tokens"
    if tcfg.stop_after_rejected and rejected_run >= tcfg.stop_after_rejected:
        return "stalled"
    if tcfg.stop_at_target and "val_loss" in record:
        for key in keys:
            if key in record and not all(best[key] <= t for t in tcfg.target_losses):
                return None
        return "targets_reached"
    return None


def stop_keys(tcfg, target_from: str | None = None) -> tuple[str, ...]:
    """The validation losses stop_at_target waits for (train.stop_reads; `target_from`: the method
    entry's own, else train.target_from)."""
    if tcfg.stop_reads == "all":
        return ("val_loss", "val_loss_ema")
    return target_keys(target_from or tcfg.target_from, tcfg.ema_decay)


def stop_holds(tcfg, keys: tuple[str, ...], rows: list[dict], stop_reason: str | None) -> bool:
    """Whether a run's recorded early stop still holds under this config (its metrics `rows`).

    A run stopped under another rule is continued from its last checkpoint: one stopped at the
    EMA's crossing of the targets before the raw parameters' (train.stop_reads: target, the rule
    before `gn sweep` set "all"), or stalled under a smaller train.stop_after_rejected. Other
    reasons (max_tokens, the last step) hold."""
    history = EvalHistory.of(rows)
    if stop_reason == "targets_reached":
        evaluated = {k for r in rows if r.get("step", 0) > 0 and "val_loss" in r for k in keys if k in r}
        return tcfg.stop_at_target and all(history.best[k] <= t for k in evaluated for t in tcfg.target_losses)
    if stop_reason == "stalled":
        return 0 < tcfg.stop_after_rejected <= history.rejected_run
    return True


class _Progress:
    """The tqdm bar (train.progress) of the loop, and the method's notes printed through it."""

    def __init__(self, sess: Session):
        self.sess, self.bar = sess, None

    def start(self) -> None:
        run, c = self.sess.run, self.sess.counters
        if run.cfg.train.progress and distributed.is_primary():   # one bar per run, not per process
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.steps, initial=c["step"], desc=run.entry.name, unit="step",
                            dynamic_ncols=True, leave=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def notes(self, info: StepInfo) -> None:
        for note in self.sess.run.method.notes(info.step, info.metrics):
            if self.bar is not None:
                self.bar.write(note)
            else:
                print(note)

    def update(self, info: StepInfo) -> None:
        if self.bar is None or info.stop is not None:
            return
        plan = self.sess.run.method.plan
        tokens_per_step = plan.train * plan.micro_batch * self.sess.run.source.seq_len
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{info.metrics['train_loss']:.3f}", val=f"{self.sess.history.last:.3f}",
                             tok_s=f"{tokens_per_step / info.record['step_time_s']:,.0f}")


__all__ = ["Hook", "Hooks", "StepInfo", "EvalHistory", "default_hooks", "check_divergence", "early_stop",
           "run_targets", "stop_keys", "stop_holds"]
