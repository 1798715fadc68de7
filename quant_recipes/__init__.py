"""Quantization recipes shipped with mimo-local (YAML, read by mimo_local.quant.recipes)."""
