#!/usr/bin/env bash
# Run `fusionrec bench` against the real broker and Redis: start Kafka and
# Redis when they are not running, run the benchmark, and stop whatever this
# script started, whatever the outcome.
#
# Without arguments the full run writes its JSON result to var/bench/result.json
# and the freshness plot to var/bench/bench-freshness.png, and prints the
# tables. Arguments replace those defaults and go to `fusionrec bench`, e.g.
#   scripts/bench.sh --quick --json
#   scripts/bench.sh --replay ../shared/data/some-file.csv.gz --format taobao

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
FUSIONREC_KAFKA_VERSION="$(scripts/services.sh env | sed -n 's/^FUSIONREC_KAFKA_VERSION=//p')"
export FUSIONREC_KAFKA_VERSION

if (($# == 0)); then
    mkdir -p var/bench
    set -- --output var/bench/result.json --plot var/bench/bench-freshness.png
fi
.venv/bin/python -m stream.cli bench "$@"
