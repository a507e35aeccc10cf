#!/usr/bin/env bash
# Make the local base image localhost/milroi-base:bookworm without any registry:
#   debootstrap (Debian bookworm, minbase + python3, python3-venv, ca-certificates)
#   -> rootfs.tar -> `buildah build` of `FROM scratch` + `ADD rootfs.tar /`.
# It plays the part of python:3.11-slim-bookworm (Debian's python3 is 3.11) for Dockerfile.serve
# and Dockerfile.train, which take it as --build-arg BASE_IMAGE.
#
# Cached: rootfs.tar stays in $MILROI_CONTAINER_CACHE (outside the clone) and the image in
# buildah's storage; both are reused when present. --force rebuilds both.
#   MILROI_DEBIAN_MIRROR   mirror for debootstrap (default: deb.debian.org)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

force=0
[[ "${1:-}" == "--force" ]] && force=1

ensure_tools || exit $?

if [[ $force -eq 0 ]] && image_exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE present, reused"
    exit 0
fi

mkdir -p "$MILROI_CONTAINER_CACHE"
rootfs_tar="$MILROI_CONTAINER_CACHE/bookworm-rootfs.tar"
start=$(date +%s)

if [[ $force -eq 1 || ! -s "$rootfs_tar" ]]; then
    work="$(mktemp -d "$MILROI_CONTAINER_CACHE/debootstrap.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    mirror="${MILROI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    log "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    r="$work/rootfs"
    # This machine's CA bundle: it holds the CA of this network's TLS proxy, without which pip
    # inside the build cannot reach the package index. (Debian's bundle is a subset of it.)
    cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
    # The same apt sources as the mirror debootstrap used, like the Debian images on Docker Hub.
    echo "deb $mirror bookworm main" >"$r/etc/apt/sources.list"
    # No caches or logs in the image.
    rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/var/log/* \
           "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/*
    tar --numeric-owner --xattrs -C "$r" -cf "$rootfs_tar.tmp" .
    mv "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$work"; trap - EXIT
    log "rootfs $(du -h "$rootfs_tar" | cut -f1) in $(( $(date +%s) - start )) s"
else
    log "rootfs $rootfs_tar present, reused"
fi

# The build context is the cache folder: only rootfs.tar and the Containerfile are in it.
cat >"$MILROI_CONTAINER_CACHE/Containerfile.base" <<'CF'
FROM scratch
ADD bookworm-rootfs.tar /
ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
CMD ["python3"]
CF
ctx="$(mktemp -d "$MILROI_CONTAINER_CACHE/ctx.XXXXXX")"
ln "$rootfs_tar" "$ctx/bookworm-rootfs.tar" 2>/dev/null || cp "$rootfs_tar" "$ctx/"
buildah_ build "${BUILD_FLAGS[@]}" --layers=false -f "$MILROI_CONTAINER_CACHE/Containerfile.base" \
    -t "$BASE_IMAGE" "$ctx" >&2
rm -rf "$ctx"
log "base image $BASE_IMAGE: $(image_size_bytes "$BASE_IMAGE") bytes, $(( $(date +%s) - start )) s"
