#!/usr/bin/env bash
# Build the milroi images without a Docker daemon (buildah, vfs, chroot isolation, no pulls).
#
#   scripts/containers/build_images.sh [serve|train|all]     (make images = all)
#
# Environment:
#   WITH_CUDA=1|0       serve image with the CUDA 13 / cuDNN 9 runtime wheels (default 1)
#   TRAIN_WHEELS=DIR    a folder of wheels (e.g. `pip download torch==2.14.1 ...` output) the
#                       train build installs from before the index, mounted into the build
#   BASE_IMAGE          base of both images (default: the local debootstrap image, made on demand)
#   SERVE_IMAGE, TRAIN_IMAGE   tags (default localhost/milroi-serve:latest, -train:latest)
#   TRAIN_LAYERS=1      cache the train image's layers too (see below)
#   MILROI_MIN_FREE_GIB free disk a build requires before it starts (default: the measured cold
#                       peaks, serve 10, or 30 with CUDA; train 34); the build stops with a clear message below it
#   MILROI_PRUNE=0      keep dangling images (default: removed after each successful build)
# The serve image's layers are cached (--layers): a rebuild after a source change reuses the
# dependency layers. The train image is built without --layers by default: under the vfs storage
# driver each cached step is a full copy of its ~7 GB file system, which needs ~55 GB of disk at
# the peak instead of ~21 GB (Docker's overlay2 has no such cost; there `docker build` caches).
# Prints build time and image size of each image and records them in
# benchmarks/results/containers.json.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

target="${1:-all}"
case "$target" in serve|train|all) ;; *) die "usage: $0 [serve|train|all]";; esac
WITH_CUDA="${WITH_CUDA:-1}"

ensure_tools || exit $?
# the disk check comes before the base image too, so a short disk writes no layer at all
serve_need=10; [[ "$WITH_CUDA" == 1 ]] && serve_need=30
train_need=34
need=$train_need; [[ "$target" == serve ]] && need=$serve_need
require_free_gib "${MILROI_MIN_FREE_GIB:-$need}" "building the $target image(s)" || exit 1
if [[ "$BASE_IMAGE" == localhost/milroi-base:* ]]; then
    bash "$REPO_ROOT/scripts/containers/make_base_image.sh"
fi
mapfile -t pip_args < <(pip_build_args)

# record NAME IMAGE SECONDS EXISTED_BEFORE: print and merge into the results file (EXISTED_BEFORE:
# the tag was there before this build, so its layers were probably cached)
record() {
    local size; size="$(image_size_bytes "$2")"
    log "$1: $2 built in $3 s, $(numfmt --to=iec "$size")B ($size bytes)"
    python3 - "$BENCH_JSON" "$1" "$2" "$3" "$size" "$4" "$WITH_CUDA" <<'PY'
import json, os, sys, time
from pathlib import Path
path, name, image, seconds, size, cached, cuda = sys.argv[1:]
path = Path(path)
results = json.loads(path.read_text()) if path.exists() else {}
results.setdefault("images", {})[name] = {
    "image": image, "build_seconds": int(seconds), "size_bytes": int(size),
    "size_gib": round(int(size) / 2**30, 2), "image_existed_before": cached == "1",
    "with_cuda": cuda == "1" if name.startswith("serve") else None,
    "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
path.parent.mkdir(parents=True, exist_ok=True)
tmp = path.with_suffix(".json.tmp")
tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
tmp.replace(path)
PY
}

build() {   # build NAME DOCKERFILE IMAGE NEED_GIB EXTRA_ARGS...
    local name="$1" dockerfile="$2" image="$3" need="${MILROI_MIN_FREE_GIB:-$4}"; shift 4
    require_free_gib "$need" "building $image" || exit 1
    local cached=0; image_exists "$image" && cached=1
    local start; start=$(date +%s)
    log "building $image from $dockerfile"
    buildah_ build "${BUILD_FLAGS[@]}" -f "$REPO_ROOT/$dockerfile" -t "$image" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" "${pip_args[@]}" "$@" "$REPO_ROOT" >&2
    record "$name" "$image" "$(( $(date +%s) - start ))" "$cached"
    # each rebuild leaves the replaced image's layers untagged (~1.2 GiB each for serve under vfs):
    # without this, repeated test runs fill the disk
    [[ "${MILROI_PRUNE:-1}" == 0 ]] || prune_dangling_images
}

if [[ "$target" == serve || "$target" == all ]]; then
    name=serve; [[ "$WITH_CUDA" == 1 ]] || name=serve-cpu
    build "$name" Dockerfile.serve "$SERVE_IMAGE" "$serve_need" --layers --build-arg "WITH_CUDA=$WITH_CUDA"
fi
if [[ "$target" == train || "$target" == all ]]; then
    [[ "${TRAIN_LAYERS:-0}" == 1 ]] && extra=(--layers=true) || extra=(--layers=false)
    if [[ -n "${TRAIN_WHEELS:-}" ]]; then
        [[ -d "$TRAIN_WHEELS" ]] || die "TRAIN_WHEELS=$TRAIN_WHEELS is not a folder"
        extra+=(--volume "$(cd "$TRAIN_WHEELS" && pwd):/wheels:ro" --build-arg "PIP_WHEELS=/wheels")
    fi
    build train Dockerfile.train "$TRAIN_IMAGE" "$train_need" "${extra[@]}"
fi
