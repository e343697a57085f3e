#!/usr/bin/env bash
# Builds the Debian guest image of the e2e tier, or finds it in the cache, and prints
# its path (the only thing on stdout; progress and the build time go to stderr):
#
#   e2e/hack/build-kube-image.sh
#   -> ${BENCHCLUSTER_CACHE:-~/.cache/benchcluster}/images/debian-kube-<hash>.qcow2
#
# The image is the vm tier's image (build-guest-image.sh: same Debian suite, same base
# packages, same guest/ files, same boot and disk layout) plus what docs/image-contract.md
# asks of a Kubernetes node, all offline at run time:
#
# - Debian's containerd (1.6; Kubernetes 1.35 is the last release that supports 1.x),
#   runc, containernetworking-plugins, and the tools kubeadm's preflight wants
#   (conntrack, iptables, socat, ethtool, ebtables, mount/losetup).
# - kubeadm, kubelet and kubectl at KUBERNETES_VERSION (e2e/versions.env), built from
#   their Go modules by build-k8s.sh, with the version stamped in;
#   kubelet as its own unit in kubeadm's layout (kube-guest/), enabled, but not started
#   before kubeadm has configured it (an idle VM under emulation does not crash-loop it).
# - The images kubeadm deploys, preloaded into containerd's k8s.io namespace under the
#   names `kubeadm config images list` prints: kube-apiserver, kube-controller-manager,
#   kube-scheduler and etcd (etcd at the version kubeadm names, built from its Go
#   module), each one layer holding the static binary, and pause, whose binary is
#   Debian's catatonit (`catatonit -P`); and kube-scheduler once more as
#   localhost/benchcluster/kube-scheduler:e2e, the e2e tier's custom scheduler image.
#   kube-proxy and CoreDNS are not built: the controller skips those kubeadm addons
#   (a scheduler benchmark cluster needs neither).
# - The pod network: bridge + host-local on each Node's podCIDR, written by containerd
#   from a template once kubelet knows the podCIDR (kube-guest/etc/containerd/config.toml
#   says how and why).
# - swap off (there is none), overlay + br_netfilter loaded, the sysctls kubeadm checks.
# - Virtio disks declared write-through, so guests' fsyncs are not host fsyncs (test VMs
#   are disposable; kube-guest/etc/udev/rules.d/ says why).
#
# The images are imported at build time by containerd itself, run inside the image's
# root in a private mount namespace, so a booting VM finds them unpacked; importing at
# first boot instead would cost every VM minutes of emulated CPU.
#
# <hash> covers this script, build-guest-image.sh (whose package list it reads),
# build-k8s.sh (which builds the Kubernetes binaries), guest/, kube-guest/ and
# e2e/versions.env. Needs root, no loop device and no mount
# outside private mount namespaces. Host packages: those of build-guest-image.sh, plus
# Go (the version e2e/hack/build-k8s.sh needs), gzip, tar.
# The Debian mirror is the one apt on this machine uses (override: BENCHCLUSTER_DEBIAN_MIRROR).
set -euo pipefail

SUITE=bookworm
# Added to the vm tier's packages.
KUBE_PACKAGES=containerd,runc,containernetworking-plugins,catatonit,conntrack,iptables,socat,ethtool,ebtables,mount
# Room for the preloaded images, the containers' writable layers and etcd, under
# kubelet's eviction thresholds (10-15 % free). Unwritten space costs nothing in qcow2.
# A node's overlay may be larger (its pool's `disk`): root grows to it at every boot,
# before containerd and kubelet (guest/'s benchcluster-growroot).
DISK_SIZE_MIB=8192
PARTITION_START_SECTOR=2048
# As in build-guest-image.sh: module trees no VM of ours loads.
PRUNED_MODULE_DIRS="drivers/gpu drivers/media drivers/net/wireless drivers/infiniband
  drivers/staging drivers/iio drivers/bluetooth drivers/isdn drivers/hid drivers/input/touchscreen
  drivers/usb/gadget drivers/net/ethernet/mellanox drivers/net/ethernet/intel drivers/scsi/lpfc
  drivers/scsi/qla2xxx drivers/scsi/mpt3sas sound net/bluetooth net/wireless net/mac80211"
