#!/usr/bin/env bash
# Choose the mount's read options on this machine by measuring them: the kernel read-ahead
# (--read-ahead-kb), the FUSE threads (--threads), the kernel's background requests in flight
# (--max-background), the transport (--transport, where the kernel has FUSE over io_uring on)
# and the base read-ahead (--base-read-ahead), each value read through fresh mounts of a Llama-shaped model
# (examples/synth_model.rs, rank-16 LoRA on every linear layer), the other options at
# their defaults. Two cases: the base in the page cache (`cached`: what a loader sees once
# the base was read before) and the base cold from disk (`cold`: page cache dropped before
# each read). Prints the median seconds of RUNS reads (default 3) per value and case, the
# fastest marked; pass the winners to `lorafs mount` (or fstab options) on this machine.
# The default of each option is the value that won on the machine of BENCHMARKS.md.
# Needs root (mount, drop_caches, read-ahead). Everything is written under DIR, removed after.
#
# Usage: [RUNS=3] [LAYERS=16] bash scripts/tune_read.sh [DIR]   (DIR: new; default /tmp/lorafs-tune)
set -euo pipefail
# shellcheck source=scripts/bench-scratch.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-scratch.sh"
bench_scratch "${1:-/tmp/lorafs-tune}"
"$repo/target/release/examples/synth_model" "$dir/model" --layers "${LAYERS:-16}" --hidden 4096 \
    --intermediate 11008 --heads 32 --kv-heads 32 --rank 16 --shard-gib 2 2> /dev/null
echo "model: $(du -sb "$dir/model/base" | awk '{printf "%.1f GB", $1 / 1e9}'); $(nproc) CPUs;" \
    "$("$lorafs" --version)"

read_through() { # read_through CASE OPTION...: seconds of one read of every shard, fresh mount
    if [ "$1" = cold ]; then drop_caches; else cat "$dir"/model/base/*.safetensors > /dev/null; fi
    "$lorafs" mount "$dir/model/base" "$mnt" --adapter "$dir/model/adapter" --warm never "${@:2}"
    local t0 t1
    t0=$(date +%s.%N)
    for f in "$mnt"/*.safetensors; do dd if="$f" of=/dev/null bs=4M status=none; done
    t1=$(date +%s.%N)
    "$lorafs" unmount "$mnt"
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b - a}'
}

sweep() { # sweep CASE OPTION VALUE...
    local case=$1 option=$2 value best="" best_s=""
    shift 2
    for value in "$@"; do
        local s
        s=$(for _ in $(seq "${RUNS:-3}"); do read_through "$case" "$option" "$value"; done | median)
        printf '  %-8s %-20s %-8s %s s\n' "$case" "$option" "$value" "$s"
        if [ -z "$best_s" ] || awk -v a="$s" -v b="$best_s" 'BEGIN {exit !(a < b)}'; then
            best=$value best_s=$s
        fi
    done
    echo "  fastest: $option $best ($best_s s)"
}

# The transports only where the kernel offers FUSE over io_uring (scripts/bench_transport.sh
# compares them in more detail).
transports=dev
if grep -qx Y /sys/module/fuse/parameters/enable_uring 2> /dev/null; then transports="dev uring"; fi
for case in cached cold; do
    sweep "$case" --read-ahead-kb 1024 4096 16384
    sweep "$case" --threads 2 4 8
    sweep "$case" --max-background 16 64 256
    # shellcheck disable=SC2086 # the list of transports, split on spaces
    sweep "$case" --transport $transports
    sweep "$case" --base-read-ahead 0 32MiB 64MiB 256MiB
done
