# benchcluster-controller, built from the Cargo workspace at the repository root with
# the committed Cargo.lock (every crate is fetched by its checksum in the lock file).
{ lib
, rustPlatform
, pkg-config
, makeBinaryWrapper
, libvirt
, openssh
}:
let
  root = ../.;
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "benchcluster-controller";
  inherit (cargoToml.workspace.package) version;

  # Only what cargo needs: the workspace manifests and every member's sources (cargo
  # reads all members' manifests even when it builds one package).
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../crd
      ../controller
      ../e2e
      ../xtask
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [ "--package" "benchcluster-controller" ];
  # The controller's unit tests: pure (planner, XML, parsers); the api and vm tiers
  # need a kube-apiserver and libvirtd and run in the repository's CI instead.
  cargoTestFlags = [ "--package" "benchcluster-controller" "--lib" ];

  nativeBuildInputs = [ pkg-config makeBinaryWrapper ];
  # The virt crate links libvirt.
  buildInputs = [ libvirt ];

  # The controller reaches guests with the system ssh client (openssh crate), also as
  # a jump host through the hypervisor (--ssh-jump-host).
  postInstall = ''
    wrapProgram $out/bin/benchcluster-controller \
      --prefix PATH : ${lib.makeBinPath [ openssh ]}
  '';

  meta = {
    description = "Reconciles BenchCluster resources into libvirt VMs forming kubeadm clusters";
    license = lib.licenses.asl20;
    mainProgram = "benchcluster-controller";
    platforms = lib.platforms.linux;
  };
}