# The Kubernetes binaries the guest runs on the host side of containers.
NODE_BINARIES="kubeadm kubelet kubectl"
CONTROL_PLANE_BINARIES="kube-apiserver kube-controller-manager kube-scheduler"
# The e2e tier's custom scheduler image (e2e/tests/scenarios/scheduler.rs names it too).
CUSTOM_SCHEDULER_IMAGE=localhost/benchcluster/kube-scheduler:e2e

here=$(cd "$(dirname "$0")" && pwd)
guest="$here/guest"
kube_guest="$here/kube-guest"
vm_script="$here/build-guest-image.sh"
k8s_script="$here/build-k8s.sh"
# shellcheck source=../versions.env
source "$here/../versions.env"
cache=${BENCHCLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/benchcluster}
images="$cache/images"
bin_root="$cache/kube-guest-$KUBERNETES_VERSION"

log() { echo "build-kube-image: $*" >&2; }

content_hash() {
  {
    cat "$here/$(basename "$0")" "$vm_script" "$k8s_script" "$here/../versions.env"
    # Names, contents and the executable bit (the one mode bit git keeps).
    for dir in "$guest" "$kube_guest"; do
      echo "== $(basename "$dir")"
      (cd "$dir" && find . -type f -print | LC_ALL=C sort | while read -r f; do
        if [ -x "$f" ]; then echo "$f x"; else echo "$f"; fi
        cat "$f"
      done)
    done
  } | sha256sum | cut -c1-16
}

image="$images/debian-kube-$(content_hash).qcow2"
if [ -f "$image" ]; then echo "$image"; exit 0; fi

[ "$(id -u)" -eq 0 ] || { log "must run as root (debootstrap, chroot)"; exit 1; }
for tool in debootstrap mke2fs sfdisk qemu-img flock unshare go gzip tar sha256sum; do
  command -v "$tool" > /dev/null || { log "$tool not found (see the package lists at the top)"; exit 1; }
done

# The vm tier's base packages and kernel, so that everything guest/ relies on is there.
vm_var() { sed -n "s/^$1=\([A-Za-z0-9,.+-]*\)\$/\1/p" "$vm_script" | head -n 1; }
BASE_PACKAGES=$(vm_var PACKAGES)
KERNEL_PACKAGE=$(vm_var KERNEL_PACKAGE)
if [ -z "$BASE_PACKAGES" ] || [ -z "$KERNEL_PACKAGE" ]; then
  log "cannot read PACKAGES and KERNEL_PACKAGE from $vm_script"
  exit 1
fi

mkdir -p "$images"
# One image build at a time per cache (the vm tier's script takes the same lock); a
# second caller waits, then finds the image.
exec 9> "$images/.lock"
flock 9
if [ -f "$image" ]; then echo "$image"; exit 0; fi
start=$SECONDS

# ---------------------------------------------------------------------------------
# Kubernetes binaries with their version stamped in, from build-k8s.sh (the api tier's
# builds, same cache), and etcd at the version kubeadm deploys.
# ---------------------------------------------------------------------------------
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
k8s_bin=$("$k8s_script" $NODE_BINARIES $CONTROL_PLANE_BINARIES | tail -n 1)
bin="$bin_root/bin"
mkdir -p "$bin"

go_module() {  # dir, requirements...
  local dir=$1; shift
  mkdir -p "$dir"
  (cd "$dir" && { [ -f go.mod ] || go mod init benchcluster.local/kube-guest-build > /dev/null 2>&1; } \
    && for r in "$@"; do go mod edit -require="$r"; done)
}

