"""reprotune: a DVC-orchestrated, reproducible fine-tuning pipeline for small causal LMs."""

__version__ = "0.1.0"
