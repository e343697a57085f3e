# The Kubernetes version the controller is built and tested for, read from the one
# place it is pinned (e2e/versions.env), so the images can warn when nixpkgs' kubernetes
# package is of another minor version.
{ lib }:
let
  lines = lib.splitString "\n" (builtins.readFile ../e2e/versions.env);
  value = name:
    let
      line = lib.findFirst (l: lib.hasPrefix "${name}=" l) null lines;
    in
    if line == null
    then throw "e2e/versions.env does not set ${name}"
    else lib.removePrefix "${name}=" line;
in
{
  # Without the leading "v", as nixpkgs writes versions: "1.35.4".
  kubernetes = lib.removePrefix "v" (value "KUBERNETES_VERSION");
}