build_etcd() {  # version (x.y.z)
  local version=$1 out="$bin/etcd-$1"
  [ -x "$out" ] || {
    local mod="$bin_root/mod-etcd-$version" t=$SECONDS
    log "building etcd v$version"
    go_module "$mod" "go.etcd.io/etcd/server/v3@v$version"
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$mod/tools.go"
    (cd "$mod" && go mod tidy -e > /dev/null 2> "$mod/tidy.log") \
      || { tail -n 20 "$mod/tidy.log" >&2; log "go mod tidy failed in $mod"; exit 1; }
    (cd "$mod" && go build -trimpath -ldflags="-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3)
    mv "$out.tmp" "$out"
    log "built etcd v$version in $((SECONDS - t))s"
  }
  echo "$out"
}

[ "$("$k8s_bin/kubeadm" version -o short)" = "$KUBERNETES_VERSION" ] \
  || { log "$k8s_bin/kubeadm does not say $KUBERNETES_VERSION"; exit 1; }
# The names kubeadm looks for (its defaults for this version; no network needed).
mapfile -t kubeadm_images < <("$k8s_bin/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION")
image_named() {  # component -> full reference
  local ref
  for ref in "${kubeadm_images[@]}"; do
    case "$ref" in */"$1":*) echo "$ref"; return 0 ;; esac
  done
  log "kubeadm lists no $1 image: ${kubeadm_images[*]}"
  exit 1
}
etcd_ref=$(image_named etcd)
pause_ref=$(image_named pause)
etcd_tag=${etcd_ref##*:}          # 3.6.6-0: etcd version, image revision
etcd_binary=$(build_etcd "${etcd_tag%-*}")
log "Kubernetes binaries ready after $((SECONDS - start))s"

# ---------------------------------------------------------------------------------
# The root file system: the vm tier's recipe with the Kubernetes packages added.
# ---------------------------------------------------------------------------------
apt_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    case "$f" in
      *.sources)
        awk 'tolower($1) == "uris:" { print $2 }' "$f" ;;
      *)
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' "$f" ;;
    esac
  done | grep -v -- '-security' | grep -E '/debian/?$' | head -n 1
}
mirror=${BENCHCLUSTER_DEBIAN_MIRROR:-$(apt_mirror)}
[ -n "$mirror" ] || { log "no Debian mirror in /etc/apt/sources.list*; set BENCHCLUSTER_DEBIAN_MIRROR"; exit 1; }

work=$(mktemp -d "$images/build-kube.XXXXXX")
root="$work/root"
# Every mount of this build lives in a private mount namespace (unshare -m) and dies
# with it, so nothing can be left mounted under $work, whatever fails.
trap 'rm -rf -- "$work"' EXIT
in_root() {  # runs stdin as a shell script in the image root, /proc, /sys, /dev mounted
  # A PID namespace too: whatever the script leaves running dies with it.
  unshare --mount --propagation private --pid --fork -- /bin/sh -eu -c '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/run"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      DEBIAN_FRONTEND=noninteractive "$@" /bin/sh -eu' in-root "$root" "$@"
}

mkdir -p "$cache/debootstrap-$SUITE"
log "debootstrap $SUITE from $mirror"
debootstrap --variant=minbase --cache-dir="$cache/debootstrap-$SUITE" \
  --include="$BASE_PACKAGES,$KUBE_PACKAGES" "$SUITE" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
log "debootstrap done after $((SECONDS - start))s"

# The vm tier's files, then ours (before the kernel, so its initramfs uses the settings).
cp -a --no-preserve=ownership "$guest/." "$root/"
cp -a --no-preserve=ownership "$kube_guest/." "$root/"
chmod 0755 "$root/usr/local/sbin/benchcluster-identity" "$root/usr/local/sbin/benchcluster-growroot"
sed -i "s|@PAUSE_IMAGE@|$pause_ref|" "$root/etc/containerd/config.toml"
for b in $NODE_BINARIES; do install -m 0755 "$k8s_bin/$b" "$root/usr/bin/$b"; done
# No service may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"

in_root KERNEL_PACKAGE="$KERNEL_PACKAGE" PRUNED_MODULE_DIRS="$PRUNED_MODULE_DIRS" \
  > "$work/chroot.log" 2>&1 <<'CHROOT' || { tail -n 40 "$work/chroot.log" >&2; log "configuring the image failed"; exit 1; }
apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-confdef "$KERNEL_PACKAGE"

for dir in $PRUNED_MODULE_DIRS; do rm -rf /lib/modules/*/kernel/$dir; done
for version in $(ls /lib/modules); do depmod "$version"; done

systemctl set-default multi-user.target
systemctl enable benchcluster-identity.service benchcluster-growroot.service systemd-networkd.service ssh.service \
  containerd.service kubelet.service
systemctl disable systemd-networkd-wait-online.service
# As in the vm tier: nothing periodic, nothing interactive, no unused early units.
systemctl mask systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer dpkg-db-backup.timer \
  systemd-tmpfiles-clean.timer getty@tty1.service systemd-pstore.service \
  modprobe@configfs.service modprobe@dm_mod.service modprobe@drm.service \
  modprobe@efi_pstore.service modprobe@fuse.service modprobe@loop.service \
  kmod-static-nodes.service systemd-network-generator.service \
  sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount \
  sys-fs-fuse-connections.mount systemd-journal-flush.service \
  systemd-update-utmp.service systemd-update-utmp-runlevel.service
mkdir -p /etc/cni/net.d /etc/kubernetes/manifests

mkdir -p /boot/grub/i386-pc
cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst /boot/grub/i386-pc/
grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2
cp /usr/lib/grub/i386-pc/boot.img /boot/grub/i386-pc/boot.img

rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
echo localhost > /etc/hostname
passwd -l root
apt-get clean
rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/locale/* /var/log/*.log
CHROOT
log "configured after $((SECONDS - start))s"

# ---------------------------------------------------------------------------------
# Control-plane images: one gzip layer with the static binary, as an OCI archive
# named for containerd by its io.containerd.image.name annotation.
# ---------------------------------------------------------------------------------
json_blob() {  # dir, content -> digest (and the blob written under dir/blobs/sha256)
  local digest
  digest=$(printf '%s' "$2" | sha256sum | cut -d' ' -f1)
  printf '%s' "$2" > "$1/blobs/sha256/$digest"
  echo "$digest"
}
oci_archive() {  # reference, archive, entrypoint (JSON array), source:destination...
  local ref=$1 out=$2 entrypoint=$3; shift 3
  local dir layout pair diff_id layer config manifest
  dir=$(mktemp -d "$work/oci.XXXXXX")
  layout="$dir/layout"
  mkdir -p "$dir/rootfs/tmp" "$layout/blobs/sha256"
  chmod 1777 "$dir/rootfs/tmp"
  for pair in "$@"; do install -D -m 0755 "${pair%%:*}" "$dir/rootfs${pair#*:}"; done
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$dir/rootfs" -cf "$dir/layer.tar" .
  diff_id=$(sha256sum < "$dir/layer.tar" | cut -d' ' -f1)
  gzip -n -6 "$dir/layer.tar"
  layer=$(sha256sum < "$dir/layer.tar.gz" | cut -d' ' -f1)
  mv "$dir/layer.tar.gz" "$layout/blobs/sha256/$layer"
  config=$(json_blob "$layout" "{\"architecture\":\"amd64\",\"os\":\"linux\",\
\"config\":{\"Entrypoint\":$entrypoint,\"Env\":[\"PATH=/usr/local/bin:/usr/bin:/bin\"]},\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_id\"]},\
\"history\":[{\"created_by\":\"benchcluster e2e/hack/build-kube-image.sh\"}]}")
  manifest=$(json_blob "$layout" "{\"schemaVersion\":2,\
\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config\",\
\"size\":$(stat -c %s "$layout/blobs/sha256/$config")},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$layer\",\
\"size\":$(stat -c %s "$layout/blobs/sha256/$layer")}]}")
  printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$(stat -c %s "$layout/blobs/sha256/$manifest")" "$ref" "${ref##*:}" > "$layout/index.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$layout" -cf "$out" .
  rm -rf -- "$dir"
}

staging="$root/var/tmp/benchcluster-images"
mkdir -p "$staging"
for b in $CONTROL_PLANE_BINARIES; do
  oci_archive "$(image_named "$b")" "$staging/$b.tar" "[\"/usr/local/bin/$b\"]" "$k8s_bin/$b:/usr/local/bin/$b"
done
# kube-scheduler again under a name of its own, as a custom build would be preloaded:
# the e2e tier runs it through spec.scheduler.image (never pulled).
oci_archive "$CUSTOM_SCHEDULER_IMAGE" "$staging/kube-scheduler-custom.tar" \
  '["/usr/local/bin/kube-scheduler"]' "$k8s_bin/kube-scheduler:/usr/local/bin/kube-scheduler"
oci_archive "$etcd_ref" "$staging/etcd.tar" '["/usr/local/bin/etcd"]' "$etcd_binary:/usr/local/bin/etcd"
oci_archive "$pause_ref" "$staging/pause.tar" '["/catatonit","-P"]' "$root/usr/bin/catatonit:/catatonit"
log "image archives written after $((SECONDS - start))s"

# containerd in the image's root, only for the import: no CRI, its own socket.
cat > "$root/var/tmp/containerd-build.toml" << 'TOML'
version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "/run/containerd-build/containerd.sock"
TOML
in_root > "$work/import.log" 2>&1 <<'IMPORT' || { tail -n 40 "$work/import.log" >&2; log "importing the images failed"; exit 1; }
containerd --config /var/tmp/containerd-build.toml &
daemon=$!
trap 'kill $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true' EXIT
ctr="ctr --address /run/containerd-build/containerd.sock --namespace k8s.io"
tries=0
until $ctr version > /dev/null 2>&1; do
  tries=$((tries + 1)); [ $tries -lt 100 ] || { echo "containerd did not start"; exit 1; }
  sleep 0.2
done
for archive in /var/tmp/benchcluster-images/*.tar; do
  $ctr images import --snapshotter overlayfs "$archive"
done
$ctr images list
kill $daemon
wait $daemon || true
trap - EXIT
rm -rf /var/tmp/benchcluster-images /var/tmp/containerd-build.toml /var/lib/containerd/tmpmounts
IMPORT
imported=$(grep -c '^registry' "$work/import.log" || true)
[ "$imported" -ge 5 ] || { cat "$work/import.log" >&2; log "expected 5 images in containerd, found $imported"; exit 1; }
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "${root:?}/tmp/"* "$root/run/"*
log "images imported after $((SECONDS - start))s"

# ---------------------------------------------------------------------------------
# Disk: as build-guest-image.sh (partition written by mke2fs -d, GRUB by dd).
# ---------------------------------------------------------------------------------
disk="$work/disk.raw"
sector=512
part_sectors=$(( DISK_SIZE_MIB * 1024 * 1024 / sector - PARTITION_START_SECTOR ))
truncate -s "${DISK_SIZE_MIB}M" "$disk"
printf 'label: dos\nstart=%s, size=%s, type=83, bootable\n' "$PARTITION_START_SECTOR" "$part_sectors" \
  | sfdisk --quiet "$disk"
mke2fs -q -t ext4 -L bc-root -d "$root" -E "offset=$(( PARTITION_START_SECTOR * sector ))" \
  "$disk" "$(( part_sectors * sector / 1024 ))k"
core="$root/boot/grub/i386-pc/core.img"
core_sectors=$(( ($(stat -c %s "$core") + sector - 1) / sector ))
[ "$core_sectors" -lt "$PARTITION_START_SECTOR" ] || { log "core.img does not fit before the partition"; exit 1; }
dd if="$root/boot/grub/i386-pc/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$core" of="$disk" bs=$sector seek=1 conv=notrunc status=none

qemu-img convert -q -f raw -O qcow2 "$disk" "$work/image.qcow2"
mv "$work/image.qcow2" "$image"
log "built $image ($(du -h "$image" | cut -f1) on disk) in $((SECONDS - start))s"
echo "$image"
