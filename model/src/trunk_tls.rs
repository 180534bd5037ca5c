//! A trunk's own TLS material (`spec.tls`): the client certificate the node presents to the
//! trunk's gateways (mutual TLS, `authMethod: certificate`) and the CA their certificates must
//! chain to. The operator resolves both from Secrets; nodes read them with the snapshot.

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row, postgres::PgRow};

use crate::decode::decode_rows;

/// The PEM material of one trunk's TLS settings, as stored in `trunk_tls`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrunkTls {
    pub namespace: String,
    pub trunk_name: String,
    /// Certificate chain (PEM) presented on the trunk's outbound TLS connections.
    pub client_cert_pem: Option<String>,
    /// Its private key (PEM); never printed.
    pub client_key_pem: Option<String>,
    /// CA certificates (PEM) the gateways' certificates must chain to, instead of the web PKI.
    pub ca_pem: Option<String>,
    pub client_secret_name: Option<String>,
    pub ca_secret_name: Option<String>,
}

impl std::fmt::Debug for TrunkTls {
    /// Never prints the key (nor the certificates, which are long): only where they came from.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrunkTls")
            .field("namespace", &self.namespace)
            .field("trunk_name", &self.trunk_name)
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("ca", &self.ca_pem.is_some())
            .field("client_secret_name", &self.client_secret_name)
            .field("ca_secret_name", &self.ca_secret_name)
            .finish_non_exhaustive()
    }
}

impl TrunkTls {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            namespace: row.try_get("namespace")?,
            trunk_name: row.try_get("trunk_name")?,
            client_cert_pem: row.try_get("client_cert_pem")?,
            client_key_pem: row.try_get("client_key_pem")?,
            ca_pem: row.try_get("ca_pem")?,
            client_secret_name: row.try_get("client_secret_name")?,
            ca_secret_name: row.try_get("ca_secret_name")?,
        })
    }

    /// Inserts or replaces the TLS material of a trunk.
    pub async fn upsert(&self, conn: &mut PgConnection, generation: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO trunk_tls (namespace, trunk_name, client_cert_pem, client_key_pem, ca_pem,
                client_secret_name, ca_secret_name, config_generation)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (namespace, trunk_name) DO UPDATE SET client_cert_pem = EXCLUDED.client_cert_pem,
                client_key_pem = EXCLUDED.client_key_pem, ca_pem = EXCLUDED.ca_pem,
                client_secret_name = EXCLUDED.client_secret_name, ca_secret_name = EXCLUDED.ca_secret_name,
                config_generation = EXCLUDED.config_generation, updated_at = now()",
        )
        .bind(&self.namespace)
        .bind(&self.trunk_name)
        .bind(&self.client_cert_pem)
        .bind(&self.client_key_pem)
        .bind(&self.ca_pem)
        .bind(&self.client_secret_name)
        .bind(&self.ca_secret_name)
        .bind(generation)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Removes a trunk's TLS material (the trunk no longer has `spec.tls`, or is gone).
    pub async fn delete(conn: &mut PgConnection, namespace: &str, trunk_name: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM trunk_tls WHERE namespace = $1 AND trunk_name = $2")
            .bind(namespace)
            .bind(trunk_name)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every stored trunk's TLS material.
    pub async fn load_all<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<Vec<Self>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT namespace, trunk_name, client_cert_pem, client_key_pem, ca_pem, client_secret_name,
                ca_secret_name FROM trunk_tls",
        )
        .fetch_all(executor)
        .await?;
        decode_rows(&rows, "TLS material of trunk", ["namespace", "trunk_name"], Self::from_row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_key() {
        let tls = TrunkTls {
            namespace: "default".into(),
            trunk_name: "main".into(),
            client_cert_pem: Some("-----BEGIN CERTIFICATE-----".into()),
            client_key_pem: Some("-----BEGIN PRIVATE KEY-----\nSECRETKEY".into()),
            ..TrunkTls::default()
        };
        let printed = format!("{tls:?}");
        assert!(!printed.contains("SECRETKEY") && !printed.contains("PRIVATE"), "{printed}");
        assert!(printed.contains("client_cert: true"), "{printed}");
    }

    /// A trunk's `tls.peerNames` and `tls.peerFingerprints` survive Postgres and the upsert; a
    /// row written before migration 0011 names no peers; a snapshot saved before the fields
    /// existed (the node's state directory) still loads.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn trunk_peers_round_trip_and_default_to_none(pool: sqlx::PgPool) {
        use crate::TrunkConfig;
        sqlx::query(
            "INSERT INTO trunks (namespace, name, provider, gateways, auth_method, registration_enabled,
                registration_expires, inbound_enabled, outbound_enabled, codecs, dtmf_relay, rtp_timeout_seconds,
                options_interval_seconds, failover_timeout_seconds, spec_hash, config_generation)
             VALUES ('default', 'old', 'acme', '[]', 'none', false, 3600, true, true, '{PCMU}', true, 30, 60, 5, 'h', 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let old = TrunkConfig::load_all(&pool).await.unwrap();
        assert!(old[0].tls_peer_names.is_empty() && old[0].tls_peer_fingerprints.is_empty());

        let mut trunk = TrunkConfig::loopback("mtls", [("127.0.0.1".to_string(), 5061)]);
        trunk.tls_peer_names = vec!["sip.carrier.example".into(), "sip:edge.carrier.example".into()];
        trunk.tls_peer_fingerprints = vec!["AB:".repeat(31) + "CD"];
        let mut conn = pool.acquire().await.unwrap();
        trunk.upsert(&mut conn, "h", 2).await.unwrap();
        trunk.tls_peer_names.pop();
        trunk.upsert(&mut conn, "h2", 3).await.unwrap();
        let stored = TrunkConfig::load_all(&pool).await.unwrap();
        let mtls = stored.iter().find(|t| t.name == "mtls").unwrap();
        assert_eq!(mtls, &trunk, "the upsert writes and updates both lists");

        let mut json = serde_json::to_value(&trunk).unwrap();
        let object = json.as_object_mut().unwrap();
        object.remove("tls_peer_names").expect("the field is serialized");
        object.remove("tls_peer_fingerprints").expect("the field is serialized");
        let saved: TrunkConfig = serde_json::from_value(json).unwrap();
        assert!(saved.tls_peer_names.is_empty() && saved.tls_peer_fingerprints.is_empty());
    }
}
