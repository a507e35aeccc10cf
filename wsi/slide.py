"""Open a whole-slide image and read RGB regions from it.

One thin layer over OpenSlide (generic tiled TIFF as in Camelyon16, Aperio SVS with JPEG or
JPEG 2000 tiles, and every other format OpenSlide reads), or over tiffslide for an OME-TIFF
pyramid that OpenSlide sees as one level or without its pixel size (wsi.ome; `Slide.reader` and
the log say which), that adds what the rest of milroi needs:

- every failure (missing file, directory, empty file, not a slide, truncated or corrupt tile
  data, at open time or later at read time) becomes one `SlideError` naming the file and the
  cause, never a crash, a hang or a bare OpenSlide exception;
- the pixel size in microns and where it comes from (`mpp_source`): the OpenSlide properties,
  else the TIFF resolution tags when they carry a physical unit ("metadata"); else the user's
  value, `--fallback-mpp` or a row of `mpp.csv` beside the slides ("user"); else Camelyon16's
  0.243 um/px is assumed with a logged warning ("assumed"), enough to view the slide, which
  wsi.scale refuses to score or tile for features;
- regions as RGB uint8 numpy arrays with transparent areas composited on white (what the tissue
  mask and the model expect: no alpha, no premultiplication).

Reads are thread-safe: the OpenSlide C library serialises what must be serialised, and the ctypes
call releases the GIL, so tile-reading threads (wsi.tiles) really run in parallel (tiffslide
keeps one zarr view per thread and decodes in imagecodecs, also without the GIL).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from core.errors import ConfigError, RequestError, SlideError, SlideMissing
from core.tiling import CAMELYON16_MPP, MPP_CSV
from wsi.discovery import dicom_files, slide_name

log = logging.getLogger(__name__)

# The pixel size assumed for a slide without one: Camelyon16's, at 40x.
DEFAULT_FALLBACK_MPP = CAMELYON16_MPP

# Micrometres per TIFF ResolutionUnit: 2 = inch, 3 = centimetre (1 = no unit: meaningless).
_UM_PER_RESOLUTION_UNIT = {"inch": 25_400.0, "centimeter": 10_000.0}
# A pixel size outside this range (um/px) is a placeholder written by a scanner, not a measure.
_PLAUSIBLE_MPP = (0.05, 100.0)

# A level bigger than this (pixels) is read in horizontal strips, each shrunk at once: a slide
# without a pyramid (one 100k x 200k level) must not need 80 GB of memory for a thumbnail or mask.
MAX_READ_PIXELS = 64 * 2**20
# Beyond any scanner's level 0 (Camelyon16's largest are ~2e10 px): such a size comes from a
# corrupt or hand-crafted header, and believing it would mean hours of reads or a huge mask.
MAX_LEVEL0_PIXELS = 2**36
# The most pixels read_level_resized scans for one downsampled view (thumbnail, tissue mask):
# a slide without a pyramid level small enough is refused rather than read for minutes.
MAX_SCAN_PIXELS = 2**32

# OpenSlide raises these for files it cannot use; OSError covers I/O errors under it.
_OPENSLIDE_ERRORS = (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError)


def _mpp_from_properties(props) -> float | None:
    """Microns per pixel from OpenSlide's own MPP properties, else from the TIFF resolution tags."""
    try:
        mpp_x, mpp_y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        if mpp_x > 0 and mpp_y > 0:
            return (mpp_x + mpp_y) / 2
    except (KeyError, ValueError):
        pass
    unit = props.get("tiff.ResolutionUnit", "").lower()
    try:
        res_x, res_y = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
    except (KeyError, ValueError):
        return None
    if unit not in _UM_PER_RESOLUTION_UNIT or res_x <= 0 or res_y <= 0:
        return None
    mpp = _UM_PER_RESOLUTION_UNIT[unit] * (1 / res_x + 1 / res_y) / 2
    return mpp if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None


