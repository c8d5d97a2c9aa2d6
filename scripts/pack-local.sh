#!/usr/bin/env bash
# npm run pack:local [-- TRIPLE...]: the release flow on this machine. Builds release binaries with
# cargo-zigbuild (glibc targets linked against glibc 2.17, musl targets for Alpine), packs the main
# tarball and one platform tarball per binary into target/pack/, then installs them into an empty
# folder with no Rust toolchain on PATH and runs a command in a sandbox (__test__/package.spec.ts).
# Default targets: the two x86_64 ones (this machine can load the gnu one); `-- --all` adds arm64.
# Needs (each missing one is named with its install command): rustup targets, cargo-zigbuild, and
# zig, taken from PyPI's `ziglang` into a virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
GLIBC=2.17
out=target/pack
targets=(x86_64-unknown-linux-gnu x86_64-unknown-linux-musl)
if [ "${1:-}" = "--all" ]; then
  targets+=(aarch64-unknown-linux-gnu aarch64-unknown-linux-musl)
elif [ $# -gt 0 ]; then
  targets=("$@")
fi

missing=()
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do grep -qx "$t" <<<"$installed" || missing+=("rustup target add $t"); done
command -v cargo-zigbuild >/dev/null || missing+=("cargo install --locked cargo-zigbuild")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'pack:local needs:\n' >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
# zig from PyPI: cargo-zigbuild runs it as `python3 -m ziglang` when that python is first on PATH.
venv=target/zig-venv
if ! "$venv/bin/python" -m ziglang version >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q ziglang
fi
export PATH="$PWD/$venv/bin:$PATH"
# Its own cargo folder, so a long release build never holds the lock of target/ that debug builds use.
export CARGO_TARGET_DIR="$PWD/target/pack-cargo"

platform_of() { # x86_64-unknown-linux-gnu -> linux-x64-gnu
  local arch=${1%%-*} abi=${1##*-}
  case $arch in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; esac
  echo "linux-$arch-$abi"
}

rm -rf "$out"
mkdir -p "$out"
nodes=()
for t in "${targets[@]}"; do
  p=$(platform_of "$t")
  zig_target=$t
  [ "${t##*-}" = gnu ] && zig_target="$t.$GLIBC"
  echo "== $p: napi build --release -x --target $zig_target" >&2
  start=$SECONDS
  npx napi build --platform --release -x --target "$zig_target" -o "$out/$p" --no-js >&2
  echo "   built in $((SECONDS - start)) s" >&2
  nodes+=(--node "$p=$out/$p/hive.$p.node")
done
node scripts/pack.mjs --out "$out/tarballs" "${nodes[@]}" >"$out/summary.json"

echo "== sizes" >&2
for f in "$out"/tarballs/*.tgz; do printf '%10s  %s\n' "$(stat -c %s "$f")" "$(basename "$f")" >&2; done
for t in "${targets[@]}"; do
  p=$(platform_of "$t")
  f="$out/$p/hive.$p.node"
  glibc=$(objdump -T "$f" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
  printf '%10s  %s  (max symbol version: %s)\n' "$(stat -c %s "$f")" "$f" "${glibc:-none}" >&2
done

echo "== install without Rust and run a sandbox" >&2
HIVE_PACKED="$PWD/$out/summary.json" npx vitest run __test__/package.spec.ts
