#!/usr/bin/env bash
# Runs a private, throwaway PostgreSQL server from Debian's packages, for the
# usage store's PostgreSQL tests and for anyone who wants a scratch server.
#
#   scripts/pg-test-server.sh start DIR   # prints postgres://kindling@127.0.0.1:PORT/kindling
#   scripts/pg-test-server.sh stop DIR    # stops the server and removes DIR
#
# The server's data, log and unix socket all live in DIR; it listens only on
# 127.0.0.1, on a free port, with trust authentication for the user `kindling`.
# Installs the `postgresql` package with apt-get when no server is present; the
# distribution's own cluster is never used. As root, the server runs as the
# `postgres` system user, so DIR's parents must be traversable by it.
# Only the URL goes to stdout; everything else goes to stderr.
set -euo pipefail

die() {
    echo "pg-test-server: $*" >&2
    exit 1
}

usage() {
    die "usage: $0 start|stop DIR"
}

# The bin directory of the highest PostgreSQL version installed, or nothing.
find_bindir() {
    local initdb
    initdb=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n $initdb ]] && dirname "$initdb"
    return 0
}

install_server() {
    echo "pg-test-server: no PostgreSQL server found; installing the postgresql package" >&2
    local install=(apt-get install -y -qq postgresql)
    if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2; then
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2 || die "apt-get install postgresql failed"
    fi
}

# Runs a PostgreSQL program as the server's owner: `postgres` when we are root.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null && return 0
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        # A refused connection means nothing listens there.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free TCP port found on 127.0.0.1"
}

prepare_dir() {
    local dir=$1
    [[ -e $dir/data ]] && die "$dir/data already exists; stop the old server first"
    mkdir -p "$dir" || die "cannot create $dir"
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' system user (is the postgresql package installed?)"
        chown postgres:postgres "$dir"
        runuser -u postgres -- test -w "$dir" -a -x "$dir" \
            || die "user postgres cannot write to $dir; make its parent directories traversable (chmod o+x)"
    fi
}

init_cluster() {
    local bindir=$1 dir=$2
    if ! as_owner "$bindir/initdb" -D "$dir/data" --auth=trust -U kindling \
        --encoding=UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        die "initdb failed in $dir/data"
    fi
}

start_server() {
    local bindir=$1 dir=$2 port=$3
    if ! as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" \
        -o "-h 127.0.0.1 -p $port -k '$dir' -c fsync=off" -w start >&2; then
        [[ -r $dir/log ]] && tail -n 20 "$dir/log" >&2
        die "the server did not start (log: $dir/log)"
    fi
}

cmd_start() {
    local dir=$1 bindir port
    bindir=$(find_bindir)
    if [[ -z $bindir ]]; then
        install_server
        bindir=$(find_bindir)
        [[ -n $bindir ]] || die "postgresql installed, but no initdb under /usr/lib/postgresql/*/bin"
    fi
    prepare_dir "$dir"
    dir=$(cd "$dir" && pwd)
    init_cluster "$bindir" "$dir"
    port=$(free_port)
    start_server "$bindir" "$dir" "$port"
    "$bindir/createdb" -h 127.0.0.1 -p "$port" -U kindling kindling >&2 \
        || die "createdb kindling failed (log: $dir/log)"
    echo "postgres://kindling@127.0.0.1:$port/kindling"
}

cmd_stop() {
    local dir=$1 bindir
    [[ -n $dir && $dir != / ]] || die "refusing to remove '$dir'"
    bindir=$(find_bindir)
    if [[ -n $bindir && -f $dir/data/postmaster.pid ]]; then
        as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast stop >&2 || true
    fi
    rm -rf "$dir"
}

main() {
    [[ $# -eq 2 && -n $2 ]] || usage
    case $1 in
        start) cmd_start "$2" ;;
        stop) cmd_stop "$2" ;;
        *) usage ;;
    esac
}

main "$@"
