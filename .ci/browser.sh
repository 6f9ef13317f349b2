#!/usr/bin/env bash
# Chromium for the report's browser test (tests/test_report_browser.py); prints its path.
#
#   bash .ci/browser.sh && STACKLAB_REQUIRE_BROWSER=1 pytest tests/test_report_browser.py
#
# For CI on a fresh Debian machine: installs Debian's `chromium` package when /usr/bin/chromium
# is missing (needs root; about 40 s and 400 MB), then checks that it starts headless.
# Idempotent: with a working /usr/bin/chromium it only checks. The test drives it through the
# Python package `playwright` (pip); never `playwright install`, which downloads its own
# browser from the network. (On Ubuntu, apt's `chromium` is a snap stub that does not run in
# containers; this check catches that.) Everything but the path goes to stderr.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
LOG=${TMPDIR:-/tmp}/stacklab-browser-install.log

die() {
    echo "browser.sh: $*" >&2
    exit 1
}

if [[ ! -x $CHROMIUM ]]; then
    [[ $(id -u) == 0 ]] || die "no $CHROMIUM; as root: apt-get install chromium"
    command -v apt-get >/dev/null || die "no $CHROMIUM and no apt-get to install it with"
    echo "browser.sh: installing chromium (log: $LOG)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq chromium; } >"$LOG" 2>&1 \
        || die "apt-get install chromium failed: $(tail -n 5 "$LOG")"
    [[ -x $CHROMIUM ]] || die "chromium installed, but there is no $CHROMIUM"
fi

# A browser that is there but cannot start (a missing library, a snap stub) fails here, with
# its own words, not later inside a test.
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
if ! out=$(timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
    --no-first-run --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --dump-dom about:blank 2>&1); then
    die "$CHROMIUM does not start headless: $(echo "$out" | tail -n 5)"
fi
[[ $out == *"<body>"* ]] || die "$CHROMIUM started but printed no page: $(echo "$out" | tail -n 5)"
echo "browser.sh: $("$CHROMIUM" --version 2>/dev/null)" >&2
echo "$CHROMIUM"
