#!/bin/sh
# Runs the qmp-load matrix and prints one summary line per configuration.
#   bench.sh fake   [N] [REPEAT]   the testkit's fake in a child process, 1/8/32 in flight
#   bench.sh daemon [N] [REPEAT]   a fresh qemu-storage-daemon, seq and conc (C=8)
#   bench.sh compare fake|daemon [N] [ROUNDS] [MODE...]
#                                  rounds of one run per client, in an order that rotates
#                                  each round; each client's ops/s and CPU are divided by those
#                                  of the raw run of the same round, and the medians (with the
#                                  lowest and highest) of those ratios are printed. Modes
#                                  default to "seq conc" (conc: C=8). The runs themselves go
#                                  to standard error.
# COMPARED overrides the clients compare runs (default below; it must include raw and
# raw-poll; raw-tick:US is raw-poll with a timer wake-up US microseconds into each wait;
# raw-reuse and raw-noid write ids 1..C reused, and no ids).
# QMP_LOAD overrides the binary (default: $CARGO_TARGET_DIR/release/qmp-load); PIN prefixes
# every run (PIN="taskset -c 1": the client and the fake on one CPU, see README).
# HALT_POLL_NS=NS sets the guest's cpuidle halt-polling window for the run and puts the old
# value back at the end (root only). On a VM booted with haltpoll.guest_halt_poll_ns=0, as
# this machine kind is, an idle vCPU halts at once and waking it goes through the
# hypervisor; that alone moves one-at-a-time results by 5-30% (see README). The setting in
# force is printed with each mode's header.
# Any failed run (qmp-load exits non-zero or prints no figures) stops the script with a
# non-zero exit; compare also fails when a client has no figure for a round.
set -eu
what=${1:-fake}
n=${2:-50000}
repeat=${3:-5}
load=${QMP_LOAD:-${CARGO_TARGET_DIR:-target}/release/qmp-load}
halt_poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
halt_poll_ns() { cat "$halt_poll" 2>/dev/null || echo none; }
# What the EXIT trap undoes (empty: nothing).
daemon_pid=
daemon_dir=
runs_file=
old_halt_poll=
cleanup() {
    # Every step, whatever failed before (a daemon that already exited, say).
    set +e
    [ -z "$daemon_pid" ] || kill "$daemon_pid" 2>/dev/null || true
    [ -z "$daemon_dir" ] || rm -rf "$daemon_dir"
    [ -z "$runs_file" ] || rm -f "$runs_file"
    # Last, and unconditionally: the machine's idle policy.
    if [ -n "$old_halt_poll" ]; then
        echo "$old_halt_poll" >"$halt_poll" ||
            echo "bench.sh: could not put $old_halt_poll back into $halt_poll" >&2
    fi
}
trap cleanup EXIT
# On Ctrl-C, kill, hang-up or a closed output, exit so that the EXIT trap still cleans up
# (dash runs it only on exit).
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 141' PIPE
trap 'exit 143' TERM
if [ -n "${HALT_POLL_NS:-}" ]; then
    old=$(halt_poll_ns)
    [ "$old" != none ] || { echo "bench.sh: no $halt_poll here" >&2; exit 1; }
    # Set before the write: restoring the old value is harmless if the write fails.
    old_halt_poll=$old
    echo "$HALT_POLL_NS" >"$halt_poll" || { echo "bench.sh: cannot write $halt_poll" >&2; exit 1; }
fi
clients="raw tokio1 tokio2 smol smol-join smol-spawn async-std async-std-join async-std-spawn"
compared=${COMPARED:-raw raw-poll raw-reuse tokio1 tokio2 smol smol-spawn async-std async-std-spawn}

