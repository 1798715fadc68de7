"""Quantization: recipes (which tensor gets which scheme), the schemes themselves (round-to-nearest,
GPTQ, bitsandbytes), the standard file layouts, quantized linear modules and the quality report."""
