"""Process set-up that must happen before anything imports JAX.

JAX reads its platform and persistent-compilation-cache settings from the
environment when it is first imported, so every entry point (`gn`, `gn bench`,
`python -m gn.bench.cli`, the scripts in experiments/) calls
`configure_jax_env()` first, before importing any module that imports jax.
Library users who want the same cache call it themselves before importing jax
(or set JAX_COMPILATION_CACHE_DIR); `import gn` changes nothing.

    GN_PLATFORMS    default of JAX_PLATFORMS (default "cpu")
    GN_CACHE_DIR    root of gn's caches (default ~/.cache/gn); compiled steps go to GN_CACHE_DIR/xla

Variables already set (JAX_PLATFORMS, JAX_COMPILATION_CACHE_DIR,
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) are left as they are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MIN_COMPILE_TIME_S = "0.5"   # only compilations at least this long are written to the cache


def cache_root() -> Path:
    """The toolkit's cache (compiled steps under xla/, tokenizers and corpora): $GN_CACHE_DIR,
    else $XDG_CACHE_HOME/gn (the XDG base-directory rule), else ~/.cache/gn."""
    if os.environ.get("GN_CACHE_DIR"):
        return Path(os.environ["GN_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "gn" if xdg and os.path.isabs(xdg) else Path.home() / ".cache" / "gn"


def configure_jax_env(*, warn: bool = True) -> Path:
    """Set the JAX platform and persistent-cache environment (setdefault), create the
    cache directory and return it. Call it before jax is imported; if jax already is,
    its config is updated too (where the cache directory is still unset). An unwritable
    cache directory warns (`warn`), or is left to the caller to refuse (the CLI does)."""
    os.environ.setdefault("JAX_PLATFORMS", os.environ.get("GN_PLATFORMS", "cpu"))
    xla = Path(os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_root() / "xla")))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_TIME_S)
    try:
        xla.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home: library users run without the cache, told so
        if warn:
            print(f"warning: no compilation cache ({xla}: {exc})", file=sys.stderr)
        return xla
    jax = sys.modules.get("jax")
    if jax is not None and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(xla))
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    return xla
