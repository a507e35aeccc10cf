"""Camelyon16 lesion annotations (ASAP XML): read, write, rasterise, tile labels.

ASAP stores one <Annotation> per polygon, vertices in level-0 pixels, each polygon in a group:
Camelyon16 uses `_0` and `_1` (and sometimes `Tumor`) for tumour, and `_2` (or `Exclusion`) for
normal islands drawn inside a tumour that are not tumour. `Annotations.region` is therefore
tumour minus exclusions. Hand-drawn real polygons can cross themselves, so every polygon goes
through shapely.make_valid.

Per-tile tumour fractions are exact areas (shapely): an STRtree finds the tiles that touch the
region, tiles fully inside get 1 without clipping, and only tiles on the boundary are clipped.
That costs a handful of clippings per lesion outline, needs no choice of raster resolution, and
micro-metastases smaller than a raster cell are not lost.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from core.errors import ConfigError

log = logging.getLogger(__name__)

TUMOR_GROUPS = frozenset({"_0", "_1", "Tumor"})
EXCLUSION_GROUPS = frozenset({"_2", "Exclusion"})


def _polygonal(geometry) -> list[Polygon]:
    """The polygons in a geometry (make_valid can also return lines and points: dropped)."""
    if geometry is None or geometry.is_empty:
        return []
    if geometry.geom_type == "Polygon":
        return [geometry]
    if hasattr(geometry, "geoms"):
        return [p for part in geometry.geoms for p in _polygonal(part)]
    return []


def _union(polygons: Iterable[Polygon]):
    polygons = list(polygons)
    if not polygons:
        return MultiPolygon()
    return shapely.union_all(polygons)


@dataclass
class Annotations:
    """Tumour and exclusion geometries of one slide, level-0 px (x right, y down)."""

    tumor: object = field(default_factory=MultiPolygon)
    exclusion: object = field(default_factory=MultiPolygon)
    tumor_polygons: list = field(default_factory=list)   # as drawn (made valid), one per <Annotation>
    exclusion_polygons: list = field(default_factory=list)
    vertex_count: int = 0
    source: str | None = None

    @property
    def region(self):
        """Tumour minus exclusions: what counts as tumour."""
        return self.tumor.difference(self.exclusion) if not self.exclusion.is_empty else self.tumor

    @property
    def is_empty(self) -> bool:
        return self.region.is_empty


def _float(text: str | None) -> float:
    # A few Camelyon16 files write a decimal comma.
    return float(str(text).replace(",", "."))


def read_asap_xml(path: str | os.PathLike) -> Annotations:
    """Read an ASAP XML file; a missing or malformed file raises ConfigError naming it."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(f"cannot read annotations {path}: {exc}") from exc
    if root.tag != "ASAP_Annotations":
        raise ConfigError(f"cannot read annotations {path}: root element is <{root.tag}>, "
                          "not <ASAP_Annotations>")
    tumor, exclusion, ignored, vertices = [], [], {}, 0
    for i, annotation in enumerate(root.iter("Annotation")):
        group = annotation.get("PartOfGroup", "")
        try:
            points = sorted(((int(c.get("Order", k)), _float(c.get("X")), _float(c.get("Y")))
                             for k, c in enumerate(annotation.iter("Coordinate"))))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot read annotations {path}: annotation {i} "
                              f"({annotation.get('Name')!r}) has a bad coordinate: {exc}") from exc
        if group not in TUMOR_GROUPS | EXCLUSION_GROUPS:
            ignored[group] = ignored.get(group, 0) + 1
            continue
        if len(points) < 3:
            log.warning("%s: annotation %r has %d vertices, not a polygon: skipped",
                        path, annotation.get("Name"), len(points))
            continue
        vertices += len(points)
        polygon = Polygon([(x, y) for _, x, y in points])
        if not polygon.is_valid:  # hand-drawn outlines may cross themselves
            polygon = shapely.make_valid(polygon)
        (tumor if group in TUMOR_GROUPS else exclusion).extend(_polygonal(polygon))
    for group, count in ignored.items():
        log.info("%s: %d annotation(s) of group %r ignored (not tumour, not exclusion)",
                 path, count, group)
    return Annotations(tumor=_union(tumor), exclusion=_union(exclusion), tumor_polygons=tumor,
                       exclusion_polygons=exclusion, vertex_count=vertices, source=str(path))


