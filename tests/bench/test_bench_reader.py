"""benchmarks.bench_reader on a small Camelyon-layout slide: both readers run, the rows add up."""
from __future__ import annotations

from benchmarks.bench_reader import bench_readers, table_rows
from wsi.synth import write_camelyon_size_slide


def test_reader_benchmark_rows(tmp_path):
    path = tmp_path / "c512.tif"
    write_camelyon_size_slide(path, 8192, 8192, seed=0, tile=512, jpeg_tables=True, variants=1)
    result = bench_readers(path, 96, thread_counts=(1, 2), repeats=1)
    assert result["tile"] == [512, 512] and result["jpeg_tables"]
    for row in result["rows"]:
        assert row["tiles"] == 96
        assert row["openslide"]["tiles_per_s"] > 0 and row["decode-once"]["tiles_per_s"] > 0
        # 224-px patches over 512-px tiles: ~1.9 tiles touched each, each decoded once
        assert 1.0 < row["openslide"]["tiles_touched_per_patch"] <= 4
        assert 0 < row["decode-once"]["decodes_per_patch"] < row["openslide"]["tiles_touched_per_patch"]
    scaled = result["scaled"]   # a 0.5 um/px model: level 1, 230 px resized to 224
    assert (scaled["level"], scaled["read_size"], scaled["tile_size"]) == (1, 230, 224)
    assert scaled["tiles"] > 0 and [r["threads"] for r in scaled["rows"]] == [1, 2]
    assert all(r["decode-once"]["tiles_per_s"] > 0 < r["ratio"] for r in scaled["rows"])
    rows = table_rows(result)
    assert len(rows) == 8 and "decode-once, 2 thread(s)" in rows[3][0] and rows[3][3].endswith("x")
    assert "model's scale, decode-once + resize, 1 thread" in rows[5][0] and "level 1" in rows[5][4]
