"""A flax model of one's own through the trainer (gn.model.FlaxLM): FOG's statistics on it.

* The LLaMA model wrapped as a FlaxLM (its own module and initialiser) trains bit for bit
  like the config's model, for FOG (K-FAC statistics found by path) and AdamW: the
  trainer, the methods and the statistics pass see nothing but the apply function and
  the parameter tree.
* FOG trains the MLP language model of examples/fog_lm_trainer.py through the trainer:
  its statistics cover exactly the two hidden nn.Dense kernels, and the validation loss
  falls (measured: 5.78 -> 3.41 nats in 40 steps; here 20 steps, > 1.5 nats).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import pytest

from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.model import FlaxLM, init_params
from gn.model.llama import Llama
from gn.optim import matrix_mask_fn, stat_layers
from gn.train.run import prepare
from gn.train.trainer import train
from tests.tiny_models import nano_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
try:
    import fog_lm_trainer as example
finally:
    sys.path.pop(0)

@dataclasses.dataclass(frozen=True)
class LlamaAsFlax(FlaxLM):
    """The config's LLaMA model as a user's FlaxLM, with the toolkit's initialiser."""

    model_cfg: object = None

    def init(self, rng):
        return init_params(self.model_cfg, rng)


def _raw(method: dict) -> dict:
    return nano_run([method], model={"vocab_size": 320}, steps=3, ema_decay=0.0)


def _rows(workdir):
    drop = ("time", "wall", "_s")
    return [{k: v for k, v in json.loads(line).items() if not any(d in k for d in drop)}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", [{"name": "fog"}, {"name": "adamw", "learning_rate": 0.01}])
def test_llama_as_a_flax_model_trains_bit_for_bit_like_the_config_model(tmp_path, method):
    cfg = config_from_dict(_raw(method))
    train(cfg, method["name"], tmp_path / "config_model")
    mcfg = cfg.model
    custom = LlamaAsFlax(Llama(mcfg), vocab_size=320, model_cfg=mcfg)
    summary = train(cfg, method["name"], tmp_path / "flax_model", model=custom)
    assert _rows(tmp_path / "flax_model") == _rows(tmp_path / "config_model")
    assert summary["model"] == "Llama" and len(_rows(tmp_path / "config_model")) == 4


def test_fog_trains_a_flax_mlp_through_the_trainer(tmp_path, monkeypatch):
    model = FlaxLM(example.MLPLM(), vocab_size=example.VOCAB)
    params = model.init(jax.random.PRNGKey(0))
    layers = stat_layers(params, matrix_mask_fn())
    assert sorted(tuple(str(getattr(k, "key", k)) for k in path) for path in layers) == [
        ("Dense_0", "kernel"), ("Dense_1", "kernel")], layers
    monkeypatch.setitem(example.CONFIG["train"], "steps", 20)
    first, last = example.main(str(tmp_path / "run"))
    assert first - last > 1.5, (first, last)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "MLPLM" and summary["num_params"] == model.num_params() > 0


def test_a_model_that_is_not_a_flax_lm_is_refused(tmp_path):
    cfg = config_from_dict(_raw({"name": "fog"}))
    with pytest.raises(ConfigError, match="FlaxLM"):
        prepare(cfg, "fog", model=Llama(cfg.model))
