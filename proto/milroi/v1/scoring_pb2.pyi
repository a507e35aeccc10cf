from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreSlideRequest(_message.Message):
    __slots__ = ("slide_path", "chunk_size", "min_tissue", "roi_threshold")
    SLIDE_PATH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FIELD_NUMBER: _ClassVar[int]
    ROI_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    slide_path: str
    chunk_size: int
    min_tissue: float
    roi_threshold: float
    def __init__(self, slide_path: _Optional[str] = ..., chunk_size: _Optional[int] = ..., min_tissue: _Optional[float] = ..., roi_threshold: _Optional[float] = ...) -> None: ...

class ScoreSlideResponse(_message.Message):
    __slots__ = ("header", "patches", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: SlideHeader
    patches: PatchScores
    summary: SlideSummary
    def __init__(self, header: _Optional[_Union[SlideHeader, _Mapping]] = ..., patches: _Optional[_Union[PatchScores, _Mapping]] = ..., summary: _Optional[_Union[SlideSummary, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "alias", "run_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    alias: str
    run_id: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class SlideHeader(_message.Message):
    __slots__ = ("slide_path", "width", "height", "level_count", "mpp", "mpp_source", "tile_size", "tile_level", "tile_count", "model", "input_px", "bounds_x", "bounds_y", "model_mpp", "scale_factor", "upsampled")
    SLIDE_PATH_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    MPP_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_PX_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_X_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_Y_FIELD_NUMBER: _ClassVar[int]
    MODEL_MPP_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLED_FIELD_NUMBER: _ClassVar[int]
    slide_path: str
    width: int
    height: int
    level_count: int
    mpp: float
    mpp_source: str
    tile_size: int
    tile_level: int
    tile_count: int
    model: ModelRef
    input_px: int
    bounds_x: int
    bounds_y: int
    model_mpp: float
    scale_factor: float
    upsampled: bool
    def __init__(self, slide_path: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., level_count: _Optional[int] = ..., mpp: _Optional[float] = ..., mpp_source: _Optional[str] = ..., tile_size: _Optional[int] = ..., tile_level: _Optional[int] = ..., tile_count: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., input_px: _Optional[int] = ..., bounds_x: _Optional[int] = ..., bounds_y: _Optional[int] = ..., model_mpp: _Optional[float] = ..., scale_factor: _Optional[float] = ..., upsampled: _Optional[bool] = ...) -> None: ...

class PatchScores(_message.Message):
    __slots__ = ("offset", "x", "y", "score", "artefact", "domain_distance")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    x: _containers.RepeatedScalarFieldContainer[int]
    y: _containers.RepeatedScalarFieldContainer[int]
    score: _containers.RepeatedScalarFieldContainer[float]
    artefact: _containers.RepeatedScalarFieldContainer[int]
    domain_distance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, offset: _Optional[int] = ..., x: _Optional[_Iterable[int]] = ..., y: _Optional[_Iterable[int]] = ..., score: _Optional[_Iterable[float]] = ..., artefact: _Optional[_Iterable[int]] = ..., domain_distance: _Optional[_Iterable[float]] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: _containers.RepeatedScalarFieldContainer[float]
    y: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, x: _Optional[_Iterable[float]] = ..., y: _Optional[_Iterable[float]] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("exterior", "holes", "area_um2", "max_score", "mean_score", "tiles")
    EXTERIOR_FIELD_NUMBER: _ClassVar[int]
    HOLES_FIELD_NUMBER: _ClassVar[int]
    AREA_UM2_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    exterior: Ring
    holes: _containers.RepeatedCompositeFieldContainer[Ring]
    area_um2: float
    max_score: float
    mean_score: float
    tiles: int
    def __init__(self, exterior: _Optional[_Union[Ring, _Mapping]] = ..., holes: _Optional[_Iterable[_Union[Ring, _Mapping]]] = ..., area_um2: _Optional[float] = ..., max_score: _Optional[float] = ..., mean_score: _Optional[float] = ..., tiles: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("open_s", "tissue_s", "scoring_s", "total_s", "first_score_s", "tiles_per_second")
    OPEN_S_FIELD_NUMBER: _ClassVar[int]
    TISSUE_S_FIELD_NUMBER: _ClassVar[int]
    SCORING_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_SCORE_S_FIELD_NUMBER: _ClassVar[int]
    TILES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    open_s: float
    tissue_s: float
    scoring_s: float
    total_s: float
    first_score_s: float
    tiles_per_second: float
    def __init__(self, open_s: _Optional[float] = ..., tissue_s: _Optional[float] = ..., scoring_s: _Optional[float] = ..., total_s: _Optional[float] = ..., first_score_s: _Optional[float] = ..., tiles_per_second: _Optional[float] = ...) -> None: ...

class SlideSummary(_message.Message):
    __slots__ = ("slide_score", "label", "threshold", "tile_count", "rois", "mpp", "roi_threshold", "timings", "model", "artefact_count", "slide_logit", "decision", "decision_reason", "in_domain", "domain_score", "domain_reasons", "domain_criteria")
    class DomainCriteriaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SLIDE_SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROIS_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    ROI_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SLIDE_LOGIT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    IN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_REASONS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_CRITERIA_FIELD_NUMBER: _ClassVar[int]
    slide_score: float
    label: str
    threshold: float
    tile_count: int
    rois: _containers.RepeatedCompositeFieldContainer[Polygon]
    mpp: float
    roi_threshold: float
    timings: Timings
    model: ModelRef
    artefact_count: int
    slide_logit: float
    decision: str
    decision_reason: str
    in_domain: bool
    domain_score: float
    domain_reasons: _containers.RepeatedScalarFieldContainer[str]
    domain_criteria: _containers.ScalarMap[str, float]
    def __init__(self, slide_score: _Optional[float] = ..., label: _Optional[str] = ..., threshold: _Optional[float] = ..., tile_count: _Optional[int] = ..., rois: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ..., mpp: _Optional[float] = ..., roi_threshold: _Optional[float] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., artefact_count: _Optional[int] = ..., slide_logit: _Optional[float] = ..., decision: _Optional[str] = ..., decision_reason: _Optional[str] = ..., in_domain: _Optional[bool] = ..., domain_score: _Optional[float] = ..., domain_reasons: _Optional[_Iterable[str]] = ..., domain_criteria: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ScoreTilesRequest(_message.Message):
    __slots__ = ("tiles", "count", "tile_size", "x", "y")
    TILES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    tiles: bytes
    count: int
    tile_size: int
    x: _containers.RepeatedScalarFieldContainer[int]
    y: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tiles: _Optional[bytes] = ..., count: _Optional[int] = ..., tile_size: _Optional[int] = ..., x: _Optional[_Iterable[int]] = ..., y: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreTilesResponse(_message.Message):
    __slots__ = ("score", "x", "y", "batch_index", "model", "domain_distance")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    score: _containers.RepeatedScalarFieldContainer[float]
    x: _containers.RepeatedScalarFieldContainer[int]
    y: _containers.RepeatedScalarFieldContainer[int]
    batch_index: int
    model: ModelRef
    domain_distance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, score: _Optional[_Iterable[float]] = ..., x: _Optional[_Iterable[int]] = ..., y: _Optional[_Iterable[int]] = ..., batch_index: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., domain_distance: _Optional[_Iterable[float]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "head", "tile_size", "tile_level", "feature_dim", "threshold", "roi_threshold", "provider", "providers", "manifest_json", "backend", "precision", "backend_choice_json", "input_px", "input_mpp")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ROI_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_CHOICE_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_PX_FIELD_NUMBER: _ClassVar[int]
    INPUT_MPP_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    head: str
    tile_size: int
    tile_level: int
    feature_dim: int
    threshold: float
    roi_threshold: float
    provider: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    manifest_json: str
    backend: str
    precision: str
    backend_choice_json: str
    input_px: int
    input_mpp: float
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., head: _Optional[str] = ..., tile_size: _Optional[int] = ..., tile_level: _Optional[int] = ..., feature_dim: _Optional[int] = ..., threshold: _Optional[float] = ..., roi_threshold: _Optional[float] = ..., provider: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., manifest_json: _Optional[str] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., backend_choice_json: _Optional[str] = ..., input_px: _Optional[int] = ..., input_mpp: _Optional[float] = ...) -> None: ...
