#!/usr/bin/env bash
# Builds the Debian guest image of the vm tier, or finds it in the cache, and prints
# its path (the only thing on stdout; progress and the build time go to stderr):
#
#   e2e/hack/build-guest-image.sh
#   -> ${BENCHCLUSTER_CACHE:-~/.cache/benchcluster}/images/debian-vm-<hash>.qcow2
#
# <hash> covers this script and everything under guest/, so editing either builds a
# new image. The image follows docs/image-contract.md: BIOS boot with GRUB from
# /dev/vda1 (ext4), console on ttyS0, DHCP with systemd-networkd, an empty
# /etc/machine-id, no SSH host key of its own, the benchcluster-identity unit
# (guest/) that applies the CIDATA seed at boot, and the benchcluster-growroot unit
# (guest/) that grows the root partition and file system to the disk at every boot.
#
# Needs root (debootstrap, chroot, file ownership in the image) but no loop device,
# no mount other than /proc in the chroot, and no systemd: the file system is written
# into the disk image by mke2fs -d and GRUB's boot sectors by dd.
#
# Host packages: debootstrap qemu-utils e2fsprogs fdisk util-linux.
# The Debian mirror is the one apt on this machine uses (override: BENCHCLUSTER_DEBIAN_MIRROR).
set -euo pipefail

SUITE=bookworm
# The cloud kernel: virtio drivers, no drivers for hardware a VM of ours never has.
# Against linux-image-amd64 it boots ~3 s faster under emulation and makes a smaller
# image. It has no AHCI/SATA cdrom driver, which nothing needs: the controller attaches
# the seed as a virtio disk (docs/image-contract.md).
KERNEL_PACKAGE=linux-image-cloud-amd64
# fdisk (sfdisk) and e2fsprogs (resize2fs): benchcluster-growroot grows root to the disk.
# Not cloud-guest-utils' growpart: it depends on python3.
PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,openssh-server,sudo,iproute2,zstd,initramfs-tools,grub-pc-bin,fdisk,e2fsprogs
# Virtual size; node overlays may be larger. Unwritten space costs nothing in qcow2.
DISK_SIZE_MIB=3072
PARTITION_START_SECTOR=2048
# Module trees no VM of ours loads, dropped to keep the image small.
PRUNED_MODULE_DIRS="drivers/gpu drivers/media drivers/net/wireless drivers/infiniband
  drivers/staging drivers/iio drivers/bluetooth drivers/isdn drivers/hid drivers/input/touchscreen
  drivers/usb/gadget drivers/net/ethernet/mellanox drivers/net/ethernet/intel drivers/scsi/lpfc
  drivers/scsi/qla2xxx drivers/scsi/mpt3sas sound net/bluetooth net/wireless net/mac80211"

here=$(cd "$(dirname "$0")" && pwd)
guest="$here/guest"
cache=${BENCHCLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/benchcluster}
images="$cache/images"

log() { echo "build-guest-image: $*" >&2; }

content_hash() {
  {
    cat "$here/$(basename "$0")"
    # Names, contents and the executable bit (the one mode bit git keeps).
    (cd "$guest" && find . -type f -print | LC_ALL=C sort | while read -r f; do
      if [ -x "$f" ]; then echo "$f x"; else echo "$f"; fi
      cat "$f"
    done)
  } | sha256sum | cut -c1-16
}

image="$images/debian-vm-$(content_hash).qcow2"
if [ -f "$image" ]; then echo "$image"; exit 0; fi

[ "$(id -u)" -eq 0 ] || { log "must run as root (debootstrap, chroot)"; exit 1; }
for tool in debootstrap mke2fs sfdisk qemu-img flock; do
  command -v "$tool" > /dev/null || { log "$tool not found (see the package list at the top)"; exit 1; }
done

mkdir -p "$images"
# One build at a time per cache; a second caller waits, then finds the image.
exec 9> "$images/.lock"
flock 9
if [ -f "$image" ]; then echo "$image"; exit 0; fi

# The first `deb` URI for Debian proper in apt's configuration (one-line or deb822).
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

start=$SECONDS
work=$(mktemp -d "$images/build.XXXXXX")
root="$work/root"
cleanup() {
  # Never delete through a mount point: unmount first, and keep the directory if that fails.
  if mountpoint -q "$root/proc" 2> /dev/null; then umount "$root/proc" || umount -l "$root/proc" || true; fi
  if mountpoint -q "$root/proc" 2> /dev/null; then
    log "$root/proc still mounted; leaving $work"
  else
    rm -rf -- "$work"
  fi
}
trap cleanup EXIT

