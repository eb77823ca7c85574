#!/usr/bin/env bash
# Run the main job end to end on the built-in synthetic sample: start Kafka
# and Redis when they are not running, replay the sample through a real
# worker, print a few users' lists, and stop whatever this script started.
#
# Extra arguments go to `python -m stream.demo`, e.g.
#   scripts/demo.sh --path ../shared/data/taobao-userbehavior/taobao_first_users.csv.gz --format taobao

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
.venv/bin/python -m stream.demo "$@"
