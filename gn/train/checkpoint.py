"""Crash-safe checkpoints over orbax-checkpoint.

Layout of ``directory``::

    step_00000100/
        state/        orbax StandardCheckpointHandler output (the pytree)
        meta.json     caller's JSON metadata (data position, RNG, metrics, ...)
        COMMIT.json   written last: size + sha256 of every other file
    step_00000200.partial-<id>/   a save in progress, or one killed mid-way

A save is assembled in a ``.partial-`` directory and renamed into place only
after every file is fsync'ed and ``COMMIT.json`` is written, so a ``kill -9``
at any moment leaves either a complete step or an ignorable partial one.
orbax alone is not enough for this: its own markers are not checked on a local
filesystem and it will happily "restore" a checkpoint whose ``_METADATA`` was
deleted, so completeness and integrity are decided by our ``COMMIT.json``.

Sharded state and several processes. The state is saved as global
``jax.Array``s through orbax's StandardSave: each process writes only the
shards it holds (nothing is gathered to one host), and a restore places every
leaf onto the sharding of the caller's abstract target, so a checkpoint written
on 8 devices with the parameters split 8 ways restores onto 1 device, or onto 4
with a 4-way split. With ``jax.process_count() > 1`` every process must call
``save`` and ``restore_latest`` (orbax's save is collective); the partial
directory has a name all processes agree on, and only process 0 writes
``meta.json`` and ``COMMIT.json``, renames, and prunes, between barriers. The
directory must then be on a filesystem every process sees. The multi-process path
runs in tests/test_multiprocess.py with 2 and 4 real processes (gloo on CPU),
including a run killed mid-way and resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from typing import Any

from gn.errors import os_error

__all__ = ["Checkpointer", "CheckpointWarning"]

_STEP_RE = re.compile(r"^step_(\d+)(.*)$")
_COMMIT = "COMMIT.json"
_META = "meta.json"
_STATE = "state"
_FORMAT = 1


from gn.train.checkpoint_files import (  # noqa: F401  (re-exported; tests patch them here)
    CheckpointWarning, _quiet_orbax, _ocp, _json_default, _fsync_path, _sha256, _finite_flags,
    _non_finite_leaves, _process, _barrier, _default_sharding, _restore_target, _fix_numpy_scalars)


class Checkpointer:
    """Keeps the newest ``keep`` verified checkpoints of a training run in ``directory``.

    ``save`` is synchronous and atomic (complete step directory or none);
    ``restore_latest`` verifies checksums and falls back past corrupted or
    partial checkpoints with a :class:`CheckpointWarning`.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
        """Use (and create) ``directory``; ``keep`` >= 1 checkpoints are retained."""
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        # Steps this process found corrupted; deleted at the next save.
        self._bad: set[int] = set()
        os.makedirs(self.directory, exist_ok=True)

    # ------------------------------------------------------------------ layout

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:08d}")

    def _scan(self) -> tuple[dict[int, str], dict[int, list[str]]]:
        """(final step dirs by step, partial/other entries by step)."""
        finals: dict[int, str] = {}
        partials: dict[int, list[str]] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return finals, partials
        for name in names:
            m = _STEP_RE.match(name)
            if not m:
                continue
            step, rest = int(m.group(1)), m.group(2)
            path = os.path.join(self.directory, name)
            if rest == "" and os.path.isdir(path):
                finals[step] = path
            else:
                partials.setdefault(step, []).append(path)
        return finals, partials

    @staticmethod
    def _read_commit(path: str) -> dict:
        with open(os.path.join(path, _COMMIT), encoding="utf-8") as f:
            commit = json.load(f)
        files = commit.get("files") if isinstance(commit, dict) else None
        if not isinstance(files, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
            for v in files.values()
        ):
            raise ValueError("malformed COMMIT.json")
        return commit

    def _check(self, path: str, *, deep: bool) -> str | None:
        """None if the checkpoint at ``path`` is complete, else the reason.

        The shallow check (marker present, listed files exist with the recorded
        size) catches deletions and truncation cheaply; ``deep`` also compares
        sha256 digests, which catches same-size garbage.
        """
        try:
            commit = self._read_commit(path)
        except FileNotFoundError:
            return f"no {_COMMIT} (save never finished)"
        except (OSError, ValueError) as e:
            return f"unreadable {_COMMIT}: {e}"
        files = commit["files"]
        if _META not in files or not any(k.startswith(_STATE + "/") for k in files):
            return f"{_COMMIT} lists no state/meta files"
        for rel, (size, digest) in files.items():
            full = os.path.join(path, rel)
            try:
                actual = os.path.getsize(full)
            except OSError:
                return f"missing file {rel}"
            if actual != size:
                return f"file {rel} has {actual} bytes, expected {size}"
            if deep:
                try:
                    if _sha256(full) != digest:
                        return f"checksum mismatch in {rel}"
                except OSError as e:
                    return f"cannot read {rel}: {e}"
        return None

    def steps(self) -> list[int]:
        """Sorted steps whose checkpoint on disk is complete (shallow check)."""
        finals, _ = self._scan()
        return sorted(s for s, p in finals.items() if self._check(p, deep=False) is None)

    # -------------------------------------------------------------------- save

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Durably save pytree ``state`` and JSON-serialisable ``meta`` at ``step``.

        Returns False (with a :class:`CheckpointWarning`) and writes nothing if
        any floating leaf of ``state`` is NaN/Inf. Otherwise blocks until the
        checkpoint is fsync'ed and committed, prunes to the newest ``keep``
        complete checkpoints, removes leftovers of killed saves, and returns True.
        Re-saving an existing step replaces it.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        bad = _non_finite_leaves(state)
        if bad:
            shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
            warnings.warn(
                f"checkpoint at step {step} refused: non-finite values in {shown}",
                CheckpointWarning,
                stacklevel=2,
            )
            return False
        # Serialise meta before touching the disk so a bad value fails cleanly.
        meta_bytes = json.dumps(meta, default=_json_default, indent=1).encode("utf-8")

        final = self._step_dir(step)
        index, count = _process()
        multi, primary = count > 1, index == 0
        # Every process must write into the same partial directory: a fixed name when there are several.
        tmp = f"{final}.partial-{'multiprocess' if multi else uuid.uuid4().hex[:12]}"
        try:
            if primary:
                shutil.rmtree(tmp, ignore_errors=True)   # a killed multi-process save's leftover
                os.makedirs(tmp)
            _barrier(f"gn-ckpt-mkdir-{step}")
            ocp = _ocp()
            with _quiet_orbax():
                ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
                try:
                    # Each process writes its own shards; orbax's save is collective across processes.
                    ckptr.save(os.path.join(tmp, _STATE), args=ocp.args.StandardSave(state))
                finally:
                    ckptr.close()
            _barrier(f"gn-ckpt-state-{step}")
            if primary:
                self._commit(step, tmp, final, meta_bytes)
            _barrier(f"gn-ckpt-commit-{step}")
        except OSError as exc:
            # Disk full, read-only, ...: the earlier checkpoints stay as they are.
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(exc, f"saving the checkpoint of step {step} in {self.directory}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._bad.discard(step)
        if primary:
            self._prune(step)
        return True

    def _commit(self, step: int, tmp: str, final: str, meta_bytes: bytes) -> None:
        """Write meta.json and COMMIT.json into `tmp` (every file fsync'ed) and rename it to `final`."""
        with open(os.path.join(tmp, _META), "wb") as f:
            f.write(meta_bytes)
        files: dict[str, list] = {}
        for root, dirs, names in os.walk(tmp):
            for name in names:
                full = os.path.join(root, name)
                _fsync_path(full)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                files[rel] = [os.path.getsize(full), _sha256(full)]
            for d in dirs:
                _fsync_path(os.path.join(root, d))
        commit = {"format": _FORMAT, "step": step, "files": files}
        with open(os.path.join(tmp, _COMMIT), "w", encoding="utf-8") as f:
            json.dump(commit, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if os.path.exists(final):
            # Move the old one aside first: rename onto a non-empty dir fails.
            old = f"{final}.replaced-{uuid.uuid4().hex[:12]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_path(self.directory)

    @staticmethod
    def _remove(path: str) -> None:
        # Rename first, so a kill during rmtree never leaves a half-deleted
        # directory under a checkpoint's name; the leftover is swept next save.
        doomed = f"{path}.deleting-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, doomed)
        except OSError:
            doomed = path
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, just_saved: int) -> None:
        finals, partials = self._scan()
        for paths in partials.values():
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
        good, newer = [], []
        for s, p in finals.items():
            if s in self._bad or self._check(p, deep=False) is not None:
                self._remove(p)
            elif s != just_saved:
                good.append(s)
                if s > just_saved:
                    newer.append(s)
        if newer:
            warnings.warn(
                f"{self.directory} holds checkpoints newer than step {just_saved} "
                f"({sorted(newer)}); restore_latest will prefer them",
                CheckpointWarning,
                stacklevel=3,
            )
        # The checkpoint just written always survives, whatever else is there.
        for s in sorted(good, reverse=True)[self.keep - 1 :]:
            self._remove(finals[s])

    # ----------------------------------------------------------------- restore

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restore the newest good checkpoint as ``(step, state, meta)``, or None.

        ``abstract_state`` fixes the tree structure (optax NamedTuples included)
        and per-leaf dtype/shape; leaves may be arrays or ``jax.ShapeDtypeStruct``.
        Leaves with a ``sharding`` are restored onto it, other array leaves onto
        the default device; numpy arrays and Python scalars come back as such.
        Corrupted or partial checkpoints are skipped with a :class:`CheckpointWarning`.
        """
        finals, partials = self._scan()
        target = None
        unrestorable = None  # (step, error) of an intact checkpoint orbax could not load
        for step in sorted(set(finals) | set(partials), reverse=True):
            path = finals.get(step)
            if path is None:
                names = ", ".join(os.path.basename(p) for p in partials[step])
                warnings.warn(
                    f"checkpoint at step {step} is incomplete (leftover of an interrupted "
                    f"save: {names}); falling back to an earlier step",
                    CheckpointWarning,
                    stacklevel=2,
                )
                continue
            reason = self._check(path, deep=True)
            if reason is None:
                try:
                    with open(os.path.join(path, _META), encoding="utf-8") as f:
                        meta = json.load(f)
                    if target is None:
                        target = _restore_target(abstract_state)
                    ocp = _ocp()
                    with _quiet_orbax():
                        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
                        try:
                            state = ckptr.restore(
                                os.path.join(path, _STATE), args=ocp.args.StandardRestore(target)
                            )
                        finally:
                            ckptr.close()
                    state = _fix_numpy_scalars(abstract_state, state)
                    return step, state, meta
                except Exception as e:  # any failure means: not usable, try older
                    reason = f"restore failed: {type(e).__name__}: {e}"
                    unrestorable = unrestorable or (step, reason)
            else:
                # Only checksum-proven damage is deleted later; an intact
                # checkpoint that fails to load may just not match the target.
                self._bad.add(step)
            warnings.warn(
                f"checkpoint at step {step} ({path}) is corrupted or partial: "
                f"{reason[:500]}; falling back to an earlier step",
                CheckpointWarning,
                stacklevel=2,
            )
        if unrestorable is not None:
            # Intact files that nonetheless will not load almost always mean the
            # target does not match (model/optimizer changed). Starting from
            # scratch would silently overwrite the run, so stop instead.
            step, reason = unrestorable
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored; step {step} is "
                f"intact but {reason[:1000]} (does abstract_state match the saved state?)"
            )
        return None
