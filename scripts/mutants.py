"""Plant one-line bugs and check that the test suite catches each (run by hand, not in CI).

    python scripts/mutants.py [--only NAME,...] [--list]

For every mutant: copy the package and tests to a scratch directory, replace one
line, run the named test files there (pytest -x), and report whether the suite
failed ("caught") or passed ("SURVIVED"). Exit status 1 if any mutant survives.
A mutant whose target line is not found is an error: the list must follow the code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, exact old text, new text, test files)
MUTANTS = {
    "plan_cost_in_outer_steps": (
        "gn/studies/plan_cost.py",
        "    return run.steps * float(run.method.grad_evals_per_step) * cfg.train.batch_size * cfg.data.seq_len",
        "    return cfg.train.steps * float(run.method.grad_evals_per_step) * cfg.train.batch_size * cfg.data.seq_len",
        ["tests/test_plan_cost.py"]),
    "plan_cost_before_init": (
        "gn/studies/plan_cost.py",
        "    jax.eval_shape(run.method.init, params)     # sets what the cost needs of the parameters",
        "    pass",
        ["tests/test_plan_cost.py"]),
    "archive_runs_in_source_order": (
        "gn/studies/run_archive.py",
        '    return [with_read(r, read) for r in sorted(runs, key=lambda r: (Path(r["dir"]).name, r["dir"]))]',
        "    return [with_read(r, read) for r in runs]",
        ["tests/test_run_archive.py"]),
    "archive_keeps_stale_copy": (
        "gn/studies/run_archive.py",
        '            if Path(r["dir"]).name not in names:',
        "            if True:",
        ["tests/test_run_archive.py"]),
    "stop_reads_all_ignored": (
        "gn/train/hooks.py",
        '    if tcfg.stop_reads == "all":',
        "    if False:",
        ["tests/test_stop_rules.py"]),
    "stopped_run_never_continued": (
        "gn/train/workdirs.py",
        "    if reason in FINAL_STOPS and not _stop_holds(run, workdir, reason):",
        "    if False:",
        ["tests/test_stop_rules.py"]),
    "stall_counter_not_reset": (
        "gn/train/hooks.py",
        '        self.rejected_run = self.rejected_run + 1 if record.get("step_rejected", 0) > 0 else 0',
        '        self.rejected_run = self.rejected_run + (1 if record.get("step_rejected", 0) > 0 else 0)',
        ["tests/test_stop_rules.py"]),
    "one_seed_best_cell_seed_bootstrapped": (
        "gn/studies/intervals.py",
        "    if best_seeds[fitted].min() < 2:",
        "    if (arr != -np.inf).sum(-1).max() < 2:",
        ["tests/test_intervals.py"]),
    "backend_cost_not_counted": (
        "gn/methods/accumulate.py",
        "backend = float(self._backend_cost(params)) if self._backend_cost is not None else 0.0",
        "backend = 0.0",
        ["tests/test_lwgn.py"]),
    "curvature_batch_ignored": (
        "gn/optim/_lwgn.py",
        "inputs, targets, mask = _first(inputs, k), _first(targets, k), _first(mask, k)",
        "inputs, targets, mask = inputs, targets, mask",
        ["tests/test_lwgn.py"]),
    "kron_stats_cost_ignores_d_out": (
        "gn/optim/_kfac.py",
        "flops += 2.0 * ((d_in + d_out) if diagonal else (d_in ** 2 + d_out ** 2))",
        "flops += 2.0 * ((d_in + d_out) if diagonal else (d_in ** 2))",
        ["tests/test_fog.py"]),
    "train_documents_overlap": (
        "gn/data/text.py",
        "start = (0, 0) if first == 0 else ends[first - 1]",
        "start = (0, 0)",
        ["tests/test_text_source.py"]),
    "n_inner_ignored": (
        "gn/studies/spec.py",
        "            return batch_size // self.n_inner",
        "            return 16",
        ["tests/test_sweep.py"]),
    "gn_ignores_line_search_alpha": (
        "gn/methods/gauss_newton.py",
        "moved = jax.tree.map(lambda p, d: p + ls.alpha.astype(p.dtype) * d, theta, delta)",
        "moved = jax.tree.map(lambda p, d: p + d, theta, delta)",
        ["tests/test_gn_trust.py"]),
    "inner_weight_decay_forced_to_zero": (
        "gn/methods/gauss_newton.py",
        '"weight_decay": hp.inner_weight_decay, "weight_decay_mask": hp.inner_weight_decay_mask}',
        '"weight_decay": 0.0, "weight_decay_mask": hp.inner_weight_decay_mask}',
        ["tests/test_gn_trust.py"]),
    "inner_weight_decay_on_every_matrix": (
        "gn/methods/gn_config.py",
        'inner_weight_decay_mask: Any = opt("adam_side",',
        'inner_weight_decay_mask: Any = opt("matrices",',
        ["tests/test_gn_trust.py"]),
    "line_search_tokens_counted_as_training": (
        "gn/train/trainer.py",
        'c.update(step=step, tokens=c["tokens"] + plan.train * plan.micro_batch * run.source.seq_len,',
        'c.update(step=step, tokens=c["tokens"] + (plan.train + plan.aux) * plan.micro_batch * run.source.seq_len,',
        ["tests/test_gn_trust.py"]),
    "ema_once_per_outer_step": (
        "gn/train/trainer.py",
        "ema_update = _ema_fn(tcfg.ema_decay ** method.updates_per_step) if tcfg.ema_decay > 0 else None",
        "ema_update = _ema_fn(tcfg.ema_decay) if tcfg.ema_decay > 0 else None",
        ["tests/test_gn_trust.py"]),
    "inner_adam_lr_not_routed": (
        "gn/methods/gauss_newton.py",
        'inner["adam_learning_rate"] = hp.inner_adam_learning_rate',
        'inner["adam_learning_rate"] = None',
        ["tests/test_gn_trust.py"]),
    "masked_logits_not_masked": (
        "gn/curvature/losses.py",
        "p = jnp.where(_expand(keep), p, 0.0)",
        "p = p",
        ["tests/test_methods.py"]),
    "curvature_ce_hessian_drops_the_rank_one_term": (
        "gn/curvature/losses.py",
        "return s * (pv - p * jnp.sum(pv, axis=-1, keepdims=True))",
        "return s * pv",
        ["tests/test_curvature.py"]),
    "line_search_takes_the_worst_alpha": (
        "gn/methods/linesearch.py",
        "k = jnp.argmin(losses)",
        "k = jnp.argmax(losses)",
        ["tests/test_gauss_newton.py"]),
    "cg_step_size_off": (
        "gn/curvature/cg.py",
        "alpha = jnp.where(act, _safe_div(rz, pap), 0.0)",       # preconditioned CG: rᵀz / pᵀAp
        "alpha = jnp.where(act, 0.5 * _safe_div(rz, pap), 0.0)",
        ["tests/test_curvature.py"]),
    "lm_damping_down_factor_wrong": (
        "gn/methods/gn_cg.py",
        "LM_UP, LM_DOWN = 1.5, 2.0 / 3.0",
        "LM_UP, LM_DOWN = 1.5, 1.0",
        ["tests/test_gn_cg.py"]),
    "cg_cost_ignores_iterations_used": (
        "gn/methods/gn_cg.py",
        "iters = hp.cg_iters if cg_iters_used is None else int(cg_iters_used)",
        "iters = hp.cg_iters",
        ["tests/test_gn_cg.py"]),
    "line_search_grid_up_ignored": (
        "gn/methods/linesearch.py",
        "first = grid_alphas(-up, grid + up)",
        "first = grid_alphas(0, grid)",
        ["tests/test_gn_cg.py"]),
    "kfac_delta_not_rescaled_by_n": (
        "gn/optim/_kfac.py",
        "d = d * (n if loss_scale is None else loss_scale)",
        "d = d * (1.0 if loss_scale is None else loss_scale)",
        ["tests/test_fog.py"]),
    "soap_unrotates_with_the_wrong_side": (
        "gn/optim/_soap.py",
        "x = x @ q_r.T",
        "x = x @ q_r",
        ["tests/test_optim_seeds.py"]),
    "soap_no_second_moment_bias_correction": (
        "gn/optim/_soap.py",
        "v_hat = v / (1 - b2 ** kf).astype(v.dtype)",
        "v_hat = v",
        ["tests/test_optim_seeds.py"]),
    "gn_rejection_ignored": (
        "gn/methods/gauss_newton.py",
        "rejected = ~(jnp.isfinite(pred) & (pred > 0))",
        "rejected = jnp.asarray(False)",
        ["tests/test_gn_trust.py"]),
    "attention_chunk_mask_excludes_the_diagonal": (
        "gn/model/attention.py",
        "mask = (start + jnp.arange(q_chunk))[:, None] >= key_pos[None, :]",
        "mask = (start + jnp.arange(q_chunk))[:, None] > key_pos[None, :]",
        ["tests/test_attention.py"]),
    "chunked_rows_unstrided_on_the_way_back": (
        "gn/curvature/chunked_loss.py",
        "return jnp.swapaxes(xc, 0, 1).reshape((-1,) + xc.shape[2:])[:n]",
        "return xc.reshape((-1,) + xc.shape[2:])[:n]",
        ["tests/test_chunked.py"]),
    "ls_reject_increase_ignored": (
        "gn/methods/gauss_newton.py",
        "rejected = rejected | ~(ls.loss <= ls.loss0)",
        "rejected = rejected",
        ["tests/test_gn_trust.py"]),
    # The paper's protocol (issue 15; tests/test_paper_protocol.py).
    "paper_acceptance_ignored": (
        "gn/methods/gauss_newton.py",
        "rejected = (ls.alpha <= 0) | ~_all_finite(moved)",
        "rejected = ~(jnp.isfinite(pred) & (pred > 0))",
        ["tests/test_paper_protocol.py"]),
    "paper_acceptance_takes_a_nonfinite_step": (
        "gn/methods/gauss_newton.py",
        "rejected = (ls.alpha <= 0) | ~_all_finite(moved)",
        "rejected = jnp.asarray(False)",
        ["tests/test_paper_protocol.py"]),
    "paper_routing_nadam_on_embedding_and_head": (
        "gn/methods/paper_inner.py",
        'nesterov=eh["nesterov"]',
        "nesterov=True",
        ["tests/test_paper_protocol.py"]),
    "per_group_clip_uses_the_global_norm": (
        "gn/optim/transforms.py",
        "sq[g] = sq.get(g, 0.0) + jnp.sum(jnp.square(x))",
        "sq[g] = sum(jnp.sum(jnp.square(y)) for y in leaves)",
        ["tests/test_paper_protocol.py"]),
    "target_from_ignored_by_the_stop": (
        "gn/train/hooks.py",
        "return early_stop(sess.run.cfg.train, info.record, sess.history.best, run_targets(sess.run))",
        "return early_stop(sess.run.cfg.train, info.record, sess.history.best)",
        ["tests/test_paper_protocol.py"]),
}


def _scratch() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="gn-mutant-"))
    for name in ("gn", "tests", "examples", "configs", "experiments", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, tmp / name)
    return tmp


def run_mutant(name: str) -> tuple[bool, float, str]:
    """(caught, seconds, last line of pytest's output) for one mutant."""
    path, old, new, tests = MUTANTS[name]
    tmp = _scratch()
    try:
        target = tmp / path
        text = target.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name}: the line to mutate occurs {text.count(old)} times in {path}")
        target.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(tmp), "JAX_PLATFORMS": "cpu"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-o", "addopts=", "-m", "not slow",
                               "-p", "no:cacheprovider", *tests], cwd=tmp, env=env, capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        return proc.returncode != 0, time.perf_counter() - t0, last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated mutant names")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] if args.only else list(MUTANTS)
    if args.list:
        for n in names:
            print(f"{n:45s} {MUTANTS[n][0]}")
        return 0
    survived = []
    for n in names:
        caught, dt, last = run_mutant(n)
        print(f"{'caught  ' if caught else 'SURVIVED'} {n:45s} {dt:6.1f} s  {last}", flush=True)
        if not caught:
            survived.append(n)
    print(f"{len(names) - len(survived)}/{len(names)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
