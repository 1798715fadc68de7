"""mimo-local: a quantized, local-first runner for Xiaomi's MiMo language models."""

__version__ = "0.1.0"
