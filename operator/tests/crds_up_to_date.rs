//! `crds/` must hold exactly what the Rust types generate. Regenerate with
//! `cargo run -- crds` (or run this test with `SWITCHBOARD_BLESS=1`).

use std::path::Path;

use switchboard_operator::crd::{all_crds, render_crd};

#[test]
fn checked_in_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let bless = std::env::var_os("SWITCHBOARD_BLESS").is_some();
    let mut stale = Vec::new();
    for (file, crd) in all_crds() {
        let path = dir.join(file);
        let expected = render_crd(&crd);
        if bless {
            std::fs::write(&path, &expected).unwrap();
            continue;
        }
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        if actual != expected {
            stale.push(file);
        }
    }
    assert!(stale.is_empty(), "crds/ is out of date for {stale:?}: run `cargo run -- crds` and commit the result");
}

#[test]
fn crds_carry_the_conventions() {
    for (_, crd) in all_crds() {
        let version = &crd.spec.versions[0];
        assert_eq!(crd.spec.group, "switchboard.dev");
        assert_eq!(version.name, "v1alpha1");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
        let columns: Vec<&str> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert!(columns.contains(&"Ready") && columns.contains(&"Age"), "{columns:?}");
        assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()));
        let schema = serde_json::to_string(&version.schema).unwrap();
        assert!(schema.contains("x-kubernetes-validations"), "CEL rules present in {}", crd.spec.names.kind);
    }
}
