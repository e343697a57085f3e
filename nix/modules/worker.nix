# The worker role: the common guest as it is. Workers run kube-proxy, CoreDNS (when
# scheduled there) and pods' sandboxes, whose images guest-common.nix preloads; they
# join with the token the controller mints on the control plane just in time.
{ ... }:
{
  imports = [ ./guest-common.nix ];

  benchcluster.guest.role = "worker";
}
