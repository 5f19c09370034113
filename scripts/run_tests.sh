#!/usr/bin/env bash
# `make test`'s steps, each run whatever the one before did: one failing suite must not hide
# another. At the end each step's outcome is printed again with pytest's summary line, so that
# both suites' results stand together at the bottom of a long log; the exit status is 1 if any
# step failed.
#
#   scripts/run_tests.sh NAME COMMAND [NAME COMMAND ...]    # COMMAND is run by bash -c
set -uo pipefail

if (($# == 0 || $# % 2)); then
    echo "usage: $0 NAME COMMAND [NAME COMMAND ...]" >&2
    exit 2
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
recap=()
failed=0
while (($#)); do
    name=$1 command=$2
    shift 2
    echo "== $name: $command"
    bash -c "$command" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    # pytest's summary is its last line, "= 12 passed, 1 failed in 3.40s ="; ruff's is its last.
    summary=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | sed 's/^=* *//; s/ *=*$//')
    if ((status == 0)); then
        recap+=("   ok        $name: $summary")
    else
        recap+=("   FAILED    $name (exit status $status): $summary")
        failed=1
    fi
done
echo "== make test, step by step"
printf '%s\n' "${recap[@]}"
exit "$failed"
