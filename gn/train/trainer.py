"""One trainer for every method.

`train(cfg, method_name, workdir)` runs one method from the config and writes:

    workdir/config.yaml     the fully resolved config (this method only)
    workdir/metrics.jsonl   one JSON object per step (+ a step-0 evaluation)
    workdir/summary.json    final/best losses, steps/tokens/updates to each target, wall time
    workdir/checkpoints/    orbax checkpoints (params, method state, EMA, RNG, data position)
    workdir/loss.png        train and validation loss against outer steps, updates, grad evals, wall time

Steps and tokens are accounted the same way for every method: a step reads
`method.plan.train` batches of training data (counted in `tokens`) and
`method.plan.aux` auxiliary batches, e.g. line-search data (counted in
`aux_tokens`). Rerunning on a workdir with checkpoints resumes from the newest
good one and recomputes the steps after it, so the finished metrics equal those
of an uninterrupted run.

`loop` runs a step, then the session's hooks (gn/train/hooks.py: evaluation,
divergence, metrics log, early stop, notes, checkpoint, progress bar, in that
order), and stops when one asks; `train(..., hooks=...)` or `Session.add_hook`
adds a user's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gn.config import Config, dump_config
from gn.curvature.objective import lm_loss
from gn.model import FlaxLM, count_params, init_params
from gn.train import distributed, interrupts, workdirs
from gn.train import mesh as meshlib
from gn.train import sharding
from gn.train.checkpoint import Checkpointer
from gn.train.hooks import EvalHistory, Hook, Hooks, StepInfo, default_hooks, run_targets
from gn.train.memory import describe as describe_memory
from gn.train.loggers import close_metrics_log, open_metrics_log
from gn.train.metrics import MetricsLog, MirrorLog, summarize
from gn.train.noise import NoiseScaleTracker, chunked, estimate, make_measure
from gn.train.run import FINAL_PARAMS, Run, abstract, prepare, warm_start
from gn.train.timing import compile_clock


def _eval_fn(apply_fn):
    @jax.jit
    def evaluate(params, val):
        return jax.lax.map(lambda b: lm_loss(apply_fn, params, b), val).mean()

    return evaluate


def _ema_fn(decay: float):
    @jax.jit
    def update(ema, params):
        return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)

    return update


@jax.jit
def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _all_finite(tree: Any) -> bool:
    """One device round trip for the whole tree (checked every step)."""
    return bool(_finite(tree))


@dataclasses.dataclass
class Session:
    """The mutable state of one run between setup and finish."""

    run: Run
    workdir: Path
    state: dict            # params, opt_state, rng (+ ema)
    counters: dict         # step, tokens, aux_tokens, updates, grad_evals, wall_time_s
    log: MetricsLog
    ckpt: Checkpointer
    evaluate: Any
    ema_update: Any
    val: Any
    noise: Any = None      # (measure fn, NoiseScaleTracker) when train.noise_scale_every > 0
    divergence: str = ""   # why the run diverged ("" while it has not)
    stop_reason: str = "steps"
    compile_mark: float = 0.0   # compile_clock() reading at the start of the current step
    history: EvalHistory = dataclasses.field(default_factory=lambda: EvalHistory.of([]))
    hooks: Hooks = dataclasses.field(default_factory=Hooks)   # run after every step (gn.train.hooks)

    @property
    def diverged(self) -> bool:
        return bool(self.divergence)

    def add_hook(self, fn=None, *, every: int = 1, **kw):
        """Run `fn(info: StepInfo)` after every `every` steps (gn.train.hooks.Hooks.add_hook)."""
        return self.hooks.add_hook(fn, every=every, **kw)


def setup(run: Run, workdir: Path) -> Session:
    """Write the resolved config, initialise (or warm-start) the state and restore
    the newest verified checkpoint; a fresh run logs its step-0 evaluation. The session's
    hooks are the trainer's defaults (gn.train.hooks.default_hooks)."""
    cfg, method, mesh = run.cfg, run.method, run.mesh
    tcfg = cfg.train
    workdir.mkdir(parents=True, exist_ok=True)
    primary = distributed.is_primary()    # process 0 writes the run's files (gn.train.distributed)
    resolved = workdirs.resolved_config(run)
    if primary:
        dump_config(resolved, workdir / "config.yaml")
    evaluate = _eval_fn(run.apply_fn)
    # The decay counts sequential updates, so a GN outer step of N inner updates decays N times.
    ema_update = _ema_fn(tcfg.ema_decay ** method.updates_per_step) if tcfg.ema_decay > 0 else None
    noise = (make_measure(run.apply_fn), NoiseScaleTracker()) if tcfg.noise_scale_every else None
    val = meshlib.put_batches(run.source.validation(tcfg.eval_batch_size), mesh)

    # Parameters, optimizer state and EMA by the sharding rule (replicated when train.fsdp = 1);
    # the methods' steps pin their outputs to the same rule (MethodContext.constrain).
    shard = lambda tree: sharding.shard_tree(tree, mesh, tcfg.fsdp_min_size)
    params = shard(init_params(run.model_cfg, jax.random.PRNGKey(tcfg.seed)))
    if tcfg.init_from:
        params = warm_start(tcfg.init_from, params)
    state = {"params": params, "opt_state": shard(method.init(params)),
             "rng": meshlib.put_replicated(jax.random.PRNGKey(tcfg.seed + 1), mesh)}
    if ema_update is not None:
        state["ema"] = params

    ckpt = Checkpointer(workdir / "checkpoints", keep=tcfg.keep_checkpoints)
    log = (open_metrics_log(workdir, tcfg.loggers, run_name=f"{workdir.name}", config=resolved.to_dict())
           if primary else MirrorLog(workdir / "metrics.jsonl"))
    counters = {"step": 0, "tokens": 0, "aux_tokens": 0, "updates": 0, "grad_evals": 0.0, "wall_time_s": 0.0}
    restored = workdirs.restore(ckpt, abstract(state), workdir)   # a mismatch: ConfigError
    if restored is not None:
        _, state, meta = restored
        counters.update(meta["counters"])
        run.source.load_state_dict(meta["data"])
        if noise is not None and "noise" in meta:
            noise[1].load_state_dict(meta["noise"])
        log.truncate_after(counters["step"])
    else:
        log.truncate_after(-1)
        loss0 = float(evaluate(state["params"], val))
        log.append({"step": 0, "outer_step": 0.0, **{k: v for k, v in counters.items() if k != "step"},
                    "val_loss": loss0, **({"val_loss_ema": loss0} if ema_update is not None else {})})
    # The log is read once (it holds a resumed run's history); the hooks keep what they need.
    sess = Session(run, workdir, state, counters, log, ckpt, evaluate, ema_update, val, noise,
                   history=EvalHistory.of(log.read()))
    sess.hooks = default_hooks(sess, save_checkpoint)
    return sess


