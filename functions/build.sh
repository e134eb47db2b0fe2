#!/usr/bin/env bash
# Builds every function under functions/NAME/main.rs (and the modules beside it) into a
# static functions/NAME/bin/NAME with plain rustc (no Cargo, no crates), ready for a
# FROM scratch image.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for dir in functions/*/; do
    name="$(basename "$dir")"
    src="functions/$name/main.rs"
    bin="functions/$name/bin/$name"
    [[ -f "$src" ]] || continue
    # Up to date when the binary is newer than every source file of the function.
    stale=0
    for file in "functions/$name"/*.rs; do
        [[ -f "$bin" && "$bin" -nt "$file" ]] || stale=1
    done
    if [[ "$stale" == 0 ]]; then
        echo "up to date $bin"
        continue
    fi
    mkdir -p "functions/$name/bin"
    rustc --edition 2021 -C opt-level=3 -C target-feature=+crt-static -C panic=abort -C strip=debuginfo \
        -o "$bin" "$src"
    echo "built $bin"
done
