#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the browser test (tests/test_ui_browser.py). Nothing else may download
# a browser at run time, so the test uses exactly these two packages. A no-op when both are installed.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "chromium/chromium-driver missing and not root: apt-get install them" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver fonts-dejavu-core >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
