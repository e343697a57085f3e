# Turns a guest configuration into the qcow2 base image the controller's image pool
# holds, with nixpkgs' own disk-image module (nixos/lib/make-disk-image.nix underneath):
# a GPT disk with an EFI system partition and systemd-boot, root file system labelled
# `nixos` on /dev/vda2, grown to the overlay's size at boot (boot.growPartition).
#
# UEFI, so a BenchCluster declares `firmware: uefi` for these images (q35 + OVMF).
# For a BIOS image set `image.efiSupport = false` (GRUB on /dev/vda, `firmware: bios`).
{ config, lib, modulesPath, ... }:
{
  imports = [ "${modulesPath}/virtualisation/disk-image.nix" ];

  image = {
    format = "qcow2";
    efiSupport = lib.mkDefault true;
    # result/benchcluster-<role>.qcow2
    baseName = "benchcluster-${
      if config.benchcluster.guest.role == "control-plane" then "master" else "worker"
    }";
  };
}
