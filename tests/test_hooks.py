"""The trainer's hooks (gn/train/hooks.py): cadence, order, stopping, and user hooks in a real run."""

import json
from types import SimpleNamespace

import pytest

from gn.config import config_from_dict
from gn.train.hooks import Hook, Hooks, StepInfo
from gn.train.run import prepare
from gn.train.trainer import setup, train
from tests.tiny_models import TINY_RUN

DEFAULT_ORDER = ["evaluate", "divergence", "metrics", "early_stop", "notes", "checkpoint", "progress"]


def _cfg(**train_kw):
    return config_from_dict({**TINY_RUN, "train": {**TINY_RUN["train"], **train_kw},
                             "methods": [{"name": "adamw", "learning_rate": 0.01}]})


def _info(step, *, final=False, finite=True, diverged=False):
    return StepInfo(step, {"step": step}, {"train_loss": 1.0}, SimpleNamespace(diverged=diverged),
                    finite=finite, final=final)


def _run(hooks, steps, last):
    for s in range(1, last + 1):
        if hooks.run(_info(s, final=s == steps)):
            return s
    return None


# --- the registry alone ---------------------------------------------------------------------


def test_every_k_and_at_last_cadence():
    calls = {"k3": [], "k3_last": [], "last_only": [], "each": []}
    hooks = Hooks()
    hooks.add_hook(lambda i: calls["k3"].append(i.step), every=3, name="k3")
    hooks.add_hook(lambda i: calls["k3_last"].append(i.step), every=3, at_last=True, name="k3_last")
    hooks.add_hook(lambda i: calls["last_only"].append(i.step), every=0, at_last=True, name="last_only")

    @hooks.add_hook(name="each")          # decorator form, every=1
    def each(info):
        calls["each"].append(info.step)

    assert _run(hooks, steps=7, last=7) is None
    assert calls == {"k3": [3, 6], "k3_last": [3, 6, 7], "last_only": [7], "each": list(range(1, 8))}


def test_hooks_run_in_registration_order_and_before_inserts():
    order = []
    hooks = Hooks()
    for name in ("a", "b"):
        hooks.add_hook(lambda i, n=name: order.append(n), name=name)
    hooks.add_hook(lambda i: order.append("c"), name="c", before="a")
    hooks.add(Hook(lambda i: order.append("d"), name="d"), before="b")
    assert hooks.names() == ["c", "a", "d", "b"]
    hooks.run(_info(1))
    assert order == ["c", "a", "d", "b"]
    assert hooks.remove("d").name == "d" and hooks.names() == ["c", "a", "b"]


def test_a_stop_makes_the_step_last_and_later_hooks_still_run():
    seen = []
    hooks = Hooks()
    hooks.add_hook(lambda i: "first" if i.step == 2 else None, name="stopper")
    hooks.add_hook(lambda i: "second" if i.step == 2 else None, name="also")
    hooks.add_hook(lambda i: seen.append((i.step, i.stop, i.last)), every=5, at_last=True, name="at_last")
    assert _run(hooks, steps=10, last=10) == 2         # the loop would stop after step 2
    assert seen == [(2, "first", True)]                # the first reason wins; at_last hooks fire on it


def test_a_diverged_step_runs_only_the_on_diverged_hooks():
    ran = []
    hooks = Hooks()
    hooks.add_hook(lambda i: ran.append("plain"), name="plain")
    hooks.add_hook(lambda i: ran.append("on_div"), on_diverged=True, name="on_div")
    hooks.run(_info(1, finite=False))
    hooks.run(_info(2, diverged=True))
    assert ran == ["on_div", "on_div"]


def test_bad_registrations_are_refused():
    with pytest.raises(ValueError, match="every"):
        Hook(lambda i: None, every=0)
    with pytest.raises(ValueError, match="every"):
        Hook(lambda i: None, every=-2)
    hooks = Hooks((Hook(lambda i: None, name="x"),))
    with pytest.raises(ValueError, match="already"):
        hooks.add_hook(lambda i: None, name="x")
    with pytest.raises(KeyError, match="no hook named 'y'"):
        hooks.add_hook(lambda i: None, name="z", before="y")
    # Unnamed hooks are named after their function, made unique.
    hooks.add_hook(lambda i: None)
    hooks.add_hook(lambda i: None)
    assert hooks.names() == ["x", "<lambda>", "<lambda>#2"]


# --- in the trainer -------------------------------------------------------------------------


def test_default_hooks_are_registered_by_setup_in_their_order(tmp_path):
    cfg = _cfg()
    sess = setup(prepare(cfg, "adamw"), tmp_path)
    assert sess.hooks.names() == DEFAULT_ORDER
    sess.add_hook(lambda i: None, every=2, name="mine")
    assert sess.hooks.names() == DEFAULT_ORDER + ["mine"]
    with pytest.raises(KeyError):
        sess.hooks.remove("nope")


def test_user_hooks_in_a_run_are_called_at_their_steps_after_the_defaults(tmp_path):
    calls = {"every2": [], "every2_last": [], "end": []}

    def every2(info):
        # After "evaluate" and "metrics": this step's record is complete and already in metrics.jsonl.
        logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1] == info.step and "val_loss" in info.record and "train_loss" in info.metrics
        calls["every2"].append(info.step)

    hooks = [Hook(every2, every=2),
             Hook(lambda i: calls["every2_last"].append(i.step), every=2, at_last=True, name="every2_last"),
             Hook(lambda i: calls["end"].append((i.step, i.last)), every=0, at_last=True, name="end")]
    summary = train(_cfg(steps=5, checkpoint_every=2), "adamw", tmp_path, hooks=hooks)
    assert calls == {"every2": [2, 4], "every2_last": [2, 4, 5], "end": [(5, True)]}
    assert summary["steps"] == 5 and summary["stop_reason"] == "steps"


def test_a_user_hook_stops_the_run_and_its_step_is_checkpointed(tmp_path):
    after = []
    hooks = [Hook(lambda i: "enough" if i.step == 2 else None, name="stop_at_2", before="checkpoint"),
             Hook(lambda i: after.append((i.step, i.stop, i.last)), name="after")]
    summary = train(_cfg(steps=6, checkpoint_every=5), "adamw", tmp_path, hooks=hooks)
    assert summary["steps"] == 2 and summary["stop_reason"] == "enough" and not summary["diverged"]
    assert after == [(1, None, False), (2, "enough", True)]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002"]
    # A user's stop is not final for the workdir: rerun without the hook, it resumes from step 2.
    rest = train(_cfg(steps=6, checkpoint_every=5), "adamw", tmp_path)
    assert rest["steps"] == 6 and rest["stop_reason"] == "steps"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))


def test_default_order_with_a_user_hook_before_the_checkpoint(tmp_path):
    sess = setup(prepare(_cfg(), "adamw"), tmp_path)
    sess.hooks.add(Hook(lambda i: None, name="mine", before="checkpoint"))
    assert sess.hooks.names() == DEFAULT_ORDER[:5] + ["mine", "checkpoint", "progress"]
