#!/usr/bin/env bash
# Vendor OpenSeadragon from its npm package into the viewer's static files
# (viewer/static/openseadragon/), so that `milroi-serve view` needs no CDN: the files are
# committed, and setuptools ships them inside the Python package (package-data).
# Rerun to change the version: bash scripts/vendor_openseadragon.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-6.1.1}
DEST=viewer/static/openseadragon
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "openseadragon@$VERSION" >/dev/null && tar xzf openseadragon-*.tgz)
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$WORK/package/build/openseadragon/openseadragon.min.js" "$DEST/"
cp -r "$WORK/package/build/openseadragon/images" "$DEST/"
cp "$WORK/package/LICENSE.txt" "$DEST/LICENSE.txt"
printf '%s\n' "$VERSION" > "$DEST/VERSION"
echo "OpenSeadragon $VERSION -> $DEST"
