"""The domain check's benchmark (issue 38, "Targets"): how often a model trained on plain slides
flags slides unlike them, how rarely it flags slides like them, and what the check costs.

    python -m benchmarks.bench_domain --root DIR [--results benchmarks/results/domain.json]

The protocol, fixed before the run (the rule's constants are core.domain's; nothing here was
chosen on these slides, whose seeds no test or development run used):

- training: `milroi-train synth DIR/train --tumor 10 --normal 10 --size 2048x2048 --seed 41`,
  `features --weights none`, `fit --folds 4`, `export` (the bundle carries the description);
- in domain: `synth DIR/plain --tumor 10 --normal 10 --seed 42` (the same kind, unseen);
- hard stain: `synth DIR/hard --hard --tumor 10 --normal 10 --seed 43` (every slide its own
  stain, wsi.synth.random_stain, with pen, marker and blur);
- 2x scale: `synth DIR/coarse --mpp 0.486 --tumor 3 --normal 3 --seed 44` (a scan at half the
  resolution, its pixel size in its metadata);
- no pixel size: the plain slides' first 6 copied with their TIFF ResolutionUnit set to none
  (OpenSlide then reads no pixel size), scored with `--fallback-mpp 0.243`.

Each set is scored once by `milroi-serve score --model BUNDLE`; the flag rate is the share of
slides with `in_domain` = 0 in summary.csv. Targets: >= 90 % of hard-stain slides, every 2x and
every pixel-size-less slide, <= 5 % of the in-domain slides.

Cost: the in-domain slides scored in process (serving.pipeline, onnxruntime fp32) by the bundle
and by the same bundle without its description, alternating, REPEATS times; the ratio of the
median scoring times (target < 1.05).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import machine_facts
from results.layout import SUMMARY_NAME

log = logging.getLogger("bench_domain")

RESULTS = Path(__file__).resolve().parent / "results" / "domain.json"
REPO = Path(__file__).resolve().parents[1]
SIZE = "2048x2048"
SETS = {  # name -> synth arguments
    "train": ["--tumor", "10", "--normal", "10", "--seed", "41"],
    "plain": ["--tumor", "10", "--normal", "10", "--seed", "42"],
    "hard": ["--tumor", "10", "--normal", "10", "--seed", "43", "--hard"],
    "coarse": ["--tumor", "3", "--normal", "3", "--seed", "44", "--mpp", "0.486"],
}
NO_MPP_SLIDES = 6
FALLBACK_MPP = "0.243"
REPEATS = 3


def _cli(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=REPO,
                          capture_output=True, text=True)
    return done.stdout


def strip_pixel_size(path: Path) -> None:
    """Set every page's ResolutionUnit to none (1): OpenSlide reads no pixel size then."""
    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            page.tags["ResolutionUnit"].overwrite(1)


def prepare(root: Path) -> Path:
    """The slide sets, the training features, the fit run and its bundle; returns the bundle."""
    for name, args in SETS.items():
        if not (root / name / "reference.csv").is_file():
            _cli("training.cli", "synth", str(root / name), "--size", SIZE, *args)
    nompp = root / "nompp"
    if not nompp.is_dir():
        nompp.mkdir()
        for slide in sorted((root / "plain").glob("*.tif"))[:NO_MPP_SLIDES]:
            shutil.copy(slide, nompp / slide.name)
            strip_pixel_size(nompp / slide.name)
    bundle = root / "bundle"
    if not (bundle / "manifest.json").is_file():
        uri = f"sqlite:///{root / 'mlflow.db'}"
        _cli("training.cli", "features", str(root / "train"), "--out", str(root / "feat_train"),
             "--weights", "none", "--no-progress")
        out = _cli("training.cli", "fit", str(root / "feat_train"), "--labels",
                   str(root / "train" / "reference.csv"), "--annotations", str(root / "train"),
                   "--folds", "4", "--seed", "0", "--tracking-uri", uri)
        run_id = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("run_id=")][-1]
        _cli("training.cli", "export", run_id, "--name", "domain-bench", "--tracking-uri", uri,
             "--out", str(bundle))
    return bundle


