"""Static int8 quantisation of a bundle's backbone (onnxruntime.quantization).

`add_int8_backbone(bundle_dir, calibration_tiles)` writes `backbone_int8.onnx` next to
`backbone.onnx` and returns the manifest entries for it; `training.export` calls it at export
time (`milroi-train export ... --int8`) and the server loads it with `--precision int8`
(serving.engine.Engine).

How, and why this way:

- `quant_pre_process` first (onnxruntime's recommended step: graph optimisation folds the
  BatchNorms into the convolutions and symbolic shape inference gives the quantiser every
  tensor's type), then `quantize_static` in QDQ format: QuantizeLinear/DequantizeLinear pairs that
  onnxruntime's CPU provider fuses into integer convolutions (VNNI on AVX-512 CPUs) and that
  TensorRT also reads as explicit int8.
- Weights int8 symmetric, per output channel (ResNet-50 channels differ by orders of magnitude in
  range; one scale per tensor costs several points of feature cosine); activations uint8
  asymmetric (post-ReLU activations are non-negative: the full 0..255 range is used).
- Calibration: MinMax over real tissue tiles (a CalibrationDataReader feeding uint8 tile batches
  through the graph's own input, so the in-graph /255 and ImageNet normalisation are calibrated
  too). Tiles come from real or synthetic slides (`calibration_tiles_from_slides`).
- Check: the features of the int8 graph against the fp32 graph on tiles *not* used for
  calibration; the export fails (QuantizationError) when the lowest cosine is below 0.99, so a
  bad int8 graph never reaches a bundle.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from core.errors import ExportError
from core.inference_backends import (  # one agreement gate: export and backend choice
    MIN_COSINE,
    feature_cosine,
)
from core.tiling import DEFAULT_TILING, TilingParams

INT8_FILE = "backbone_int8.onnx"
# How a backbone becomes int8 (training.encoders.Encoder.int8 says which):
# - static: QDQ, activations calibrated by MinMax on tissue tiles (ResNet-50: every op);
# - dynamic: int8 weights of the MatMuls, activations quantised per batch at run time, the
#   recipe onnxruntime gives for transformers. Measured on a random-init ViT-Ti/16
#   (2 cores, AVX-512 VNNI): static QDQ of every op gave feature cosine 0.96 (softmax and
#   LayerNorm outputs do not fit one uint8 range), static of the MatMuls alone 0.14;
#   dynamic 0.9997, at 1.4x the fp32 graph's tiles/s.
METHODS = ("static", "dynamic")
# Calibration wants tiles that are mostly tissue, more than the grid's own minimum.
CALIBRATION_MIN_TISSUE = 0.5


class QuantizationError(ExportError):
    """The int8 backbone could not be built or does not agree with the fp32 one."""


def _reader_class():
    # onnxruntime is imported lazily: training imports this module without needing it otherwise.
    from onnxruntime.quantization import CalibrationDataReader

    class TileCalibrationReader(CalibrationDataReader):
        """Feeds uint8 tiles [n, s, s, 3] to the backbone's "tiles" input in batches."""

        def __init__(self, tiles: np.ndarray, batch_size: int = 16):
            self.batches = [np.ascontiguousarray(tiles[i:i + batch_size])
                            for i in range(0, len(tiles), batch_size)]
            self.position = 0

        def get_next(self):
            if self.position >= len(self.batches):
                return None
            self.position += 1
            return {"tiles": self.batches[self.position - 1]}

        def rewind(self):
            self.position = 0

    return TileCalibrationReader


