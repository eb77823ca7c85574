#!/usr/bin/env bash
# Time the operational promises (stock fan-out, forget, Redis outage,
# broker restart, SIGTERM, restart after SIGKILL) against real services and
# write docs/operations.md. Starts Kafka and Redis when they are not
# running and stops only what it started. Extra arguments go to
# `python -m stream.drills`, e.g. `scripts/operations.sh --fanout 10000`.

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
export FUSIONREC_KAFKA_BOOTSTRAP="127.0.0.1:${FUSIONREC_KAFKA_PORT:-9092}"
export FUSIONREC_REDIS_URL="redis://127.0.0.1:${FUSIONREC_REDIS_PORT:-6379}/0"
.venv/bin/python -m stream.drills --markdown docs/operations.md "$@"
