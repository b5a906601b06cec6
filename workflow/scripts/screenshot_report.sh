#!/usr/bin/env bash
# Render results/report.html in headless Chromium (Debian's chromium package) to a PNG,
# to check that its tables, plots and grids show. Usage: workflow/scripts/screenshot_report.sh [html] [png]
set -euo pipefail
html=$(realpath "${1:-results/report.html}")
png=$(realpath -m "${2:-results/report_screenshot.png}")
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "error: chromium not found; install it with: apt-get install -y chromium" >&2; exit 2; }
[ -f "$html" ] || { echo "error: $html does not exist; run the report stage first" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1400,4000 \
  --screenshot="$png" "file://$html" >/dev/null 2>&1
[ -s "$png" ] || { echo "error: chromium wrote no screenshot" >&2; exit 1; }
echo "$png"
