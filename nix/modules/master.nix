# The control-plane role: the common guest plus the images of kubeadm's static pods,
# so `kubeadm init` (run by the controller with this VM's DHCP address as the
# advertise address) finds the control plane locally and pulls nothing.
{ ... }:
{
  imports = [ ./guest-common.nix ];

  benchcluster.guest = {
    role = "control-plane";
    preloadImages = [
      "kube-apiserver"
      "kube-controller-manager"
      "kube-scheduler"
      "etcd"
    ];
  };
}
