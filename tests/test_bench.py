"""Smoke tests of the benchmarks: JSON schema and internal consistency on a tiny model.

The benchmarks run as the user runs them, `python -m gn.bench.cli ... --json`, in a
subprocess with XLA's cheapest optimisation level (the values are not judged, only
their consistency) and a persistent compilation cache under .pytest_cache, so that
re-runs skip compilation.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn.bench import cli
from gn.bench.gn_step import GOALS, format_gn_table, inner_step_fn
from gn.bench.optimizers import format_optimizer_table, tree_bytes
from gn.model import init_params, make_apply, model_config
from gn.methods import registry
from gn.methods.base import MethodContext

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "hidden=16", "--model", "layers=1", "--model", "heads=2", "--model", "ffn=32",
        "--vocab-size", "64", "--seq-len", "8"]

TIMES = {"adamw_step_s": "adamw_step", "muon_step_s": "muon_step", "value_and_grad_s": "value_and_grad",
         "gn_inner_step_s": "gn_inner_step", "gn_prox_linear_inner_step_s": "gn_prox_linear_inner_step",
         "gn_layerwise_inner_step_s": "gn_layerwise_inner_step", "linesearch_s": "linesearch",
         "outer_step_s": "outer_step"}
RATIOS = {
    "gn_inner_over_muon": ("gn_inner_step_s", "muon_step_s", 1),
    "gn_prox_linear_inner_over_muon": ("gn_prox_linear_inner_step_s", "muon_step_s", 1),
    "gn_layerwise_inner_over_gn_inner": ("gn_layerwise_inner_step_s", "gn_inner_step_s", 1),
    "gn_layerwise_inner_over_blocks_times_gn_inner": ("gn_layerwise_inner_step_s", "gn_inner_step_s", "blocks"),
    "linesearch_fraction_of_outer": ("linesearch_s", "outer_step_s", 1),
    "gn_inner_over_value_and_grad": ("gn_inner_step_s", "value_and_grad_s", 1),
}


@pytest.fixture(scope="module")
def run_cli(request):
    cache = request.config.cache.mkdir("gn_bench_xla_cache") if request.config.cache else None

    def run(*args):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
        if cache is not None:
            env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        proc = subprocess.run([sys.executable, "-m", "gn.bench.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    return run


def test_gn_bench_json_is_complete_and_consistent(run_cli):
    res = run_cli("--json", *TINY, "--inner-batch", "2", "--inner-steps", "3", "--repeats", "3",
                  "--outer-repeats", "2", "--ls-grid", "3", "--ls-batches", "1", "--inner-optimizer", "sgd")
    c = res["config"]
    assert (c["inner_steps"], c["inner_batch"], c["seq_len"], c["vocab_size"], c["ls_grid"], c["ls_batches"],
            c["hidden"], c["layers"], c["inner_optimizer"]) == (3, 2, 8, 64, 3, 1, 16, 1, "sgd")
    assert res["num_blocks"] == 1 + 1 + 1      # embedding, block_0 with the final norm, head
    for key, sample in TIMES.items():
        assert isinstance(res[key], float) and res[key] > 0, key
        # Reported times are the medians of the reported samples.
        assert res[key] == pytest.approx(statistics.median(res["samples_s"][sample]), rel=1e-12), key
        assert res["min_s"][sample] == min(res["samples_s"][sample])
    assert len(res["samples_s"]["gn_inner_step"]) == 3 and len(res["samples_s"]["outer_step"]) == 2
    for name, (num, den, scale) in RATIOS.items():
        d = res[den] * (res["num_blocks"] if scale == "blocks" else 1)
        assert res[name] == pytest.approx(res[num] / d, rel=1e-12), name
    assert set(res["goals"]) == {g[0] for g in GOALS}
    for name, metric, threshold, _ in GOALS:
        g = res["goals"][name]
        assert g["metric"] == metric and g["threshold"] == threshold and g["value"] == res[metric]
        assert g["pass"] is (res[metric] <= threshold)
    assert res["goals"]["linesearch_le_20pct_of_outer"]["at_paper_inner_steps"] is False
    # An outer step holds N inner steps and the line search.
    assert res["outer_step_s"] > res["linesearch_s"]
    b = res["breakdown"]
    assert b["gn_inner_step_in_scan_s"] == pytest.approx(b["outer_inner_loop_s"] / 3, rel=1e-12)
    assert b["outer_inner_loop_s"] + b["outer_linesearch_s"] <= max(res["samples_s"]["outer_step"])
    assert b["gn_model_grad_over_value_and_grad"] == pytest.approx(
        b["gn_model_grad_s"] / res["value_and_grad_s"], rel=1e-12)
    assert b["gn_layerwise_model_grad_over_blocks_times_gn_model_grad"] == pytest.approx(
        b["gn_layerwise_model_grad_s"] / (res["num_blocks"] * b["gn_model_grad_s"]), rel=1e-12)
    # XLA's FLOP counts: the GN model is one primal + one tangent + one transpose pass (~10N per token)
    # against ~6N for value_and_grad; the layerwise model pushes one tangent and transpose per block.
    assert 1.3 < b["gn_model_grad_flops_over_value_and_grad_flops"] < 2.0
    assert b["gn_layerwise_flops_over_gn_flops"] > 1.5
    assert res["peak_bytes_in_use"] is None and "memory_stats" in res["peak_memory_note"]   # CPU
    table = format_gn_table(res)
    assert all(("[PASS]" if g["pass"] else "[FAIL]") + " " + g["description"] in table
               for g in res["goals"].values())


def test_optimizer_bench_is_relative_to_adamw(run_cli):
    res = run_cli("optimizers", "--json", *TINY, "--batch-size", "2", "--repeats", "3",
                  "--methods", "sgd,muon,lion", "--exclude", "lion")
    assert list(res["methods"]) == ["adamw", "sgd", "muon"] and res["errors"] == {}
    ref = res["methods"]["adamw"]
    assert ref["step_time_rel"] == 1.0 and ref["state_rel"] == 1.0
    for name, r in res["methods"].items():
        assert r["step_time_s"] == pytest.approx(statistics.median(res["samples_s"][name]), rel=1e-12)
        assert r["step_time_rel"] == pytest.approx(r["step_time_s"] / ref["step_time_s"], rel=1e-12)
        assert r["state_rel"] == pytest.approx(r["state_bytes"] / ref["state_bytes"], rel=1e-12)
        assert len(res["samples_s"][name]) == r["repeats"] == 3 and r["from_first_call"] is False
        assert r["first_call_s"] > 0
    # AdamW keeps two moments, SGD with momentum one trace (plus a few scalar counters each).
    params_bytes = res["config"]["params_bytes"]
    assert params_bytes == 4 * res["config"]["num_params"]
    assert 2 * params_bytes <= ref["state_bytes"] <= 2 * params_bytes + 64
    assert params_bytes <= res["methods"]["sgd"]["state_bytes"] <= params_bytes + 64
    table = format_optimizer_table(res)
    assert all(name in table for name in res["methods"])
    # Gauss-Newton and unknown names are user errors (exit 2, before any compute).
    assert cli.main(["optimizers", "--methods", "gn"]) == 2
    assert cli.main(["optimizers", "--methods", "adamx"]) == 2
    assert cli.main(["optimizers", "--exclude", "adamw"]) == 2
    assert tree_bytes({"a": jnp.zeros((3, 4)), "b": jnp.zeros((), jnp.int32)}) == 52


def test_bench_inner_step_is_the_methods_scan_body():
    """The benchmarked inner step, iterated, reproduces the method's own inner loop."""
    cfg = model_config("nano", vocab_size=32, hidden=8, layers=1, heads=2, ffn=16, max_seq_len=8)
    apply = make_apply(cfg)
    theta = init_params(cfg, jax.random.PRNGKey(0))
    batches = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(2, 2, 7)), jnp.int32)
    m = registry.build(registry.resolve_entry({"name": "gn", "inner_steps": 2, "inner_optimizer": "sgd"}),
                       MethodContext(apply_fn=apply, total_steps=5, batch_size=4, reference_batch_size=4))
    state = m.init(theta)
    state = state._replace(inner_params=jax.tree.map(lambda p: p * 1.1, theta), outer_step=state.outer_step + 1)
    expected, _, _ = m._inner(theta, state, batches)
    step = jax.jit(inner_step_fn(m))
    th, opt = state.inner_params, state.inner_opt
    for i in range(2):
        th, opt, _, _ = step(theta, th, opt, batches[i], state.outer_step, jnp.asarray(i))
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), th, expected)
    moved = jax.tree.leaves(jax.tree.map(lambda a, p: float(jnp.max(jnp.abs(a - p))), th, state.inner_params))
    assert max(moved) > 0


