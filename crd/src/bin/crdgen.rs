//! Prints the BenchCluster CRD as YAML (what `manifests/crd.yaml` must contain).

use std::io::Write;

fn main() -> std::process::ExitCode {
    match benchcluster_crd::crd_yaml() {
        Ok(yaml) => {
            if std::io::stdout().write_all(yaml.as_bytes()).is_ok() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("cannot render the CRD: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
