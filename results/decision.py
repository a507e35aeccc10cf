"""One decision per slide: the slide label and the ROIs reconciled, or a stated reason why not.

A scored slide carries two verdicts that come from different parts of the model: the slide label
(the aggregator's slide score against `slide_threshold`) and the tumour ROIs (tiles whose patch
score reaches `roi_threshold`). Shown side by side they can contradict each other (a slide
labelled normal with a red ROI of tile score 0.98), and a pathologist or a Spatiopath user acts
on what they see. So every output states one decision (docs/INTERFACES.md, "One decision per
slide"):

- `tumor`: the label is tumour and the slide has at least one ROI;
- `normal`: the label is normal and the slide has no ROI;
- `review`: the two disagree; `reason` says which way, with the figures (the ROIs are kept,
  for the reader to look at, never silently dropped or invented);
- `no_tissue`: nothing was scored.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DECISIONS = ("tumor", "normal", "review", "no_tissue")


@dataclass(frozen=True)
class Decision:
    decision: str   # one of DECISIONS
    reason: str     # empty when label and ROIs agree

    def to_dict(self) -> dict:
        return asdict(self)


def decide(label: str, slide_score: float, slide_threshold: float, roi_count: int,
           roi_threshold: float, top_roi_score: float | None = None) -> Decision:
    """The rule of the module docstring. `top_roi_score`: the highest tile score in an ROI
    (quoted in the reason of a normal slide with ROIs)."""
    if label == "no_tissue" or (isinstance(slide_score, float) and math.isnan(slide_score)):
        return Decision("no_tissue", "no tissue tile was scored")
    tumour = label == "tumor"
    if tumour and roi_count:
        return Decision("tumor", "")
    if not tumour and not roi_count:
        return Decision("normal", "")
    if tumour:
        return Decision("review", f"slide score {slide_score:.3g} >= slide threshold "
                                  f"{slide_threshold:.3g}, but no tile reaches the ROI threshold "
                                  f"{roi_threshold:.3g}: tumour slide without an ROI")
    top = "" if top_roi_score is None else f" (top tile {top_roi_score:.3g})"
    return Decision("review", f"slide score {slide_score:.3g} < slide threshold "
                              f"{slide_threshold:.3g}, but {roi_count} ROI(s) reach the ROI "
                              f"threshold {roi_threshold:.3g}{top}: normal slide with ROIs")