def _one_step(sess: Session, step: int) -> tuple[dict, dict]:
    """Read the step's batches and run the method; (new state, metrics)."""
    run, plan = sess.run, sess.run.method.plan
    sess.compile_mark = compile_clock().mark()
    host = run.source.next(plan.train + plan.aux, plan.micro_batch)
    train_b = meshlib.put_batches(host[:plan.train], run.mesh)
    aux_b = meshlib.put_batches(host[plan.train:], run.mesh) if plan.aux else None
    rng, sub = jax.random.split(sess.state["rng"])
    params, opt_state, m = run.method.step(sess.state["params"], sess.state["opt_state"], train_b, aux_b, sub)
    m = {k: float(v) for k, v in jax.device_get(m).items()}   # one transfer, not one per metric
    if sess.noise is not None and step % run.cfg.train.noise_scale_every == 0:
        m.update(_noise_scale(sess, train_b))
    return {**sess.state, "params": params, "opt_state": opt_state, "rng": rng}, m


def _noise_scale(sess: Session, train_b) -> dict:
    """B_simple from the step's training batches at θ_t (before the update)."""
    measure, tracker = sess.noise
    chunks = chunked(train_b)
    small_sq, big_sq = (float(x) for x in measure(sess.state["params"], chunks))
    b = chunks.shape[1]
    return tracker.update(estimate(small_sq, big_sq, b, b * chunks.shape[0]))


