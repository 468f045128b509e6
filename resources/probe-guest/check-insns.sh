#!/usr/bin/env bash
# Fails if the probe image contains instructions that KVM's x86 instruction
# emulator (used for all guest code by kvm_pvm) cannot execute: SSE/AVX
# register use (only SSE moves exist there), popcnt/lzcnt/tzcnt,
# cmpxchg16b, xsave/xrstor, fxsave/fxrstor, ldmxcsr/stmxcsr, fences.
# int3 is tolerated: it only appears as linker padding between functions.
# The hand-written 32-bit PVH entry (pvh_start..linux64_start) is skipped
# because objdump decodes it as 64-bit code.
#
# Usage: ./check-insns.sh [path/to/probe-guest]   (needs binutils' objdump)
set -euo pipefail
elf="${1:-$(dirname "$0")/target/x86_64-unknown-linux-gnu/release/probe-guest}"
start=$(nm "$elf" | awk '$3 == "pvh_start" { print $1 }')
end=$(nm "$elf" | awk '$3 == "linux64_start" { print $1 }')
if [[ -z "$start" || -z "$end" ]]; then
    echo "check-insns: entry symbols not found in $elf" >&2
    exit 2
fi
bad=$(objdump -d --no-show-raw-insn -M att "$elf" |
    awk -v s="$start" -v e="$end" '
        /^ *[0-9a-f]+:\t/ {
            addr = substr($1, 1, length($1) - 1)
            while (length(addr) < 16) addr = "0" addr
            if (addr >= s && addr < e) next
            if ($0 ~ /%[xyz]mm[0-9]|%mm[0-7]|\<(popcnt|lzcnt|tzcnt|cmpxchg16b|xsave[a-z0-9]*|xrstor[a-z0-9]*|fxsave[a-z0-9]*|fxrstor[a-z0-9]*|ldmxcsr|stmxcsr|mfence|lfence|sfence)\>/)
                print
        }')
if [[ -n "$bad" ]]; then
    echo "check-insns: $elf uses instructions an emulating KVM cannot run:" >&2
    echo "$bad" | head -20 >&2
    exit 1
fi
echo "check-insns: ok ($elf)"
