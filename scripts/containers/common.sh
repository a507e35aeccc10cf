# Shared settings of the container scripts (sourced, not run).
#
# There is no Docker daemon on the CI machines: images are built and run with buildah as root,
# with the vfs storage driver (no overlay mounts needed) and chroot isolation (no user namespaces
# or OCI runtime needed). Nothing is pulled from a registry (--pull-never): the base image is made
# locally by make_base_image.sh.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# Outside the clone, so no build output lands in the git tree; reused across runs and clones.
MILROI_CONTAINER_CACHE="${MILROI_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/milroi/containers}"
BASE_IMAGE="${BASE_IMAGE:-localhost/milroi-base:bookworm}"
SERVE_IMAGE="${SERVE_IMAGE:-localhost/milroi-serve:latest}"
TRAIN_IMAGE="${TRAIN_IMAGE:-localhost/milroi-train:latest}"
BENCH_JSON="${BENCH_JSON:-$REPO_ROOT/benchmarks/results/containers.json}"

BUILDAH_GLOBAL=(--storage-driver vfs)
BUILD_FLAGS=(--isolation chroot --pull-never --format docker --force-rm)
# --force-rm: a failed step's working container (a full file-system copy under vfs) is removed
# too, not left behind to fill the disk.
# --format docker: the OCI image format has no HEALTHCHECK; buildah drops it there with a warning.
# --layers (a cached image per instruction) is set per build, always explicitly (--layers,
# --layers=false): with vfs every cached layer and every step's working container is a full
# copy of the file system so far, and buildah 1.28 (Debian bookworm) rejects --force-rm unless
# --layers or --no-cache is given on the command line.

log() { printf '[containers] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

buildah_() { buildah "${BUILDAH_GLOBAL[@]}" "$@"; }

# Install buildah and debootstrap when missing (CI runs on a clean machine, as root).
# Exit status 3 means "cannot be done here" (not root, or the Debian mirror is unreachable):
# callers such as the container tests turn it into a skip with that reason.
ensure_tools() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        log "need root to install ${missing[*]}"; return 3
    fi
    log "installing ${missing[*]} with apt-get"
    if ! apt-get update -qq; then
        log "apt-get update failed: the Debian mirror is unreachable"; return 3
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" crun >/dev/null || { log "apt-get install ${missing[*]} failed"; return 3; }
}

# buildah's storage folder (/var/lib/containers/storage for root).
graph_root() { buildah_ info --format '{{.store.GraphRoot}}'; }

# Free space, in GiB, of the file system holding buildah's storage.
storage_free_gib() {
    local root; root="$(graph_root)"
    mkdir -p "$root"
    df --output=avail -B1G "$root" | tail -n 1 | tr -d ' '
}

# require_free_gib NEED WHAT: stop with a clear message, before any layer is written, when the
# storage has less than NEED GiB free (a vfs build that runs out midway leaves half-written layers
# and an unreadable "no space left on device" deep in buildah's output).
require_free_gib() {
    local free; free="$(storage_free_gib)"
    if (( free < $1 )); then
        log "error: $2 needs about $1 GiB free for buildah's vfs storage ($(graph_root)), only $free GiB free"
        log "free space: remove unused images (buildah --storage-driver vfs rmi IMAGE) or set MILROI_MIN_FREE_GIB"
        return 1
    fi
}

# Remove what earlier builds left behind: images that lost their tag to a newer build and have no
# child image (dangling, as podman and docker define it). Cached layers that the current images
# still build on are children-bearing, so they stay and keep --layers fast.
prune_dangling_images() {
    local before after
    before="$(storage_free_gib)"
    buildah_ rmi --prune >/dev/null 2>&1 || true
    after="$(storage_free_gib)"
    (( after <= before )) || log "pruned dangling images: $(( after - before )) GiB freed"
}

image_exists() { buildah_ inspect --type image "$1" >/dev/null 2>&1; }

# Size of an image in bytes: the sum of its layers uncompressed (what `docker images` shows), read
# from the storage's own layer records, without copying the image into a container.
image_size_bytes() {
    local id root
    id="$(buildah_ inspect --type image --format '{{.FromImageID}}' "$1")"
    root="$(graph_root)"
    python3 - "$root" "$id" <<'PY'
import json, sys
from pathlib import Path
root, image_id = Path(sys.argv[1]), sys.argv[2]
image = next(i for i in json.loads((root / "vfs-images/images.json").read_text()) if i["id"] == image_id)
layers = {l["id"]: l for l in json.loads((root / "vfs-layers/layers.json").read_text())}
size, layer = 0, image["layer"]
while layer:
    size += layers[layer].get("diff-size", 0)
    layer = layers[layer].get("parent")
print(size)
PY
}

# pip options for builds on this network. The local base image carries this machine's CA bundle
# (make_base_image.sh), which pip inside the build must use to reach the package index through
# this network; an http(s) index the host is configured with (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL)
# is passed on. No host name is written into any file: values come from the environment.
pip_build_args() {
    echo --build-arg; echo "PIP_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"
    if [[ "${PIP_INDEX_URL:-}" == http* ]]; then echo --build-arg; echo "PIP_INDEX=$PIP_INDEX_URL"; fi
    local extra="" url
    for url in ${PIP_EXTRA_INDEX_URL:-}; do if [[ "$url" == http* ]]; then extra+="$url "; fi; done
    if [[ -n "$extra" ]]; then echo --build-arg; echo "PIP_EXTRA_INDEX=${extra% }"; fi
}
