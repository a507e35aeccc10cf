#!/usr/bin/env bash
# `docker run` without a daemon: run an image's entrypoint with arguments in a fresh buildah
# container (chroot isolation: the host's network namespace, so a server's port is the host's),
# removed afterwards.
#
#   scripts/containers/run.sh serve|train|IMAGE [-v HOST:CTR[:ro]]... [--] ARGS...
#
#   scripts/containers/run.sh serve -v $PWD/slides:/slides:ro -v $PWD/bundle:/models/bundle:ro \
#       -v $PWD/out:/out -- score /slides --model /models/bundle --out /out
#   scripts/containers/run.sh serve -v $PWD/slides:/slides:ro -v $PWD/bundle:/models/bundle:ro \
#       -- serve --model /models/bundle --slide-root /slides --port 50051
#   scripts/containers/run.sh train -v $PWD/data:/data -v $PWD/work:/work -- fit /data/features ...
# Folders the container writes (/out, /work) must be writable by its user, uid 10001.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || die "usage: $0 serve|train|IMAGE [-v HOST:CTR[:ro]]... [--] ARGS..."
case "$1" in
    serve) image="$SERVE_IMAGE" ;;
    train) image="$TRAIN_IMAGE" ;;
    *) image="$1" ;;
esac
shift
volumes=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -v|--volume) volumes+=(--volume "$2"); shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
image_exists "$image" || die "no image $image: build it with scripts/containers/build_images.sh"

# The entrypoint from the image's own config, as docker would run it.
mapfile -t entrypoint < <(buildah_ inspect --type image "$image" \
    | python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["Docker"]["config"]["Entrypoint"] or []))')
ctr="$(buildah_ from --pull-never "$image")"
trap 'buildah_ rm "$ctr" >/dev/null' EXIT
# Signals reach the command through buildah run (Ctrl-C / SIGTERM stop a server cleanly).
buildah_ run --isolation chroot "${volumes[@]}" "$ctr" -- "${entrypoint[@]}" "$@"
