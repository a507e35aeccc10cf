"""Inference on open sessions: uint8 tiles in, the head's outputs (and the backbone's features,
`FEATURES`, for the domain check of core.domain) out. No batching, no choice of
backend (serving.sessions made it); one class per place the backbone runs, one `infer` each.

- `CpuInference`: the backbone as the CPU backend chosen for this host runs it (onnxruntime or
  OpenVINO, core.inference_backends), its features into the head's onnxruntime session.
- `GpuInference`: IO binding: the tiles go to the device once (or were decoded there,
  wsi.gpu_decode), the features stay there between the backbone and the head.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.errors import RequestError

Outputs = dict[str, np.ndarray]
FEATURES = "features"   # the backbone's output [n, D], returned beside the head's


def on_device(tiles) -> bool:
    """Whether a batch of tiles is in GPU memory (a wsi.gpu_decode.DeviceBatch), not numpy."""
    return hasattr(tiles, "__cuda_array_interface__") and not isinstance(tiles, np.ndarray)


class CpuInference:
    """Backbone on the host's chosen CPU backend, head in onnxruntime."""

    on_gpu = False

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], head):
        self.features = features   # uint8 tiles [n, s, s, 3] -> float32 features [n, D]
        self.head = head
        self.head_outputs = [o.name for o in head.get_outputs()]

    def infer(self, tiles) -> Outputs:
        if on_device(tiles):
            raise RequestError("tiles decoded on a GPU reach an engine that runs on the CPU")
        tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
        features = self.features(tiles)
        outputs = dict(zip(self.head_outputs, self.head.run(self.head_outputs, {"features": features})))
        outputs[FEATURES] = features
        return outputs


class GpuInference:
    """Backbone and head in onnxruntime sessions on one GPU, bound to device memory."""

    on_gpu = True

    def __init__(self, backbone, head, ort):
        self.backbone, self.head, self._ort = backbone, head, ort
        self.head_outputs = [o.name for o in head.get_outputs()]

    def infer(self, tiles) -> Outputs:
        device = "cuda"
        backbone = self.backbone.io_binding()
        if on_device(tiles):
            backbone.bind_input("tiles", device, tiles.device_id, np.uint8, list(tiles.shape),
                                tiles.ptr)
        else:
            tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
            backbone.bind_ortvalue_input("tiles", self._ort.OrtValue.ortvalue_from_numpy(tiles, device, 0))
        backbone.bind_output("features", device, 0)
        self.backbone.run_with_iobinding(backbone)
        features = backbone.get_outputs()[0]
        head = self.head.io_binding()
        head.bind_ortvalue_input("features", features)
        for name in self.head_outputs:
            head.bind_output(name, "cpu")
        self.head.run_with_iobinding(head)
        outputs = dict(zip(self.head_outputs, (v.numpy() for v in head.get_outputs())))
        outputs[FEATURES] = features.numpy()   # [n, D] to the host for the domain check
        return outputs
