#!/usr/bin/env bash
# Debian packages the test suite uses: chromium (the web page, headless), prometheus
# (promtool checks the metrics) and curl (scripts/readme_walk.sh asks the endpoint). Installed when missing and we may; else the tests that
# need them say they were skipped and why.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: not root or no apt-get; missing ${missing[*]} (their tests will be skipped)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system-deps: installed ${missing[*]}"