def flag_rates(root: Path, bundle: Path) -> dict:
    """Each set scored once: share of slides flagged, and why."""
    out = {}
    for name in ("plain", "hard", "coarse", "nompp"):
        scores = root / f"scores_{name}"
        if not (scores / SUMMARY_NAME).is_file():
            extra = ["--fallback-mpp", FALLBACK_MPP] if name == "nompp" else []
            _cli("serving.cli", "score", str(root / name), "--model", str(bundle), "--out",
                 str(scores), "--backend", "onnxruntime", "--precision", "fp32", *extra)
        with open(scores / SUMMARY_NAME) as f:
            rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
        flagged = [r for r in rows if r["in_domain"] == "0"]
        reasons = {}
        for r in flagged:
            for criterion in {reason.split(":", 1)[0] for reason in r["domain_reasons"].split("; ")}:
                reasons[criterion] = reasons.get(criterion, 0) + 1
        out[name] = {"slides": len(rows), "flagged": len(flagged),
                     "rate": len(flagged) / len(rows) if rows else None,
                     "by_criterion": reasons,
                     "domain_scores": sorted(float(r["domain_score"]) for r in rows
                                             if r["domain_score"])}
    return out


def cost(root: Path, bundle: Path) -> dict:
    """Scoring time of the plain slides with and without the description (module docstring)."""
    from core.bundle import BundleManifest
    from core.domain import DOMAIN_ROLE
    from serving.engine import Engine
    from serving.pipeline import SlideScorer

    bare = root / "bundle_without_domain"
    if bare.exists():
        shutil.rmtree(bare)
    shutil.copytree(bundle, bare)
    manifest = BundleManifest.read(bare)
    files = {k: v for k, v in manifest.files.items() if k != DOMAIN_ROLE}
    (bare / manifest.files[DOMAIN_ROLE]).unlink()
    manifest.replace(files=files, domain=None).write(bare)
    slides = sorted((root / "plain").glob("*.tif"))
    engines = {"with": Engine(bundle, backend="onnxruntime", precision="fp32"),
               "without": Engine(bare, backend="onnxruntime", precision="fp32")}
    times: dict[str, list[float]] = {"with": [], "without": []}
    try:
        scorers = {k: SlideScorer(e) for k, e in engines.items()}
        scorers["with"].score_slide(slides[0])   # warm-up (sessions, allocator)
        scorers["without"].score_slide(slides[0])
        for repeat in range(REPEATS):
            order = ("with", "without") if repeat % 2 == 0 else ("without", "with")
            for key in order:
                t0 = time.perf_counter()
                for slide in slides:
                    scorers[key].score_slide(slide)
                times[key].append(time.perf_counter() - t0)
    finally:
        for engine in engines.values():
            engine.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"slides": len(slides), "repeats": REPEATS, "seconds": times,
            "median_with_s": medians["with"], "median_without_s": medians["without"],
            "ratio": medians["with"] / medians["without"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    bundle = prepare(root)
    rates = flag_rates(root, bundle)
    timing = cost(root, bundle)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    result = {"protocol": "benchmarks/bench_domain.py docstring", "machine": machine_facts(),
              "commit": commit, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "flag_rates": rates, "cost": timing,
              "targets": {"hard_rate_min": 0.9, "coarse_rate": 1.0, "nompp_rate": 1.0,
                          "plain_rate_max": 0.05, "cost_ratio_max": 1.05}}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    for name, r in rates.items():
        print(f"{name:7s} {r['flagged']:3d}/{r['slides']:3d} flagged ({r['rate']:.0%}) "
              f"{r['by_criterion']}")
    print(f"cost: {timing['median_with_s']:.1f} s with the check, {timing['median_without_s']:.1f} s "
          f"without (median of {REPEATS}): ratio {timing['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
