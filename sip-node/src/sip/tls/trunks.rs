//! Per-trunk TLS client configurations (`spec.tls` of a Trunk): a trunk with its own CA
//! (`tls.caSecretRef`) verifies its gateways against that CA only, and a trunk with a client
//! certificate (`tls.clientCertSecretRef`, `authMethod: certificate`) presents it on its
//! outbound TLS connections. The configurations are built from the configuration snapshot
//! whenever its generation changes, keyed by the gateway host names of the trunk.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use switchboard_model::{Transport, TrunkTls};

use super::certs;
use crate::config::Snapshot;

/// A trunk's configuration, or why it could not be built (said on every connection attempt,
/// so that the trunk's `Reachable=False` names the Secret to fix).
pub(super) type HostConfig = Result<Arc<ClientConfig>, String>;

/// The host configurations of one snapshot generation.
#[derive(Default)]
pub(super) struct HostConfigs {
    pub generation: Option<i64>,
    pub by_host: HashMap<String, HostConfig>,
}

/// What a per-trunk configuration falls back on: the node's extra CAs and client certificate.
pub(super) struct Defaults<'a> {
    pub extra_ca: &'a [CertificateDer<'static>],
    pub client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
}

/// The configurations of every trunk with TLS material, by the host names of its TLS gateways
/// and its registrar. When two trunks share a host, the first trunk (by namespace and name) wins.
pub(super) fn host_configs(snapshot: &Snapshot, defaults: &Defaults<'_>) -> HostConfigs {
    let mut by_host = HashMap::new();
    let mut trunks: Vec<_> = snapshot.trunks().collect();
    trunks.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for trunk in trunks {
        let Some(tls) = snapshot.trunk_tls(&trunk.namespace, &trunk.name) else { continue };
        let config = trunk_config(tls, defaults).map(Arc::new).map_err(|problem| {
            tracing::warn!(trunk = %format!("{}/{}", trunk.namespace, trunk.name), %problem, "the trunk's TLS material is unusable");
            format!("the TLS material of trunk {}/{} is unusable: {problem}", trunk.namespace, trunk.name)
        });
        let hosts = trunk
            .gateways
            .iter()
            .filter(|g| g.transport == Transport::Tls)
            .map(|g| g.address.as_str())
            .chain(trunk.registrar_address.as_deref());
        for host in hosts {
            by_host.entry(host.trim_matches(['[', ']']).to_string()).or_insert_with(|| config.clone());
        }
    }
    HostConfigs { generation: Some(snapshot.generation()), by_host }
}

/// One trunk's client configuration: its CA (else the web PKI and the node's CAs) and its
/// client certificate (else the node's, if any).
pub(super) fn trunk_config(tls: &TrunkTls, defaults: &Defaults<'_>) -> Result<ClientConfig, String> {
    let what = |field: &str, secret: &Option<String>| format!("{field} of Secret {}", secret.as_deref().unwrap_or("?"));
    let (roots, web_pki) = match &tls.ca_pem {
        Some(pem) => {
            let name = what("ca.crt", &tls.ca_secret_name);
            (certs::parse_certs(pem.as_bytes(), &name).map_err(|e| e.to_string())?, false)
        }
        None => (defaults.extra_ca.to_vec(), true),
    };
    let resolver = match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert), Some(key)) => {
            let cert_name = what("tls.crt", &tls.client_secret_name);
            let key_name = what("tls.key", &tls.client_secret_name);
            let chain = certs::parse_certs(cert.as_bytes(), &cert_name).map_err(|e| e.to_string())?;
            let key = certs::parse_key(key.as_bytes(), &key_name).map_err(|e| e.to_string())?;
            let certified = certs::certified_key(chain, key, &cert_name, &key_name).map_err(|e| e.to_string())?;
            Some(Arc::new(FixedCert(Arc::new(certified))) as Arc<dyn rustls::client::ResolvesClientCert>)
        }
        (None, None) => defaults.client_cert.clone(),
        _ => return Err("a client certificate needs both tls.crt and tls.key".into()),
    };
    super::client::client_config(&roots, web_pki, resolver).map_err(|e| e.to_string())
}

/// A client certificate that never changes (a new Secret makes a new configuration).
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl std::fmt::Debug for FixedCert {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FixedCert")
    }
}

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use switchboard_model::GatewayConfig;

    use super::*;
    use crate::config::fixtures::trunk;

    use crate::sip::tls::tests::pki;

    fn gateway(address: &str, transport: Transport) -> GatewayConfig {
        GatewayConfig { address: address.into(), port: None, transport, priority: 10, weight: 100, enabled: true }
    }

    fn material(cert: &str, key: &str) -> TrunkTls {
        TrunkTls {
            namespace: "default".into(),
            trunk_name: "mtls".into(),
            client_cert_pem: Some(cert.into()),
            client_key_pem: Some(key.into()),
            client_secret_name: Some("mtls-client".into()),
            ..TrunkTls::default()
        }
    }

    fn snapshot(tls: TrunkTls) -> Snapshot {
        let mut mtls = trunk("default", "mtls");
        mtls.gateways =
            vec![gateway("sip.provider.test", Transport::Tls), gateway("udp.provider.test", Transport::Udp)];
        mtls.registrar_address = Some("registrar.provider.test".into());
        let other = trunk("default", "other");
        Snapshot::from_parts(7, vec![mtls, other], vec![], vec![], vec![]).unwrap().with_trunk_tls(vec![tls])
    }

    fn defaults() -> Defaults<'static> {
        Defaults { extra_ca: &[], client_cert: None }
    }

    /// The trunk's configuration serves its TLS gateways and its registrar, not its UDP
    /// gateways nor other trunks' hosts.
    #[test]
    fn a_trunks_configuration_serves_its_tls_gateways_and_registrar() {
        let ca = pki::Ca::new("provider CA");
        let leaf = ca.leaf(&["trunk.switchboard.test"]);
        let configs = host_configs(&snapshot(material(&leaf.cert_pem, &leaf.key_pem)), &defaults());
        assert_eq!(configs.generation, Some(7));
        let mut hosts: Vec<&str> = configs.by_host.keys().map(String::as_str).collect();
        hosts.sort();
        assert_eq!(hosts, ["registrar.provider.test", "sip.provider.test"]);
        let config = configs.by_host["sip.provider.test"].as_ref().expect("a usable configuration");
        assert!(config.client_auth_cert_resolver.has_certs(), "the trunk's client certificate is offered");
    }

    /// Unusable material is an error naming the trunk and the Secret (never the key's text).
    #[test]
    fn unusable_material_names_the_trunk_and_secret() {
        let configs = host_configs(&snapshot(material("garbage", "SECRET-KEY-TEXT")), &defaults());
        let problem = configs.by_host["sip.provider.test"].as_ref().expect_err("garbage is refused").clone();
        assert!(problem.contains("trunk default/mtls") && problem.contains("mtls-client"), "{problem}");
        assert!(!problem.contains("SECRET-KEY-TEXT"), "{problem}");

        let mut half = material("x", "y");
        half.client_key_pem = None;
        let problem = trunk_config(&half, &defaults()).expect_err("a certificate without its key");
        assert!(problem.contains("tls.crt and tls.key"), "{problem}");
    }
}
