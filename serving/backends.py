"""How the batch job scores one slide: in this process or through a running server.

Both backends give a `results.scored.ScoredSlide` (the pipeline's own, or the client's from the
server's messages), so the folder job (serving.batch) and its Ray variant (serving.ray_batch,
whose actors each hold a `LocalBackend`) are one code path. Each backend also names the model's
tissue-mask settings (`tissue`), which the Spatiopath file records.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Protocol

from core.tiling import TissueParams
from results.scored import ScoredSlide
from serving.model_source import ModelSource
from serving.options import EngineOptions
from serving.overrides import ScoringOverrides
from serving.pipeline import SlideScorer
from wsi.slide import Slide


class SlideScoringBackend(Protocol):
    model: str
    model_version: str
    tissue: TissueParams | None
    fallback_mpp: float | None   # the user's um/px for slides without one (ScoringOverrides)
    scores_here: bool   # reads the slide in this process (from the handle `score` is given)

    def score(self, path: Path, key: str, slide: Slide | None = None) -> ScoredSlide:
        """`slide`: the slide at `path`, already open in this process (a backend that reads it
        here scores from that handle; one that scores elsewhere ignores it)."""

    def close(self) -> None: ...


class LocalBackend:
    """Scores in this process: the server's engine and pipeline on a bundle or registered model."""

    scores_here = True

    def __init__(self, model_uri: str, engine: EngineOptions = EngineOptions(),
                 overrides: ScoringOverrides = ScoringOverrides(), *,
                 tracking_uri: str | None = None):
        # Resolve and load once: a batch job keeps one model version for the whole folder.
        source = ModelSource(model_uri, lambda path, ref: engine.engine(path, model=ref),
                             tracking_uri=tracking_uri)
        source.refresh()
        self.engine = source.current.engine
        self.fallback_mpp = overrides.fallback_mpp
        self.scorer = SlideScorer(self.engine, fallback_mpp=overrides.fallback_mpp)
        self.model, self.model_version = self.engine.model.name, self.engine.model.version
        self.tissue = self.engine.manifest.tissue
        self.min_tissue, self.roi_threshold = overrides.min_tissue, overrides.roi_threshold
        # Fail on a bad parameter now, not once per slide.
        self.scorer.check_parameters(None, self.min_tissue, self.roi_threshold)

    def score(self, path: Path, key: str, slide: Slide | None = None) -> ScoredSlide:
        return self.scorer.score_slide(path, min_tissue=self.min_tissue,
                                       roi_threshold=self.roi_threshold, display_path=key,
                                       slide=slide)

    def close(self) -> None:
        self.engine.close()


class RemoteBackend:
    """Scores through a running server; slides are named by their path under `remote_root`
    (the folder, relative to the server's slide root, that holds SLIDES_DIR's content)."""

    scores_here = False

    def __init__(self, client, slides_dir: Path, remote_root: str = "",
                 overrides: ScoringOverrides = ScoringOverrides()):
        self.client, self.slides_dir = client, Path(slides_dir)
        self.remote_root = PurePosixPath(remote_root) if remote_root else None
        served = client.get_model()
        self.model, self.model_version = served.model.name, served.model.version
        self.tissue = served.tissue
        self.min_tissue, self.roi_threshold = overrides.min_tissue, overrides.roi_threshold
        # for the slide opened here to write the outputs; the server has its own --fallback-mpp
        self.fallback_mpp = overrides.fallback_mpp

    def remote_path(self, path: Path) -> str:
        rel = PurePosixPath(path.relative_to(self.slides_dir).as_posix())
        return str(self.remote_root / rel if self.remote_root else rel)

    def score(self, path: Path, key: str, slide: Slide | None = None) -> ScoredSlide:
        return self.client.score_slide_all(self.remote_path(path), min_tissue=self.min_tissue,
                                           roi_threshold=self.roi_threshold)

    def close(self) -> None:
        self.client.close()
