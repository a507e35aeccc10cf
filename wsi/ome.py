"""OME-TIFF pyramids, which OpenSlide reads only in part, opened through tiffslide instead.

QuPath and Bio-Formats (bfconvert) write OME-TIFF with the reduced levels in SubIFDs of the
full-resolution image and the pixel size in the OME-XML (`Pixels/@PhysicalSizeX` with its unit).
OpenSlide's generic TIFF reader sees only top-level IFDs and the TIFF resolution tags, so it opens
such a file as one level with no pixel size: a wrong (fallback) pixel size, and a Camelyon-size
slide with no level small enough for the tissue mask. tifffile reads the SubIFD pyramid and
tiffslide (tifffile + zarr) puts the OpenSlide API on it; the pixel size is parsed here from the
OME-XML, whose unit can be any length (nm, mm, inch...), converted to micrometres.

`ome_reader(path, openslide_levels, openslide_mpp)` decides: it returns an open `OmeTiffReader`
when the file is an OME-TIFF that tifffile reads better than OpenSlide did (more levels, or a
pixel size where OpenSlide has none, or OpenSlide could not open it at all), else None.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

import numpy as np
import tifffile
import tiffslide

log = logging.getLogger(__name__)

# Micrometres per OME `UnitsLength` symbol (the OME schema's enumeration); "pixel" and
# "reference frame" are not physical lengths and give no pixel size.
_SI_PREFIX = {"Y": 1e24, "Z": 1e21, "E": 1e18, "P": 1e15, "T": 1e12, "G": 1e9, "M": 1e6, "k": 1e3,
              "h": 1e2, "da": 1e1, "": 1.0, "d": 1e-1, "c": 1e-2, "m": 1e-3, "µ": 1e-6, "n": 1e-9,
              "p": 1e-12, "f": 1e-15, "a": 1e-18, "z": 1e-21, "y": 1e-24}
UM_PER_OME_UNIT = {f"{prefix}m": scale * 1e6 for prefix, scale in _SI_PREFIX.items()}
UM_PER_OME_UNIT.update({
    "\u03bcm": 1.0, "um": 1.0, "micron": 1.0,   # Greek mu and ASCII spellings seen in the wild
    "Å": 1e-4, "in": 25_400.0, "thou": 25.4, "li": 25_400.0 / 12, "pt": 25_400.0 / 72,
    "ft": 304_800.0, "yd": 914_400.0, "mi": 1_609_344e3,
})
OME_DEFAULT_UNIT = "µm"   # the schema's default when PhysicalSizeXUnit is absent


class OmeReadError(OSError):
    """A read through tifffile/tiffslide failed (corrupt or truncated tile data)."""


@dataclass(frozen=True)
class OmeInfo:
    levels: int                  # pyramid levels of the first image (SubIFDs included)
    mpp: float | None            # um/px at level 0 from the OME-XML, None when absent
    mpp_note: str                # how the pixel size was found (or why not)


def physical_size_um(value: str | None, unit: str | None) -> float | None:
    """One OME PhysicalSize (with its unit, default µm) in micrometres; None when absent,
    not a number, not positive or not a physical length."""
    if value is None:
        return None
    try:
        size = float(value)
    except ValueError:
        return None
    scale = UM_PER_OME_UNIT.get(unit if unit else OME_DEFAULT_UNIT)
    if scale is None or not size > 0:
        return None
    return size * scale


def ome_pixel_size(ome_xml: str) -> tuple[float | None, str]:
    """(um/px, note) of the first image's Pixels element; the mean of x and y."""
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError as exc:
        return None, f"unreadable OME-XML ({exc})"
    # The namespace changes with the schema year (2013-06, 2016-06...): match the local name.
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, "no Pixels element in the OME-XML"
    x = physical_size_um(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"))
    y = physical_size_um(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"))
    if x is None and y is None:
        return None, "no physical pixel size in the OME-XML"
    x, y = x or y, y or x
    unit = pixels.get("PhysicalSizeXUnit") or OME_DEFAULT_UNIT
    return (x + y) / 2, f"OME-XML PhysicalSizeX/Y ({pixels.get('PhysicalSizeX')} {unit})"


def ome_info(path: str | os.PathLike) -> OmeInfo | None:
    """What an OME-TIFF holds (levels, pixel size); None for any other file."""
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.is_ome or not tif.series:
                return None
            levels = len(tif.series[0].levels)
            ome_xml = tif.ome_metadata
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: not an OME-TIFF we can use
        return None
    mpp, note = ome_pixel_size(ome_xml or "")
    return OmeInfo(levels=levels, mpp=mpp, mpp_note=note)


class _LevelPixelTiffSlide(tiffslide.TiffSlide):
    """TiffSlide whose read_region takes its location in px of the level read (the override
    point tiffslide documents): the caller's exact level window is read, not one recomputed
    from level-0 px by truncation."""

    def _read_region_loc_transform(self, location, level):
        return int(location[0]), int(location[1])


class OmeTiffReader:
    """An OME-TIFF opened by tiffslide, with the OpenSlide calls wsi.slide.Slide makes.

    `read_region` returns RGBA uint8 like OpenSlide: pixels outside the level are transparent
    (alpha 0), so the caller composites them on white as for any slide (tiffslide itself pads
    with black).
    """

    def __init__(self, path: str | os.PathLike, info: OmeInfo):
        self._ts = _LevelPixelTiffSlide(os.fspath(path))
        self.info = info
        self.level_count = self._ts.level_count
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._ts.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        self.version = tiffslide.__version__
        # OpenSlide's property names, so that the resolution-tag fallback reads them alike.
        self.properties = {key.replace("tiffslide.", "openslide.", 1): str(value)
                           for key, value in self._ts.properties.items()
                           if value is not None and key != "tiff.ImageDescription"}
        self.properties["openslide.vendor"] = "ome-tiff"
        if info.mpp is not None:
            self.properties["openslide.mpp-x"] = self.properties["openslide.mpp-y"] = repr(info.mpp)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGBA [h, w, 4] of the w x h region at `level` whose top-left is `location` (level 0)."""
        x, y = location
        w, h = size
        ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        # The part of the request inside the level, in level px.
        lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, level_w), min(ly + h, level_h)
        out = np.zeros((h, w, 4), np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            rgb = self._ts.read_region((x0, y0), level, (x1 - x0, y1 - y0), as_array=True,
                                       padding=False)
        except Exception as exc:  # noqa: BLE001 - tifffile/imagecodecs/zarr raise many kinds
            raise OmeReadError(f"tiffslide read failed: {exc!r}") from exc
        # [h, w, 3], or [h, w, 1] for a greyscale image (broadcast to the three channels)
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx, :3] = rgb[: y1 - y0, : x1 - x0, :3]
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx, 3] = 255
        return out

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return int(self._ts.get_best_level_for_downsample(downsample))

    def close(self) -> None:
        self._ts.close()


def ome_reader(path: str | os.PathLike, openslide_levels: int | None,
               openslide_has_mpp: bool) -> OmeTiffReader | None:
    """An OmeTiffReader when `path` is an OME-TIFF that OpenSlide read less well: OpenSlide could
    not open it (`openslide_levels` None), saw fewer levels than tifffile, or found no pixel size
    where the OME-XML has one. None otherwise (OpenSlide stays the reader)."""
    info = ome_info(path)
    if info is None:
        return None
    better = (openslide_levels is None or info.levels > openslide_levels
              or (not openslide_has_mpp and info.mpp is not None))
    if not better:
        return None
    log.info("%s: OME-TIFF with %d level(s) (OpenSlide: %s), pixel size: %s; reading it with "
             "tiffslide", path, info.levels,
             "cannot open it" if openslide_levels is None else f"{openslide_levels} level(s)",
             info.mpp_note)
    return OmeTiffReader(path, info)
