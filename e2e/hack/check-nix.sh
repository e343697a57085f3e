#!/usr/bin/env bash
# Checks every .nix file of the repository with tools that work offline:
#   nix-instantiate --parse   the Nix parser itself (Debian package nix-bin)
#   deadnix --fail            unused bindings and arguments (crates.io: deadnix)
#   nixpkgs-fmt --check       formatting (crates.io: nixpkgs-fmt)
# It installs nothing; install with
#   apt-get install -y --no-install-recommends nix-bin
#   cargo install --locked deadnix nixpkgs-fmt
# Evaluating the flake or building its outputs needs nixpkgs, which cannot be fetched
# here (see nix/README.md); these checks are what can run without it.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
for tool in nix-instantiate deadnix nixpkgs-fmt; do
  command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "check-nix: missing ${missing[*]}: apt-get install nix-bin; cargo install --locked deadnix nixpkgs-fmt" >&2
  exit 2
fi

# Tracked and new files alike, but nothing git ignores (target/ holds vendored crates).
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.nix' | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "check-nix: no .nix files found" >&2
  exit 1
fi
echo "check-nix: ${#files[@]} files: ${files[*]}"

status=0
# --parse needs no store; NIX_STATE_DIR keeps a non-root run from touching /nix/var.
export NIX_STATE_DIR=${NIX_STATE_DIR:-$(mktemp -d)}
# Debian's nix.conf names a build-users-group this machine need not have.
export NIX_CONFIG="build-users-group ="
for file in "${files[@]}"; do
  if ! nix-instantiate --parse "$file" > /dev/null; then
    echo "check-nix: $file does not parse" >&2
    status=1
  fi
done
echo "check-nix: nix-instantiate --parse: $([ $status -eq 0 ] && echo ok || echo FAILED)"

if deadnix --fail "${files[@]}"; then
  echo "check-nix: deadnix: ok"
else
  echo "check-nix: deadnix found unused code (deadnix --edit <file> removes it)" >&2
  status=1
fi

if nixpkgs-fmt --check "${files[@]}"; then
  echo "check-nix: nixpkgs-fmt: ok"
else
  echo "check-nix: not formatted: run nixpkgs-fmt on the files above" >&2
  status=1
fi
exit $status
