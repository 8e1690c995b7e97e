#!/usr/bin/env bash
# The Prefect server on PostgreSQL, and the worker, on a login node without root (docs/clusters.md).
#
#   bash deployments/login-node.sh postgres start   initdb (first time) and start PostgreSQL in your
#                                                   home; prints the URL for PREFECT_API_DATABASE_CONNECTION_URL
#   bash deployments/login-node.sh postgres stop|status|url
#   bash deployments/login-node.sh server           the Prefect server on that database (foreground:
#                                                   run it under tmux or a systemd user unit)
#   bash deployments/login-node.sh worker           the process worker of pool `layertime` (foreground)
#   bash deployments/login-node.sh units            write systemd user units for the three above
#
# Everything runs as you, under $LAYERTIME_HOME (default ~/.local/share/layertime): the database
# cluster (postgres/data), its socket and log, its password (postgres/password, mode 600). PostgreSQL's
# binaries come from PATH (conda: `conda install -c conda-forge postgresql`) or Debian's
# /usr/lib/postgresql/<version>/bin. It listens on 127.0.0.1:$LAYERTIME_PG_PORT (default 5433) only:
# the server runs on the same node. `postgres start` is idempotent and takes seconds.
#
# The server and the worker use the repository's .venv (run `make venv` first) and this checkout as
# their working directory. Set PREFECT_API_URL for the worker and the shells that deploy and submit:
# http://<this node>:4200/api (`server` binds 0.0.0.0 so SLURM jobs reach it; LAYERTIME_PREFECT_PORT
# changes 4200). Set the worker's LAYERTIME_SLURM_* and HF cache variables before `worker` starts:
# flow runs, and the SLURM jobs they submit, get the worker's environment.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${LAYERTIME_HOME:-$HOME/.local/share/layertime}
PG=$STATE/postgres
DATA=$PG/data
PORT=${LAYERTIME_PG_PORT:-5433}
API_PORT=${LAYERTIME_PREFECT_PORT:-4200}
DB=prefect   # role and database

log() { echo "login-node.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# PostgreSQL's server programs: PATH first (conda, modules), then Debian's per-version directory.
bindir() {
  local found
  if found=$(command -v pg_ctl 2>/dev/null); then dirname "$(readlink -f "$found")"; return 0; fi
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n $found && -x $found/pg_ctl ]] || return 1
  echo "$found"
}

need_bindir() {
  bindir >/dev/null || die "no PostgreSQL server programs (pg_ctl, initdb) on PATH or under /usr/lib/postgresql; \
install them in user space: conda install -c conda-forge postgresql (or ask for Debian's postgresql package)"
}

url() {
  [[ -s $PG/password ]] || die "no database yet: run \`bash deployments/login-node.sh postgres start\`"
  echo "postgresql+asyncpg://$DB:$(cat "$PG/password")@127.0.0.1:$PORT/$DB"
}

ctl() { "$(bindir)/pg_ctl" -D "$DATA" "$@"; }

running() { [[ -s $DATA/postmaster.pid ]] && ctl status >/dev/null 2>&1; }

# psql beside pg_ctl (conda, Debian), else the one on PATH (Debian's client wrapper)
psql_bin() { if [[ -x $(bindir)/psql ]]; then echo "$(bindir)/psql"; else command -v psql || die "no psql"; fi; }

psql_admin() { "$(psql_bin)" -X -q -v ON_ERROR_STOP=1 -h "$PG" -p "$PORT" -d postgres "$@"; }

