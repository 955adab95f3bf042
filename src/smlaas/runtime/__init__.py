"""What a stage runs, below both ``export`` (which verifies chains of stages) and ``serving``
(whose workers serve one): a stage's ONNX Runtime session with checked I/O, and a sealed stage
opened with its released key."""
