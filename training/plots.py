"""The pictures a run logs: the validation ROC curve, heatmaps of the top-scored slides, and
the reliability diagram `evaluate` logs."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from training.feature_file import Bag
from training.heads import MILHead
from training.trainer import predict
from wsi.discovery import find_slides, slide_name

HEATMAPS = 4

def write_reliability_png(path: Path, levels: dict[str, dict], title: str = "test") -> None:
    """Observed tumour share against mean probability per bin (training.calibration's
    `calibration_metrics`), one line per level ("slides", "patches"), with its ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfectly calibrated")
    for name, m in levels.items():
        if "reliability" in m:
            r = m["reliability"]
            ax.plot(r["predicted"], r["observed"], "o-", ms=3,
                    label=f"{name}: ECE {m['ece']:.3f}, Brier {m['brier']:.3f}")
    ax.legend(loc="upper left", fontsize=7)
    ax.set(xlabel="mean predicted probability", ylabel="observed tumour share",
           xlim=(0, 1), ylim=(0, 1), title=f"reliability ({title})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_roc_png(path: Path, y: np.ndarray, p: np.ndarray, title: str = "validation") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({title})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_heatmaps(out: Path, model: MILHead, bags: Sequence[Bag], slides_dir,
                   limit: int = HEATMAPS) -> list[Path]:
    """Heatmap PNGs (results.outputs) of the highest-scored slides whose files are reachable."""
    from results.outputs import write_heatmap_png
    from wsi.slide import open_slide

    out.mkdir(parents=True, exist_ok=True)
    scores = predict(model, bags)
    slides = {slide_name(path): path for path in find_slides(slides_dir).slides}
    written = []
    for i in np.argsort(-scores):
        path = slides.get(bags[i].name)
        if path is None:
            continue
        with torch.no_grad():
            patch_scores = model(bags[i].features).patch_scores.numpy()
        with open_slide(path) as slide:
            target = out / f"{bags[i].name}.png"
            write_heatmap_png(target, slide, bags[i].coords, patch_scores,
                              bags[i].attrs.tiling.tile_size)
        written.append(target)
        if len(written) >= limit:
            break
    return written


