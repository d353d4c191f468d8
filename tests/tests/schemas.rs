//! The deployment files against their published schemas, with `tests/schemas/validate`
//! (PyPI `jsonschema` and `kubernetes-validate`, in the `.venv` of `scripts/setup`):
//!
//! - every resource of `deploy/istio` (the kustomization's resources, as `kustomize
//!   build` emits them): the Istio kinds against Istio's CRD schemas
//!   (`tests/schemas/istio/`), strict like `kubectl apply --validate=strict`; the
//!   Kubernetes kinds against Kubernetes' strict JSON schemas;
//! - `deploy/docker-compose.yml` and `deploy/docker-compose.native.yml` against the
//!   Compose Specification's schema.
//!
//! Negative controls: a field name with a typo, in an Istio resource, in a Kubernetes
//! resource and in the compose file, each fails the check and is named by it.

use std::path::Path;
use std::process::Command;

use tokengate_tests::harness::workspace_root;

/// `tests/schemas/validate ARGS`: (succeeded, its report).
fn validate(args: &[&str]) -> (bool, String) {
    let root = workspace_root();
    let output = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/schemas/validate"))
        .args(args)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run tests/schemas/validate (scripts/setup): {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

/// A copy of `deploy/istio` with `from` replaced by `to` (once) in `file`.
fn istio_copy_with(file: &str, from: &str, to: &str) -> tempfile::TempDir {
    let copy = tempfile::Builder::new()
        .prefix("tokengate-istio-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
    let source = workspace_root().join("deploy/istio");
    for entry in std::fs::read_dir(&source).unwrap_or_else(|e| panic!("{e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        if name == file {
            assert!(text.contains(from), "{file} has no {from:?}");
            text = text.replacen(from, to, 1);
        }
        std::fs::write(copy.path().join(&name), text).unwrap_or_else(|e| panic!("{e}"));
    }
    copy
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn istio_manifests_match_istio_and_kubernetes_schemas() {
    let (valid, report) = validate(&["istio", "deploy/istio"]);
    assert!(valid, "deploy/istio fails its schemas:\n{report}");
    let checked: Vec<&str> = report.lines().filter(|l| l.starts_with("ok ")).collect();
    for source in [
        "Istio CRD extensions.istio.io/v1alpha1",
        "Istio CRD networking.istio.io/v1",
        "Istio CRD security.istio.io/v1",
        "Kubernetes ",
    ] {
        assert!(
            checked.iter().any(|line| line.contains(source)),
            "nothing checked against {source}:\n{report}"
        );
    }
    assert!(
        checked.iter().any(|l| l.contains("WasmPlugin/"))
            && checked.iter().any(|l| l.contains("Deployment/")),
        "{report}"
    );
    // The one kind without a schema here is said so, not passed silently.
    let unchecked: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("unchecked "))
        .collect();
    assert_eq!(unchecked.len(), 1, "{report}");
    assert!(unchecked[0].contains("AuthorizationPolicy/"), "{report}");
}

#[test]
fn a_field_name_typo_in_a_manifest_fails_the_schema_check() {
    for (file, from, to, named) in [
        // A top-level field of an Istio resource.
        (
            "wasm-plugin.yaml",
            "failStrategy:",
            "failStrategi:",
            "'failStrategi' was unexpected",
        ),
        // A nested one.
        (
            "egress.yaml",
            "subjectAltNames:",
            "subjectAltName:",
            "'subjectAltName' was unexpected",
        ),
        // An optional field of a Kubernetes Deployment's container.
        (
            "companion.yaml",
            "readinessProbe:",
            "readinesProbe:",
            "readinesProbe",
        ),
    ] {
        let copy = istio_copy_with(file, from, to);
        let (valid, report) = validate(&["istio", &path_text(copy.path())]);
        assert!(!valid, "{file} with {to:?} passed:\n{report}");
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("FAIL ") && l.contains(file) && l.contains(named)),
            "{file}: the typo {to:?} is named:\n{report}"
        );
    }
}

#[test]
fn compose_files_match_the_compose_specification_and_a_typo_fails() {
    let (valid, report) = validate(&[
        "compose",
        "deploy/docker-compose.yml",
        "deploy/docker-compose.native.yml",
    ]);
    assert!(valid, "{report}");

    let broken = tempfile::Builder::new()
        .prefix("tokengate-compose-")
        .suffix(".yml")
        .tempfile()
        .unwrap_or_else(|e| panic!("{e}"));
    let compose = std::fs::read_to_string(workspace_root().join("deploy/docker-compose.yml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(compose.contains("    healthcheck:"));
    std::fs::write(
        broken.path(),
        compose.replacen("    healthcheck:", "    health_check:", 1),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (valid, report) = validate(&["compose", &path_text(broken.path())]);
    assert!(!valid, "a compose file with health_check passed:\n{report}");
    assert!(report.contains("'health_check'"), "{report}");
}
