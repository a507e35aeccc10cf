#!/usr/bin/env bash
# Debian's chromium for the viewer's browser tests (tests/viewer), installed when it is absent.
# The tests drive it headless through Playwright's Python package with executable_path, so
# Playwright's own browser download (`playwright install`) is never needed.
set -euo pipefail
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "chromium is missing and this is not root: apt-get install chromium" >&2; exit 1; }
    SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
