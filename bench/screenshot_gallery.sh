#!/usr/bin/env bash
# A look at the gallery pages (python -m eval.gallery) in a real browser: each PAGE.html is rendered by headless
# Chromium at a laptop's width into PAGE.png beside it.
#   bash bench/screenshot_gallery.sh runs/gallery/pairs.html runs/gallery/compare.html
#   WINDOW=1366,2400 bash bench/screenshot_gallery.sh PAGE.html      (a taller window shows more entries)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/screenshot_gallery.sh PAGE.html [PAGE.html ...]" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no chromium found; install it (Debian/Ubuntu: apt-get install -y chromium) and rerun" >&2
  exit 1
fi
for page in "$@"; do
  [ -f "$page" ] || { echo "$page: no such file" >&2; exit 1; }
  png="${page%.html}.png"
  "$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --window-size="${WINDOW:-1366,900}" \
    --screenshot="$(realpath -m "$png")" "file://$(realpath "$page")" 2>/dev/null
  echo "wrote $png"
done
