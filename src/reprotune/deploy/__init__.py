"""Deployment artifacts: merged weights, INT8 / bitsandbytes / GGUF quantisation."""
