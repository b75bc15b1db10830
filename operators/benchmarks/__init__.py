"""Evaluation-set loaders: the prompts that must never leak into training data (and DSIR targets)."""