init_cluster() {
  [[ -s $DATA/PG_VERSION ]] && return 0
  mkdir -p "$PG"
  chmod 700 "$PG"
  # trust on the socket (in a directory only you can enter), passwords on loopback TCP
  "$(bindir)/initdb" -D "$DATA" -U "$(id -un)" -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 >"$PG/initdb.log" 2>&1 \
    || die "initdb failed: $(tail -n 5 "$PG/initdb.log")"
  cat >>"$DATA/postgresql.conf" <<EOF
# layertime deployments/login-node.sh
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$PG'
max_connections = 200
logging_collector = off
EOF
  (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$PG/password")
}

# The role and database `prefect`; JIT off for the role: the UI's run graph is one query PostgreSQL
# would JIT-compile for seconds to run for milliseconds (benchmarks/RESULTS.md).
create_role_and_db() {
  local password
  password=$(cat "$PG/password")
  psql_admin <<EOF
SELECT 'CREATE ROLE $DB LOGIN PASSWORD ''$password''' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB')\gexec
SELECT 'CREATE DATABASE $DB OWNER $DB' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB')\gexec
ALTER ROLE $DB SET jit = off;
EOF
}

postgres_start() {
  need_bindir
  init_cluster
  if running; then
    log "PostgreSQL already running on 127.0.0.1:$PORT (data $DATA)"
  else
    ctl -l "$PG/server.log" -w -t 60 -o "-p $PORT" start >/dev/null \
      || die "PostgreSQL did not start: $(tail -n 5 "$PG/server.log")"
    log "PostgreSQL up on 127.0.0.1:$PORT (data $DATA, log $PG/server.log)"
  fi
  create_role_and_db
  url
}

postgres_stop() {
  if bindir >/dev/null && running; then ctl -m fast -w -t 60 stop >/dev/null && log "PostgreSQL stopped"; else log "PostgreSQL not running"; fi
}

venv() {
  [[ -x $REPO/.venv/bin/prefect ]] || die "no $REPO/.venv: run \`make venv\` in $REPO first"
  echo "$REPO/.venv/bin"
}

server() {
  local bin
  bin=$(venv)
  running || die "PostgreSQL is not running: \`bash deployments/login-node.sh postgres start\` first"
  export PREFECT_API_DATABASE_CONNECTION_URL
  PREFECT_API_DATABASE_CONNECTION_URL=$(url)
  export PREFECT_SERVER_ANALYTICS_ENABLED=false   # no telemetry from a cluster's login node (often offline)
  export PREFECT_SERVER_API_PORT=$API_PORT        # the UI calls the API on this port
  cd "$REPO"
  exec "$bin/prefect" server start --host 0.0.0.0 --port "$API_PORT"
}

worker() {
  local bin
  bin=$(venv)
  [[ -n ${PREFECT_API_URL:-} ]] || die "set PREFECT_API_URL=http://$(hostname -f):$API_PORT/api first"
  cd "$REPO"   # flow runs start here: prefect.yaml's specs and run roots are relative to it
  exec "$bin/prefect" worker start --pool layertime
}

# systemd user units: `systemctl --user daemon-reload && systemctl --user enable --now layertime-worker`
# (with `loginctl enable-linger $USER`, they outlive your login). Environment= lines carry what the
# worker's flow runs need: add yours (LAYERTIME_SLURM_*, HF_HUB_CACHE) in the worker's unit.
units() {
  local dir=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user script=$REPO/deployments/login-node.sh
  mkdir -p "$dir"
  cat >"$dir/layertime-postgres.service" <<EOF
[Unit]
Description=PostgreSQL for the Prefect server of layertime (user space)

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=LAYERTIME_HOME=$STATE LAYERTIME_PG_PORT=$PORT
ExecStart=/usr/bin/env bash $script postgres start
ExecStop=/usr/bin/env bash $script postgres stop

[Install]
WantedBy=default.target
EOF
  cat >"$dir/layertime-prefect-server.service" <<EOF
[Unit]
Description=Prefect server of layertime, on its PostgreSQL
Requires=layertime-postgres.service
After=layertime-postgres.service

[Service]
Environment=LAYERTIME_HOME=$STATE LAYERTIME_PG_PORT=$PORT LAYERTIME_PREFECT_PORT=$API_PORT
ExecStart=/usr/bin/env bash $script server
Restart=on-failure

[Install]
WantedBy=default.target
EOF
  cat >"$dir/layertime-worker.service" <<EOF
[Unit]
Description=Prefect process worker of layertime (pool layertime)
After=layertime-prefect-server.service

[Service]
Environment=PREFECT_API_URL=http://$(hostname -f):$API_PORT/api
ExecStart=/usr/bin/env bash $script worker
Restart=on-failure

[Install]
WantedBy=default.target
EOF
  log "wrote layertime-postgres, layertime-prefect-server and layertime-worker in $dir"
  echo "$dir"
}

case "${1:-} ${2:-}" in
  "postgres start") postgres_start ;;
  "postgres stop") postgres_stop ;;
  "postgres status")
    if bindir >/dev/null && running; then echo "running: $(url)"; else echo "not running"; exit 3; fi
    ;;
  "postgres url") url ;;
  "server "*) server ;;
  "worker "*) worker ;;
  "units "*) units ;;
  *) die "usage: $0 postgres start|stop|status|url | server | worker | units" ;;
esac