def write_asap_xml(path: str | os.PathLike, tumor_polygons: Sequence[Polygon],
                   exclusion_polygons: Sequence[Polygon] = ()) -> Path:
    """Write polygons as ASAP XML: tumour in group `_0`, exclusions in `_2` (Camelyon16 style).
    Holes of tumour polygons are written as `_2` polygons, which is how ASAP expresses them."""
    from core.files import atomic_write

    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    tumor = [p for g in tumor_polygons for p in _polygonal(g)]
    exclusion = [p for g in exclusion_polygons for p in _polygonal(g)]
    exclusion += [Polygon(ring) for p in tumor for ring in p.interiors]
    items = [("_0", p.exterior) for p in tumor] + [("_2", p.exterior) for p in exclusion]
    for i, (group, ring) in enumerate(items):
        node = ET.SubElement(annotations, "Annotation", Name=f"Annotation {i}", Type="Polygon",
                             PartOfGroup=group, Color="#F4FA58" if group == "_0" else "#64FE2E")
        coordinates = ET.SubElement(node, "Coordinates")
        for k, (x, y) in enumerate(np.asarray(ring.coords)[:-1]):  # ASAP rings are not closed
            ET.SubElement(coordinates, "Coordinate", Order=str(k), X=f"{x:.4f}", Y=f"{y:.4f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    for name, color in (("_0", "#FF0000"), ("_1", "#FF0000"), ("_2", "#00FF00")):
        group = ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color=color)
        ET.SubElement(group, "Attributes")
    ET.indent(root)
    with atomic_write(path, "wb") as f:
        ET.ElementTree(root).write(f, encoding="utf-8", xml_declaration=True)
    return Path(path)


def rasterize(geometry, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Bool mask (rows, cols) of `geometry` (level-0 px) at `downsample` level-0 px per mask px.

    A mask pixel is set when its centre is inside the geometry (skimage.draw.polygon on centres);
    holes are cleared per polygon, so an island inside another polygon's hole stays set.
    """
    from skimage.draw import polygon as draw_polygon

    if isinstance(geometry, Annotations):
        geometry = geometry.region
    mask = np.zeros(shape, bool)
    for poly in _polygonal(geometry):
        minx, miny, maxx, maxy = poly.bounds
        r0 = max(int(np.floor(miny / downsample - 0.5)), 0)
        c0 = max(int(np.floor(minx / downsample - 0.5)), 0)
        r1 = min(int(np.ceil(maxy / downsample - 0.5)) + 1, shape[0])
        c1 = min(int(np.ceil(maxx / downsample - 0.5)) + 1, shape[1])
        if r0 >= r1 or c0 >= c1:
            continue
        local = np.zeros((r1 - r0, c1 - c0), bool)  # this polygon alone, in its bounding box
        for ring, value in [(poly.exterior, True)] + [(r, False) for r in poly.interiors]:
            xy = np.asarray(ring.coords)
            rr, cc = draw_polygon(xy[:, 1] / downsample - 0.5 - r0, xy[:, 0] / downsample - 0.5 - c0,
                                  local.shape)
            local[rr, cc] = value
        mask[r0:r1, c0:c1] |= local
    return mask


def tile_tumor_fraction(annotations, coords, tile_size: int) -> np.ndarray:
    """Exact fraction (float32 in [0, 1]) of each tile (level-0 top-left `coords`, side
    `tile_size`) covered by the tumour region (an Annotations, or any shapely geometry)."""
    region = annotations.region if isinstance(annotations, Annotations) else annotations
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    fraction = np.zeros(len(coords), np.float64)
    parts = _polygonal(region)
    if not parts or not len(coords):
        return fraction.astype(np.float32)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + tile_size, coords[:, 1] + tile_size)
    tree = shapely.STRtree(boxes)
    part_idx, box_idx = tree.query(parts, predicate="intersects")
    parts = np.asarray(parts, dtype=object)
    shapely.prepare(parts)
    inside = shapely.contains(parts[part_idx], boxes[box_idx])  # whole tile inside: no clipping
    area = np.full(len(box_idx), float(tile_size) ** 2)
    clip = ~inside
    area[clip] = shapely.area(shapely.intersection(parts[part_idx[clip]], boxes[box_idx[clip]]))
    np.add.at(fraction, box_idx, area)  # the parts of a valid multipolygon do not overlap
    return np.clip(fraction / float(tile_size) ** 2, 0.0, 1.0).astype(np.float32)


def tile_labels(annotations, coords, tile_size: int, min_fraction: float = 0.5) -> np.ndarray:
    """1 for a tile at least `min_fraction` covered by tumour, else 0 (int8)."""
    return (tile_tumor_fraction(annotations, coords, tile_size) >= min_fraction).astype(np.int8)
