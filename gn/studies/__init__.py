"""Studies built on the trainer: sweeps over batch size and learning rate (`gn sweep`)."""
