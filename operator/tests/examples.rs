//! Every manifest in `examples/` is valid for every validation path: the folder source, the Rust
//! checks, and the CRD's CEL rules evaluated client-side (as the API server would). Invalid
//! variants are refused by both the Rust checks and CEL with the same field in the message.

use std::path::Path;

use switchboard_operator::crd::{PhoneNumber, RoutingRule, Trunk};
use switchboard_operator::source::folder::FolderSource;
use switchboard_operator::source::{Kind, ResourceKey, Spec};
use switchboard_operator::validate::{parse_spec, validate};

#[path = "support/invalid_variants.rs"]
mod invalid_variants;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn examples_read_cleanly_and_validate() {
    let state = FolderSource::new(examples()).read().expect("examples folder reads");
    assert!(state.problems.is_empty(), "{:?}", state.problems);
    assert!(state.broken.is_empty(), "{:?}", state.broken);
    let count = |kind| state.resources.iter().filter(|r| r.key.kind == kind).count();
    assert_eq!((count(Kind::Trunk), count(Kind::PhoneNumber), count(Kind::RoutingRule)), (2, 2, 2));
    assert_eq!(state.secrets.len(), 1);
    for resource in &state.resources {
        validate(&resource.key, &resource.spec).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn manifests() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
                out.push(value);
            }
        }
    }
    out
}

fn cel(object: &serde_json::Value) -> Result<(), String> {
    let result = match object["kind"].as_str() {
        Some("Trunk") => serde_json::from_value::<Trunk>(object.clone()).unwrap().validate_cel(),
        Some("PhoneNumber") => serde_json::from_value::<PhoneNumber>(object.clone()).unwrap().validate_cel(),
        Some("RoutingRule") => serde_json::from_value::<RoutingRule>(object.clone()).unwrap().validate_cel(),
        _ => return Ok(()),
    };
    result.map_err(|errors| format!("{errors:?}"))
}

#[test]
fn examples_pass_the_crd_cel_rules() {
    let manifests = manifests();
    assert!(manifests.len() >= 7);
    for manifest in &manifests {
        cel(manifest).unwrap_or_else(|e| panic!("{} fails CEL: {e}", manifest["metadata"]["name"]));
    }
}

fn rust_check(object: &serde_json::Value) -> Result<(), String> {
    let kind = match object["kind"].as_str().unwrap() {
        "Trunk" => Kind::Trunk,
        "PhoneNumber" => Kind::PhoneNumber,
        _ => Kind::RoutingRule,
    };
    let key =
        ResourceKey { kind, namespace: "default".into(), name: object["metadata"]["name"].as_str().unwrap().into() };
    let spec: Spec = parse_spec(&key, object["spec"].clone()).map_err(|e| e.to_string())?;
    validate(&key, &spec).map_err(|e| e.to_string())
}

/// A TLS gateway (on its default port and on 5060) passes both the CRD's CEL and the Rust
/// checks, now that the node speaks SIP over TLS.
#[test]
fn tls_gateways_pass_cel_and_rust() {
    let trunk = manifests().into_iter().find(|m| m["kind"] == "Trunk").expect("an example trunk");
    for port in [None, Some(5061), Some(5060)] {
        let mut tls = trunk.clone();
        tls["spec"]["gateways"][0]["transport"] = serde_json::json!("TLS");
        match port {
            Some(port) => tls["spec"]["gateways"][0]["port"] = serde_json::json!(port),
            None => _ = tls["spec"]["gateways"][0].as_object_mut().unwrap().remove("port"),
        }
        cel(&tls).unwrap_or_else(|e| panic!("TLS on {port:?} fails CEL: {e}"));
        rust_check(&tls).unwrap_or_else(|e| panic!("TLS on {port:?} fails the Rust checks: {e}"));
    }
}

/// Each invalid variant breaks one cross-field rule that both the CRD (CEL) and the Rust checks
/// carry; both must refuse it, naming the same thing. (tests/kubernetes_e2e.rs sends the same
/// table to a real API server.)
#[test]
fn cross_field_rules_agree_between_cel_and_rust() {
    let cases = invalid_variants::invalid_variants(&manifests());
    // Eleven: `transport: TLS` left the table when the node learnt SIP over TLS (see below),
    // certificate auth's refusal became its two requirements (client certificate, TLS gateways),
    // and inbound mutual TLS added peer names on a trunk that is not certificate-auth.
    assert_eq!(cases.len(), 11);
    for (name, object, needle) in cases {
        let from_cel = cel(&object).expect_err(name);
        let from_rust = rust_check(&object).expect_err(name);
        assert!(from_cel.contains(needle), "{name}: CEL said {from_cel}");
        assert!(from_rust.contains(needle), "{name}: Rust said {from_rust}");
    }
}