one() { # client, then qmp-load arguments
    c=$1; shift
    case $c in
        raw) set -- --raw "$@" ;;
        raw-poll) set -- --raw --raw-wait poll "$@" ;;
        raw-reuse) set -- --raw --raw-ids reuse "$@" ;;
        raw-noid) set -- --raw --raw-ids none "$@" ;;
        raw-tick:*) set -- --raw --raw-wait "${c#raw-}" "$@" ;;
        tokio1) set -- --runtime tokio --threads 1 "$@" ;;
        tokio2) set -- --runtime tokio --threads 2 "$@" ;;
        *-join) set -- --runtime "${c%-join}" --driver join "$@" ;;
        *-spawn) set -- --runtime "${c%-spawn}" --driver spawn "$@" ;;
        *) set -- --runtime "$c" "$@" ;;
    esac
    # Explicit checks: set -e does not apply where `one` is a condition (`x=$(one ..) || ..`).
    out=$(${PIN:-} "$load" --n "$n" --repeat "$repeat" "$@") ||
        { echo "bench.sh: qmp-load failed: $c $*" >&2; return 1; }
    sw=$(echo "$out" | sed -n 's/^switches_per_op=//p')
    cpu=$(echo "$out" | sed -n 's/^cpu_us_per_op=//p')
    ops=$(echo "$out" | sed -n 's/^ops_per_sec=//p')
    [ -n "$ops" ] && [ -n "$cpu" ] ||
        { echo "bench.sh: no figures from qmp-load: $c $*" >&2; return 1; }
    echo "client=$c $* load=$(cut -d' ' -f1 /proc/loadavg) guest_halt_poll_ns=$(halt_poll_ns) switches_per_op=$sw cpu_us_per_op=$cpu ops_per_sec=$ops"
}

start_daemon() {
    dir=$(mktemp -d)
    daemon_dir=$dir
    # wait=on: QEMU takes the first connection before it sets the monitor up, which avoids
    # its start-up race (see the qmp-testkit launch docs).
    qemu-storage-daemon --chardev "socket,id=m,path=$dir/qmp.sock,server=on,wait=on" \
        --monitor chardev=m &
    pid=$!
    daemon_pid=$pid
    # The socket file appears at bind(), a moment before QEMU listens: wait until one short
    # raw session gets through (up to 10 s; give up at once if the daemon has gone).
    [ -x "$load" ] || { echo "bench.sh: no $load (cargo build --release -p qmp-bench)" >&2; exit 1; }
    tries=0
    until "$load" --socket "$dir/qmp.sock" --raw --n 1 >/dev/null 2>&1; do
        kill -0 $pid 2>/dev/null || { echo "bench.sh: qemu-storage-daemon exited" >&2; exit 1; }
        tries=$((tries + 1))
        [ $tries -lt 200 ] || { echo "bench.sh: no QMP session on $dir/qmp.sock" >&2; exit 1; }
        sleep 0.05
    done
}

# Stops the script unless $1 (called $2 in the usage) is a whole number above zero.
positive() {
    case $1 in
    '' | *[!0-9]* | 0 | 0*) echo "bench.sh: $2 must be a whole number above zero, not '$1'" >&2; exit 2 ;;
    esac
}

