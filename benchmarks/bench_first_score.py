"""How soon a slide's first scores leave the pipeline: the small first engine run against none.

    python -m benchmarks.bench_first_score [--batch-size 64] [--repeats 3]

A demo-size synthetic slide (3072 x 3072 px, wsi.synth) is scored by serving.pipeline.SlideScorer
in this process (ResNet-50 random init + CHOWDER on onnxruntime's CPU provider, the server's
default batch size), streamed in chunks of 8 as the viewer asks. Measured per run: seconds from
the request to the first PatchChunk and to the summary, with the first engine run limited to
FIRST_BATCH_TILES tiles (today's default) and without (the first run a full batch). The two
variants alternate within each repeat; medians are printed with the CPU model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.machine import machine_facts


def _time_stream(scorer, slide: Path) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    for event in scorer.score(slide, chunk_size=8):
        if first is None and type(event).__name__ == "PatchChunk":
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from serving.engine import Engine
    from serving.pipeline import FIRST_BATCH_TILES, SlideScorer
    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head
    from wsi.synth import write_synthetic_slide

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backbone = build_backbone("none", seed=0)
        bundle = export_bundle(work / "bundle", backbone,
                               build_head({"kind": "chowder", "in_dim": backbone.feature_dim}))
        slide = work / "demo_tumor.tif"
        write_synthetic_slide(slide, 3072, 3072, seed=11, tumor=True)
        runs: dict[str, list[tuple[float, float]]] = {"small first run": [], "full first batch": []}
        with Engine(bundle, provider="cpu", batch_size=args.batch_size) as engine:
            scorers = {"small first run": SlideScorer(engine, first_batch_tiles=FIRST_BATCH_TILES),
                       "full first batch": SlideScorer(engine, first_batch_tiles=0)}
            _time_stream(scorers["full first batch"], slide)   # warm-up: sessions, page cache
            for _ in range(args.repeats):
                for name, scorer in scorers.items():
                    runs[name].append(_time_stream(scorer, slide))
    result = {"machine": machine_facts(), "batch_size": args.batch_size,
              "first_batch_tiles": FIRST_BATCH_TILES,
              "rows": {name: {"first_chunk_s": statistics.median(r[0] for r in rs),
                              "summary_s": statistics.median(r[1] for r in rs), "runs": rs}
                       for name, rs in runs.items()}}
    print(json.dumps(result["machine"]))
    print("| variant | first chunk (median s) | summary (median s) |\n|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['first_chunk_s']:.2f} | {row['summary_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
