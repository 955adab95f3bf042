"""Enclave backends: ``sim`` (development, CI, the demo) and ``gramine`` (real SGX)."""