def test_compile_only_compiles_every_function_and_runs_nothing(capsys, monkeypatch):
    """`gn bench --compile-only` on nano: every benchmarked function is compiled on abstract arguments,
    XLA's buffer sizes are reported, and nothing is executed or transferred to the device."""
    from gn.bench.compile_only import COMPILE_ONLY_FUNCTIONS

    def refuse(*args, **kwargs):
        raise AssertionError("--compile-only executed a compiled function")

    monkeypatch.setattr(jax.stages.Compiled, "__call__", refuse)
    with jax.transfer_guard("disallow"):      # no parameter, batch or state is put on the device
        assert cli.main(["--compile-only", "--json", "--preset", "nano", "--seq-len", "16", "--inner-batch", "2",
                         "--inner-steps", "2", "--ls-grid", "2", "--ls-batches", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["benchmark"] == "gn_step_compile_only"
    c = res["config"]
    assert (c["preset"], c["vocab_size"], c["inner_steps"], c["inner_batch"], c["seq_len"]) == ("nano", 512, 2, 2, 16)
    assert set(res["compiled"]) == set(COMPILE_ONLY_FUNCTIONS)
    assert {"value_and_grad", "gn_inner_step", "gn_layerwise_inner_step", "linesearch"} <= set(res["compiled"])
    for name, st in res["compiled"].items():
        assert st["temp_bytes"] > 0 and st["argument_bytes"] > 0 and st["output_bytes"] > 0, name
        assert st["total_bytes"] == st["temp_bytes"] + st["argument_bytes"] + st["output_bytes"], name
    # value_and_grad takes the parameters and one batch, and returns the loss and a gradient per parameter.
    n_params, b, t = c["num_params"], 2, 17
    vg = res["compiled"]["value_and_grad"]
    assert vg["argument_bytes"] == 4 * n_params + 4 * b * t
    assert 4 * n_params + 4 <= vg["output_bytes"] < 4 * n_params + 4096     # + XLA's tuple index tables
    # The layerwise step pushes a tangent per block: more FLOPs than the full GN step.
    assert res["compiled"]["gn_layerwise_inner_step"]["flops"] > res["compiled"]["gn_inner_step"]["flops"]
    assert res["num_blocks"] == 2 + 2     # embed, block_0, block_1 (+ final norm), head


def test_compile_only_refuses_optimizers_target(capsys):
    assert cli.main(["optimizers", "--compile-only"]) == 2
    assert "--compile-only" in capsys.readouterr().err


def test_compile_only_with_compute_dtype(capsys):
    """`--compute-dtype bfloat16` reaches the model config (mixed precision) while the
    parameters, and so value_and_grad's arguments and gradients, stay float32."""
    args = ["--compile-only", "--preset", "nano", "--seq-len", "16", "--inner-batch", "2", "--inner-steps", "2",
            "--ls-grid", "2", "--ls-batches", "1", "--compute-dtype", "bfloat16", "--model", "layers=1"]
    assert cli.main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    c = res["config"]
    assert (c["dtype"], c["compute_dtype"]) == ("float32", "bfloat16")
    vg = res["compiled"]["value_and_grad"]
    assert vg["argument_bytes"] == 4 * c["num_params"] + 4 * 2 * 17
    assert vg["output_bytes"] >= 4 * c["num_params"] + 4
    assert cli.main(args) == 0
    assert "bfloat16 matmuls, float32 params" in capsys.readouterr().out


def test_model_flags_reach_the_model_config():
    """--logits-chunk / --remat / --scan-layers set the ModelConfig fields; the chunked apply is a SplitApply."""
    from gn.bench.harness import model_for_bench
    from gn.split import SplitApply

    args = cli.build_parser().parse_args(["bench", "--compile-only", "--logits-chunk", "64", "--remat",
                                          "--scan-layers", "--model", "hidden=32"])
    ov = cli.model_overrides(args)
    assert ov == {"hidden": 32, "logits_chunk": 64, "remat": True, "scan_layers": True}
    mcfg = model_for_bench("nano", None, ov, 16)
    assert (mcfg.logits_chunk, mcfg.remat, mcfg.scan_layers, mcfg.hidden) == (64, True, True, 32)
    assert isinstance(make_apply(mcfg), SplitApply)
    assert cli.model_overrides(cli.build_parser().parse_args(["bench"])) == {}
