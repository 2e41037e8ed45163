"""Subprocess worker of tests/test_sharding.py: trains method families on several meshes.

jax fixes the device count at process start, so the tests run this script with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and read the JSON it writes.
A layout is [devices, fsdp]: the run uses the first `devices` devices as a
(devices / fsdp, fsdp) mesh (`prepare(..., num_devices=devices)`).

    python tests/sharded_worker.py train SPEC.json OUT.json
        SPEC {"steps", "families": {name: method entry}, "layouts": [[d, f], ...], "errors": [[d, f, train], ...]}
        OUT  {family: {"dxf": {train_loss, val_loss, layout}}, "errors": [ConfigError message, ...]}
    python tests/sharded_worker.py ckpt WORKDIR OUT.json SAVE RESTORE...
        train 2 steps on layout SAVE ("8x8") and checkpoint; for each RESTORE layout, restore a
        copy of that checkpoint, compare it bit for bit with the saved state, train a 3rd step.
    python tests/sharded_worker.py save WORKDIR VALUES.npz F   /   restore WORKDIR VALUES.npz F OUT.json
        the same across processes: save on every device with fsdp = F; restore on every device
        of this process with fsdp = F (the workdir's config drift check included).

`layout` of a run: for params, opt_state and ema, key path → [PartitionSpec, global
shape, addressable shard shapes] of every array leaf after the last step.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.train import trainer, workdirs
from gn.train.checkpoint import Checkpointer
from gn.train.run import abstract, prepare

ENTRY = {"name": "adamw", "learning_rate": 0.01}
CKPT_ENTRY = {"name": "fog"}    # K-FAC factors and Muon momentum: a rich optimizer state

BASE = {
    "model": {"preset": "nano", "hidden": 32, "layers": 1, "heads": 2, "ffn": 64},
    "data": {"source": "embedded", "tokenizer": "bpe", "vocab_size": 320, "seq_len": 16},
    "train": {"batch_size": 16, "eval_batch_size": 16, "eval_every": 1, "checkpoint_every": 1000,
              "progress": False, "ema_decay": 0.9, "fsdp_min_size": 256},
}


def config(entry: dict, steps: int, fsdp: int, overrides: dict | None = None):
    raw = json.loads(json.dumps(BASE))
    raw["train"].update(steps=steps, fsdp=fsdp)
    for section, values in (overrides or {}).items():
        raw[section].update(values)
    raw["methods"] = [entry]
    return config_from_dict(raw)


def layout(tree) -> dict:
    """Key path → [spec, addressable shard shapes] of each array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array):
            shapes = sorted({tuple(s.data.shape) for s in leaf.addressable_shards})
            out[jax.tree_util.keystr(path)] = [str(leaf.sharding.spec), list(leaf.shape), [list(s) for s in shapes]]
    return out


def run_one(entry: dict, steps: int, devices: int, fsdp: int, workdir: Path, overrides=None):
    cfg = config(entry, steps, fsdp, overrides)
    run = prepare(cfg, entry["name"], num_devices=devices)
    sess = trainer.setup(run, workdir)
    trainer.loop(sess)
    return sess, result(sess)


def result(sess) -> dict:
    rows = sess.log.read()
    return {"steps": [r["step"] for r in rows], "train_loss": [r.get("train_loss") for r in rows],
            "val_loss": [r.get("val_loss") for r in rows],
            "layout": {k: layout(sess.state[k]) for k in ("params", "opt_state", "ema")}}


def cmd_train(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = {"errors": []}
    for devices, fsdp, train in spec.get("errors", []):     # bad input: ConfigError before any compute
        try:
            prepare(config(ENTRY, 1, fsdp, {"train": train}), "adamw", num_devices=devices)
            out["errors"].append(None)
        except ConfigError as exc:
            out["errors"].append(str(exc))
    real_save, trainer.save_checkpoint = trainer.save_checkpoint, lambda sess: None   # not timed here
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in spec["families"].items():
            for devices, fsdp in spec["layouts"]:
                t0 = time.perf_counter()
                _, res = run_one(entry, spec["steps"], devices, fsdp, Path(tmp) / f"{name}-{devices}-{fsdp}",
                                 spec.get("overrides"))
                res["seconds"] = time.perf_counter() - t0
                out.setdefault(name, {})[f"{devices}x{fsdp}"] = res
    trainer.save_checkpoint = real_save
    Path(out_path).write_text(json.dumps(out))


def _host(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _parse(text: str) -> tuple[int, int]:
    devices, fsdp = text.split("x")
    return int(devices), int(fsdp)


def _restore(workdir: Path, devices: int, fsdp: int, saved: dict) -> dict:
    """Restore `workdir` onto a (devices, fsdp) mesh, compare with `saved`, train step 3."""
    run = prepare(config(CKPT_ENTRY, 3, fsdp), CKPT_ENTRY["name"], num_devices=devices)
    workdirs.check_drift(run, workdir)               # another fsdp is no config drift
    sess = trainer.setup(run, workdir)               # restores the newest checkpoint onto this mesh
    restored = _host(sess.state)
    out = {"restored_step": sess.counters["step"], "leaves": sorted(restored),
           "mismatched": sorted(k for k in restored if k not in saved or not np.array_equal(saved[k], restored[k])),
           "restored_layout": layout(sess.state["params"])}
    trainer.loop(sess)
    return {**out, **result(sess)}


def cmd_ckpt(workdir: str, out_path: str, save: str, *restores: str) -> None:
    devices, fsdp = _parse(save)
    sess, res = run_one(CKPT_ENTRY, 2, devices, fsdp, Path(workdir) / "saved")   # checkpoints step 2
    saved = _host(sess.state)
    out = {"saved": res}
    for i, text in enumerate(restores):
        copy = Path(workdir) / f"restore{i}"
        shutil.copytree(Path(workdir) / "saved", copy)
        out[text] = _restore(copy, *_parse(text), saved)
    Path(out_path).write_text(json.dumps(out))


def cmd_save(workdir: str, npz: str, fsdp: str) -> None:
    sess, res = run_one(CKPT_ENTRY, 2, len(jax.devices()), int(fsdp), Path(workdir))
    np.savez(npz, **_host(sess.state))


def cmd_restore(workdir: str, npz: str, fsdp: str, out_path: str) -> None:
    saved = dict(np.load(npz))
    out = _restore(Path(workdir), len(jax.devices()), int(fsdp), saved)
    Path(out_path).write_text(json.dumps({**out, "devices": len(jax.devices())}))


if __name__ == "__main__":
    commands = {"train": cmd_train, "ckpt": cmd_ckpt, "save": cmd_save, "restore": cmd_restore}
    commands[sys.argv[1]](*sys.argv[2:])
