#!/usr/bin/env bash
# Start, stop and inspect the services fusionrec runs against: one Apache Kafka
# broker in KRaft mode (combined broker and controller) and one redis-server,
# both bound to 127.0.0.1. Their configuration, data, logs and pid files live
# under one folder, by default .services/ at the repository root.
#
# Usage: scripts/services.sh up|down|status|env|kafka-config [kafka|redis]...
#
#   up            start the services that are not running, wait until each is
#                 ready, then create the topics; exits 0 when all are up
#   down          stop the processes this script started (by recorded pid) and
#                 wait for them to exit
#   status        print the state of each service; exits 0 only if all run
#   env           print the effective settings as KEY=VALUE lines
#   kafka-config  print the server.properties the broker is started with
#
# The broker runs from Maven Central jars resolved by scripts/kafka/pom.xml
# into a cache folder, or from an existing install named by KAFKA_HOME.
# Settings are environment variables; `scripts/services.sh env` lists them.

set -euo pipefail

readonly KAFKA_VERSION="3.9.1"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
readonly SCRIPT_DIR REPO_ROOT

HOST="${FUSIONREC_SERVICES_HOST:-127.0.0.1}"
KAFKA_PORT="${FUSIONREC_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${FUSIONREC_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP="${FUSIONREC_KAFKA_HEAP:-512M}"
KAFKA_START_TIMEOUT="${FUSIONREC_KAFKA_START_TIMEOUT:-90}"
REDIS_PORT="${FUSIONREC_REDIS_PORT:-6379}"
REDIS_START_TIMEOUT="${FUSIONREC_REDIS_START_TIMEOUT:-20}"
STOP_TIMEOUT="${FUSIONREC_SERVICES_STOP_TIMEOUT:-60}"
PARTITIONS="${FUSIONREC_PARTITIONS:-8}"
SERVICES_DIR="${FUSIONREC_SERVICES_DIR:-${REPO_ROOT}/.services}"
CACHE_ROOT="${XDG_CACHE_HOME:-${HOME}/.cache}/fusionrec"
KAFKA_LIBS_CACHE="${FUSIONREC_KAFKA_LIBS:-${CACHE_ROOT}/kafka-${KAFKA_VERSION}/libs}"
PYTHON="${FUSIONREC_PYTHON:-${REPO_ROOT}/.venv/bin/python}"

KAFKA_DIR="${SERVICES_DIR}/kafka"
REDIS_DIR="${SERVICES_DIR}/redis"