def _advance(sess: Session, step: int, m: dict, dt: float) -> dict:
    """Count the step's tokens, updates and cost; the step's metrics record.

    `step_time_s` is the whole step, `compile_time_s` the part of it spent tracing
    and compiling (gn.train.timing); `wall_time_s` sums the rest over the run."""
    run, method, c = sess.run, sess.run.method, sess.counters
    plan = method.plan
    compile_s = min(dt, compile_clock().since(sess.compile_mark))
    c.update(step=step, tokens=c["tokens"] + plan.train * plan.micro_batch * run.source.seq_len,
             aux_tokens=c["aux_tokens"] + plan.aux * plan.aux_micro_batch * run.source.seq_len,
             updates=c["updates"] + method.updates_per_step,
             grad_evals=c["grad_evals"] + m.pop("grad_evals", method.grad_evals_per_step),
             wall_time_s=c["wall_time_s"] + (dt - compile_s),
             compile_time_s=c.get("compile_time_s", 0.0) + compile_s)
    return {"step": step, "outer_step": step / run.every, "tokens": c["tokens"], "aux_tokens": c["aux_tokens"],
            "updates": c["updates"], "grad_evals": c["grad_evals"], "lr": method.lr(step - 1),
            "step_time_s": dt, "compile_time_s": compile_s, "wall_time_s": c["wall_time_s"], **m}


def _train_step(sess: Session) -> StepInfo:
    """Run the next step and count it; its state is kept only when its loss and parameters
    are finite (the EMA follows the kept parameters)."""
    step = sess.counters["step"] + 1
    t0 = time.perf_counter()
    state, m = _one_step(sess, step)
    finite = math.isfinite(m["train_loss"]) and _all_finite(state["params"])
    if finite:
        if sess.ema_update is not None:
            state["ema"] = sess.ema_update(state["ema"], state["params"])
        sess.state = state
    # A dropped step's tokens were read, so they are counted.
    record = _advance(sess, step, m, time.perf_counter() - t0)
    return StepInfo(step, record, m, sess, finite=finite, final=step == sess.run.steps)


def loop(sess: Session) -> None:
    """Train from the session's step to the run's last step: each step, then the session's
    hooks (evaluating, logging and checkpointing on their cadences: gn.train.hooks); stop when
    a hook asks (a non-finite step, a diverged evaluation, train.max_tokens,
    train.stop_at_target, a user's hook) or at a SIGTERM/Ctrl-C before a step."""
    hooks = sess.hooks
    hooks.start()
    try:
        while sess.counters["step"] < sess.run.steps:
            if interrupts.agreed():      # SIGTERM/Ctrl-C (in any process): stop at this step boundary
                break
            reason = hooks.run(_train_step(sess))
            if reason is not None:
                sess.stop_reason = reason
                break
    finally:
        hooks.close()


