#!/usr/bin/env bash
# Builds every function under functions/NAME/main.rs into a static functions/NAME/bin/NAME
# with plain rustc (no Cargo, no crates), ready for a FROM scratch image.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for dir in functions/*/; do
    name="$(basename "$dir")"
    src="functions/$name/main.rs"
    bin="functions/$name/bin/$name"
    [[ -f "$src" ]] || continue
    if [[ -f "$bin" && "$bin" -nt "$src" ]]; then
        echo "up to date $bin"
        continue
    fi
    mkdir -p "functions/$name/bin"
    rustc --edition 2021 -C opt-level=3 -C target-feature=+crt-static -C panic=abort -C strip=debuginfo \
        -o "$bin" "$src"
    echo "built $bin"
done
