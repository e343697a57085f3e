#!/usr/bin/env bash
# Installs the Debian packages benchcluster needs, as root; installs nothing (and does
# not run apt-get update) when they are all there already. Used by .ci/run and by
# `cargo xtask up`, so the list lives here only.
#
#   e2e/hack/install-deps.sh
#
# Not libvirt-daemon-system: it would start a system libvirtd, and the sandbox runs its
# own (e2e/src/sandbox.rs).
set -euo pipefail

packages=(
  # Build: the controller's libvirt bindings (virt crate) link libvirt; gcc and libc6-dev
  # for the ring crate's C parts; bash for the harness's process watchdogs.
  libvirt-dev libvirt0 pkg-config gcc libc6-dev bash ca-certificates
  # The Nix files' parse check (e2e/hack/check-nix.sh).
  nix-bin
  # The sandbox of the vm and e2e tiers and of `cargo xtask up`: a private libvirtd with
  # the qemu driver, qemu (software emulation), dnsmasq for DHCP and iptables for
  # libvirt's network, ip for the network namespace, virsh, ssh to the guests.
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
  dnsmasq-base iptables iproute2 openssh-client
  # The guest images (build-guest-image.sh, build-kube-image.sh): debootstrap, mke2fs,
  # sfdisk, qemu-img, and gzip/tar for the preloaded container images.
  debootstrap e2fsprogs fdisk util-linux gzip tar
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} Debian packages are installed" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages (run as root to install them): ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
