"""What the slide core and both sides share, below all of them (docs/ARCHITECTURE.md).

Errors, the tiling and tissue parameters, the model bundle contract, MLflow URIs, onnxruntime
session settings, the Ray connection, atomic file writes and the command-line dispatcher. It
imports nothing of milroi's own but itself.
"""
