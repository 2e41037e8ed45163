"""Sharded parameters (FSDP) on simulated CPU devices: the rule, the trainer, checkpoints.

jax fixes its device count at process start, so the multi-device tests run
tests/sharded_worker.py in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and compare its JSON.

Tolerance. A sharded step computes the same float32 numbers with its sums
split over devices and reduced in another order (batch-mean losses and
gradients over the data axis, matmuls whose contraction runs over a sharded
dimension after the all-gather XLA chooses): each reordered sum differs by a
few ulps (~1e-7 relative). Measured over two steps against 1 device (8 devices
data-only, fsdp 8, data 2 × fsdp 4, 4 devices fsdp 4): adamw, muon, fog,
diagfog, gn, gn_layerwise and gn with CG all ≤ 2.3e-7 relative. RTOL = 2e-6
leaves ten times that, and is more than ten times below the loss difference
between two families or two steps, which the tests also check (so a wrong rule,
a dropped update or a mis-sharded batch cannot pass as round-off).

SOAP is the exception, with its own SOAP_RTOL: its first preconditioner of a
non-square matrix is rank-deficient, so `eigh` may return any basis of the null
space (docs: DESIGN §8), and Adam's normalisation in that basis turns ulp-level
differences into up to 5.6e-5 after two steps and 1.2e-4 after three, on 8
devices without fsdp too. That is a property of SOAP, not of the sharding.
"""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.train.sharding import leaf_spec

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_worker.py"
RTOL = 2e-6
SOAP_RTOL = 3e-4    # see the module docstring
MIN_SIZE = 256      # train.fsdp_min_size of the worker's config (its model is tiny)

FAMILIES = {        # one method of each family the trainer runs sharded
    "adamw": {"name": "adamw", "learning_rate": 0.01},
    "muon": {"name": "muon"},
    "soap": {"name": "soap"},
    "fog": {"name": "fog"},
    "diagfog": {"name": "diagfog"},
    "gn": {"name": "gn", "inner_steps": 2},                       # optax inner loop + line search
    # Another inner rate than gn's: with one block the layerwise model is close to the full one,
    # and equal settings would give losses within 2.3e-5 of gn's (not distinguishable at RTOL).
    "gn_layerwise": {"name": "gn_layerwise", "inner_steps": 2, "inner_learning_rate": 0.02},
    "gn_cg": {"name": "gn_cg", "method": "gn", "inner_solver": "cg", "inner_steps": 1, "cg_iters": 5},
}


def _worker(*args: str, devices: int = 8, timeout: int = 600) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(WORKER), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _train(tmp_path: Path, families: dict, layouts: list, errors: list = (), overrides: dict | None = None) -> dict:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"steps": 2, "families": families, "layouts": layouts, "errors": list(errors),
                                "overrides": overrides or {}}))
    _worker("train", str(spec), str(tmp_path / "out.json"))
    return json.loads((tmp_path / "out.json").read_text())


def _losses(res: dict) -> np.ndarray:
    return np.array([x for x in res["train_loss"] + res["val_loss"] if x is not None])


