"""How the batch job scores one slide: in this process or through a running server.

Both backends give a `ScoredSlide`, so the folder job (serving.batch) and its Ray variant
(serving.ray_batch, whose actors each hold a `LocalBackend`) are one code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np

from core.tiling import TissueParams
from serving.model_source import ModelSource
from serving.options import EngineOptions
from serving.overrides import ScoringOverrides
from serving.pipeline import SlideScorer


@dataclass
class ScoredSlide:
    """What the batch job needs of a scored slide, whichever way it was scored."""
    coords: np.ndarray   # int64 [N, 2] level-0 (x, y)
    scores: np.ndarray   # float32 [N]
    tile_size: int
    slide_score: float
    label: str
    slide_threshold: float
    roi_threshold: float
    rois: int            # tumour ROI polygons at roi_threshold
    model: str
    model_version: str
    flags: np.ndarray | None = None   # uint8 [N] artefact bits (wsi.tile_quality), 0 = clean
    tissue: TissueParams | None = None   # the model's tissue-mask settings (for the outputs)

    @property
    def artefact_tiles(self) -> int:
        return 0 if self.flags is None else int(np.count_nonzero(self.flags))


class SlideScoringBackend(Protocol):
    model: str
    model_version: str

    def score(self, path: Path, key: str) -> ScoredSlide: ...

    def close(self) -> None: ...


class LocalBackend:
    """Scores in this process: the server's engine and pipeline on a bundle or registered model."""

    def __init__(self, model_uri: str, engine: EngineOptions = EngineOptions(),
                 overrides: ScoringOverrides = ScoringOverrides(), *,
                 tracking_uri: str | None = None):
        # Resolve and load once: a batch job keeps one model version for the whole folder.
        source = ModelSource(model_uri, lambda path, ref: engine.engine(path, model=ref),
                             tracking_uri=tracking_uri)
        source.refresh()
        self.engine = source.current.engine
        self.scorer = SlideScorer(self.engine)
        self.model, self.model_version = self.engine.model.name, self.engine.model.version
        self.min_tissue, self.roi_threshold = overrides.min_tissue, overrides.roi_threshold
        # Fail on a bad parameter now, not once per slide.
        self.scorer.check_parameters(None, self.min_tissue, self.roi_threshold)

    def score(self, path: Path, key: str) -> ScoredSlide:
        s = self.scorer.score_slide(path, min_tissue=self.min_tissue,
                                    roi_threshold=self.roi_threshold, display_path=key)
        return ScoredSlide(s.coords, s.scores, s.tile_size, s.slide_score, s.label, s.slide_threshold,
                           s.roi_threshold, len(s.rois), s.model.name, s.model.version, s.flags,
                           self.engine.manifest.tissue)

    def close(self) -> None:
        self.engine.close()


class RemoteBackend:
    """Scores through a running server; slides are named by their path under `remote_root`
    (the folder, relative to the server's slide root, that holds SLIDES_DIR's content)."""

    def __init__(self, client, slides_dir: Path, remote_root: str = "",
                 overrides: ScoringOverrides = ScoringOverrides()):
        self.client, self.slides_dir = client, Path(slides_dir)
        self.remote_root = PurePosixPath(remote_root) if remote_root else None
        served = client.get_model()
        self.model, self.model_version = served.model.name, served.model.version
        self.tissue = served.tissue
        self.min_tissue, self.roi_threshold = overrides.min_tissue, overrides.roi_threshold

    def remote_path(self, path: Path) -> str:
        rel = PurePosixPath(path.relative_to(self.slides_dir).as_posix())
        return str(self.remote_root / rel if self.remote_root else rel)

    def score(self, path: Path, key: str) -> ScoredSlide:
        result = self.client.score_slide_all(self.remote_path(path), min_tissue=self.min_tissue,
                                             roi_threshold=self.roi_threshold)
        s = result.summary
        return ScoredSlide(result.coords, result.scores, result.header.tile_size, s.slide_score,
                           s.label, s.slide_threshold, s.roi_threshold, len(s.rois), s.model.name,
                           s.model.version, result.artefact, self.tissue)

    def close(self) -> None:
        self.client.close()
