# shellcheck shell=bash
# Sourced by the read benchmarks (bench_read.sh, tune_read.sh, profile_read.sh): a scratch
# directory of their own, unmounted and removed on exit, and lorafs built.
#   bench_scratch DIR   sets repo, dir (absolute), mnt (DIR/mnt) and lorafs; refuses a DIR
#                       that exists and was not made by a lorafs benchmark.
#   drop_caches         empties the page cache (root).
#   median              the median of the numbers on stdin, one a line.
bench_scratch() {
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    dir="$1"
    if [ -e "$dir" ] && [ ! -f "$dir/.lorafs-bench" ]; then
        echo "$dir exists and was not made by a lorafs benchmark: name a new DIR" >&2
        exit 1
    fi
    mkdir -p "$dir/mnt" && touch "$dir/.lorafs-bench"
    dir="$(cd "$dir" && pwd)"
    mnt="$dir/mnt"
    lorafs="$repo/target/release/lorafs"
    trap bench_cleanup EXIT
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --example synth_model --bin lorafs
}
bench_cleanup() {
    if mountpoint -q "$mnt"; then "$lorafs" unmount "$mnt" || umount -l "$mnt"; fi
    rm -rf "$dir"
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
