//! Every manifest in `examples/` is valid for every validation path: the folder source, the Rust
//! checks, and the CRD's CEL rules evaluated client-side (as the API server would). Invalid
//! variants are refused by both the Rust checks and CEL with the same field in the message.

use std::path::Path;

use serde_json::json;
use switchboard_operator::crd::{PhoneNumber, RoutingRule, Trunk};
use switchboard_operator::source::folder::FolderSource;
use switchboard_operator::source::{Kind, ResourceKey, Spec};
use switchboard_operator::validate::{parse_spec, validate};

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

/// Each invalid variant breaks one cross-field rule that both the CRD (CEL) and the Rust checks
/// carry; both must refuse it, naming the same thing.
#[test]
fn cross_field_rules_agree_between_cel_and_rust() {
    let trunk = manifests().into_iter().find(|m| m["metadata"]["name"] == "skyetel-example").unwrap();
    let number = manifests().into_iter().find(|m| m["metadata"]["name"] == "main-line").unwrap();
    let inbound = manifests().into_iter().find(|m| m["metadata"]["name"] == "inbound-ai-agent").unwrap();
    let outbound = manifests().into_iter().find(|m| m["metadata"]["name"] == "outbound-us").unwrap();

    let mut cases: Vec<(&str, serde_json::Value, &str)> = Vec::new();
    let mut digest_without_credentials = trunk.clone();
    digest_without_credentials["spec"]["authMethod"] = json!("digest");
    cases.push(("digest needs credentials", digest_without_credentials, "credentials"));
    let mut ip_without_cidrs = trunk.clone();
    ip_without_cidrs["spec"]["inbound"]["allowedSourceCidrs"] = json!([]);
    cases.push(("ip auth needs cidrs", ip_without_cidrs, "allowedSourceCidrs"));
    let mut bad_cidr = trunk.clone();
    bad_cidr["spec"]["inbound"]["allowedSourceCidrs"] = json!(["10.0.0.0/33"]);
    cases.push(("bad cidr", bad_cidr, "CIDR"));
    let mut no_audio = trunk.clone();
    no_audio["spec"]["codecs"] = json!(["telephone-event"]);
    cases.push(("no audio codec", no_audio, "PCMU or PCMA"));
    let mut rule_and_destination = number.clone();
    rule_and_destination["spec"]["destination"] = json!({"type": "websocket", "url": "ws://agent"});
    cases.push(("rule and destination", rule_and_destination, "routingRuleRef"));
    let mut websocket_without_url = inbound.clone();
    websocket_without_url["spec"]["destination"] = json!({"type": "websocket"});
    cases.push(("websocket needs url", websocket_without_url, "url"));
    let mut outbound_without_trunks = outbound.clone();
    outbound_without_trunks["spec"]["trunks"] = json!([]);
    cases.push(("outbound needs trunks", outbound_without_trunks, "trunks"));
    let mut inbound_without_destination = inbound.clone();
    inbound_without_destination["spec"].as_object_mut().unwrap().remove("destination");
    cases.push(("inbound needs destination", inbound_without_destination, "destination"));

    let mut tls = trunk.clone();
    tls["spec"]["gateways"][0]["transport"] = json!("TLS");
    cases.push(("TLS is unsupported", tls, "TLS is not supported"));
    let mut certificate = trunk.clone();
    certificate["spec"]["authMethod"] = json!("certificate");
    cases.push(("certificate is unsupported", certificate, "authMethod certificate is not supported"));

    for (name, object, needle) in cases {
        let from_cel = cel(&object).expect_err(name);
        let from_rust = rust_check(&object).expect_err(name);
        assert!(from_cel.contains(needle), "{name}: CEL said {from_cel}");
        assert!(from_rust.contains(needle), "{name}: Rust said {from_rust}");
    }
}
