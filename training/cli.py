"""`milroi-train`: the model side, from slides and slide labels to a registered ONNX bundle."""
from __future__ import annotations

from core.cli import dispatch

COMMANDS = {
    "synth": ("wsi.synth", "write a synthetic Camelyon16-like dataset (pyramidal TIFFs + XML)"),
    "tiles": ("wsi.grid", "tissue mask and tile grid of one slide: CSV + PNGs for a quick look"),
    "features": ("training.features", "encoder features (ResNet-50 by default, --encoder) of "
                 "every tissue tile, one h5 per slide"),
    "fit": ("training.fit", "train a MIL head on slide labels, tracked in MLflow"),
    "evaluate": ("training.evaluate", "slide AUC, patch AUC and lesion FROC of a trained run"),
    "benchmark-mil": ("training.musk", "MIL heads on MUSK1/MUSK2 against Ilse et al. 2018"),
    "export": ("training.export", "export a run to an ONNX bundle and register it in MLflow"),
    "promote": ("training.registry", "move an alias (champion) to a model version"),
    "camelyon16": ("training.camelyon16", "the whole protocol on the real Camelyon16 layout"),
}


def main(argv=None) -> int:
    return dispatch("milroi-train", __doc__.strip(), COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
