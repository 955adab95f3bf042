"""Conformance: ONNX's own backend test suite run through the partitioned chain."""
