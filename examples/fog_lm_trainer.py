"""FOG through gn's trainer on a language model that is not the LLaMA one: a flax MLP.

The model predicts each next token from the current one through an embedding, two
tanh Dense layers and an output layer (`embed` and `lm_head` by name, so FOG's default
masks give them to its AdamW side, as in the LLaMA model). Wrapped in `gn.model.FlaxLM`
it goes through `gn.train.trainer.train` like the config's model would: the K-FAC
statistics pass finds the two hidden nn.Dense layers by path (gn.curvature.layer_stats)
and FOG (Muon ∘ K-FAC⁻¹) preconditions them; metrics, checkpoints and summary.json are
the trainer's.
    python examples/fog_lm_trainer.py [WORKDIR]     # prints the validation loss before and after
"""
import sys
import tempfile

import flax.linen as nn

from gn.config import config_from_dict
from gn.model import FlaxLM
from gn.train.trainer import train

VOCAB = 320

CONFIG = {
    "data": {"source": "embedded", "tokenizer": "bpe", "vocab_size": VOCAB, "seq_len": 32},
    "train": {"batch_size": 32, "eval_batch_size": 64, "steps": 40, "eval_every": 10, "progress": False,
              "ema_decay": 0.0, "checkpoint_every": 20},
    "methods": [{"name": "fog", "learning_rate": 0.02, "adam_learning_rate": 0.01, "schedule": "constant"}],
}


class MLPLM(nn.Module):
    vocab: int = VOCAB
    width: int = 64

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.width, name="embed")(tokens)
        h = nn.tanh(nn.Dense(self.width)(h))
        h = nn.tanh(nn.Dense(self.width)(h))
        return nn.Dense(self.vocab, name="lm_head")(h)


def main(workdir: str | None = None) -> tuple[float, float]:
    workdir = workdir or tempfile.mkdtemp(prefix="fog_lm_")
    summary = train(config_from_dict(CONFIG), "fog", workdir, model=FlaxLM(MLPLM(), vocab_size=VOCAB))
    return summary["initial_val_loss"], summary["final_val_loss"]


if __name__ == "__main__":
    print("validation loss %.4f -> %.4f" % main(*sys.argv[1:2]))
