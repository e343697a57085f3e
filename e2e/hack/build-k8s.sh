#!/usr/bin/env bash
# Builds the upstream Kubernetes binaries the test tiers need from their published Go
# modules, at the versions pinned in e2e/versions.env, into a cache outside the repo,
# and prints the directory holding them.
#
#   e2e/hack/build-k8s.sh [binary...]     (default: kube-apiserver etcd kubectl)
#
# Any of k8s.io/kubernetes/cmd/* and etcd. The Kubernetes binaries carry their version
# as the release's own build does (hack/lib/version.sh's -X flags): kubeadm and kubelet
# check each other's version, and a plain `go build` says v0.0.0-master. The api tier
# uses kube-apiserver, etcd and kubectl; the e2e image (build-kube-image.sh) takes
# kubeadm, kubelet, kubectl and the control-plane binaries from here too.
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
# "-v2": binaries with the version stamped in (earlier caches hold unstamped ones).
out="$cache/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-v2/bin"
mod="$cache/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION/mod"
mkdir -p "$out" "$mod"

bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kube-apiserver etcd kubectl)

missing=()
for b in "${bins[@]}"; do [ -x "$out/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$out"; exit 0; fi

export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
staging_minor=${KUBERNETES_VERSION#v1.}        # 35.4
staging_version="v0.$staging_minor"            # v0.35.4

cd "$mod"
if [ ! -f go.mod ]; then
  go mod init benchcluster.local/k8s-build >/dev/null 2>&1
fi
info=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION")
kmod=$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' <<< "$info")
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

# What hack/lib/version.sh stamps; the date is the release's, from the module proxy.
version_info=$(sed -n 's/.*"Info": "\(.*\)".*/\1/p' <<< "$info")
date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$version_info")
minor=${KUBERNETES_VERSION#v1.}
minor=${minor%%.*}
stamp=()
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=("-X" "$pkg.gitVersion=$KUBERNETES_VERSION" "-X" "$pkg.gitMajor=1"
    "-X" "$pkg.gitMinor=$minor" "-X" "$pkg.gitTreeState=clean" "-X" "$pkg.gitCommit="
    "-X" "$pkg.buildDate=${date:-1970-01-01T00:00:00Z}")
done

for b in "${missing[@]}"; do
  ldflags=(-s -w)
  case "$b" in
    etcd) pkg=go.etcd.io/etcd/server/v3 ;;
    *) pkg="k8s.io/kubernetes/cmd/$b"; ldflags+=("${stamp[@]}") ;;
  esac
  echo "building $b ($pkg)" >&2
  start=$(date +%s)
  go build -trimpath -ldflags="${ldflags[*]}" -o "$out/$b.tmp" "$pkg"
  mv "$out/$b.tmp" "$out/$b"
  echo "built $b in $(( $(date +%s) - start ))s" >&2
done
echo "$out"
