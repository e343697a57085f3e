# services.benchcluster: the controller as a systemd service on the libvirt host.
#
#   services.benchcluster = {
#     enable = true;
#     kubeconfig = "/etc/benchcluster/kubeconfig";   # the management cluster's
#   };
#
# It runs as its own system user in the libvirt group (the libvirt socket is
# root:libvirtd 0770 on NixOS), with the rest of the system read-only to it.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.benchcluster;
  stateDir = "/var/lib/benchcluster";

  args = [
    "--libvirt-uri=${cfg.libvirtUri}"
    "--image-pool=${cfg.imagePool}"
    "--node-pool=${cfg.nodePool}"
    "--domain-type=${cfg.domainType}"
    "--http-addr=${cfg.httpAddress}"
    "--log-format=${cfg.logFormat}"
    "--log-level=${cfg.logLevel}"
    "--state-dir=${stateDir}"
  ]
  ++ lib.optional (cfg.namespace != null) "--namespace=${cfg.namespace}"
  ++ lib.optional (cfg.sshJumpHost != null) "--ssh-jump-host=${cfg.sshJumpHost}"
  ++ lib.optionals cfg.leaderElection [
    "--leader-election"
    "--lease-namespace=${cfg.leaseNamespace}"
  ]
  ++ cfg.extraArgs;
in
{
  options.services.benchcluster = {
    enable = lib.mkEnableOption "benchcluster-controller, which turns BenchCluster resources into libvirt VMs forming kubeadm clusters";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The benchcluster-controller package.";
    };

    kubeconfig = lib.mkOption {
      type = lib.types.str;
      example = "/etc/benchcluster/kubeconfig";
      description = ''
        Path of the kubeconfig for the management cluster (where the BenchCluster
        resources are). A path on the host, never copied into the Nix store: it may
        stay readable by root only, systemd hands the service a copy (LoadCredential).
      '';
    };

    libvirtUri = lib.mkOption {
      type = lib.types.str;
      default = "qemu:///system";
      example = "qemu+ssh://bench@hypervisor/system";
      description = "libvirt connection URI. Taken from here, never from a BenchCluster.";
    };

    libvirtGroup = lib.mkOption {
      type = lib.types.str;
      default = "libvirtd";
      description = "Group owning the libvirt socket; the service user joins it.";
    };

    imagePool = lib.mkOption {
      type = lib.types.str;
      default = "benchcluster-images";
      description = "libvirt storage pool holding the base images (`spec.*.image.volume`).";
    };

    nodePool = lib.mkOption {
      type = lib.types.str;
      default = "benchcluster-nodes";
      description = "libvirt storage pool where the VMs' overlays and seed disks are created.";
    };

    domainType = lib.mkOption {
      type = lib.types.enum [ "kvm" "qemu" ];
      default = "kvm";
      description = "libvirt domain type: `kvm`, or `qemu` for software emulation.";
    };

    namespace = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Watch BenchClusters in this namespace only (default: all namespaces).";
    };

    httpAddress = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:8080";
      description = "Address of /metrics, /healthz and /readyz.";
    };

    logLevel = lib.mkOption {
      type = lib.types.str;
      default = "info";
      example = "benchcluster_controller=debug,info";
      description = "Log level or tracing filter (as RUST_LOG).";
    };

    logFormat = lib.mkOption {
      type = lib.types.enum [ "text" "json" ];
      default = "text";
      description = "Log format; the journal takes either.";
    };

    leaderElection = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Take a Lease before reconciling (when several controllers share a management cluster).";
    };

    leaseNamespace = lib.mkOption {
      type = lib.types.str;
      default = "benchcluster-system";
      description = "Namespace of the leader-election Lease.";
    };

    sshJumpHost = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "bench@hypervisor";
      description = "`user@host` to reach the VMs through, when they are only reachable from the hypervisor.";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "--lease-name=bench-a" ];
      description = "Further command-line arguments.";
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.benchcluster = {
      isSystemUser = true;
      group = "benchcluster";
      extraGroups = [ cfg.libvirtGroup ];
      home = stateDir;
      description = "benchcluster-controller";
    };
    users.groups.benchcluster = { };

    systemd.services.benchcluster = {
      description = "benchcluster-controller: BenchCluster resources to libvirt VMs and kubeadm clusters";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "libvirtd.service" "virtqemud.service" ];
      environment = {
        KUBECONFIG = "%d/kubeconfig";
        # ssh keeps ~/.ssh in the state directory.
        HOME = stateDir;
      };
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} ${lib.escapeShellArgs args}";
        User = "benchcluster";
        Group = "benchcluster";
        SupplementaryGroups = [ cfg.libvirtGroup ];
        LoadCredential = [ "kubeconfig:${cfg.kubeconfig}" ];
        StateDirectory = "benchcluster";
        StateDirectoryMode = "0700";
        UMask = "0077";
        Restart = "on-failure";
        RestartSec = 5;

        # Hardening that leaves what the controller needs: the libvirt socket
        # (AF_UNIX; connecting to a socket works on a read-only mount), TCP to the
        # management API and SSH to the VMs, and its state directory.
        NoNewPrivileges = true;
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
      };
    };
  };
}
