#!/usr/bin/env bash
# Builds the upstream Kubernetes binaries the test tiers need from their published Go
# modules, at the versions pinned in e2e/versions.env, into a cache outside the repo.
#
#   e2e/hack/build-k8s.sh [binary...]     (default: kube-apiserver etcd kubectl)
#
# k8s.io/kubernetes requires its ~30 staging modules at v0.0.0 and replaces them with
# local paths a dependent module cannot see; we replace each with its published
# v0.<minor>.<patch> instead. The list is read from the module's own go.mod so it
# follows the pinned version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../versions.env
source "$here/../versions.env"

cache=${BENCHCLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/benchcluster}
out="$cache/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION/bin"
mod="$cache/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION/mod"
mkdir -p "$out" "$mod"

bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kube-apiserver etcd kubectl)

missing=()
for b in "${bins[@]}"; do [ -x "$out/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$out"; exit 0; fi

export GOFLAGS=-mod=mod CGO_ENABLED=0
staging_minor=${KUBERNETES_VERSION#v1.}        # 35.4
staging_version="v0.$staging_minor"            # v0.35.4

cd "$mod"
if [ ! -f go.mod ]; then
  go mod init benchcluster.local/k8s-build >/dev/null 2>&1
fi
kmod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$kmod" ] || { echo "cannot download k8s.io/kubernetes@$KUBERNETES_VERSION" >&2; exit 1; }
go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
for staged in $(sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*|\1|p' "$kmod"); do
  go mod edit -replace="$staged=$staged@$staging_version"
done
# A tools.go keeps the main packages in the module graph so `go mod tidy` keeps them.
cat > tools.go <<GO
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubeadm"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
go mod tidy -e >/dev/null

for b in "${missing[@]}"; do
  case "$b" in
    etcd) pkg=go.etcd.io/etcd/server/v3 ;;
    *) pkg="k8s.io/kubernetes/cmd/$b" ;;
  esac
  echo "building $b ($pkg)" >&2
  start=$(date +%s)
  go build -trimpath -ldflags="-s -w" -o "$out/$b.tmp" "$pkg"
  mv "$out/$b.tmp" "$out/$b"
  echo "built $b in $(( $(date +%s) - start ))s" >&2
done
echo "$out"
