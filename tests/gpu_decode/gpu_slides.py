"""Paths and facts the GPU-decode tests share (a module of its own name: test modules cannot
import `conftest` reliably when several test folders have one)."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
CMU_SMALL = DATA / "CMU-1-Small-Region.svs"        # Aperio, 240-px RGB-coded JPEG, JPEGTables
TCGA_JP2K = DATA / "TCGA-CR-7395-01A-01-TS1.svs"   # Aperio, JPEG 2000 (RGB)
ABSENT_TILE = 5                                     # row 1, column 1 of the edges slide
