#!/usr/bin/env bash
# What the outbox library adds to a service's build: two service crates on SeaORM with PostgreSQL
# (tokio, rustls), one with `outbox` (default-features = false, features = ["postgres"]) and one
# without, made in a temporary directory; for each, its normal dependency count and the wall-clock
# and CPU time of a cold `cargo build` (an empty target dir; the registry already downloaded).
#
#   outbox-bench/build-cost/measure.sh [features]     # default features: postgres
#
# Prints one line per crate and the difference. Builds run one after the other: on a machine
# doing other work, trust the CPU time (user + system) more than the wall clock.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
features=${1:-postgres}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

service() {
    local name=$1 extra=$2
    mkdir -p "$work/$name/src"
    cat >"$work/$name/Cargo.toml" <<TOML
[package]
name = "$name"
version = "0.1.0"
edition = "2024"

[dependencies]
sea-orm = { version = "2.0.4", default-features = false, features = ["macros", "with-json", "with-chrono", "with-uuid", "sqlx-postgres", "runtime-tokio-rustls"] }
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
$extra

[workspace]
TOML
    echo 'fn main() {}' >"$work/$name/src/main.rs"
    # The same versions as this repository's lock file, where both have a crate.
    cp "$root/Cargo.lock" "$work/$name/Cargo.lock"
}

service plain ""
service with_outbox "outbox = { path = \"$root/outbox\", default-features = false, features = [$(printf '"%s",' ${features//,/ } | sed 's/,$//')] }"

measure() {
    local name=$1
    cd "$work/$name"
    local crates
    crates=$(cargo tree -e normal --prefix none --no-dedupe | sed 's/ (\*)$//; s/ (proc-macro)$//' | sort -u | wc -l)
    local start=$SECONDS
    local times
    times=$( { /usr/bin/time -f '%U %S' cargo build -q --target-dir "$work/target-$name" 2>&1 1>/dev/null; } | tail -1)
    local wall=$((SECONDS - start))
    local cpu
    cpu=$(echo "$times" | awk '{printf "%.0f", $1 + $2}')
    echo "$name crates=$crates wall=${wall}s cpu=${cpu}s"
}

plain=$(measure plain)
echo "$plain"
with=$(measure with_outbox)
echo "$with"
field() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2 | tr -d s; }
echo "outbox adds: crates=+$(( $(field "$with" crates) - $(field "$plain" crates) ))" \
    "wall=+$(( $(field "$with" wall) - $(field "$plain" wall) ))s" \
    "cpu=+$(( $(field "$with" cpu) - $(field "$plain" cpu) ))s" \
    "($(awk "BEGIN{printf \"%.0f\", 100*($(field "$with" cpu)/$(field "$plain" cpu)-1)}")% of the plain build's CPU time)"
