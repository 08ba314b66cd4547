#!/usr/bin/env bash
# The benchmark of issue #15 (loads at the speed of the disk): four readings through lorafs,
# each against a baseline measured in the same run, printed as ratios.
#
# 1. cold load: a Llama-7B-shaped F16 model of FRACTION of RAM (examples/synth_model.rs,
#    rank-16 LoRA on every linear layer) read whole with `dd bs=4M` through a fresh default
#    mount, against `dd bs=4M` of the base from disk, and against the same with
#    `iflag=direct` (the disk without the page cache); page cache dropped before each;
#    RUNS rounds (default 3), interleaved, medians compared.
# 2. page cache: the ~1 GB shard of the 8-layer model of the other benchmarks, base in the
#    page cache, `dd bs=4M` of the merged shard through a fresh mount (--warm never, so no
#    background merge races the reader), against `cat` of the base shard (best of 3); and
#    against a copy of the base shard into new tmpfs pages (the floor of a file of new pages).
#    Medians of 3 fresh mounts.
# 3. pass-through ceiling: the same through a fresh mount whose adapter merges one 2048x2048
#    tensor (q_proj of layer 0), against `cat`: what the FUSE path costs without merging.
# 4. from_pretrained of model 1 (float16, low_cpu_mem_usage) in a new Python process, through
#    a fresh default mount against a `lorafs materialize`d copy, page cache dropped before
#    each, RUNS rounds interleaved, medians. Timed twice in the process: the call alone, and
#    the call plus a first touch of every page of every weight (from_pretrained maps
#    safetensors files and leaves the pages to be read when first used, so the call alone
#    reads little). Needs scripts/venv.sh.
# Prints the machine first (CPU, flags that matter, kernel, RAM, lorafs's merge kernel).
# Needs root (mount, drop_caches). Everything is written under DIR and removed after.
#
# Usage: [MOUNT_ARGS='--threads 4'] [SKIP_PRETRAINED=1] [RUNS=3] bash scripts/bench_read.sh [DIR] [FRACTION_OF_RAM]
#        (defaults: /tmp/lorafs-read 0.6; DIR must be new; MOUNT_ARGS: options of every mount,
#        not --warm, which 2 and 3 set)
set -euo pipefail
# shellcheck source=scripts/bench-scratch.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-scratch.sh"
fraction="${2:-0.6}"
bench_scratch "${1:-/tmp/lorafs-read}"
synth="$repo/target/release/examples/synth_model"
ram=$(awk '/MemTotal/ {printf "%.0f", $2 * 1024}' /proc/meminfo)
echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs"
echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx512f|avx2|fma|f16c' | xargs)"
echo "linux: $(uname -r); RAM: $(awk -v r="$ram" 'BEGIN {printf "%.1f GB", r / 1e9}')"
echo "lorafs: $("$lorafs" --version)"
echo "MOUNT_ARGS: ${MOUNT_ARGS:-(none)}"

