"""Evaluation: generation, metrics, the base-vs-fine-tuned comparison and its report."""
