"""onnxruntime settings shared by the server's engine and `milroi-train features`' CPU backbone.

Both run a ResNet-50 beside tile-decoding threads on the same cores, so both take the same
session options; onnxruntime itself is imported by the caller (the serve image has it, and so
does the train image).
"""
from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def session_options(ort, threads: int):
    """onnxruntime session options for a model that shares the cores with tile decoding threads:
    full graph optimisation, `threads` intra-op threads that sleep rather than spin between runs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads would steal the cores the tile decoders need between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # CUDA/TRT fallback chatter: we report the outcome ourselves
    return options