def calibration_tiles_from_slides(slides: Iterable[str | os.PathLike], n: int = 64,
                                  seed: int = 0,
                                  min_tissue: float = CALIBRATION_MIN_TISSUE,
                                  tiling: TilingParams = DEFAULT_TILING,
                                  fallback_mpp: float | None = None) -> np.ndarray:
    """n tissue tiles drawn evenly at random (fixed seed) from the tissue grids of the slides,
    read at the model's scale (`tiling`, wsi.scale) as the server reads them; `fallback_mpp`:
    the pixel size of slides whose metadata has none."""
    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    slides = [Path(s) for s in slides]
    if not slides:
        raise QuantizationError("no calibration slides given")
    rng = np.random.default_rng(seed)
    per_slide = -(-n // len(slides))
    tiles = []
    for path in slides:
        with open_slide(path, fallback_mpp=fallback_mpp) as slide:
            _, grid = tiles_for_slide(slide, tiling.replace(min_tissue=min_tissue))
            if len(grid.coords) == 0:
                raise QuantizationError(f"calibration slide {path} has no tissue tiles")
            picks = rng.choice(len(grid.coords), min(per_slide, len(grid.coords)), replace=False)
            tiles.extend(grid.scale.read(slide, int(x), int(y))
                         for x, y in grid.coords[np.sort(picks)])
    return np.stack(tiles[:n])


def synthetic_calibration_tiles(n: int = 64, seed: int = 0,
                                tiling: TilingParams = DEFAULT_TILING) -> np.ndarray:
    """Tissue tiles of a small wsi.synth slide (lymph node with a tumour nest), for when no
    real slide is at hand: real tissue-mask + grid path, H&E-like textures, read at the
    model's scale (`tiling`: a 0.5 um/px encoder gets a slide twice as large)."""
    from wsi.synth import write_synthetic_slide

    side = int(3072 * max(1.0, tiling.target_mpp / DEFAULT_TILING.target_mpp))
    with tempfile.TemporaryDirectory(prefix="milroi-calib-") as tmp:
        path = Path(tmp) / "calibration.tif"
        write_synthetic_slide(path, side, side, seed=seed, tumor=True)
        return calibration_tiles_from_slides([path], n=n, seed=seed, tiling=tiling)


def quantize_backbone(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                      calibration: np.ndarray, *, per_channel: bool = True,
                      batch_size: int = 16, method: str = "static") -> Path:
    """backbone.onnx -> int8 graph at out_path: `static` QDQ calibrated on uint8 tiles (CNNs),
    or `dynamic` (METHODS: transformers; `calibration` is then only checked for its type)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise QuantizationError(f"unknown int8 method {method!r}; choose one of "
                                f"{', '.join(METHODS)}")

    calibration = np.asarray(calibration)
    if calibration.dtype != np.uint8 or calibration.ndim != 4 or len(calibration) == 0:
        raise QuantizationError(f"calibration tiles must be a non-empty uint8 [n, h, w, 3] array, "
                                f"got {calibration.dtype} {list(calibration.shape)}")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="milroi-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # An fp32 graph with its weights beside it (ONNX external data: encoders over
            # 1 GB) is prepared the same way; its int8 graph (a quarter of the bytes) is one file.
            large = Path(f"{fp32_path}.data").is_file()
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=large,
                              save_as_external_data=large)
            if method == "dynamic":
                quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8,
                                 per_channel=per_channel, op_types_to_quantize=["MatMul"])
                return out_path
            quantize_static(
                str(prepared), str(out_path), _reader_class()(calibration, batch_size),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        except Exception as exc:  # onnx/onnxruntime raise many types; one error names the file
            raise QuantizationError(f"int8 quantisation of {fp32_path} failed: {exc}") from exc
    return out_path


def feature_agreement(fp32_path: str | os.PathLike, int8_path: str | os.PathLike,
                      tiles: np.ndarray) -> dict[str, float]:
    """Cosine similarity (per tile) and max abs difference of the two backbones' features."""
    import onnxruntime as ort

    def features(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["features"], {"tiles": np.ascontiguousarray(tiles)})[0]

    ref, got = features(fp32_path), features(int8_path)
    cosine = feature_cosine(ref, got)
    return {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "max_abs_diff": float(np.abs(ref - got).max()), "tiles": int(len(tiles))}


def add_int8_backbone(bundle_dir: str | os.PathLike, tiles: np.ndarray, *,
                      held_out: int = 8, min_cosine: float = MIN_COSINE,
                      method: str = "static") -> dict:
    """Write backbone_int8.onnx into a bundle folder; returns {"file", "calibration", "agreement"}.

    The last `held_out` tiles are kept out of calibration and used for the agreement check.
    Raises QuantizationError when the lowest feature cosine on them is below `min_cosine`.
    """
    bundle_dir = Path(bundle_dir)
    tiles = np.asarray(tiles)
    if len(tiles) <= held_out:
        raise QuantizationError(f"need more than {held_out} tiles for calibration + check, "
                                f"got {len(tiles)}")
    calibrate, check = tiles[:-held_out], tiles[-held_out:]
    fp32 = bundle_dir / "backbone.onnx"
    out = quantize_backbone(fp32, bundle_dir / INT8_FILE, calibrate, method=method)
    agreement = feature_agreement(fp32, out, check)
    if not agreement["cosine_min"] >= min_cosine:  # NaN fails too
        out.unlink(missing_ok=True)
        raise QuantizationError(
            f"int8 backbone of {bundle_dir} disagrees with fp32: feature cosine min "
            f"{agreement['cosine_min']:.4f} < {min_cosine} on {len(check)} held-out tiles")
    calibration = {"tiles": int(len(calibrate)), "method": "minmax", "format": "QDQ",
                   "per_channel": True, "activations": "uint8", "weights": "int8"}
    if method == "dynamic":
        calibration = {"tiles": 0, "method": "dynamic", "format": "MatMulInteger",
                       "per_channel": True, "activations": "uint8, per batch",
                       "weights": "int8, MatMul only"}
    return {"file": INT8_FILE, "calibration": calibration,
            "agreement": agreement}
