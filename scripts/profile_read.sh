#!/usr/bin/env bash
# Where a mount's read path spends its cycles (issue: loads at the speed of the disk).
#
# Makes the ~1 GB Llama of the benchmarks (examples/synth_model.rs, rank-16 LoRA on every
# linear layer), puts the base in the page cache, mounts it with an empty cache and no
# warm-up, and reads the merged shard with `dd bs=4M` under `perf record` of the whole
# system. Prints: the read's time against `cat` of the base from the page cache and against
# a copy of the base into new tmpfs pages (same run), the cycles by thread (FUSE workers,
# rayon merge/prefetch pool, dd, kernel threads), and the top symbols of each (perf's
# figures come from a second read, of a fresh mount). Needs root (mount, perf) and
# Debian's linux-perf.
#
# Usage: [MOUNT_ARGS='--threads 4'] bash scripts/profile_read.sh [DIR]
#        (DIR: a new scratch directory, removed after; MOUNT_ARGS: options of the mount)
set -euo pipefail
# shellcheck source=scripts/bench-scratch.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-scratch.sh"
bench_scratch "${1:-/tmp/lorafs-profile}"
"$repo/target/release/examples/synth_model" "$dir" --layers 8 > /dev/null
shard=$(cd "$dir/base" && ls -- *.safetensors | head -n 1)
cat "$dir/base/$shard" > /dev/null # into the page cache
t0=$(date +%s.%N); cat "$dir/base/$shard" > /dev/null; t1=$(date +%s.%N)
base_s=$(echo "$t1 - $t0" | bc -l)
# The floor of any file system whose file is new data: the merged file's pages are memory
# the kernel has not handed out before. Measured as a copy of the base into new tmpfs pages.
shm=$(mktemp /dev/shm/lorafs-profile.XXXXXX)
t0=$(date +%s.%N); dd if="$dir/base/$(cd "$dir/base" && ls -- *.safetensors | head -n 1)" \
    of="$shm" bs=4M status=none; t1=$(date +%s.%N)
rm -f "$shm"
new_s=$(echo "$t1 - $t0" | bc -l)

mkdir -p "$mnt"
mount_fresh() {
    mountpoint -q "$mnt" && "$lorafs" unmount "$mnt"
    # shellcheck disable=SC2086 # MOUNT_ARGS: extra mount options, split on spaces
    "$lorafs" mount "$dir/base" "$mnt" --adapter "$dir/adapter" \
        --warm never ${MOUNT_ARGS:-}
}
# Timed without perf (its sampling slows the read), then read again under perf from a new
# mount, so both reads start from an empty merged cache and no merged pages.
mount_fresh
t0=$(date +%s.%N); dd if="$mnt/$shard" of=/dev/null bs=4M status=none; t1=$(date +%s.%N)
mount_s=$(echo "$t1 - $t0" | bc -l)
mount_fresh
perf record -q -a -g -o "$dir/perf.data" -- \
    dd if="$mnt/$shard" of=/dev/null bs=4M status=none 2> /dev/null
size=$(stat -c %s "$dir/base/$shard")
printf 'shard %s: %.2f GB\n' "$shard" "$(echo "$size / 1000000000" | bc -l)"
printf 'cat of the base (page cache): %.3f s; dd bs=4M of a fresh mount: %.3f s (%.2fx)\n' \
    "$base_s" "$mount_s" "$(echo "$mount_s / $base_s" | bc -l)"
printf 'a copy of the base into new tmpfs pages: %.3f s (the mount: %.2fx of it)\n' \
    "$new_s" "$(echo "$mount_s / $new_s" | bc -l)"
echo
echo "== cycles by thread (comm)"
perf report -i "$dir/perf.data" --no-children --sort comm --stdio 2> /dev/null \
    | grep -E '^ +[0-9]' | head -n 12
echo
echo "== top symbols (thread, symbol)"
perf report -i "$dir/perf.data" --no-children --sort comm,sym --stdio 2> /dev/null \
    | grep -E '^ +[0-9]' | head -n 30
