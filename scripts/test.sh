#!/usr/bin/env bash
# Run the whole test suite: unit tests, doctests, and integration tests
# against the real Kafka broker and Redis server that this script starts.
# Services that were already running are left running; services this
# script started are stopped again, whatever the outcome.
#
# Extra arguments go to pytest, e.g. `scripts/test.sh -k sink`.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=0
if ! scripts/services.sh status >/dev/null 2>&1; then
    started=1
fi
cleanup() {
    if [[ "${started}" == 1 ]]; then
        scripts/services.sh down || true
    fi
}
trap cleanup EXIT

scripts/services.sh up

# Integration tests fail instead of skipping when a service is missing.
export FUSIONREC_REQUIRE_SERVICES=1
export FUSIONREC_KAFKA_BOOTSTRAP="127.0.0.1:${FUSIONREC_KAFKA_PORT:-9092}"
export FUSIONREC_REDIS_URL="redis://127.0.0.1:${FUSIONREC_REDIS_PORT:-6379}/0"

set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
# pytest exits 5 when it collected no test; that is a broken suite here.
if [[ "${code}" == 5 ]]; then
    echo "test.sh: pytest collected no tests; failing" >&2
    code=1
fi
exit "${code}"
