#!/usr/bin/env bash
# Builds the std-only programs that go into FROM scratch images, with plain rustc (no
# Cargo, no crates) and statically linked:
#   functions/NAME/main.rs -> functions/NAME/bin/NAME     (ready functions)
#   runtimes/NAME/main.rs  -> runtimes/NAME/bin/ember-NAME (e.g. runtimes/shim: ember-shim)
# A program is rebuilt when any .rs file of its folder, or one it includes with
# #[path = "..."], is newer than its binary.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

build() {
    local dir="$1" bin="$2"
    [[ -f "$dir/main.rs" ]] || return 0
    # Its own .rs files, and those it includes from elsewhere with #[path = "..."].
    local shared=()
    while IFS= read -r p; do shared+=("$dir/$p"); done < <(sed -n 's/^#\[path = "\(.*\)"\]$/\1/p' "$dir"/*.rs)
    if [[ -f "$bin" ]] && [[ -z "$(find "$dir" "${shared[@]}" -maxdepth 1 -name '*.rs' -newer "$bin")" ]]; then
        echo "up to date $bin"
        return 0
    fi
    mkdir -p "$(dirname "$bin")"
    rustc --edition 2021 -C opt-level=3 -C target-feature=+crt-static -C panic=abort -C strip=debuginfo \
        -o "$bin" "$dir/main.rs"
    echo "built $bin"
}

for dir in functions/*/; do
    name="$(basename "$dir")"
    build "functions/$name" "functions/$name/bin/$name"
done
for dir in runtimes/*/; do
    name="$(basename "$dir")"
    build "runtimes/$name" "runtimes/$name/bin/ember-$name"
done
