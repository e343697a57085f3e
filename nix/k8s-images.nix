# Container images for what kubeadm runs as pods (the control plane's static pods,
# kube-proxy, CoreDNS) and containerd's sandbox (pause), built from nixpkgs' packages
# with dockerTools: no registry is reached at build time or at run time.
#
# Each is a docker-archive tarball (gzip) whose single layer holds the binary copied
# (not linked) out of its package, so an image carries that binary and its own runtime
# closure, not the whole kubernetes package. Images are named
# `benchcluster.local/<name>:nix`; at boot the guest re-tags them under the names
# `kubeadm config images list` prints (modules/guest-common.nix), so kubeadm finds
# them whatever tags its version expects.
{ lib
, dockerTools
, runCommand
, buildEnv
, kubernetes
, etcd
, coredns
, iptables
, conntrack-tools
, iproute2
, kmod
}:
let
  # Where kubeadm's manifests expect the binaries: the static pods run a bare
  # `kube-apiserver` etc. (found on PATH), kube-proxy's DaemonSet runs
  # /usr/local/bin/kube-proxy.
  binDir = "/usr/local/bin";

  rootWith = name: binaries:
    runCommand "benchcluster-${name}-root" { } ''
      mkdir -p $out${binDir}
      ${lib.concatMapStrings (bin: ''
        install -m 0755 "$(readlink -f ${bin})" $out${binDir}/${baseNameOf bin}
      '') binaries}
    '';

  image = { name, binaries, extraContents ? [ ], entrypoint ? null }:
    dockerTools.buildImage {
      name = "benchcluster.local/${name}";
      tag = "nix";
      copyToRoot = [ (rootWith name binaries) ] ++ extraContents;
      config = {
        Env = [ "PATH=${binDir}:/bin" ];
      } // lib.optionalAttrs (entrypoint != null) { Entrypoint = entrypoint; };
    };

  # kube-proxy (iptables mode) runs iptables, ip6tables, iptables-restore and
  # conntrack itself: the same iptables as the host's, so both agree on the backend.
  proxyTools = buildEnv {
    name = "benchcluster-kube-proxy-tools";
    paths = [ iptables conntrack-tools iproute2 kmod ];
    pathsToLink = [ "/bin" ];
  };
in
{
  kube-apiserver = image {
    name = "kube-apiserver";
    binaries = [ "${kubernetes}/bin/kube-apiserver" ];
  };
  kube-controller-manager = image {
    name = "kube-controller-manager";
    binaries = [ "${kubernetes}/bin/kube-controller-manager" ];
  };
  kube-scheduler = image {
    name = "kube-scheduler";
    binaries = [ "${kubernetes}/bin/kube-scheduler" ];
  };
  kube-proxy = image {
    name = "kube-proxy";
    binaries = [ "${kubernetes}/bin/kube-proxy" ];
    extraContents = [ proxyTools ];
  };
  etcd = image {
    name = "etcd";
    binaries = [ "${etcd}/bin/etcd" ];
  };
  # kubeadm's CoreDNS Deployment passes only args: the image's entrypoint runs it.
  coredns = image {
    name = "coredns";
    binaries = [ "${coredns}/bin/coredns" ];
    entrypoint = [ "${binDir}/coredns" ];
  };
  pause = image {
    name = "pause";
    binaries = [ "${kubernetes.pause}/bin/pause" ];
    entrypoint = [ "${binDir}/pause" ];
  };
}
