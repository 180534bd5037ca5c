//! The kube-cel table: invalid variants of the examples, each breaking one cross-field rule that
//! the CRDs' CEL rules and `switchboard validate` both carry, with the field both must name.
//! Shared by operator/tests/examples.rs (CEL evaluated client-side) and tests/kubernetes_e2e.rs
//! (the real API server and the `switchboard validate` command).

use serde_json::{Value, json};

/// `(case, object, field named in both refusals)`, from the examples' manifests.
pub fn invalid_variants(manifests: &[Value]) -> Vec<(&'static str, Value, &'static str)> {
    let trunk = manifests.iter().find(|m| m["metadata"]["name"] == "skyetel-example").unwrap().clone();
    let number = manifests.iter().find(|m| m["metadata"]["name"] == "main-line").unwrap().clone();
    let inbound = manifests.iter().find(|m| m["metadata"]["name"] == "inbound-ai-agent").unwrap().clone();
    let outbound = manifests.iter().find(|m| m["metadata"]["name"] == "outbound-us").unwrap().clone();

    let mut cases: Vec<(&'static str, Value, &'static str)> = Vec::new();
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
    // Certificate authentication (mutual TLS) needs the client certificate's Secret.
    let mut certificate = trunk.clone();
    certificate["spec"]["authMethod"] = json!("certificate");
    certificate["spec"]["gateways"] = json!([{"address": "sip.example.com", "transport": "TLS"}]);
    cases.push(("certificate needs a client certificate", certificate.clone(), "needs a client certificate"));
    // ... and TLS gateways: the client certificate is sent over TLS only.
    certificate["spec"]["tls"] = json!({"clientCertSecretRef": {"name": "client-cert"}});
    certificate["spec"]["gateways"] = json!([{"address": "sip.example.com", "transport": "UDP"}]);
    cases.push(("certificate needs TLS gateways", certificate, "transport: TLS"));
    // Peer certificates (inbound mutual TLS) are only checked on a certificate-auth trunk.
    let mut peers_without_certificate = trunk.clone();
    peers_without_certificate["spec"]["tls"] = json!({"peerNames": ["sip.example.com"]});
    cases.push(("peer names need certificate auth", peers_without_certificate, "authMethod: certificate"));
    cases
}
