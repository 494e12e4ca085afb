#!/usr/bin/env bash
# The concurrency and fault soak for hours: rounds of three ingests of different VMs, a prune, a
# gc, a check, an extract, a check --repair or --rebuild-index and a copy to a second repository
# started at once, one of them killed with SIGKILL at a random moment; after every round each
# generation whose ingest exited 0 (and that the prune kept) must extract byte for byte (one of
# them from the copy too) and `check --read-data` must be clean in both repositories. The test
# suite runs 6 rounds of the same test (tests/concurrency.rs); this runs it for as long as you
# say.
#
#   scripts/soak.sh [--hours H | --minutes M] [--seed N]
#
# Prints the seed (replay a failure with --seed), the rounds, the kills and the generations kept.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=3600
seed=""
while [ $# -gt 0 ]; do
    case "$1" in
        --hours) seconds=$(python3 -c "print(int(float('$2') * 3600))"); shift 2 ;;
        --minutes) seconds=$(python3 -c "print(int(float('$2') * 60))"); shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "soak.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

export VMREPO_SOAK_SECONDS="$seconds"
if [ -n "$seed" ]; then export VMREPO_SOAK_SEED="$seed"; fi
cargo test --release --test concurrency soak_concurrent_commands_with_random_kills -- --nocapture 2>&1 \
    | grep -E "soak|test result|panicked|round|FAILED" 
