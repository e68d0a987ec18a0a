"""Training loops that are not preference optimisation: base-model pretraining."""
