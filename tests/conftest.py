"""Test-session setup: CPU only, and a persistent XLA compilation cache.

Many tests build the same jitted steps again (each `train` call creates a new
method object); the on-disk cache turns those recompilations into lookups.
Environment variables reach the subprocess tests too.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gn-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