def finish(sess: Session) -> dict:
    """Save the final parameters (never non-finite ones), write summary.json and the plot."""
    run, c, workdir = sess.run, sess.counters, sess.workdir
    method, plan = run.method, run.method.plan
    if not sess.diverged:
        Checkpointer(workdir / FINAL_PARAMS, keep=1).save(c["step"], {"params": sess.state["params"]},
                                                          {"counters": c})
    close_metrics_log(sess.log)   # TensorBoard / W&B (train.loggers); metrics.jsonl needs no closing
    rows = sess.log.read()
    summary = {
        "method": run.entry.name,
        "registered_method": run.entry.method,
        **summarize(rows, run.cfg.train.target_losses, key=run_targets(run)[0]),
        **method.summarize(rows),
        "wall_time_s": c["wall_time_s"],
        "compile_time_s": c.get("compile_time_s", 0.0),
        "diverged": sess.diverged,
        "stop_reason": "diverged" if sess.diverged else sess.stop_reason,
        "divergence": sess.divergence or None,
        "batch_size": run.batch_size,
        "seq_len": run.source.seq_len,
        "tokens_per_step": plan.train * plan.micro_batch * run.source.seq_len,
        "updates_per_step": method.updates_per_step,
        "grad_evals_per_step": method.grad_evals_per_step,
        "family": run.entry.hparams.family,
        "loss_floor": run.source.loss_floor,
        "num_params": count_params(run.model_cfg),
        **({"model": run.model_cfg.name} if isinstance(run.model_cfg, FlaxLM) else {}),
        "hparams": run.entry.to_dict(),
        **({"memory": run.memory} if run.memory else {}),
        "data_passes": data_passes(run.source),
        **_device_peak(),
    }
    if not distributed.is_primary():      # process 0 writes summary.json and the plot
        return summary
    if (summary["data_passes"] or 0) > 1:
        print(f"warning: the run read its training data {summary['data_passes']:.2f} times (windows repeated; "
              "line-search batches count): a study that must not repeat data needs a larger corpus or fewer tokens",
              flush=True)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    try:
        from gn.train.plots import plot_run  # matplotlib: imported only when a run finishes

        plot_run(rows, workdir / "loss.png", title=run.entry.name, floor=run.source.loss_floor,
                 targets=run.cfg.train.target_losses)
    except Exception as exc:  # a plot must never lose a finished run
        print(f"warning: could not write the loss plot: {exc}")
    return summary


def data_passes(source) -> float | None:
    """How many times a finite source's training windows were read (epochs + the fraction of the current
    one; line-search batches count, as they come from the same stream); None for unbounded sources."""
    num_train = getattr(source, "num_train", None)
    if not num_train:
        return None
    return float(source.epoch + source.index / num_train)


def _device_peak() -> dict:
    """{"device_peak_bytes": n} where the backend reports its peak (GPUs; not CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics raise or return None
        stats = {}
    return {"device_peak_bytes": int(stats["peak_bytes_in_use"])} if "peak_bytes_in_use" in stats else {}


def train(cfg: Config, method_name: str, workdir: str | Path, *, run: Run | None = None,
          branch: str | Path | None = None, hooks: Sequence[Hook] = (), model: Any = None) -> dict:
    """Train one method of `cfg` in `workdir` (resuming if it holds checkpoints); return the summary.

    Before any compute the workdir is locked and its stored config compared with
    this one (gn/train/workdirs.py); a finished run returns its stored summary.
    `branch`: continue the run of `workdir` in this new directory with `cfg`.
    SIGTERM/Ctrl-C stop at a step boundary with a checkpoint (gn.errors.Stopped).
    `hooks`: more hooks (gn.train.hooks.Hook) after the trainer's own, run after every step.
    `model`: a gn.model.FlaxLM (any flax Module from tokens to logits) instead of cfg.model.
    """
    run = run or prepare(cfg, method_name, model=model)
    with workdirs.claim(run, Path(workdir), branch=branch) as claim:
        say = print if distributed.is_primary() else (lambda *a, **k: None)
        if claim.finished is not None:
            say(f"finished: {claim.workdir} holds a finished run (summary.json); nothing to do", flush=True)
            return claim.finished
        with interrupts.handled():
            sess = setup(run, claim.workdir)
            for hook in hooks:
                sess.hooks.add(hook)
            if describe_memory(run.memory):
                say(describe_memory(run.memory), flush=True)
            if sess.counters["step"] > 0:
                say(f"resumed from step {sess.counters['step']} in {claim.workdir}", flush=True)
            loop(sess)
            interrupts.stop_if_requested(sess, save_checkpoint)
            return finish(sess)


def save_checkpoint(sess: Session) -> None:
    """Checkpoint the session's current step (the same contents as the loop's cadence saves)."""
    run, c = sess.run, sess.counters
    meta = {"counters": c, "data": run.source.state_dict()}
    if sess.noise is not None:
        meta["noise"] = sess.noise[1].state_dict()
    sess.ckpt.save(c["step"], sess.state, meta)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


__all__ = ["train", "prepare", "setup", "loop", "finish", "Run", "Session", "Hook", "StepInfo"]
