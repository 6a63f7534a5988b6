#!/usr/bin/env bash
# Set up the environment (see scripts/setup.sh) and run the test suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k model -x
set -euo pipefail
cd "$(dirname "$0")/.."
TRADUIRE_EXTRAS=test source scripts/setup.sh
say "running the tests"
python -m pytest "$@"
