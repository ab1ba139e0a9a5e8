#!/usr/bin/env bash
# Make sure Debian's Chromium and its WebDriver are installed: the browser test of
# the Nightshift view drives a headless Chromium through chromedriver (selenium).
# Idempotent: installs only what is missing, and only as root with apt-get.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  echo "chromium: $(chromium --version 2>/dev/null | head -n1) with chromedriver"
  exit 0
fi

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  cat >&2 <<MSG
chromium: ${missing[*]} not installed and this user cannot install them; the browser
  test of the Nightshift view will be skipped. Install them, e.g.
  'sudo apt-get install chromium chromium-driver', then run this again.
MSG
  exit 0
fi

echo "chromium: installing Debian's ${missing[*]}"
apt_log=$(mktemp)
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$apt_log" 2>&1 || {
  echo "apt-get install ${missing[*]} failed:" >&2; tail -n 20 "$apt_log" >&2; exit 1; }
rm -f "$apt_log"
echo "chromium: $(chromium --version 2>/dev/null | head -n1) with chromedriver"
