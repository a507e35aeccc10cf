"""Small slides the test folders share (a module of its own name: test modules cannot import
`conftest` reliably when several test folders have one)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MPP = 0.243   # um/px written into the resolution tags (Camelyon16 at 40x)


def write_blank_slide(path: Path, width: int = 768, height: int = 640) -> Path:
    """A two-level JPEG-tiled TIFF of empty glass: a slide without a tissue tile."""
    import tifffile

    image = np.full((height, width, 3), 243, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((image, image[::2, ::2])):
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                      subfiletype=int(i > 0), resolution=(1e4 / MPP / 2**i,) * 2,
                      resolutionunit="CENTIMETER")
    return path


# -- Philips TIFF ------------------------------------------------------------------------------
# As Philips' exporter (IntelliSite "Philips DP") writes it, after the public Philips-1.tiff
# and OpenSlide's philips driver: BigTIFF; page 0 is level 0 and carries the DPUfsImport XML
# (pixel spacings in mm, "row" "column"); the reduced levels follow with NewSubfileType 1; every
# level's TIFF size is padded to whole tiles (the XML's spacings give the true downsamples);
# YCbCr JPEG tiles ("useRgb=0") with one shared JPEGTables tag; a sparse slide leaves the tiles
# outside its scanned regions out (TileOffsets and TileByteCounts 0).

_PHILIPS_ATTRIBUTE = ('<Attribute Name="{name}" Group="{group}" Element="{element}" PMSVR="{vr}">'
                      '{value}</Attribute>')


def _philips_attribute(name: str, value, vr: str = "IString", group: str = "0x301D",
                       element: str = "0x1000") -> str:
    return _PHILIPS_ATTRIBUTE.format(name=name, group=group, element=element, vr=vr, value=value)


def _philips_spacing(mm: float) -> str:
    return f"&quot;{mm:.6g}&quot; &quot;{mm:.6g}&quot;"   # IDoubleArray: quoted row, column


def philips_xml(mpp: float, level_sizes: list[tuple[int, int]]) -> str:
    """The DPUfsImport document of page 0: one WSI DPScannedImage with its pixel spacing and one
    PixelDataRepresentation per level (`level_sizes`: (columns, rows), level 0 first)."""
    levels = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        + _philips_attribute("DICOM_PIXEL_SPACING", _philips_spacing(mpp * 2**i / 1000),
                             "IDoubleArray", "0x0028", "0x0030")
        + _philips_attribute("PIIM_DP_PIXEL_DATA_REPRESENTATION_POSITION",
                             "&quot;0&quot; &quot;0&quot; &quot;0&quot;", "IDoubleArray",
                             "0x101D", "0x100B")
        + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_COLUMNS", w, "IUInt32", "0x2001", "0x115E")
        + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", i, "IUInt16", "0x1001", "0x8B02")
        + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_ROWS", h, "IUInt32", "0x2001", "0x115D")
        + "</DataObject>" for i, (w, h) in enumerate(level_sizes))
    wsi = ('<DataObject ObjectType="DPScannedImage">'
           + _philips_attribute("PIM_DP_IMAGE_TYPE", "WSI", element="0x1004")
           + _philips_attribute("DICOM_DERIVATION_DESCRIPTION",
                                "tiff-useBigTIFF=1-useRgb=0-levels=10003,10002,10000-processing=0-q80",
                                group="0x0008", element="0x2111")
           + _philips_attribute("DICOM_PHOTOMETRIC_INTERPRETATION", "RGB", group="0x0028",
                                element="0x0004")
           + _philips_attribute("DICOM_PIXEL_SPACING", _philips_spacing(mpp / 1000), "IDoubleArray",
                                "0x0028", "0x0030")
           + _philips_attribute("PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE",
                                f"<Array>{levels}</Array>", "IDataObjectArray", "0x1001", "0x8B01")
           + _philips_attribute("PIM_DP_IMAGE_COLUMNS", level_sizes[0][0], "IUInt32", element="0x1007")
           + _philips_attribute("PIM_DP_IMAGE_ROWS", level_sizes[0][1], "IUInt32", element="0x1006")
           + "</DataObject>")
    return ('<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
            + _philips_attribute("DICOM_MANUFACTURER", "PHILIPS", group="0x0008", element="0x0070")
            + _philips_attribute("PIM_DP_SCANNED_IMAGES", f"<Array>{wsi}</Array>",
                                 "IDataObjectArray", element="0x1003")
            + _philips_attribute("PIM_DP_UFS_INTERFACE_VERSION", "3.0", element="0x1001")
            + "</DataObject>\n")


def write_philips_tiff(path: Path, rgb: np.ndarray, mpp: float = 0.25, levels: int = 3,
                       tile: int = 512, missing=(), quality: int = 80,
                       software: str = "Philips DP v1.0", depth_tags: bool = False) -> Path:
    """`rgb` (padded with white to whole tiles) as a Philips TIFF of `levels` levels at `mpp`
    um/px. `missing`: level-0 tile indices (row-major) stored as absent, sparse-slide style;
    the reduced levels show them white, as the exporter renders them. `software`: the Software
    tag (OpenSlide wants it to start with "Philips", tifffile with "Philips DP"). `depth_tags`: write
    ImageDepth and TileDepth = the level count, as Philips DP v1.1 does (wrongly)."""
    import imagecodecs
    import tifffile
    from PIL import Image

    from wsi.synth import split_jpeg_tables

    def encode(block):   # standard Huffman tables: every tile's tables are the same
        return imagecodecs.jpeg_encode(np.ascontiguousarray(block), level=quality, colorspace="RGB",
                                       outcolorspace="YCBCR", subsampling=(2, 2), optimize=False)

    h, w = rgb.shape[:2]
    image = np.full((-(-h // tile) * tile, -(-w // tile) * tile, 3), 255, np.uint8)
    image[:h, :w] = rgb
    columns = image.shape[1] // tile
    for index in missing:   # what the exporter's reduced levels show there
        r, c = divmod(int(index), columns)
        image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = 255
    pyramid = [image]
    for _ in range(1, levels):
        reduced = np.asarray(Image.fromarray(pyramid[-1]).reduce(2))
        padded = np.full((-(-reduced.shape[0] // tile) * tile, -(-reduced.shape[1] // tile) * tile, 3),
                         255, np.uint8)
        padded[:reduced.shape[0], :reduced.shape[1]] = reduced
        pyramid.append(padded)
    tables = split_jpeg_tables(encode(image[:tile, :tile]))[0]
    absent = {int(i) for i in missing}

    def tiles(level: int, data: np.ndarray):
        for r in range(data.shape[0] // tile):
            for c in range(data.shape[1] // tile):
                if level == 0 and r * columns + c in absent:
                    yield b""   # tifffile writes offset 0, byte count 0
                    continue
                own, stream = split_jpeg_tables(encode(data[r * tile:(r + 1) * tile,
                                                            c * tile:(c + 1) * tile]))
                assert own == tables
                yield stream

    sizes = [(d.shape[1], d.shape[0]) for d in pyramid]
    # tifffile will not write ImageDepth / TileDepth itself: placeholders in the codes either
    # side (the IFD stays sorted), renamed in place below
    depth = [(32996, "I", 1, levels, True), (32999, "I", 1, levels, True)] if depth_tags else []
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, data in enumerate(pyramid):
            tif.write(tiles(level, data), shape=data.shape, dtype=np.uint8, tile=(tile, tile),
                      photometric="rgb", compression="jpeg", jpegtables=tables,
                      subfiletype=int(level > 0), software=software, metadata=None,
                      description=philips_xml(mpp, sizes) if level == 0 else
                      f"level={level} mag={round(40 / 2**level)} quality={quality}",
                      extratags=depth)
    if depth_tags:
        with tifffile.TiffFile(path, mode="r+b") as tif:
            for page in tif.pages:
                for placeholder, code in ((32996, 32997), (32999, 32998)):
                    tif.filehandle.seek(page.tags[placeholder].offset)
                    tif.filehandle.write(code.to_bytes(2, "little"))
    return Path(path)


def write_camelyon_layout_slide(folder: Path, tile: int = 512) -> Path:
    """Camelyon16's own layout, small: generic TIFF, YCbCr JPEG tiles of `tile` px with one
    shared JPEGTables tag (wsi.synth.write_camelyon_size_slide); 4096 px square for 512-px
    tiles (seed 3), 2048 px for 256-px tiles (seed 4). Used by the decode-once and GPU-decode
    tests, which compare the same slides."""
    from wsi.synth import write_camelyon_size_slide

    side, seed = {512: (4096, 3), 256: (2048, 4)}[tile]
    path = Path(folder) / f"camelyon_{tile}.tif"
    write_camelyon_size_slide(path, side, side, seed=seed, tile=tile, jpeg_tables=True, variants=1)
    return path