log() {
    printf 'services: %s\n' "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

require_port() {
    local name="$1" value="$2"
    if ! [[ "${value}" =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
        die "${name}=${value} is not a TCP port; expected an integer from 1 to 65535"
    fi
}

check_settings() {
    require_port FUSIONREC_KAFKA_PORT "${KAFKA_PORT}"
    require_port FUSIONREC_KAFKA_CONTROLLER_PORT "${KAFKA_CONTROLLER_PORT}"
    require_port FUSIONREC_REDIS_PORT "${REDIS_PORT}"
    if ((KAFKA_PORT == KAFKA_CONTROLLER_PORT)); then
        die "FUSIONREC_KAFKA_PORT and FUSIONREC_KAFKA_CONTROLLER_PORT are both ${KAFKA_PORT}; expected two different ports"
    fi
    if ! [[ "${PARTITIONS}" =~ ^[1-9][0-9]*$ ]]; then
        die "FUSIONREC_PARTITIONS=${PARTITIONS} is invalid; expected a positive integer"
    fi
    local timeout
    for timeout in KAFKA_START_TIMEOUT REDIS_START_TIMEOUT STOP_TIMEOUT; do
        if ! [[ "${!timeout}" =~ ^[1-9][0-9]*$ ]]; then
            die "${timeout}=${!timeout} is invalid; expected a positive number of seconds"
        fi
    done
}

print_env() {
    cat <<EOF
FUSIONREC_SERVICES_HOST=${HOST}
FUSIONREC_KAFKA_PORT=${KAFKA_PORT}
FUSIONREC_KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT}
FUSIONREC_KAFKA_BOOTSTRAP=${HOST}:${KAFKA_PORT}
FUSIONREC_KAFKA_HEAP=${KAFKA_HEAP}
FUSIONREC_KAFKA_START_TIMEOUT=${KAFKA_START_TIMEOUT}
FUSIONREC_KAFKA_VERSION=${KAFKA_VERSION}
FUSIONREC_KAFKA_LIBS=${KAFKA_LIBS_CACHE}
FUSIONREC_REDIS_PORT=${REDIS_PORT}
FUSIONREC_REDIS_URL=redis://${HOST}:${REDIS_PORT}/0
FUSIONREC_REDIS_START_TIMEOUT=${REDIS_START_TIMEOUT}
FUSIONREC_SERVICES_STOP_TIMEOUT=${STOP_TIMEOUT}
FUSIONREC_PARTITIONS=${PARTITIONS}
FUSIONREC_SERVICES_DIR=${SERVICES_DIR}
EOF
}

# --- processes ---------------------------------------------------------------

# The pid file contains "<pid> <start time in clock ticks since boot>", so that
# a recycled pid belonging to another process is never taken for ours.
process_start_time() {
    local pid="$1" stat
    stat="$(cat "/proc/${pid}/stat" 2>/dev/null)" || return 1
    # Field 2 (the command name) may contain spaces, so cut after its ")".
    stat="${stat##*) }"
    # shellcheck disable=SC2086
    set -- ${stat}
    printf '%s\n' "${20}"
}

# Print the pid recorded in a pid file, or fail. The process must still be the
# one this script started, and its command line must contain the marker.
recorded_pid() {
    local pid_file="$1" marker="$2" pid start_time current cmdline
    [[ -s "${pid_file}" ]] || return 1
    read -r pid start_time <"${pid_file}" || return 1
    [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
    current="$(process_start_time "${pid}")" || return 1
    [[ -z "${start_time:-}" || "${current}" == "${start_time}" ]] || return 1
    cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/${pid}/cmdline")" || return 1
    [[ "${cmdline}" == *"${marker}"* ]] || return 1
    printf '%s\n' "${pid}"
}

# Start a command in its own session with output appended to a log file, and
# record its pid. The inner shell writes its own pid and then becomes the
# command with exec, so the recorded pid is the service itself.
spawn() {
    local pid_file="$1" out_file="$2"
    shift 2
    rm -f "${pid_file}"
    setsid bash -c 'echo "$$" >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' \
        "${pid_file}" "$@" </dev/null >>"${out_file}" 2>&1 9>&- &
    local waited=0
    while [[ ! -s "${pid_file}" ]] && ((waited < 50)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    [[ -s "${pid_file}" ]] || die "could not start $1: no pid file ${pid_file} after 5 s"
    local pid start_time
    read -r pid <"${pid_file}"
    start_time="$(process_start_time "${pid}")" || start_time=""
    printf '%s %s\n' "${pid}" "${start_time}" >"${pid_file}"
}

port_in_use() {
    (exec 3<>"/dev/tcp/${HOST}/$1") 2>/dev/null
}

# Send SIGTERM to a recorded process and wait until it has exited; after the
# stop timeout, send SIGKILL.
stop_process() {
    local name="$1" pid_file="$2" marker="$3" pid
    if ! pid="$(recorded_pid "${pid_file}" "${marker}")"; then
        if [[ -e "${pid_file}" ]]; then
            log "${name}: not running (stale pid file removed)"
            rm -f "${pid_file}"
        else
            log "${name}: not running"
        fi
        return 0
    fi
    log "${name}: stopping pid ${pid}"
    local started=${SECONDS}
    kill -TERM "${pid}" 2>/dev/null || true
    while recorded_pid "${pid_file}" "${marker}" >/dev/null; do
        if ((SECONDS - started >= STOP_TIMEOUT)); then
            log "${name}: pid ${pid} still running after ${STOP_TIMEOUT} s; sending SIGKILL"
            kill -KILL "${pid}" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "${pid_file}"
    log "${name}: stopped after $((SECONDS - started)) s"
}

# --- Kafka ---------------------------------------------------------------------

kafka_marker() {
    printf 'kafka.Kafka %s' "${KAFKA_DIR}/server.properties"
}

write_kafka_config() {
    local data_dir="$1"
    cat <<EOF
# Written by scripts/services.sh; changes are overwritten at the next start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@${HOST}:${KAFKA_CONTROLLER_PORT}
listeners=PLAINTEXT://${HOST}:${KAFKA_PORT},CONTROLLER://${HOST}:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://${HOST}:${KAFKA_PORT}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=${data_dir}
num.partitions=${PARTITIONS}
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=${PARTITIONS}
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
log.retention.hours=168
log.segment.bytes=134217728
EOF
}

write_log4j_config() {
    local logs_dir="$1"
    cat <<EOF
# Written by scripts/services.sh: the broker's reload4j configuration.
log4j.rootLogger=INFO, server

log4j.appender.server=org.apache.log4j.RollingFileAppender
log4j.appender.server.File=${logs_dir}/server.log
log4j.appender.server.MaxFileSize=50MB
log4j.appender.server.MaxBackupIndex=2
log4j.appender.server.layout=org.apache.log4j.PatternLayout
log4j.appender.server.layout.ConversionPattern=[%d] %p %m (%c)%n

log4j.appender.stateChange=org.apache.log4j.RollingFileAppender
log4j.appender.stateChange.File=${logs_dir}/state-change.log
log4j.appender.stateChange.MaxFileSize=10MB
log4j.appender.stateChange.MaxBackupIndex=1
log4j.appender.stateChange.layout=org.apache.log4j.PatternLayout
log4j.appender.stateChange.layout.ConversionPattern=[%d] %p %m (%c)%n

log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.network.RequestChannel\$=WARN
log4j.logger.state.change.logger=INFO, stateChange
log4j.additivity.state.change.logger=false
log4j.logger.kafka.authorizer.logger=WARN
EOF
}

# Print the folder of broker jars, downloading them into the cache first when
# KAFKA_HOME is not set and the cache is incomplete.
# NOTE: only Kafka 3.9 has been run this way. A 4.x install under KAFKA_HOME
# logs through log4j2, which ignores the reload4j file written below, so it
# writes no server.log and its readiness depends on what it prints to stdout.
kafka_libs() {
    if [[ -n "${KAFKA_HOME:-}" ]]; then
        local libs="${KAFKA_HOME}/libs"
        compgen -G "${libs}/kafka_2.1[0-9]-*.jar" >/dev/null ||
            die "KAFKA_HOME=${KAFKA_HOME} has no libs/kafka_2.1x-*.jar; expected an unpacked Apache Kafka release"
        printf '%s\n' "${libs}"
        return 0
    fi
    if [[ -f "${KAFKA_LIBS_CACHE}/.complete" ]]; then
        printf '%s\n' "${KAFKA_LIBS_CACHE}"
        return 0
    fi
    command -v mvn >/dev/null ||
        die "mvn not found; install Maven or set KAFKA_HOME to an unpacked Apache Kafka ${KAFKA_VERSION}"
    log "kafka: downloading the Kafka ${KAFKA_VERSION} jars from Maven Central into ${KAFKA_LIBS_CACHE}"
    local parent staging started=${SECONDS}
    parent="$(dirname "${KAFKA_LIBS_CACHE}")"
    mkdir -p "${parent}"
    staging="$(mktemp -d "${parent}/libs.partial.XXXXXX")"
    # Debian's Maven writes colour resets even in batch mode, so its output
    # goes to a file and shows, without escape codes, only when it fails.
    if ! mvn -q -B -Dstyle.color=never -f "${SCRIPT_DIR}/kafka/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="${staging}" >"${staging}.log" 2>&1; then
        sed 's/\x1b\[[0-9;]*m//g' "${staging}.log" | tail -n 40 >&2
        rm -rf "${staging}" "${staging}.log"
        die "mvn could not resolve the Kafka ${KAFKA_VERSION} jars; check the route to Maven Central or set KAFKA_HOME"
    fi
    rm -f "${staging}.log"
    touch "${staging}/.complete"
    rm -rf "${KAFKA_LIBS_CACHE}"
    mv "${staging}" "${KAFKA_LIBS_CACHE}"
    log "kafka: $(find "${KAFKA_LIBS_CACHE}" -name '*.jar' | wc -l) jars cached in $((SECONDS - started)) s"
    printf '%s\n' "${KAFKA_LIBS_CACHE}"
}

# The broker is ready once it logged "Kafka Server started" in this run, either
# to server.log (from the given byte offset on) or to its standard output.
kafka_ready() {
    local log_file="$1" offset="$2" out_file="$3"
    if [[ -f "${log_file}" ]] &&
        tail -c "+$((offset + 1))" "${log_file}" | grep -q 'Kafka Server started'; then
        return 0
    fi
    [[ -f "${out_file}" ]] && grep -q 'Kafka Server started' "${out_file}"
}

kafka_up() {
    local pid_file="${KAFKA_DIR}/kafka.pid" marker pid
    marker="$(kafka_marker)"
    if pid="$(recorded_pid "${pid_file}" "${marker}")"; then
        log "kafka: already running (pid ${pid}, ${HOST}:${KAFKA_PORT})"
        return 0
    fi
    local port
    for port in "${KAFKA_PORT}" "${KAFKA_CONTROLLER_PORT}"; do
        if port_in_use "${port}"; then
            die "kafka: port ${HOST}:${port} is taken by a process this script did not start; stop it or set FUSIONREC_KAFKA_PORT / FUSIONREC_KAFKA_CONTROLLER_PORT"
        fi
    done

    local libs java_bin started=${SECONDS}
    libs="$(kafka_libs)"
    java_bin="${JAVA_HOME:+${JAVA_HOME}/bin/}java"
    command -v "${java_bin}" >/dev/null || die "java not found; install Java 17 or set JAVA_HOME"

    local data_dir="${KAFKA_DIR}/data" logs_dir="${KAFKA_DIR}/logs"
    mkdir -p "${data_dir}" "${logs_dir}"
    write_kafka_config "${data_dir}" >"${KAFKA_DIR}/server.properties"
    write_log4j_config "${logs_dir}" >"${KAFKA_DIR}/log4j.properties"

    local java_opts=(
        "-Xms${KAFKA_HEAP}" "-Xmx${KAFKA_HEAP}" -server
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
        -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true
        "-Dkafka.logs.dir=${logs_dir}"
        "-Dlog4j.configuration=file:${KAFKA_DIR}/log4j.properties"
        -cp "${libs}/*"
    )

    # A cluster id is 16 random bytes in unpadded base64url. The storage is
    # formatted with it once and later formats are no-ops. An id that starts
    # with "-" is drawn again, because the storage tool would read it as an
    # option. About one id in 64 starts that way.
    local cluster_id_file="${KAFKA_DIR}/cluster.id" cluster_id
    if [[ -s "${cluster_id_file}" ]] && [[ "$(cat "${cluster_id_file}")" == -* ]]; then
        rm -f "${cluster_id_file}"
    fi
    while [[ ! -s "${cluster_id_file}" ]]; do
        cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        if [[ "${cluster_id}" != -* ]]; then
            printf '%s' "${cluster_id}" >"${cluster_id_file}"
        fi
    done
    cluster_id="$(cat "${cluster_id_file}")"
    if ! "${java_bin}" "${java_opts[@]}" kafka.tools.StorageTool format -t "${cluster_id}" \
        -c "${KAFKA_DIR}/server.properties" --ignore-formatted >>"${logs_dir}/storage-format.log" 2>&1; then
        tail -n 30 "${logs_dir}/storage-format.log" >&2
        die "kafka: formatting the storage in ${data_dir} failed (log above)"
    fi

    local server_log="${logs_dir}/server.log" offset=0
    [[ -f "${server_log}" ]] && offset="$(stat -c %s "${server_log}")"
    [[ ! -f "${logs_dir}/kafka.out" ]] || mv "${logs_dir}/kafka.out" "${logs_dir}/kafka.out.prev"
    log "kafka: starting Kafka ${KAFKA_VERSION} on ${HOST}:${KAFKA_PORT} (controller ${HOST}:${KAFKA_CONTROLLER_PORT})"
    spawn "${pid_file}" "${logs_dir}/kafka.out" \
        "${java_bin}" "${java_opts[@]}" kafka.Kafka "${KAFKA_DIR}/server.properties"

    until kafka_ready "${server_log}" "${offset}" "${logs_dir}/kafka.out"; do
        if ! recorded_pid "${pid_file}" "${marker}" >/dev/null; then
            tail -n 40 "${server_log}" "${logs_dir}/kafka.out" >&2 2>/dev/null || true
            rm -f "${pid_file}"
            die "kafka: the broker exited during start (log tail above, full logs in ${logs_dir})"
        fi
        if ((SECONDS - started >= KAFKA_START_TIMEOUT)); then
            tail -n 40 "${server_log}" "${logs_dir}/kafka.out" >&2 2>/dev/null || true
            stop_process kafka "${pid_file}" "${marker}"
            die "kafka: timed out after ${KAFKA_START_TIMEOUT} s waiting for 'Kafka Server started' (log tail above); raise FUSIONREC_KAFKA_START_TIMEOUT on a slow machine"
        fi
        sleep 0.3
    done
    read -r pid _ <"${pid_file}"
    log "kafka: ready in $((SECONDS - started)) s (pid ${pid}, logs in ${logs_dir})"
}

create_topics() {
    if [[ ! -f "${REPO_ROOT}/stream/topics.py" ]]; then
        log "topics: stream/topics.py not found; topics not created"
        return 0
    fi
    if [[ ! -x "${PYTHON}" ]]; then
        log "topics: ${PYTHON} not found; topics not created (create the venv, then run up again)"
        return 0
    fi
    log "topics: creating topics with ${PARTITIONS} partitions"
    (cd "${REPO_ROOT}" &&
        FUSIONREC_KAFKA_BOOTSTRAP="${HOST}:${KAFKA_PORT}" FUSIONREC_PARTITIONS="${PARTITIONS}" \
            "${PYTHON}" -m stream.topics --create) ||
        die "topics: python -m stream.topics --create failed"
}

# --- Redis -----------------------------------------------------------------------

# redis-server rewrites its command line to "redis-server HOST:PORT" once it
# runs, so the marker is the program name alone. The recorded start time
# distinguishes our process from any other.
redis_marker() {
    printf 'redis-server'
}

install_redis() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
    log "redis: redis-server not found; installing the Debian package redis-server"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "redis: installing redis-server needs root or sudo"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update >&2 || die "redis: apt-get update failed"
    # The package's own service would take port 6379; policy-rc.d exit code
    # 101 forbids starting services during the install.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "${policy}" ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "${policy}" >/dev/null
        "${sudo[@]}" chmod +x "${policy}"
        created_policy=1
    fi
    local status=0
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y redis-server >&2 || status=$?
    ((created_policy == 0)) || "${sudo[@]}" rm -f "${policy}"
    ((status == 0)) || die "redis: apt-get install -y redis-server failed"
}

write_redis_config() {
    local data_dir="$1"
    cat <<EOF
# Written by scripts/services.sh; changes are overwritten at the next start.
bind ${HOST}
port ${REDIS_PORT}
protected-mode yes
daemonize no
dir ${data_dir}
logfile ""
loglevel notice
# The lists are rebuilt from Kafka, so nothing is persisted to disk.
save ""
appendonly no
maxmemory-policy noeviction
EOF
}

redis_ping() {
    [[ "$(redis-cli -h "${HOST}" -p "${REDIS_PORT}" ping 2>/dev/null)" == "PONG" ]]
}

redis_up() {
    local pid_file="${REDIS_DIR}/redis.pid" marker pid
    marker="$(redis_marker)"
    if pid="$(recorded_pid "${pid_file}" "${marker}")"; then
        log "redis: already running (pid ${pid}, ${HOST}:${REDIS_PORT})"
        return 0
    fi
    if port_in_use "${REDIS_PORT}"; then
        die "redis: port ${HOST}:${REDIS_PORT} is taken by a process this script did not start; stop it or set FUSIONREC_REDIS_PORT"
    fi
    install_redis

    local data_dir="${REDIS_DIR}/data" started=${SECONDS}
    mkdir -p "${data_dir}"
    write_redis_config "${data_dir}" >"${REDIS_DIR}/redis.conf"
    log "redis: starting redis-server on ${HOST}:${REDIS_PORT}"
    spawn "${pid_file}" "${REDIS_DIR}/redis.log" redis-server "${REDIS_DIR}/redis.conf"

    until redis_ping; do
        if ! recorded_pid "${pid_file}" "${marker}" >/dev/null; then
            tail -n 30 "${REDIS_DIR}/redis.log" >&2 || true
            rm -f "${pid_file}"
            die "redis: redis-server exited during start (log tail above)"
        fi
        if ((SECONDS - started >= REDIS_START_TIMEOUT)); then
            tail -n 30 "${REDIS_DIR}/redis.log" >&2 || true
            stop_process redis "${pid_file}" "${marker}"
            die "redis: timed out after ${REDIS_START_TIMEOUT} s waiting for PONG (log tail above); raise FUSIONREC_REDIS_START_TIMEOUT on a slow machine"
        fi
        sleep 0.1
    done
    read -r pid _ <"${pid_file}"
    log "redis: ready in $((SECONDS - started)) s (pid ${pid}, log ${REDIS_DIR}/redis.log)"
}

# --- commands ------------------------------------------------------------------

prepare_dir() {
    mkdir -p "${KAFKA_DIR}" "${REDIS_DIR}"
    # Keeps the whole folder out of git without editing the repository's
    # .gitignore.
    [[ -f "${SERVICES_DIR}/.gitignore" ]] || printf '*\n' >"${SERVICES_DIR}/.gitignore"
}

# Serialize concurrent calls, for example two test runs starting at once.
take_lock() {
    exec 9>"${SERVICES_DIR}/.lock"
    flock -w 300 9 ||
        die "timed out after 300 s waiting for ${SERVICES_DIR}/.lock, which another scripts/services.sh call has locked"
}

status_line() {
    local name="$1" pid_file="$2" marker="$3" address="$4" pid
    if pid="$(recorded_pid "${pid_file}" "${marker}")"; then
        printf '%-6s running  pid %-8s %s\n' "${name}" "${pid}" "${address}"
        return 0
    fi
    printf '%-6s stopped\n' "${name}"
    return 1
}

main() {
    local command="${1:-}"
    shift || true
    local services=("$@")
    ((${#services[@]} > 0)) || services=(kafka redis)
    local service
    for service in "${services[@]}"; do
        [[ "${service}" == kafka || "${service}" == redis ]] ||
            die "unknown service '${service}'; expected kafka or redis"
    done
    check_settings

    case "${command}" in
    up)
        prepare_dir
        take_lock
        local started=${SECONDS}
        for service in "${services[@]}"; do
            "${service}_up"
        done
        [[ " ${services[*]} " != *" kafka "* ]] || create_topics
        log "up in $((SECONDS - started)) s"
        ;;
    down)
        [[ -d "${SERVICES_DIR}" ]] || {
            log "nothing to stop: ${SERVICES_DIR} does not exist"
            return 0
        }
        take_lock
        for service in "${services[@]}"; do
            case "${service}" in
            kafka) stop_process kafka "${KAFKA_DIR}/kafka.pid" "$(kafka_marker)" ;;
            redis) stop_process redis "${REDIS_DIR}/redis.pid" "$(redis_marker)" ;;
            esac
        done
        ;;
    status)
        local all_up=0
        for service in "${services[@]}"; do
            case "${service}" in
            kafka) status_line kafka "${KAFKA_DIR}/kafka.pid" "$(kafka_marker)" \
                "${HOST}:${KAFKA_PORT}" || all_up=1 ;;
            redis) status_line redis "${REDIS_DIR}/redis.pid" "$(redis_marker)" \
                "${HOST}:${REDIS_PORT}" || all_up=1 ;;
            esac
        done
        return "${all_up}"
        ;;
    env)
        print_env
        ;;
    kafka-config)
        write_kafka_config "${KAFKA_DIR}/data"
        ;;
    *)
        die "usage: $0 up|down|status|env|kafka-config [kafka|redis]..."
        ;;
    esac
}

main "$@"
