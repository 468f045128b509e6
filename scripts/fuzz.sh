#!/usr/bin/env bash
# Runs every fuzz target (cargo fuzz, libFuzzer) for SECONDS each (default
# 60), starting from the corpus in fuzz/corpus/<target>/. New inputs the
# fuzzer finds go to $TESSERA_FUZZ_OUT/<target>/ (a scratch directory by
# default; point it at fuzz/corpus to grow the committed corpus). A crash,
# a leak, a timeout (10 s per input, see TESSERA_FUZZ_TIMEOUT) or an out-of-memory stops the run:
# the input is in fuzz/artifacts/<target>/, and the script exits non-zero.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
# With TESSERA_FUZZ_RUNS=N a target stops after N executions (or SECONDS,
# whichever comes first): the long runs recorded in FUZZING.md.
# TESSERA_FUZZ_TIMEOUT (seconds per input, default 10): a long run niced
# beside tests and benchmarks can be starved for longer than 10 s, which
# libFuzzer reports as a timeout; give such runs 120.
# TESSERA_FUZZ_RSS_MB (default 4096): the vhost-user targets start three
# threads per input, and ASan keeps a record of every thread, so their RSS
# grows about 370 bytes per execution (flat without ASan): a 10^7 run
# needs 8192.
# Needs the nightly toolchain; installs cargo-fuzz if it is missing.
# vhost_user_net opens a TAP: it needs root and /dev/net/tun, and is
# skipped without them (a failure under TESSERA_STRICT=1).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
	mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^tessera-fuzz$')
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
	echo "[fuzz] installing cargo-fuzz" >&2
	# From outside the workspace: a tool for this machine, not built with
	# the workspace's static-target settings (.cargo/config.toml).
	(cd / && cargo install --locked cargo-fuzz)
fi

# ASan's fake stacks (stack-use-after-return, a defect safe Rust cannot
# have) cost an mmap and munmap per thread: the vhost-user targets start
# threads per input and run twice as fast without them.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=0}

out=${TESSERA_FUZZ_OUT:-$(mktemp -d)}
python3 fuzz/seeds.py
(cd fuzz && cargo +nightly fuzz build -O >&2)

can_open_tap() { [ "$(id -u)" -eq 0 ] && [ -c /dev/net/tun ]; }

status=0
for target in "${targets[@]}"; do
	if [ "$target" = vhost_user_net ] && ! can_open_tap; then
		echo "[fuzz] $target: skipped (needs root and /dev/net/tun)" >&2
		[ "${TESSERA_STRICT:-0}" = 1 ] && status=1
		continue
	fi
	mkdir -p "$out/$target" "fuzz/corpus/$target"
	log="$out/$target.log"
	if (cd fuzz && cargo +nightly fuzz run -O "$target" "$out/$target" "corpus/$target" -- \
		-max_total_time="$seconds" ${TESSERA_FUZZ_RUNS:+-runs=$TESSERA_FUZZ_RUNS} \
		-timeout="${TESSERA_FUZZ_TIMEOUT:-10}" -rss_limit_mb="${TESSERA_FUZZ_RSS_MB:-4096}" -print_final_stats=1) >"$log" 2>&1; then
		runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
		cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1)
		took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
		echo "[fuzz] $target: ok, ${runs:-?} runs in ${took:-?} s, ${cov:-cov: ?}" >&2
	else
		echo "[fuzz] $target: FAILED; the last lines of its log ($log):" >&2
		grep -v '^INFO\|Uses: ' "$log" | tail -n 40 >&2
		status=1
	fi
done
exit $status