# Reads the lines of `one` for rounds of all $compared clients and prints, per client, the
# median ops/s, the median (min..max) of its ratios to the same round's raw run, and the
# median of its ratios to the same round's raw-poll run. Fails (printing no ratios) when a
# client, raw and raw-poll included, has no ops/s or CPU figure, or a zero one, for a round.
ratios() {
    awk -v rounds="$1" -v clients="$compared" '
    function med(s, k,   a, m, i, j, t) {
        m = split(s, a, " ")
        for (i = 2; i <= m; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
        if (k == "min") return a[1]; if (k == "max") return a[m]
        return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
    }
    {
        split("", f)
        for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        c = f["client"]; r = f["round"]
        ops[c, r] = f["ops_per_sec"]; cpu[c, r] = f["cpu_us_per_op"]
    }
    END {
        m = split(clients " raw raw-poll", need, " ")
        bad = 0
        for (k = 1; k <= m; k++) {
            c = need[k]
            if (c in checked) continue
            checked[c] = 1
            for (r = 1; r <= rounds; r++)
                if (!((c, r) in ops) || ops[c, r] + 0 <= 0 || cpu[c, r] + 0 <= 0) {
                    printf "bench.sh: no figures for client %s in round %d\n", c, r | "cat 1>&2"
                    bad = 1
                }
        }
        if (bad) exit 1
        nc = split(clients, order, " ")
        for (k = 1; k <= nc; k++) {
            c = order[k]; o = ""; ro = ""; rp = ""; rc = ""
            for (r = 1; r <= rounds; r++) {
                o = o " " ops[c, r]
                ro = ro " " ops[c, r] / ops["raw", r]
                rp = rp " " ops[c, r] / ops["raw-poll", r]
                rc = rc " " cpu[c, r] / cpu["raw", r]
            }
            printf "client=%s rounds=%d ops_per_sec=%.0f ops_vs_raw=%.3f (%.3f..%.3f) ops_vs_raw_poll=%.3f cpu_vs_raw=%.2f (%.2f..%.2f)\n",
                c, rounds, med(o), med(ro), med(ro, "min"), med(ro, "max"), med(rp), med(rc), med(rc, "min"), med(rc, "max")
        }
    }'
}

# Prints one line of `one` per client and round, after round=R, to standard output and
# standard error; fails at the first failed run.
compare() { # rounds, then qmp-load arguments
    rounds=$1; shift
    k=$(echo $compared | wc -w)
    r=1
    while [ $r -le "$rounds" ]; do
        # Rotate the order: round r starts with the client at position r mod k.
        list="$compared $compared"
        start=$((r % k))
        for c in $(echo $list | cut -d' ' -f$((start + 1))-$((start + k))); do
            run=$(one "$c" "$@") || { echo "bench.sh: round $r failed" >&2; return 1; }
            # Each run also to standard error, to follow the rounds.
            printf 'round=%s %s\n' "$r" "$run" >&2
            printf 'round=%s %s\n' "$r" "$run"
        done
        r=$((r + 1))
    done
}

case $what in
fake)
    for c in $clients; do
        one "$c" --fake --mode seq
        one "$c" --fake --mode conc --concurrency 8
        one "$c" --fake --mode conc --concurrency 32
    done ;;
daemon)
    start_daemon
    for c in $clients; do
        one "$c" --socket "$dir/qmp.sock" --mode seq
        one "$c" --socket "$dir/qmp.sock" --mode conc --concurrency 8
    done ;;
compare)
    where=${2:-daemon}
    n=${3:-5000}
    rounds=${4:-9}
    repeat=1
    shift $(( $# < 4 ? $# : 4 ))
    modes=${*:-seq conc}
    positive "$n" N
    positive "$rounds" ROUNDS
    case $where in
    daemon) start_daemon; target="--socket $dir/qmp.sock" ;;
    fake) target="--fake" ;;
    *) echo "usage: bench.sh compare fake|daemon [N] [ROUNDS] [MODE...]" >&2; exit 2 ;;
    esac
    for m in $modes; do
        echo "mode=$m n=$n where=$where load_before=$(cut -d' ' -f1 /proc/loadavg) guest_halt_poll_ns=$(halt_poll_ns)"
        # Into a file first, not a pipeline: a failed run must stop the script (in a pipeline
        # only the last command's status counts).
        [ -n "$runs_file" ] || runs_file=$(mktemp)
        compare "$rounds" $target --mode "$m" --concurrency 8 >"$runs_file" ||
            { echo "bench.sh: compare $where --mode $m failed" >&2; exit 1; }
        ratios "$rounds" <"$runs_file" ||
            { echo "bench.sh: compare $where --mode $m: figures missing" >&2; exit 1; }
    done ;;
*) echo "usage: bench.sh fake|daemon|compare ..." >&2; exit 2 ;;
esac
