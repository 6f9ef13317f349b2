#!/usr/bin/env bash
# A throwaway PostgreSQL server for the run store's tests; prints its SQLAlchemy URL.
#
#   url=$(bash .ci/postgres.sh)      # start (or reuse) it; a plain assignment keeps set -e
#   export STACKLAB_TEST_PG_URL=$url  # (`export X=$(...)` would hide a failure)
#   bash .ci/postgres.sh stop         # stop it and delete its data
#
# For CI on a fresh Debian machine: installs the `postgresql` package when no server is
# installed (needs root), then runs a cluster of its own (not Debian's `main` one) in
# $STACKLAB_PG_DIR (default /tmp/stacklab-pg), listening on 127.0.0.1 only, on the first free
# port from 55432, with trust authentication and no fsync: test data, never real data.
# Idempotent: while that server runs, a second call prints the same URL. Everything but the
# URL (the last line of stdout) goes to stderr. The driver is `pip install "psycopg[binary]"`.
set -euo pipefail

DIR=$(realpath -m "${STACKLAB_PG_DIR:-/tmp/stacklab-pg}")
DB=stacklab_test
DATA=$DIR/data

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}

server_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $bin && -x $bin/initdb ]]; then
        echo "$bin"
    elif command -v initdb >/dev/null; then
        dirname "$(command -v initdb)"
    fi
}

# The server refuses to run as root: as root, run it as the `postgres` user.
as_owner() {
    if [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Ours, and answering (a killed server can leave its pid file, or its pid, for a while).
running() {
    [[ -f $DIR/port ]] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1 \
        && "$BIN/pg_isready" -q -h 127.0.0.1 -p "$(cat "$DIR/port")" -U postgres -d "$DB"
}

url() {
    echo "postgresql+psycopg://postgres@127.0.0.1:$(cat "$DIR/port")/$DB"
}

cd / # the server's user may not be allowed into the caller's folder
BIN=$(server_bin)
if [[ ${1:-start} == stop ]]; then
    if [[ -n $BIN && -d $DATA ]]; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m immediate -w stop >&2 || true
    fi
    rm -rf "$DIR"
    exit 0
fi
[[ ${1:-start} == start ]] || die "usage: postgres.sh [start|stop]"

if [[ -z $BIN ]]; then
    [[ $(id -u) == 0 ]] || die "no PostgreSQL server installed; as root: apt-get install postgresql"
    echo "postgres.sh: installing postgresql" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Debian's package starts its own `main` cluster where it can; ours is separate.
    { apt-get update -qq && apt-get install -y -qq postgresql; } >&2 \
        || die "apt-get install postgresql failed"
    BIN=$(server_bin)
    [[ -n $BIN ]] || die "postgresql installed, but no initdb under /usr/lib/postgresql/*/bin"
fi

if running; then
    url
    exit 0
fi

# Not running: start from nothing (what a killed server left is thrown away).
if [[ -d $DATA ]]; then
    as_owner "$BIN/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true
fi
rm -rf "$DIR"
mkdir -p "$DIR"
if [[ $(id -u) == 0 ]]; then
    chown postgres: "$DIR"
fi
as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
    || die "initdb failed: $(tail -n 5 "$DIR/initdb.log")"

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
port=55432
while ! port_free "$port"; do
    port=$((port + 1))
    ((port < 55532)) || die "no free port in 55432-55531"
done
echo "$port" >"$DIR/port"

# -k: the socket in our folder (Debian's /var/run/postgresql may not exist or be writable).
opts="-h 127.0.0.1 -p $port -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -o "$opts" -w -t 60 start >&2 \
    || die "the server did not start: $(tail -n 5 "$DIR/server.log" 2>/dev/null)"
as_owner "$BIN/createdb" -h 127.0.0.1 -p "$port" -U postgres "$DB" \
    || die "createdb $DB failed (server log: $DIR/server.log)"
url
