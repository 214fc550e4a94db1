#!/bin/sh
# Runs the qmp-load matrix and prints one summary line per configuration.
#   bench.sh fake   [N] [REPEAT]   the testkit's fake in a child process, 1/8/32 in flight
#   bench.sh daemon [N] [REPEAT]   a fresh qemu-storage-daemon, seq and conc (C=8)
# QMP_LOAD overrides the binary (default: $CARGO_TARGET_DIR/release/qmp-load); PIN prefixes
# every run (PIN="taskset -c 1": the client and the fake on one CPU, see README).
set -eu
what=${1:-fake}
n=${2:-50000}
repeat=${3:-5}
load=${QMP_LOAD:-${CARGO_TARGET_DIR:-target}/release/qmp-load}
clients="raw tokio1 tokio2 smol smol-join async-std async-std-join"

one() { # client, then qmp-load arguments
    c=$1; shift
    case $c in
        raw) set -- --raw "$@" ;;
        tokio1) set -- --runtime tokio --threads 1 "$@" ;;
        tokio2) set -- --runtime tokio --threads 2 "$@" ;;
        *-join) set -- --runtime "${c%-join}" --driver join "$@" ;;
        *) set -- --runtime "$c" "$@" ;;
    esac
    out=$(${PIN:-} "$load" --n "$n" --repeat "$repeat" "$@")
    sw=$(echo "$out" | sed -n 's/^switches_per_op=//p')
    cpu=$(echo "$out" | sed -n 's/^cpu_us_per_op=//p')
    ops=$(echo "$out" | sed -n 's/^ops_per_sec=//p')
    echo "client=$c $* load=$(cut -d' ' -f1 /proc/loadavg) switches_per_op=$sw cpu_us_per_op=$cpu ops_per_sec=$ops"
}

case $what in
fake)
    for c in $clients; do
        one "$c" --fake --mode seq
        one "$c" --fake --mode conc --concurrency 8
        one "$c" --fake --mode conc --concurrency 32
    done ;;
daemon)
    dir=$(mktemp -d)
    qemu-storage-daemon --chardev "socket,id=m,path=$dir/qmp.sock,server=on,wait=off" \
        --monitor chardev=m &
    pid=$!
    trap 'kill $pid; rm -rf "$dir"' EXIT
    while [ ! -S "$dir/qmp.sock" ]; do sleep 0.05; done
    for c in $clients; do
        one "$c" --socket "$dir/qmp.sock" --mode seq
        one "$c" --socket "$dir/qmp.sock" --mode conc --concurrency 8
    done ;;
*) echo "usage: bench.sh fake|daemon [N] [REPEAT]" >&2; exit 2 ;;
esac
