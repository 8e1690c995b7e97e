#!/usr/bin/env bash
# A PostgreSQL server for the Prefect server, the way a lab runs one on a login node (issue 15).
#
#   bash .ci/postgres.sh start    install (Debian's postgresql, only if missing), initdb, start, check;
#                                 prints the connection URL for PREFECT_API_DATABASE_CONNECTION_URL
#   bash .ci/postgres.sh stop     stop the server this script started
#   bash .ci/postgres.sh status   pg_isready and the URL
#   bash .ci/postgres.sh url      the URL alone (for scripts: URL=$(bash .ci/postgres.sh url))
#
# Root only (as CI and the development machines run): the server itself runs as the `postgres`
# user, which the Debian package creates. No systemd and no Debian cluster (pg_ctlcluster): one
# cluster initialised with `initdb` under $LAYERTIME_PG_STATE (default /var/lib/layertime-postgres),
# started with `pg_ctl` on 127.0.0.1:$LAYERTIME_PG_PORT (default 5433, so it never meets a system
# PostgreSQL on 5432), socket and log in the state directory. `start` is idempotent and takes
# seconds: a running server is left as it is; a stale pid file (the server died) is cleared by pg_ctl.
# It creates the role and database `prefect` (password `prefect`, loopback only) if missing; the role
# may create databases, so a test or benchmark can give each Prefect server a fresh one.
set -euo pipefail

STATE=${LAYERTIME_PG_STATE:-/var/lib/layertime-postgres}
PORT=${LAYERTIME_PG_PORT:-5433}
DATA=$STATE/data
DB=prefect   # role and database
PASSWORD=prefect
URL="postgresql+asyncpg://$DB:$PASSWORD@127.0.0.1:$PORT/$DB"

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Debian installs the server binaries outside PATH, one directory per major version: take the newest.
bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n $dir && -x $dir/pg_ctl ]] || return 1
  echo "$dir"
}

install_packages() {
  bindir >/dev/null && command -v psql >/dev/null && return 0
  log "installing postgresql (no server binaries under /usr/lib/postgresql)"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps the package's init script from starting its own cluster: we start ours.
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1; fi
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  ((added)) && rm -f "$policy"
  bindir >/dev/null || die "postgresql installed, but no pg_ctl under /usr/lib/postgresql/*/bin"
}

as_postgres() { runuser -u postgres -- "$@"; }

ctl() { as_postgres "$(bindir)/pg_ctl" -D "$DATA" "$@"; }

running() { [[ -s $DATA/postmaster.pid ]] && ctl status >/dev/null 2>&1; }

ready() { "$(bindir)/pg_isready" -q -h 127.0.0.1 -p "$PORT"; }

psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -h "$STATE" -p "$PORT" -d postgres "$@"; }

init_cluster() {
  [[ -s $DATA/PG_VERSION ]] && return 0
  install -d -o postgres -g postgres -m 0700 "$STATE" "$DATA"
  # trust on the socket (only root and postgres reach the state dir), passwords on loopback TCP.
  as_postgres "$(bindir)/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 >"$STATE/initdb.log" 2>&1 \
    || die "initdb failed: $(tail -n 5 "$STATE/initdb.log")"
  # Prefect's server with several workers holds a few dozen connections (pool 5 + overflow 10 per
  # server process, plus its background services); 200 leaves room for a benchmark's second server.
  cat >>"$DATA/postgresql.conf" <<EOF
# layertime .ci/postgres.sh
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$STATE'
max_connections = 200
shared_buffers = 128MB
fsync = on
logging_collector = off
EOF
}

# JIT off for the role (every database it uses): the UI's flow-run graph query is estimated at
# billions of rows, so PostgreSQL JIT-compiled it (~3 s) to run a ~15 ms query (benchmarks/RESULTS.md).
create_role_and_db() {
  psql_admin <<EOF
SELECT 'CREATE ROLE $DB LOGIN CREATEDB PASSWORD ''$PASSWORD''' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB')\gexec
SELECT 'CREATE DATABASE $DB OWNER $DB' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB')\gexec
ALTER ROLE $DB SET jit = off;
EOF
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and runs the server as postgres)"
  install_packages
  local t0=$SECONDS
  init_cluster
  if running && ready; then
    log "already running on 127.0.0.1:$PORT (data $DATA)"
  else
    # pg_ctl clears a pid file whose process is gone; -w waits until the server accepts connections.
    ctl -l "$STATE/server.log" -w -t 60 -o "-p $PORT" start >/dev/null \
      || die "server did not start: $(tail -n 5 "$STATE/server.log")"
    log "up in $((SECONDS - t0)) s on 127.0.0.1:$PORT (data $DATA, log $STATE/server.log)"
  fi
  create_role_and_db
  echo "$URL"
}

stop() {
  if ! bindir >/dev/null || ! running; then
    log "not running"
    return 0
  fi
  # fast: disconnect clients (a Prefect server still up) and stop cleanly.
  ctl -m fast -w -t 60 stop >/dev/null
  log "stopped"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status)
    if bindir >/dev/null && running && ready; then echo "running: $URL"; else echo "not running"; exit 3; fi
    ;;
  url) echo "$URL" ;;
  *) die "usage: $0 start|stop|status|url" ;;
esac
