#!/usr/bin/env bash
# Build the C WebAssembly samples in spear_nb/samples/wasm/ (currently only
# wordfreq.c -> wordfreq.wasm, a wasm32-wasi command). The .wat samples need
# no build step: wasmtime compiles WAT text directly.
#
# Installs nothing. Needs, on Debian bookworm:
#   apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32
#     clang                     - the compiler (clang-14), has the wasm32 backend
#     lld                       - provides wasm-ld
#     wasi-libc                 - WASI libc; Debian installs it multiarch-style
#                                 into /usr/include/wasm32-wasi and
#                                 /usr/lib/wasm32-wasi, so the sysroot is /usr
#     libclang-rt-14-dev-wasm32 - compiler-rt builtins for wasm32 (optional:
#                                 without it we link with -nodefaultlibs -lc,
#                                 which works for wordfreq.c)
# An upstream wasi-sdk style sysroot (/usr/share/wasi-sysroot,
# /usr/lib/wasi-sysroot, or $WASI_SYSROOT) is used instead when present.
#
# Usage: scripts/build_wasm_samples.sh            build
#        scripts/build_wasm_samples.sh --check    build to a temp file and fail
#                                                 if it differs from the
#                                                 committed wordfreq.wasm
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC_DIR="$ROOT/spear_nb/samples/wasm"
CC="${CC:-clang}"

die() { echo "build_wasm_samples: $*" >&2; exit 1; }

command -v "$CC" >/dev/null 2>&1 \
    || die "'$CC' not found (apt-get install -y clang)"
command -v wasm-ld >/dev/null 2>&1 || command -v wasm-ld-14 >/dev/null 2>&1 \
    || die "wasm-ld not found (apt-get install -y lld)"

SYSROOT="${WASI_SYSROOT:-}"
if [ -z "$SYSROOT" ]; then
    for cand in /usr/share/wasi-sysroot /usr/lib/wasi-sysroot; do
        if [ -f "$cand/include/stdio.h" ] || [ -f "$cand/include/wasm32-wasi/stdio.h" ]; then
            SYSROOT="$cand"; break
        fi
    done
fi
if [ -z "$SYSROOT" ] && [ -f /usr/include/wasm32-wasi/stdio.h ] \
        && [ -f /usr/lib/wasm32-wasi/libc.a ]; then
    SYSROOT=/usr   # Debian's wasi-libc package layout
fi
[ -n "$SYSROOT" ] || die "no WASI sysroot found (apt-get install -y wasi-libc)"

LIBS=()
rt="$("$CC" --target=wasm32-wasi -print-libgcc-file-name 2>/dev/null || true)"
if [ -z "$rt" ] || [ ! -f "$rt" ]; then
    echo "build_wasm_samples: wasm32 compiler-rt builtins missing" \
         "(libclang-rt-14-dev-wasm32); linking with -nodefaultlibs -lc" >&2
    LIBS=(-nodefaultlibs -lc)
fi

out="$SRC_DIR/wordfreq.wasm"
if [ "${1:-}" = "--check" ]; then
    out="$(mktemp --suffix=.wasm)"
    trap 'rm -f "$out"' EXIT
fi

set -x
"$CC" --target=wasm32-wasi --sysroot="$SYSROOT" -O2 -s -Wall -Wextra \
    -o "$out" "$SRC_DIR/wordfreq.c" "${LIBS[@]}"
{ set +x; } 2>/dev/null

if [ "${1:-}" = "--check" ]; then
    if cmp -s "$out" "$SRC_DIR/wordfreq.wasm"; then
        echo "wordfreq.wasm is up to date"
    else
        die "wordfreq.wasm differs from a fresh build of wordfreq.c"
    fi
else
    echo "built $out ($(wc -c <"$out") bytes)"
fi
