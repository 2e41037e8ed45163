"""Time spent compiling, apart from time spent computing.

JAX reports each tracing (`/jax/core/compile/jaxpr_trace_duration`), lowering
(`.../jaxpr_to_mlir_module_duration`) and XLA compilation or persistent-cache
load (`.../backend_compile_duration`) as a time span through `jax.monitoring`.
`CompileClock` listens to them, process-wide, and returns the time covered by
such spans: their union, so that a nested trace (a jitted function traced
inside another) is not counted twice.

    clock = compile_clock()
    mark = clock.mark()
    ...                         # a training step
    compile_s = clock.since(mark)

The trainer logs it per step as `compile_time_s` and leaves it out of
`wall_time_s`, so wall time to a target measures computation, not compilation.
"""

from __future__ import annotations

import threading

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """Accumulates the union of the compile spans reported by jax.monitoring."""

    def __init__(self):
        self._lock = threading.Lock()
        self._spans: list[tuple[float, float]] = []   # closed spans since the last mark, not yet merged
        self._total = 0.0                             # merged time before the pending spans
        self._covered_to = float("-inf")              # end of the merged time

    def _on_span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS and end > start:
            with self._lock:
                self._spans.append((start, end))

    def total(self) -> float:
        """Seconds covered by compile spans since the clock was installed."""
        with self._lock:
            # An outer span closes after the spans nested in it, so spans arrive ordered by end,
            # not start: merge the pending ones as a set, each only beyond what is already counted.
            pending = sorted(self._spans)
            self._spans.clear()
            merged: list[list[float]] = []
            for s, e in pending:
                if merged and s <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], e)
                else:
                    merged.append([s, e])
            for s, e in merged:
                s = max(s, self._covered_to)
                if e > s:
                    self._total += e - s
                    self._covered_to = e
            return self._total

    def mark(self) -> float:
        return self.total()

    def since(self, mark: float) -> float:
        return max(0.0, self.total() - mark)


_CLOCK: CompileClock | None = None
_INSTALL = threading.Lock()


def compile_clock() -> CompileClock:
    """The process's clock, listening from its first call on."""
    global _CLOCK
    with _INSTALL:
        if _CLOCK is None:
            import jax.monitoring

            clock = CompileClock()
            jax.monitoring.register_event_time_span_listener(clock._on_span)
            _CLOCK = clock
    return _CLOCK
