"""Measurement in the runtime that serves the model: latency, size, memory, metric."""
