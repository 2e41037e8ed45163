"""Shared pieces of the benchmarks: machine facts, ahead-of-time compilation, interleaved
round-robin timing, and the model and inputs they run on (`gn bench`, `gn bench optimizers`)."""


import os
import platform
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gn.errors import require
# Vocabulary used when the preset leaves it to the data source.
DEFAULT_VOCAB = {"nano": 512, "tiny": 4096}


def machine_info() -> dict:
    """Where the numbers were taken: CPU, cores usable, backend, versions."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores_usable": cores, "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "backend": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count()}


def peak_memory() -> tuple[int | None, str]:
    """(peak_bytes_in_use of device 0, explanation); None where the backend reports none (CPU)."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:   # some backends raise instead of returning None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), (
            f"{dev.platform}: memory_stats()['peak_bytes_in_use'], process-wide peak over the whole benchmark")
    return None, (f"the {dev.platform} backend reports no memory_stats(), so no peak is measured; "
                  "'compiled' gives XLA's per-function buffer sizes instead")


def tune_malloc() -> bool:
    """Keep freed heap memory in the process (glibc only): mallopt(M_MMAP_MAX, 0) and a 1 GiB
    M_TRIM_THRESHOLD. Returns whether it was applied.

    On CPU, XLA allocates each executable's temp buffer per call; above glibc's mmap threshold
    (at most 32 MiB) that is a fresh mmap, page-faulted in and unmapped on every call. A
    standalone jitted step then costs far more than the same step inside `lax.scan` (which
    allocates once). Opt-in (`gn bench --tune-malloc`); the default measures the untuned process.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def compile_aot(jitted: Any, *args, compiler_options: Mapping[str, Any] | None = None) -> tuple[Callable, dict]:
    """Ahead-of-time compile `jitted` for `args`; return (compiled, XLA statistics).

    The compiled executable is what gets timed, so compiling once gives both. A
    function already compiled by a call hits JAX's cache (compile_s ~ 0).
    `compiler_options` (e.g. {"xla_backend_optimization_level": 0}) only speed up
    smoke tests; timings taken with them are not representative.
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile(dict(compiler_options)) if compiler_options else lowered.compile()
    stats: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        stats["flops"] = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:
        stats["flops"] = None
    try:
        mem = compiled.memory_analysis()
        stats["temp_bytes"] = int(mem.temp_size_in_bytes)
        stats["argument_bytes"] = int(mem.argument_size_in_bytes)
        stats["output_bytes"] = int(mem.output_size_in_bytes)
    except Exception:
        stats.update(temp_bytes=None, argument_bytes=None, output_bytes=None)
    return compiled, stats


def time_round_robin(fns: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 1,
                     counts: Mapping[str, int] | None = None,
                     budget_s: float | None = None) -> dict[str, list[float]]:
    """Wall times of each thunk: `warmup` untimed calls each, then `repeats` rounds in
    which every thunk is called once (results blocked on). `counts[name]` caps how many
    rounds a thunk takes part in; with `budget_s`, a thunk leaves the rounds once its
    timed calls add up to that many seconds (for the slow ones)."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if counts is not None and r >= counts.get(name, repeats):
                continue
            if budget_s is not None and sum(samples[name]) >= budget_s:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - t0)
    return samples


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def model_for_bench(preset: str, vocab_size: int | None, overrides: Mapping[str, Any], seq_len: int,
                    micro_batch: int | None = None):
    """ModelConfig of a preset with a vocabulary (DEFAULT_VOCAB when the preset has none).

    A `model.memory` mode (the paper presets: auto) is resolved as `gn train` does for a GN
    run at `micro_batch` sequences (gn.train.memory); without `micro_batch` it is left set."""
    from gn.model import PRESETS, model_config

    require(preset in PRESETS, f"unknown model preset {preset!r}; valid presets are {', '.join(PRESETS)}.")
    ov = dict(overrides)
    vocab = vocab_size or ov.pop("vocab_size", None) or PRESETS[preset].get("vocab_size") \
        or DEFAULT_VOCAB.get(preset, 512)
    ov["vocab_size"] = vocab
    max_len = ov.get("max_seq_len", PRESETS[preset].get("max_seq_len", seq_len))
    ov["max_seq_len"] = max(max_len, seq_len)
    mcfg = model_config(preset, **ov)
    if mcfg.memory is not None and micro_batch is not None:
        from gn.train.memory import resolve_memory

        mcfg, _ = resolve_memory(mcfg, micro_batch=micro_batch, seq_len=seq_len, curvature=True)
    return mcfg


def random_tokens(rng: np.random.Generator, shape: tuple, vocab: int) -> jnp.ndarray:
    return jnp.asarray(rng.integers(0, vocab, size=shape), jnp.int32)


def parse_overrides(items: list[str] | None) -> dict:
    """['hidden=32', 'layers=1'] -> {'hidden': 32, 'layers': 1} (YAML scalars)."""
    import yaml

    out = {}
    for item in items or []:
        require("=" in item, f"model override '{item}' must look like KEY=VALUE, e.g. hidden=32.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def precision(c: Mapping[str, Any]) -> str:
    """", bfloat16 matmuls, float32 params" for a table title under mixed precision; "" otherwise."""
    cd = c.get("compute_dtype")
    return f", {cd} matmuls, {c.get('dtype')} params" if cd and cd != c.get("dtype") else ""