def _check_layout(layout: dict, devices: int, fsdp: int) -> int:
    """Every leaf is placed by the rule (not replicated by the step); returns the sharded leaves."""
    sharded = 0
    for tree, leaves in layout.items():
        for path, (spec, shape, shard_shapes) in leaves.items():
            want = leaf_spec(tuple(shape), fsdp, MIN_SIZE)
            assert spec == str(want), f"{tree}{path}: {spec}, the rule says {want}"
            split = [d // fsdp if s == "fsdp" else d for d, s in zip(shape, tuple(want) + (None,) * len(shape))]
            assert shard_shapes == [split], f"{tree}{path}: shards {shard_shapes}, expected {split}"
            sharded += "fsdp" in spec
    return sharded


def _compare_families(out: dict, families, layouts) -> None:
    ref = {name: _losses(out[name]["1x1"]) for name in families}
    failures = []            # every family and layout checked, then all failures reported at once
    for name in families:
        rtol = SOAP_RTOL if families[name]["name"] == "soap" else RTOL
        for devices, fsdp in layouts:
            res = out[name][f"{devices}x{fsdp}"]
            got = _losses(res)
            rel = float(np.max(np.abs(got / ref[name] - 1.0)))
            if not rel <= rtol:
                failures.append(f"{name} on {devices} devices, fsdp {fsdp}: relative difference {rel:.2g} > {rtol:g}"
                                f" ({got} vs {ref[name]})")
            n = _check_layout(res["layout"], devices, fsdp)
            if fsdp > 1:
                assert n >= 10, f"{name}: only {n} leaves sharded over fsdp"
                spec, shape, shards = res["layout"]["params"]["['embed']['embedding']"]
                assert "fsdp" in spec and shards == [[shape[0] // fsdp, shape[1]]]
    assert not failures, "\n".join(failures)
    # The compared numbers are not trivially equal: families and steps differ far beyond the tolerance
    # (the closest pair, fog and diagfog, by 2.8e-4 relative).
    tol = {name: SOAP_RTOL if families[name]["name"] == "soap" else RTOL for name in families}
    names = list(families)
    for a, b in zip(names, names[1:]):
        assert abs(ref[a][-1] - ref[b][-1]) > 10 * max(tol[a], tol[b]) * abs(ref[a][-1]), (a, b, ref[a], ref[b])
    for name in names:
        assert abs(ref[name][1] - ref[name][0]) > 10 * tol[name] * abs(ref[name][0]), (name, ref[name])


# ------------------------------------------------------------------ the rule (in process)

def test_rule_shards_the_largest_divisible_dimension():
    assert leaf_spec((512, 64), 8) == P("fsdp", None)
    assert leaf_spec((64, 256), 8) == P(None, "fsdp")
    assert leaf_spec((64, 64), 4) == P("fsdp", None)                 # a tie: the first
    assert leaf_spec((36, 64), 8) == P(None, "fsdp")                 # 36 is not divisible
    assert leaf_spec((2, 3, 512), 4) == P(None, None, "fsdp")


def test_rule_replicates_small_scalar_and_indivisible_leaves():
    assert leaf_spec((64,), 8) == P()                                # below the size threshold
    assert leaf_spec((64,), 8, min_size=0) == P("fsdp")
    assert leaf_spec((), 8, min_size=0) == P()                       # scalars, step counters
    assert leaf_spec((33, 35), 8, min_size=0) == P()                 # no divisible dimension
    assert leaf_spec((512, 64), 1) == P()                            # fsdp = 1: data parallelism only


def test_config_rejects_bad_fsdp_values():
    with pytest.raises(ConfigError, match="train.fsdp must be a positive integer"):
        config_from_dict({"train": {"fsdp": 0}})
    with pytest.raises(ConfigError, match="train.fsdp_min_size must be >= 0"):
        config_from_dict({"train": {"fsdp_min_size": -1}})
    assert config_from_dict({}).train.fsdp == 1


# ------------------------------------------------------------------ on 8 simulated devices

def test_families_match_one_device_when_sharded(tmp_path):
    """First-order, K-FAC/FOG and GN (optax inner loop + line search) on a (data 2, fsdp 4) mesh
    of 8 devices: losses equal to the 1-device run's within RTOL, every params / optimizer-state
    / EMA leaf still sharded by the rule after the steps; bad layouts refused before compute."""
    families = {k: FAMILIES[k] for k in ("adamw", "fog", "gn")}
    errors = [[8, 3, {}], [8, 8, {"batch_size": 4}], [8, 4, {"eval_batch_size": 12}]]
    out = _train(tmp_path, families, [[1, 1], [8, 4]], errors)
    _compare_families(out, families, [[8, 4]])
    msgs = out["errors"]
    assert msgs[0] and "train.fsdp = 3 does not divide the 8 devices" in msgs[0]
    assert msgs[1] and "batch size 4 is not divisible by the 8 devices of the mesh (data 1 × fsdp 8)" in msgs[1]
    assert msgs[2] and "train.eval_batch_size (12) is not divisible" in msgs[2]


@pytest.mark.slow
def test_memory_lean_model_matches_one_device_when_sharded(tmp_path):
    """The paper presets' memory-lean evaluation (chunked logits and attention, remat, layer scan)
    sharded over (data 2, fsdp 4): the same losses as on one device, every leaf by the rule."""
    families = {k: FAMILIES[k] for k in ("adamw", "fog", "gn", "gn_layerwise")}
    lean = {"model": {"layers": 2, "logits_chunk": 24, "attn_chunk": 8, "remat": True, "scan_layers": True}}
    out = _train(tmp_path, families, [[1, 1], [8, 4]], overrides=lean)
    _compare_families(out, families, [[8, 4]])


def test_checkpoint_restores_onto_other_device_counts(tmp_path):
    """Saved on 8 devices with fsdp = 8; restored bit for bit onto 1 device and onto 4 devices
    with fsdp = 4 (each restore's own sharding), and training continues identically on both."""
    out_path = tmp_path / "ckpt.json"
    _worker("ckpt", str(tmp_path), str(out_path), "8x8", "1x1", "4x4")
    out = json.loads(out_path.read_text())
    saved = out["saved"]
    assert _check_layout({"params": saved["layout"]["params"]}, 8, 8) >= 8
    for text, (devices, fsdp) in (("1x1", (1, 1)), ("4x4", (4, 4))):
        res = out[text]
        assert res["restored_step"] == 2 and res["mismatched"] == [] and len(res["leaves"]) > 50
        _check_layout({"params": res["restored_layout"]}, devices, fsdp)
        _check_layout(res["layout"], devices, fsdp)
        assert res["steps"] == [0, 1, 2, 3]
        assert res["train_loss"][:3] == saved["train_loss"]            # the resumed log keeps steps 1-2
    np.testing.assert_allclose(_losses(out["4x4"]), _losses(out["1x1"]), rtol=RTOL, atol=0)
    assert abs(out["1x1"]["train_loss"][3] - saved["train_loss"][2]) > 1e-3     # step 3 did move


# ------------------------------------------------------------------ bigger variants

@pytest.mark.slow
def test_every_family_on_every_layout(tmp_path):
    """All eight families on 8 devices data-only, fsdp 8, (data 2, fsdp 4), and 4 devices fsdp 4."""
    layouts = [[1, 1], [8, 1], [8, 8], [8, 4], [4, 4]]
    out = _train(tmp_path, FAMILIES, layouts)
    _compare_families(out, FAMILIES, layouts[1:])


@pytest.mark.slow
def test_checkpoint_restores_in_other_processes(tmp_path):
    """Save in an 8-device process (fsdp 8); restore in a 1-device process and in a 4-device one (fsdp 4)."""
    npz = tmp_path / "saved.npz"
    _worker("save", str(tmp_path / "run"), str(npz), "8", devices=8)
    results = {}
    for devices, fsdp in ((1, 1), (4, 4)):
        work = tmp_path / f"resume{devices}"
        shutil.copytree(tmp_path / "run", work)
        _worker("restore", str(work), str(npz), str(fsdp), str(tmp_path / f"r{devices}.json"), devices=devices)
        res = results[devices] = json.loads((tmp_path / f"r{devices}.json").read_text())
        assert res["devices"] == devices and res["restored_step"] == 2 and res["mismatched"] == []
        _check_layout(res["layout"], devices, fsdp)
    np.testing.assert_allclose(_losses(results[4]), _losses(results[1]), rtol=RTOL, atol=0)
