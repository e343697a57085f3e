{
  description = "benchcluster: a Kubernetes controller for disposable kubeadm clusters of libvirt VMs, its NixOS service, and the NixOS VM images";

  # A release branch, not unstable (unstable once broke the etcd build for the people
  # this is for). No flake.lock is committed, because none can be produced without
  # network access: run `nix flake lock` once and commit the result (nix/README.md).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};

      # A guest image's NixOS system: the role module plus the qcow2 image module.
      guest = role: nixpkgs.lib.nixosSystem {
        modules = [
          { nixpkgs.hostPlatform = system; }
          self.nixosModules.${role}
          ./nix/modules/disk-image.nix
        ];
      };
    in
    {
      packages.${system} = {
        benchcluster-controller = pkgs.callPackage ./nix/package.nix { };
        default = self.packages.${system}.benchcluster-controller;
        controller-image = pkgs.callPackage ./nix/container.nix {
          inherit (self.packages.${system}) benchcluster-controller;
        };
        # result/benchcluster-master.qcow2 and result/benchcluster-worker.qcow2
        master-image = self.nixosConfigurations.master.config.system.build.image;
        worker-image = self.nixosConfigurations.worker.config.system.build.image;
      };

      nixosModules = {
        # services.benchcluster: the controller on the libvirt host.
        benchcluster = ./nix/service.nix;
        default = self.nixosModules.benchcluster;
        # The guest images: import master or worker (each imports guest-common).
        guest-common = ./nix/modules/guest-common.nix;
        master = ./nix/modules/master.nix;
        worker = ./nix/modules/worker.nix;
      };

      # The image builds' systems, also to inspect them:
      #   nix eval .#nixosConfigurations.worker.config.benchcluster.guest.preloadImages
      nixosConfigurations = {
        master = guest "master";
        worker = guest "worker";
      };

      overlays.default = final: _prev: {
        benchcluster-controller = final.callPackage ./nix/package.nix { };
      };

      devShells.${system}.default = pkgs.mkShell {
        inputsFrom = [ self.packages.${system}.benchcluster-controller ];
        packages = [
          pkgs.cargo
          pkgs.rustc
          pkgs.clippy
          pkgs.rustfmt
          pkgs.go
          pkgs.kubectl
          pkgs.libvirt
          pkgs.qemu
          pkgs.openssh
          pkgs.nixpkgs-fmt
          pkgs.deadnix
        ];
      };

      formatter.${system} = pkgs.nixpkgs-fmt;
    };
}
