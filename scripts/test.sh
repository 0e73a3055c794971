#!/usr/bin/env bash
# The test command (README, .ci/run): a virtual environment with the test extra,
# Debian's Chromium for the browser test, then every test and notebook.
#
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --disable-pip-version-check -q -e '.[test]'

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "scripts/test.sh: installing Debian's chromium for the browser test" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
    else
        echo "scripts/test.sh: /usr/bin/chromium is missing, so the browser test" \
            "(tests/notebook/test_browser.py) will fail; install it with" \
            "'sudo apt-get install chromium' and run this again" >&2
    fi
fi

exec .venv/bin/python -m pytest "$@"
