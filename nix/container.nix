# The controller as an OCI image (docker-archive tarball) for manifests/deployment.yaml:
#   nix build .#controller-image && docker load < result    (or: ctr -n k8s.io images import result)
# Named `benchcluster-controller:<version>`, the name the Deployment uses.
{ lib
, dockerTools
, runCommand
, cacert
, benchcluster-controller
}:
let
  # ssh refuses to run for a uid without a passwd entry ("No user exists for uid"):
  # the uid/gid the Deployment runs as (65532) gets one, with its home in the state
  # directory the Deployment mounts.
  etc = runCommand "benchcluster-controller-etc" { } ''
    mkdir -p $out/etc
    cat > $out/etc/passwd <<'PASSWD'
    root:x:0:0:root:/root:/sbin/nologin
    benchcluster:x:65532:65532:benchcluster-controller:/var/lib/benchcluster:/sbin/nologin
    nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
    PASSWD
    cat > $out/etc/group <<'GROUP'
    root:x:0:
    benchcluster:x:65532:
    nogroup:x:65534:
    GROUP
  '';
in
dockerTools.buildLayeredImage {
  name = "benchcluster-controller";
  tag = benchcluster-controller.version;
  contents = [ etc cacert ];
  # Mount points for the Deployment's volumes, so a read-only root file system works.
  extraCommands = ''
    mkdir -p tmp var/lib/benchcluster var/run/libvirt
    chmod 1777 tmp
  '';
  config = {
    Entrypoint = [ (lib.getExe benchcluster-controller) ];
    User = "65532:65532";
    Env = [
      "HOME=/var/lib/benchcluster"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
    ];
    ExposedPorts."8080/tcp" = { };
  };
}
