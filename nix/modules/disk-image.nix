# Turns a guest configuration into the qcow2 base image the controller's image pool
# holds, with nixpkgs' own disk-image module (nixos/lib/make-disk-image.nix underneath):
# a GPT disk with an EFI system partition and systemd-boot, root file system labelled
# `nixos` on /dev/vda2, grown to the overlay's size at boot (boot.growPartition and
# autoResize, below).
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

  # The root partition and file system grow to the node's overlay (its pool's `disk`) at
  # every boot, before kubelet reads the root file system's size as the Node's
  # ephemeral-storage capacity (docs/image-contract.md). nixpkgs' module above sets both
  # too (growPartition only as a default); set here as the contract depends on them.
  # fileSystems at the priority that module gives it, so the two definitions merge.
  boot.growPartition = true;
  fileSystems = lib.mkImageMediaOverride { "/".autoResize = true; };
}
