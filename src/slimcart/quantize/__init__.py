"""Quantization techniques; every module here registers its techniques on import."""