mount_fresh() { # mount_fresh BASE ADAPTER [OPTION...]: a new mount at $mnt
    mountpoint -q "$mnt" && "$lorafs" unmount "$mnt"
    # shellcheck disable=SC2086 # MOUNT_ARGS: extra mount options, split on spaces
    "$lorafs" mount "$1" "$mnt" --adapter "$2" "${@:3}" ${MOUNT_ARGS:-}
}
secs() { # secs COMMAND...: its wall time in seconds, its output discarded
    local t0 t1
    t0=$(date +%s.%N); "$@" > /dev/null; t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}'
}
dd4m() { dd if="$1" of=/dev/null bs=4M status=none "${@:2}"; }
read_all() { for f in "$1"/*.safetensors; do dd4m "$f" "${@:2}"; done; }
report() { # report NAME LORAFS_S BASELINE_S NOTE
    awk -v n="$1" -v a="$2" -v b="$3" -v t="$4" \
        'BEGIN {printf "%s: lorafs %.3f s, baseline %.3f s, ratio %.2fx (%s)\n", n, a, b, a / b, t}'
}

# 2 and 3: the 1 GB shard, base in the page cache.
"$synth" "$dir/small" --layers 8 2> /dev/null
"$synth" "$dir/one" --layers 8 --targets q_proj --target-layers 1 --adapter-only 2> /dev/null
shards=("$dir"/small/base/*.safetensors)
base_shard="${shards[0]}"
shard="$(basename "$base_shard")"
echo "shard: $(stat -c %s "$base_shard" | awk '{printf "%.2f GB", $1 / 1e9}')," \
    "base in the page cache, fresh mounts with --warm never"
cat "$base_shard" > /dev/null
cat_s=$(for _ in 1 2 3; do secs cat "$base_shard"; echo; done | sort -n | head -n 1) # the best of 3
for _ in 1 2 3; do # medians of 3, fresh mounts each time
    shm=$(mktemp /dev/shm/lorafs-read.XXXXXX)
    echo "new $(secs dd if="$base_shard" of="$shm" bs=4M status=none)"
    rm -f "$shm"
    mount_fresh "$dir/small/base" "$dir/small/adapter" --warm never
    echo "merged $(secs dd4m "$mnt/$shard")"
    mount_fresh "$dir/small/base" "$dir/one/adapter" --warm never
    echo "pass $(secs dd4m "$mnt/$shard")"
    "$lorafs" unmount "$mnt"
done > "$dir/cached"
new_s=$(awk '$1 == "new" {print $2}' "$dir/cached" | median)
merged_s=$(awk '$1 == "merged" {print $2}' "$dir/cached" | median)
pass_s=$(awk '$1 == "pass" {print $2}' "$dir/cached" | median)
report "page cache (dd of the merged shard vs cat of the base)" "$merged_s" "$cat_s" "target ≤ 3x"
report "page cache vs new tmpfs pages (copy of the base)" "$merged_s" "$new_s" "the first-touch floor"
report "pass-through ceiling (one small tensor merged, vs cat)" "$pass_s" "$cat_s" "no merging"
rm -rf "$dir/small" "$dir/one"

# 1: the large model, cold. Llama-7B shapes: a layer is 202 M parameters of 2 bytes,
# embeddings and head 262 M.
layers=$(awk -v r="$ram" -v f="$fraction" 'BEGIN {n = (r * f / 2 - 262e6) / 202e6; n = int(n + 0.5); print n < 1 ? 1 : n}')
"$synth" "$dir/large" --layers "$layers" --hidden 4096 --intermediate 11008 --heads 32 \
    --kv-heads 32 --rank 16 --shard-gib 4 2> /dev/null
size=$(du -cb "$dir"/large/base/*.safetensors | tail -n 1 | cut -f1)
echo "large model: $layers layers, $(awk -v s="$size" -v r="$ram" \
    'BEGIN {printf "%.2f GB = %.0f %% of RAM", s / 1e9, s / r * 100}')"
# RUNS rounds, each: dd of the base, dd of the base with O_DIRECT, dd of a fresh mount.
# Interleaved, and the median of each: on a VM the disk and first-touched memory vary
# between runs by up to 2x.
for _ in $(seq "${RUNS:-3}"); do
    drop_caches
    echo "disk $(secs read_all "$dir/large/base")"
    drop_caches
    echo "direct $(secs read_all "$dir/large/base" iflag=direct)"
    drop_caches
    mount_fresh "$dir/large/base" "$dir/large/adapter"
    echo "mount $(secs read_all "$mnt")"
    "$lorafs" unmount "$mnt"
done > "$dir/cold"
runs() { awk -v k="$1" '$1 == k {printf "%s%s", sep, $2; sep = " "}' "$dir/cold"; }
echo "cold runs (s): dd $(runs disk); dd iflag=direct $(runs direct); mount $(runs mount)"
disk_s=$(awk '$1 == "disk" {print $2}' "$dir/cold" | median)
direct_s=$(awk '$1 == "direct" {print $2}' "$dir/cold" | median)
mount_s=$(awk '$1 == "mount" {print $2}' "$dir/cold" | median)
report "cold load, medians (dd of the mount vs dd of the base from disk)" "$mount_s" "$disk_s" "target ≤ 1.3x"
report "cold load vs dd iflag=direct of the base (the disk without the page cache)" "$mount_s" "$direct_s" "the device's speed"

# 4: from_pretrained, cold, through a fresh default mount and from a materialized copy.
if [ "${SKIP_PRETRAINED:-0}" != 0 ]; then exit 0; fi
py="$(bash "$repo/scripts/venv.sh")/bin/python"
load_s() { # load_s DIR: seconds of from_pretrained(DIR), then with every weight touched
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$py" - "$1" << 'EOF' | tail -n 1
import sys, time
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16, low_cpu_mem_usage=True)
t1 = time.perf_counter()
for p in model.parameters():  # one byte of every page
    p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
print(f"{t1 - t0:.3f} {time.perf_counter() - t0:.3f}")
EOF
}
"$lorafs" materialize "$dir/large/base" --adapter "$dir/large/adapter" "$dir/merged" > /dev/null
# RUNS rounds, interleaved as above, each: the copy, then a fresh mount; medians.
for _ in $(seq "${RUNS:-3}"); do
    drop_caches
    echo "copy $(load_s "$dir/merged")"
    drop_caches
    mount_fresh "$dir/large/base" "$dir/large/adapter"
    echo "mount $(load_s "$mnt")"
    "$lorafs" unmount "$mnt"
done > "$dir/pretrained"
rm -rf "$dir/merged"
loads() { awk -v k="$1" -v c="$2" '$1 == k {printf "%s%s", sep, $c; sep = " "}' "$dir/pretrained"; }
echo "from_pretrained runs (s): copy $(loads copy 2); mount $(loads mount 2)"
echo "the same + every weight touched (s): copy $(loads copy 3); mount $(loads mount 3)"
median_of() { awk -v k="$1" -v c="$2" '$1 == k {print $c}' "$dir/pretrained" | median; }
report "from_pretrained, medians (fresh mount vs materialized copy, cold)" \
    "$(median_of mount 2)" "$(median_of copy 2)" "target ≤ 1.3x"
report "from_pretrained + every weight touched, medians (same)" \
    "$(median_of mount 3)" "$(median_of copy 3)" "target ≤ 1.3x"