def mpp_from_csv(path: Path) -> float | None:
    """The pixel size `mpp.csv` in the slide's folder gives it, if any (a bad file is an error
    naming it: a value the user wrote must not be ignored quietly)."""
    table = path.parent / MPP_CSV
    if not table.is_file():
        return None
    names = {path.name, slide_name(path)}
    try:
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                if (row.get("slide") or "").strip() in names:
                    return float(row["mpp"])
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise ConfigError(f"{table}: cannot read the pixel size of {path.name} (rows 'slide,mpp' "
                          f"with a header): {exc!r}") from None
    return None


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA on white; opaque images take the fast path."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint32)  # 255 * 255 * 2 overflows uint16
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class Slide:
    """An open whole-slide image. Use `open_slide()`; close it (or use `with`) when done."""

    def __init__(self, path: str | os.PathLike, fallback_mpp: float | None = None):
        self.path = Path(path)
        self.name = slide_name(self.path)
        # A DICOM WSI is a folder of .dcm files; OpenSlide opens the series from any one of them.
        dicom = dicom_files(self.path) if self.path.is_dir() else []
        source = dicom[0] if dicom else self.path
        _check_is_readable_file(source)
        self._osr, self.reader = _open_reader(self.path, source)
        try:
            self.dimensions: tuple[int, int] = tuple(self._osr.dimensions)
            self.level_count: int = self._osr.level_count
            self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
                tuple(d) for d in self._osr.level_dimensions)
            self.level_downsamples: tuple[float, ...] = tuple(self._osr.level_downsamples)
            props = dict(self._osr.properties)
        except _OPENSLIDE_ERRORS as exc:
            self._osr.close()
            raise SlideError(self.path, f"unreadable slide metadata: {exc}") from exc
        if min(self.dimensions) <= 0:
            self._osr.close()
            raise SlideError(self.path, f"empty image, level-0 size {self.dimensions}")
        if self.dimensions[0] * self.dimensions[1] > MAX_LEVEL0_PIXELS:
            self._osr.close()
            raise SlideError(self.path, f"claims {self.dimensions[0]} x {self.dimensions[1]} px "
                                        f"at level 0, more than {MAX_LEVEL0_PIXELS:.3g} px of any "
                                        f"real slide (corrupt or hand-crafted header)")
        self.properties = props
        self.vendor: str = props.get("openslide.vendor", "unknown")
        self.bounds_offset: tuple[int, int] = _bounds_offset(props)
        mpp = _mpp_from_properties(props)
        # the user's value only where the metadata has none: mpp.csv is read for those slides only
        user_mpp = None if mpp is not None else (
            fallback_mpp if fallback_mpp is not None else mpp_from_csv(self.path))
        if mpp is not None:
            self.mpp, self.mpp_source = mpp, "metadata"
        elif user_mpp is not None:
            self.mpp, self.mpp_source = float(user_mpp), "user"
            if not self.mpp > 0:
                self._osr.close()
                raise ConfigError(f"fallback_mpp must be > 0, got {user_mpp}")
        else:
            # Enough to view the slide and draw its tissue mask; wsi.scale refuses to score or
            # extract features at a guessed scale.
            self.mpp, self.mpp_source = DEFAULT_FALLBACK_MPP, "assumed"
            log.warning("%s: no pixel size in its metadata and none given (--fallback-mpp, %s); "
                        "assuming %.3f um/px to display it", self.path, MPP_CSV, self.mpp)
        log.info("%s: opened by %s (%s), %d level(s), %.4g um/px (%s)", self.path, self.reader,
                 self.vendor, self.level_count, self.mpp, self.mpp_source)

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._osr.close()

    @property
    def openslide(self) -> openslide.OpenSlide:
        """The handle underneath (OpenSlide, or tiffslide's for an OME-TIFF: the same API), for
        OpenSlide's own helpers (DeepZoomGenerator)."""
        return self._osr

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, dimensions={self.dimensions}, levels={self.level_count}, "
                f"mpp={self.mpp:.3f} ({self.mpp_source}), vendor={self.vendor!r}, "
                f"reader={self.reader!r})")

    # -- reads -----------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise RequestError(f"{self.path}: level {level} does not exist "
                               f"(the slide has levels 0..{self.level_count - 1})")

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 array [h, w, 3] of the region whose top-left is (x, y) in level-0 pixels,
        w x h pixels at `level`. Areas outside the slide or transparent are white."""
        self._check_level(level)
        if w <= 0 or h <= 0:
            raise RequestError(f"{self.path}: region size must be positive, got {w}x{h}")
        try:
            image = self._osr.read_region((int(x), int(y)), level, (int(w), int(h)))
        except _OPENSLIDE_ERRORS as exc:
            raise SlideError(self.path, f"read of {w}x{h} px at ({x}, {y}) level {level} "
                                        f"failed (corrupt or truncated tile data?): {exc}") from exc
        return rgba_to_rgb_on_white(np.asarray(image))

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one pyramid level as RGB uint8 [h, w, 3]."""
        self._check_level(level)
        w, h = self.level_dimensions[level]
        return self.read_region(0, 0, w, h, level)

    def read_level_resized(self, level: int, size: tuple[int, int],
                           max_read_pixels: int = MAX_READ_PIXELS,
                           max_scan_pixels: int = MAX_SCAN_PIXELS) -> np.ndarray:
        """The whole of `level` as RGB area-averaged (BOX) to `size` = (w, h), in bounded memory:
        a level over `max_read_pixels` is read in horizontal strips, each resized at once.
        A level over `max_scan_pixels` (a big slide without a pyramid) is a SlideError."""
        self._check_level(level)
        out_w, out_h = size
        level_w, level_h = self.level_dimensions[level]
        if level_w * level_h > max_scan_pixels:
            raise SlideError(self.path, f"no pyramid level small enough for a {out_w} x {out_h} "
                                        f"view: level {level} is {level_w} x {level_h} px, more "
                                        f"than {max_scan_pixels:.3g} px to scan (write the slide "
                                        f"with a pyramid, e.g. vips tiffsave --pyramid --tile)")
        if level_w * level_h <= max_read_pixels:
            rgb = self.read_level(level)
            if (level_w, level_h) == (out_w, out_h):
                return rgb
            return np.asarray(Image.fromarray(rgb).resize((out_w, out_h), Image.Resampling.BOX))
        level_ds = self.level_downsamples[level]
        rows_per_out_row = level_h / out_h
        strip_rows = max(1, int(max_read_pixels / (level_w * rows_per_out_row)))   # output rows
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for r0 in range(0, out_h, strip_rows):
            r1 = min(r0 + strip_rows, out_h)
            y0, y1 = round(r0 * rows_per_out_row), round(r1 * rows_per_out_row)
            strip = self.read_region(0, round(y0 * level_ds), level_w, max(y1 - y0, 1), level)
            out[r0:r1] = np.asarray(Image.fromarray(strip).resize((out_w, r1 - r0),
                                                                  Image.Resampling.BOX))
        return out

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The finest level whose downsample is <= `downsample` (level 0 when none is)."""
        return int(self._osr.get_best_level_for_downsample(float(downsample)))

    def thumbnail(self, max_size: int) -> np.ndarray:
        """RGB uint8 image of the whole slide whose longer side is at most `max_size` px."""
        scale = max(max(self.dimensions) / float(max_size), 1.0)
        level = self.get_best_level_for_downsample(scale)
        size = (max(1, round(self.dimensions[0] / scale)), max(1, round(self.dimensions[1] / scale)))
        return self.read_level_resized(level, size)


def _check_is_readable_file(path: Path) -> None:
    """The causes OpenSlide reports badly (or not at all), checked up front for a clear message."""
    if not path.exists():
        raise SlideMissing(path)
    if path.is_dir():
        raise SlideError(path, "is a directory, not a slide file (nor a DICOM WSI folder)")
    if not path.is_file():
        raise SlideError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise SlideError(path, "permission denied")


def _open_reader(path: Path, source: Path):
    """(reader, its name): OpenSlide, or tiffslide for an OME-TIFF that OpenSlide reads only in
    part (one level of a SubIFD pyramid, no pixel size) or not at all (see wsi.ome)."""
    levels, has_mpp, error = None, False, None
    try:
        osr = openslide.OpenSlide(str(source))
        levels, has_mpp = osr.level_count, _mpp_from_properties(osr.properties) is not None
    except _OPENSLIDE_ERRORS as exc:
        osr, error = None, exc
    if osr is not None and levels > 1 and has_mpp:   # nothing an OME-XML could add
        return osr, "openslide"
    if source.suffix.lower() != ".dcm":
        from wsi import ome  # tiffslide (zarr) is imported only for the files that need it

        try:
            reader = ome.ome_reader(source, levels if osr is not None else None, has_mpp)
        except Exception as exc:  # noqa: BLE001 - an OME-TIFF that tiffslide cannot open
            if osr is None:
                raise SlideError(path, f"OME-TIFF that neither OpenSlide ({error}) nor tiffslide "
                                       f"({exc}) can open") from exc
            log.warning("%s: OME-TIFF that tiffslide cannot open (%s); reading it with OpenSlide",
                        path, exc)
            reader = None
        if reader is not None:
            if osr is not None:
                osr.close()
            return reader, f"tiffslide {reader.version}"
    if osr is None:
        raise SlideError(path, _describe_open_error(error)) from error
    return osr, "openslide"


def _bounds_offset(props) -> tuple[int, int]:
    """OpenSlide's bounds offset (level-0 px): the top-left of the non-empty region, which QuPath
    crops to by default (MRXS, Leica SCN, sparse TIFF...); (0, 0) for a slide without bounds."""
    try:
        return int(props["openslide.bounds-x"]), int(props["openslide.bounds-y"])
    except (KeyError, ValueError):
        return 0, 0


def _describe_open_error(exc: Exception) -> str:
    if isinstance(exc, openslide.OpenSlideUnsupportedFormatError):
        return "not a slide format OpenSlide reads (unsupported, corrupt or truncated file)"
    return f"OpenSlide cannot open it (corrupt or truncated file?): {exc}"


def open_slide(path: str | os.PathLike, fallback_mpp: float | None = None) -> Slide:
    """Open `path` as a slide; raises SlideError naming the file and the cause if it cannot.

    `fallback_mpp` is the user's pixel size for a slide that carries none (before `mpp.csv`
    beside it); `Slide.mpp_source` then says "user". With neither, DEFAULT_FALLBACK_MPP is
    assumed for display ("assumed"), and scoring refuses the slide (wsi.scale).
    """
    return Slide(path, fallback_mpp)