mkdir -p "$cache/debootstrap-$SUITE"
log "debootstrap $SUITE from $mirror"
debootstrap --variant=minbase --cache-dir="$cache/debootstrap-$SUITE" \
  --include="$PACKAGES" "$SUITE" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
log "debootstrap done after $((SECONDS - start))s"

# Our files over the base system (before the kernel, so its initramfs uses our settings).
cp -a --no-preserve=ownership "$guest/." "$root/"
chmod 0755 "$root/usr/local/sbin/benchcluster-identity" "$root/usr/local/sbin/benchcluster-growroot"

mount -t proc proc "$root/proc"
# No service may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"

chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  KERNEL_PACKAGE="$KERNEL_PACKAGE" PRUNED_MODULE_DIRS="$PRUNED_MODULE_DIRS" /bin/sh -eu > "$work/chroot.log" 2>&1 <<'CHROOT' \
  || { tail -n 40 "$work/chroot.log" >&2; log "configuring the image failed"; exit 1; }
apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-confdef "$KERNEL_PACKAGE"

for dir in $PRUNED_MODULE_DIRS; do rm -rf /lib/modules/*/kernel/$dir; done
# The initramfs was built by the kernel's installation, with guest/'s settings.
for version in $(ls /lib/modules); do depmod "$version"; done

systemctl set-default multi-user.target
systemctl enable benchcluster-identity.service benchcluster-growroot.service systemd-networkd.service ssh.service
systemctl disable systemd-networkd-wait-online.service
# Nothing periodic, nothing interactive on first boot, and none of the early units a
# VM without VGA, fuse, device mapper or persistent journal has no use for: under
# emulation each process started costs a few hundred milliseconds of boot.
systemctl mask systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer dpkg-db-backup.timer \
  systemd-tmpfiles-clean.timer getty@tty1.service systemd-pstore.service \
  modprobe@configfs.service modprobe@dm_mod.service modprobe@drm.service \
  modprobe@efi_pstore.service modprobe@fuse.service modprobe@loop.service \
  kmod-static-nodes.service systemd-network-generator.service \
  sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount \
  sys-fs-fuse-connections.mount systemd-journal-flush.service \
  systemd-update-utmp.service systemd-update-utmp-runlevel.service

# GRUB for BIOS: the core image goes into the gap before the partition (see below);
# its modules and grub.cfg (from guest/) live in /boot/grub.
mkdir -p /boot/grub/i386-pc
cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst /boot/grub/i386-pc/
grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2
cp /usr/lib/grub/i386-pc/boot.img /boot/grub/i386-pc/boot.img

# Per-VM things come from the seed and from the first boot, never from the image.
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
# debootstrap copied the build machine's name; a VM without a seed must not send it.
echo localhost > /etc/hostname
passwd -l root
apt-get clean
rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/locale/* /var/log/*.log /tmp/*
rm -f /usr/sbin/policy-rc.d
CHROOT
umount "$root/proc"
log "configured after $((SECONDS - start))s"

disk="$work/disk.raw"
sector=512
part_sectors=$(( DISK_SIZE_MIB * 1024 * 1024 / sector - PARTITION_START_SECTOR ))
truncate -s "${DISK_SIZE_MIB}M" "$disk"
printf 'label: dos\nstart=%s, size=%s, type=83, bootable\n' "$PARTITION_START_SECTOR" "$part_sectors" \
  | sfdisk --quiet "$disk"
# The root file system, written straight into the partition from the directory tree.
mke2fs -q -t ext4 -L bc-root -d "$root" -E "offset=$(( PARTITION_START_SECTOR * sector ))" \
  "$disk" "$(( part_sectors * sector / 1024 ))k"
# GRUB's boot sector (its code only, not the partition table), then the core image from
# sector 1: boot.img reads sector 1 and core.img's own block list (sectors 2.. in order)
# by default, which is exactly how they are laid out here.
core="$root/boot/grub/i386-pc/core.img"
core_sectors=$(( ($(stat -c %s "$core") + sector - 1) / sector ))
[ "$core_sectors" -lt "$PARTITION_START_SECTOR" ] || { log "core.img does not fit before the partition"; exit 1; }
dd if="$root/boot/grub/i386-pc/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$core" of="$disk" bs=$sector seek=1 conv=notrunc status=none

qemu-img convert -q -f raw -O qcow2 "$disk" "$work/image.qcow2"
mv "$work/image.qcow2" "$image"
log "built $image ($(du -h "$image" | cut -f1) on disk) in $((SECONDS - start))s"
echo "$image"
