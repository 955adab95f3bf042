"""smlaas: Secure ML-as-a-Service on Intel SGX.

Partition an ONNX model into sub-models that each fit an enclave, and (later
layers) serve them as a pipeline of attested enclave workers.
"""

from __future__ import annotations

from smlaas.errors import SmlaasError

__version__ = "0.1.0"
__all__ = ["SmlaasError", "__version__"]
