"""`gn bench candidates`: each faster-GN-step candidate computes the same numbers as its reference.

The float32 memory options (chunked logits, chunked attention, remat, the layer scan) change only
summation order: measured ≤ 4e-7 relative on the GN model's gradient (nano, CPU), asserted 1e-5.
bf16 candidates are compared with the bf16 plain model: chunked logits / the whole lean setting
moved the gradient by 1.0e-3 / 2.4e-3 relative (bf16's unit roundoff is 3.9e-3), asserted 1e-2.
"""

import pytest

from gn.bench.candidates import candidate_overrides, format_candidates_table, run_candidates
from gn.bench.gn_step import GNBenchConfig
from gn.errors import ConfigError

CFG = GNBenchConfig(preset="nano", vocab_size=64, model_overrides={"hidden": 16, "heads": 2, "ffn": 32},
                    inner_batch=4, seq_len=16, inner_steps=2, repeats=2)


def _check(res, timed):
    rows = res["candidates"]
    assert list(rows) == list(candidate_overrides(4, 16))
    for name, r in rows.items():
        tol = 1e-2 if r["reference"] == "bf16" else 1e-5
        if name != "bf16":                             # bf16 against float32: reported, not asserted
            assert r["value_rel"] <= tol and r["loss0_rel"] <= tol and r["grad_rel"] <= tol, (name, r)
        assert (r["step_s"] > 0 and r["over_plain"] > 0) if timed else r["step_s"] is None
    # The options do what they say: the chunked ones really chunk at this size.
    assert rows["logits_chunk"]["overrides"]["logits_chunk"] == 16 and rows["attn_chunk"]["overrides"]["attn_chunk"] == 8
    assert rows["bf16"]["grad_rel"] > 1e-6          # bf16 is a different computation: the check can fail
    assert "bf16_lean" in format_candidates_table(res)


def test_every_candidate_computes_its_references_numbers():
    _check(run_candidates(CFG, timed=False), timed=False)


@pytest.mark.slow
def test_candidates_timed_end_to_end():
    _check(run_candidates(CFG), timed=True)


def test_unknown_candidate_is_refused_before_compute():
    with pytest.raises(ConfigError, match="unknown candidate.*remat"):
        run_candidates(CFG, only=("rematt",))
