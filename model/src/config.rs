//! Configuration rows: what the operator writes for each resource and what nodes load into
//! their snapshot. The SQL for both directions lives here so that the column lists exist once.

use ipnet::IpNet;
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row, postgres::PgRow};

use crate::decode::{
    column_error, decode_rows, opt_u16, opt_u32, parse_json, parse_opt_json, parse_text, to_i32, u32_col,
};

// The tables as a whole (row hashes, generation) live in `tables`; callers name them here too.
pub use crate::tables::{ConfigTable, StoredHash, bump_generation, notify_generation};
use crate::types::{AuthMethod, Codec, DestinationType, Direction, SrtpMode, TransferMode, Transport, TrunkSelection};

/// One provider address of a trunk. Failover tries gateways by ascending `priority` and spreads
/// calls by `weight` within a priority, as DNS SRV does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    pub address: String,
    /// `None`: resolve the address per RFC 3263 (SRV, then A/AAAA with the transport's port).
    pub port: Option<u16>,
    pub transport: Transport,
    pub priority: u16,
    pub weight: u16,
    pub enabled: bool,
}

/// Where a call goes: the inline destination of a number or the target of an inbound rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// `websocket` (AI agent), `sip` (a SIP URI), `number` (dial out through a trunk) or `reject`.
    #[serde(rename = "type")]
    pub kind: DestinationType,
    /// Agent URL for `websocket` (`ws://` or `wss://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// Target for `sip`, e.g. `sip:agent@10.0.0.5:5060`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub uri: Option<String>,
    /// E.164 number for `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\+[1-9][0-9]{1,14}$"))]
    pub number: Option<String>,
    /// Trunk to dial `number` through; defaults to the called number's own trunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub trunk_ref: Option<String>,
    /// SIP status for `reject` (4xx–6xx, default 603).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 400, max = 699))]
    pub reject_code: Option<u16>,
}

/// What an inbound or outbound rule matches. Empty lists match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchSpec {
    /// Called numbers (E.164) an inbound rule applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(regex(pattern = r"^\+[1-9][0-9]{1,14}$")))]
    pub numbers: Vec<String>,
    /// Regular expressions on the caller's number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub caller_patterns: Vec<String>,
    /// Regular expressions on the dialled number (outbound rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub destination_patterns: Vec<String>,
}

/// A trunk as stored: the validated, defaulted form of the `Trunk` resource's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrunkConfig {
    pub namespace: String,
    pub name: String,
    pub provider: String,
    pub display_name: Option<String>,
    pub suspended: bool,
    pub gateways: Vec<GatewayConfig>,
    pub registrar_address: Option<String>,
    pub registrar_port: Option<u16>,
    pub realm: Option<String>,
    pub auth_method: AuthMethod,
    pub registration_enabled: bool,
    pub registration_expires: u32,
    pub inbound_enabled: bool,
    pub allowed_source_cidrs: Vec<IpNet>,
    pub outbound_enabled: bool,
    pub dial_prefix: Option<String>,
    pub strip_digits: u32,
    pub prepend_digits: Option<String>,
    pub max_concurrent_calls: Option<u32>,
    pub calls_per_second: Option<u32>,
    pub codecs: Vec<Codec>,
    pub dtmf_relay: bool,
    /// SRTP on this trunk's legs (`media.srtp`). Defaulted when absent, so that a snapshot a
    /// node saved to its state directory before the field existed still loads.
    #[serde(default)]
    pub srtp: SrtpMode,
    /// Whether the provider takes REFER for transfers (`transfer`). Defaulted when absent, as
    /// `srtp` is.
    #[serde(default)]
    pub transfer: TransferMode,
    /// Names an inbound mutual-TLS peer of a certificate-auth trunk must carry (`tls.peerNames`:
    /// a DNS or `sip:` URI subject alternative name, or the subject CN of a certificate without
    /// either), its chain verified against the trunk's CA. Defaulted when absent, as `srtp` is,
    /// and left out when empty, so that the operator's hash of a trunk without peers (and so
    /// its stored row) does not change with this field's arrival.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_peer_names: Vec<String>,
    /// SHA-256 fingerprints (colon hex, upper case) of certificates admitted as they are
    /// (`tls.peerFingerprints`, pinning). Defaulted when absent, left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_peer_fingerprints: Vec<String>,
    pub rtp_timeout_seconds: u32,
    pub options_interval_seconds: u32,
    pub failover_timeout_seconds: u32,
    pub backup_trunks: Vec<String>,
    pub rate_outbound_per_minute: Decimal,
    pub rate_inbound_per_minute: Decimal,
    pub rate_per_message: Decimal,
    pub currency: String,
}

/// Digest credentials of a trunk, resolved from its Secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub namespace: String,
    pub trunk_name: String,
    pub username: String,
    pub password: String,
    pub secret_name: String,
}

impl std::fmt::Debug for Credential {
    /// Never prints the password, so that credentials can sit in logged structs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("namespace", &self.namespace)
            .field("trunk_name", &self.trunk_name)
            .field("username", &self.username)
            .field("secret_name", &self.secret_name)
            .finish_non_exhaustive()
    }
}

/// A phone number (DID) as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberConfig {
    pub namespace: String,
    pub name: String,
    pub number: String,
    pub trunk_ref: String,
    pub routing_rule_ref: Option<String>,
    pub destination: Option<Destination>,
    pub message_webhook: Option<String>,
    pub caller_id_allowed: bool,
}

/// A routing rule as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleConfig {
    pub namespace: String,
    pub name: String,
    pub direction: Direction,
    pub priority: i32,
    pub match_spec: MatchSpec,
    pub destination: Option<Destination>,
    pub trunks: Vec<String>,
    pub trunk_selection: TrunkSelection,
    pub status_callback: Option<String>,
}

impl TrunkConfig {
    /// Whether inbound requests on this trunk must come over TLS with a matching client
    /// certificate: a certificate-auth trunk that names its peers (`tls.peerNames` or
    /// `tls.peerFingerprints`). Without them it admits by source address, as before.
    pub fn requires_peer_certificate(&self) -> bool {
        self.auth_method == AuthMethod::Certificate
            && !(self.tls_peer_names.is_empty() && self.tls_peer_fingerprints.is_empty())
    }

    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let codecs: Vec<String> = row.try_get("codecs")?;
        let codecs = codecs
            .iter()
            .map(|c| c.parse::<Codec>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| column_error("codecs", e))?;
        Ok(Self {
            namespace: row.try_get("namespace")?,
            name: row.try_get("name")?,
            provider: row.try_get("provider")?,
            display_name: row.try_get("display_name")?,
            suspended: row.try_get("suspended")?,
            gateways: parse_json(row, "gateways")?,
            registrar_address: row.try_get("registrar_address")?,
            registrar_port: opt_u16(row, "registrar_port")?,
            realm: row.try_get("realm")?,
            auth_method: parse_text(row, "auth_method")?,
            registration_enabled: row.try_get("registration_enabled")?,
            registration_expires: u32_col(row, "registration_expires")?,
            inbound_enabled: row.try_get("inbound_enabled")?,
            allowed_source_cidrs: row.try_get("allowed_source_cidrs")?,
            outbound_enabled: row.try_get("outbound_enabled")?,
            dial_prefix: row.try_get("dial_prefix")?,
            strip_digits: u32_col(row, "strip_digits")?,
            prepend_digits: row.try_get("prepend_digits")?,
            max_concurrent_calls: opt_u32(row, "max_concurrent_calls")?,
            calls_per_second: opt_u32(row, "calls_per_second")?,
            codecs,
            dtmf_relay: row.try_get("dtmf_relay")?,
            srtp: parse_text(row, "srtp")?,
            transfer: parse_text(row, "transfer")?,
            tls_peer_names: row.try_get("tls_peer_names")?,
            tls_peer_fingerprints: row.try_get("tls_peer_fingerprints")?,
            rtp_timeout_seconds: u32_col(row, "rtp_timeout_seconds")?,
            options_interval_seconds: u32_col(row, "options_interval_seconds")?,
            failover_timeout_seconds: u32_col(row, "failover_timeout_seconds")?,
            backup_trunks: row.try_get("backup_trunks")?,
            rate_outbound_per_minute: row.try_get("rate_outbound_per_minute")?,
            rate_inbound_per_minute: row.try_get("rate_inbound_per_minute")?,
            rate_per_message: row.try_get("rate_per_message")?,
            currency: row.try_get("currency")?,
        })
    }

    /// Inserts or replaces the trunk's row, recording the hash of the spec it came from and the
    /// generation of the change.
    pub async fn upsert(&self, conn: &mut PgConnection, spec_hash: &str, generation: i64) -> Result<(), sqlx::Error> {
        let codecs: Vec<&str> = self.codecs.iter().map(|c| c.as_str()).collect();
        sqlx::query(
            "INSERT INTO trunks (namespace, name, provider, display_name, suspended, gateways,
                registrar_address, registrar_port, realm, auth_method, registration_enabled,
                registration_expires, inbound_enabled, allowed_source_cidrs, outbound_enabled,
                dial_prefix, strip_digits, prepend_digits, max_concurrent_calls, calls_per_second,
                codecs, dtmf_relay, rtp_timeout_seconds, options_interval_seconds,
                failover_timeout_seconds, backup_trunks, rate_outbound_per_minute,
                rate_inbound_per_minute, rate_per_message, currency, spec_hash, config_generation,
                srtp, transfer, tls_peer_names, tls_peer_fingerprints, updated_at)
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,
                $23,$24,$25,$26,$27,$28,$29,$30,$31,$32,$33,$34,$35,$36, now())
             ON CONFLICT (namespace, name) DO UPDATE SET
                provider = EXCLUDED.provider, display_name = EXCLUDED.display_name,
                suspended = EXCLUDED.suspended, gateways = EXCLUDED.gateways,
                registrar_address = EXCLUDED.registrar_address, registrar_port = EXCLUDED.registrar_port,
                realm = EXCLUDED.realm, auth_method = EXCLUDED.auth_method,
                registration_enabled = EXCLUDED.registration_enabled,
                registration_expires = EXCLUDED.registration_expires,
                inbound_enabled = EXCLUDED.inbound_enabled,
                allowed_source_cidrs = EXCLUDED.allowed_source_cidrs,
                outbound_enabled = EXCLUDED.outbound_enabled, dial_prefix = EXCLUDED.dial_prefix,
                strip_digits = EXCLUDED.strip_digits, prepend_digits = EXCLUDED.prepend_digits,
                max_concurrent_calls = EXCLUDED.max_concurrent_calls,
                calls_per_second = EXCLUDED.calls_per_second, codecs = EXCLUDED.codecs,
                dtmf_relay = EXCLUDED.dtmf_relay, rtp_timeout_seconds = EXCLUDED.rtp_timeout_seconds,
                options_interval_seconds = EXCLUDED.options_interval_seconds,
                failover_timeout_seconds = EXCLUDED.failover_timeout_seconds,
                backup_trunks = EXCLUDED.backup_trunks,
                rate_outbound_per_minute = EXCLUDED.rate_outbound_per_minute,
                rate_inbound_per_minute = EXCLUDED.rate_inbound_per_minute,
                rate_per_message = EXCLUDED.rate_per_message, currency = EXCLUDED.currency,
                spec_hash = EXCLUDED.spec_hash, config_generation = EXCLUDED.config_generation,
                srtp = EXCLUDED.srtp, transfer = EXCLUDED.transfer,
                tls_peer_names = EXCLUDED.tls_peer_names,
                tls_peer_fingerprints = EXCLUDED.tls_peer_fingerprints, updated_at = now()",
        )
        .bind(&self.namespace)
        .bind(&self.name)
        .bind(&self.provider)
        .bind(&self.display_name)
        .bind(self.suspended)
        .bind(serde_json::to_value(&self.gateways).expect("gateways serialize"))
        .bind(&self.registrar_address)
        .bind(self.registrar_port.map(i32::from))
        .bind(&self.realm)
        .bind(self.auth_method.as_str())
        .bind(self.registration_enabled)
        .bind(to_i32(self.registration_expires))
        .bind(self.inbound_enabled)
        .bind(&self.allowed_source_cidrs)
        .bind(self.outbound_enabled)
        .bind(&self.dial_prefix)
        .bind(to_i32(self.strip_digits))
        .bind(&self.prepend_digits)
        .bind(self.max_concurrent_calls.map(to_i32))
        .bind(self.calls_per_second.map(to_i32))
        .bind(&codecs)
        .bind(self.dtmf_relay)
        .bind(to_i32(self.rtp_timeout_seconds))
        .bind(to_i32(self.options_interval_seconds))
        .bind(to_i32(self.failover_timeout_seconds))
        .bind(&self.backup_trunks)
        .bind(self.rate_outbound_per_minute)
        .bind(self.rate_inbound_per_minute)
        .bind(self.rate_per_message)
        .bind(&self.currency)
        .bind(spec_hash)
        .bind(generation)
        .bind(self.srtp.as_str())
        .bind(self.transfer.as_str())
        .bind(&self.tls_peer_names)
        .bind(&self.tls_peer_fingerprints)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Every stored trunk. A row that does not decode fails the load with
    /// [`sqlx::Error::Decode`] naming the trunk (`trunk default/main: error decoding column ...`).
    pub async fn load_all<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<Vec<Self>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM trunks ORDER BY namespace, name").fetch_all(executor).await?;
        decode_rows(&rows, "trunk", ["namespace", "name"], Self::from_row)
    }
}

impl Credential {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            namespace: row.try_get("namespace")?,
            trunk_name: row.try_get("trunk_name")?,
            username: row.try_get("username")?,
            password: row.try_get("password")?,
            secret_name: row.try_get("secret_name")?,
        })
    }

    /// Inserts or replaces the credential of a trunk.
    pub async fn upsert(&self, conn: &mut PgConnection, generation: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO credentials (namespace, trunk_name, username, password, secret_name, config_generation)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (namespace, trunk_name) DO UPDATE SET username = EXCLUDED.username,
                password = EXCLUDED.password, secret_name = EXCLUDED.secret_name,
                config_generation = EXCLUDED.config_generation, updated_at = now()",
        )
        .bind(&self.namespace)
        .bind(&self.trunk_name)
        .bind(&self.username)
        .bind(&self.password)
        .bind(&self.secret_name)
        .bind(generation)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Removes a trunk's credential (the trunk no longer uses digest, or is gone).
    pub async fn delete(conn: &mut PgConnection, namespace: &str, trunk_name: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM credentials WHERE namespace = $1 AND trunk_name = $2")
            .bind(namespace)
            .bind(trunk_name)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every stored credential. A row that does not decode fails the load with
    /// [`sqlx::Error::Decode`] naming the trunk (`credential of trunk default/main: ...`).
    pub async fn load_all<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<Vec<Self>, sqlx::Error> {
        let rows = sqlx::query("SELECT namespace, trunk_name, username, password, secret_name FROM credentials")
            .fetch_all(executor)
            .await?;
        decode_rows(&rows, "credential of trunk", ["namespace", "trunk_name"], Self::from_row)
    }
}

impl NumberConfig {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            namespace: row.try_get("namespace")?,
            name: row.try_get("name")?,
            number: row.try_get("number")?,
            trunk_ref: row.try_get("trunk_ref")?,
            routing_rule_ref: row.try_get("routing_rule_ref")?,
            destination: parse_opt_json(row, "destination")?,
            message_webhook: row.try_get("message_webhook")?,
            caller_id_allowed: row.try_get("caller_id_allowed")?,
        })
    }

    /// Inserts or replaces the number's row.
    pub async fn upsert(&self, conn: &mut PgConnection, spec_hash: &str, generation: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO phone_numbers (namespace, name, number, trunk_ref, routing_rule_ref,
                destination, message_webhook, caller_id_allowed, spec_hash, config_generation)
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)
             ON CONFLICT (namespace, name) DO UPDATE SET number = EXCLUDED.number,
                trunk_ref = EXCLUDED.trunk_ref, routing_rule_ref = EXCLUDED.routing_rule_ref,
                destination = EXCLUDED.destination, message_webhook = EXCLUDED.message_webhook,
                caller_id_allowed = EXCLUDED.caller_id_allowed, spec_hash = EXCLUDED.spec_hash,
                config_generation = EXCLUDED.config_generation, updated_at = now()",
        )
        .bind(&self.namespace)
        .bind(&self.name)
        .bind(&self.number)
        .bind(&self.trunk_ref)
        .bind(&self.routing_rule_ref)
        .bind(self.destination.as_ref().map(|d| serde_json::to_value(d).expect("destination serializes")))
        .bind(&self.message_webhook)
        .bind(self.caller_id_allowed)
        .bind(spec_hash)
        .bind(generation)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Every stored number. A row that does not decode fails the load with
    /// [`sqlx::Error::Decode`] naming the resource (`phone number default/support: ...`).
    pub async fn load_all<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<Vec<Self>, sqlx::Error> {
        let rows = sqlx::query("SELECT * FROM phone_numbers ORDER BY number").fetch_all(executor).await?;
        decode_rows(&rows, "phone number", ["namespace", "name"], Self::from_row)
    }

    /// `(namespace, name, number)` of every stored number: who holds which number, so that a
    /// second resource claiming one can be refused.
    pub async fn holders(conn: &mut PgConnection) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        sqlx::query_as("SELECT namespace, name, number FROM phone_numbers").fetch_all(conn).await
    }
}

impl RuleConfig {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            namespace: row.try_get("namespace")?,
            name: row.try_get("name")?,
            direction: parse_text(row, "direction")?,
            priority: row.try_get("priority")?,
            match_spec: parse_json(row, "match_spec")?,
            destination: parse_opt_json(row, "destination")?,
            trunks: row.try_get("trunks")?,
            trunk_selection: parse_text(row, "trunk_selection")?,
            status_callback: row.try_get("status_callback")?,
        })
    }

    /// Inserts or replaces the rule's row.
    pub async fn upsert(&self, conn: &mut PgConnection, spec_hash: &str, generation: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO routing_rules (namespace, name, direction, priority, match_spec, destination,
                trunks, trunk_selection, status_callback, spec_hash, config_generation)
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)
             ON CONFLICT (namespace, name) DO UPDATE SET direction = EXCLUDED.direction,
                priority = EXCLUDED.priority, match_spec = EXCLUDED.match_spec,
                destination = EXCLUDED.destination, trunks = EXCLUDED.trunks,
                trunk_selection = EXCLUDED.trunk_selection, status_callback = EXCLUDED.status_callback,
                spec_hash = EXCLUDED.spec_hash, config_generation = EXCLUDED.config_generation,
                updated_at = now()",
        )
        .bind(&self.namespace)
        .bind(&self.name)
        .bind(self.direction.as_str())
        .bind(self.priority)
        .bind(serde_json::to_value(&self.match_spec).expect("match spec serializes"))
        .bind(self.destination.as_ref().map(|d| serde_json::to_value(d).expect("destination serializes")))
        .bind(&self.trunks)
        .bind(self.trunk_selection.as_str())
        .bind(&self.status_callback)
        .bind(spec_hash)
        .bind(generation)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Every stored rule, in evaluation order (priority, then name, then namespace). A row that
    /// does not decode fails the load with [`sqlx::Error::Decode`] naming the rule
    /// (`routing rule default/to-agent: ...`).
    pub async fn load_all<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<Vec<Self>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT * FROM routing_rules ORDER BY priority, name, namespace").fetch_all(executor).await?;
        decode_rows(&rows, "routing rule", ["namespace", "name"], Self::from_row)
    }
}

#[cfg(any(test, feature = "test-support"))]
impl TrunkConfig {
    /// A trunk for tests on loopback: `namespace` `default`, provider `testcarrier`, IP
    /// authentication from 127.0.0.1, inbound and outbound enabled, PCMU, no limits, no OPTIONS
    /// pings, one UDP gateway per `(address, port)` in priority order, a 5 s failover timeout
    /// and small rates. Tests change what they exercise with struct update syntax.
    pub fn loopback(name: &str, gateways: impl IntoIterator<Item = (String, u16)>) -> TrunkConfig {
        TrunkConfig {
            namespace: "default".into(),
            name: name.into(),
            provider: "testcarrier".into(),
            display_name: None,
            suspended: false,
            gateways: gateways
                .into_iter()
                .enumerate()
                .map(|(i, (address, port))| GatewayConfig {
                    address,
                    port: Some(port),
                    transport: Transport::Udp,
                    priority: u16::try_from(i).unwrap_or(u16::MAX),
                    weight: 1,
                    enabled: true,
                })
                .collect(),
            registrar_address: None,
            registrar_port: None,
            realm: None,
            auth_method: AuthMethod::Ip,
            registration_enabled: false,
            registration_expires: 3600,
            inbound_enabled: true,
            allowed_source_cidrs: vec![IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST))],
            outbound_enabled: true,
            dial_prefix: None,
            strip_digits: 0,
            prepend_digits: None,
            max_concurrent_calls: None,
            calls_per_second: None,
            codecs: vec![Codec::Pcmu],
            dtmf_relay: true,
            srtp: SrtpMode::Disabled,
            transfer: TransferMode::None,
            tls_peer_names: vec![],
            tls_peer_fingerprints: vec![],
            rtp_timeout_seconds: 60,
            options_interval_seconds: 0,
            failover_timeout_seconds: 5,
            backup_trunks: vec![],
            rate_outbound_per_minute: Decimal::new(12, 3),
            rate_inbound_per_minute: Decimal::new(6, 3),
            rate_per_message: Decimal::ZERO,
            currency: "USD".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trunk row with every required column; the caller breaks one of them.
    const INSERT_TRUNK: &str = "INSERT INTO trunks (namespace, name, provider, gateways, auth_method,
            registration_enabled, registration_expires, inbound_enabled, outbound_enabled, codecs, dtmf_relay,
            rtp_timeout_seconds, options_interval_seconds, failover_timeout_seconds, spec_hash, config_generation)
         VALUES ('default', 'main', 'acme', '[]', 'none', false, 3600, true, true, '{PCMU}', true, 30, 60, 5, 'h', 1)";

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn load_all_reads_inside_a_transaction_and_names_bad_rows(pool: sqlx::PgPool) {
        sqlx::query(INSERT_TRUNK).execute(&pool).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let trunks = TrunkConfig::load_all(&mut *tx).await.unwrap();
        assert_eq!(
            trunks.iter().map(|t| (t.name.as_str(), t.codecs.clone())).collect::<Vec<_>>(),
            [("main", vec![Codec::Pcmu])]
        );
        // Uncommitted writes of the same transaction are visible: the load runs on its connection.
        sqlx::query("UPDATE trunks SET codecs = '{PCMU,G729}'").execute(&mut *tx).await.unwrap();
        let error = TrunkConfig::load_all(&mut *tx).await.expect_err("G729 is not a codec");
        let sqlx::Error::Decode(problem) = &error else { panic!("expected a decode error, got {error}") };
        let problem = problem.to_string();
        assert!(problem.starts_with(r#"trunk default/main: error decoding column "codecs": "#), "{problem}");
        assert!(problem.contains("G729"), "{problem}");
        tx.rollback().await.unwrap();

        sqlx::query(
            r#"INSERT INTO routing_rules (namespace, name, direction, match_spec, spec_hash, config_generation)
               VALUES ('default', 'broken', 'inbound', '{"numbers": "not a list"}', 'h', 0)"#,
        )
        .execute(&pool)
        .await
        .unwrap();
        let error = RuleConfig::load_all(&pool).await.expect_err("match_spec is malformed").to_string();
        assert!(error.contains(r#"routing rule default/broken: error decoding column "match_spec": "#), "{error}");
        assert_eq!(TrunkConfig::load_all(&pool).await.unwrap().len(), 1, "the rollback kept the good row");
    }

    /// `srtp` survives the round trip through Postgres; a row written before migration 0008
    /// (no value) reads as disabled.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn srtp_round_trips_and_defaults_to_disabled(pool: sqlx::PgPool) {
        sqlx::query(INSERT_TRUNK).execute(&pool).await.unwrap();
        assert_eq!(TrunkConfig::load_all(&pool).await.unwrap()[0].srtp, SrtpMode::Disabled);
        let mut trunk = TrunkConfig::loopback("secure", [("127.0.0.1".to_string(), 5061)]);
        trunk.srtp = SrtpMode::Optional;
        let mut conn = pool.acquire().await.unwrap();
        trunk.upsert(&mut conn, "h", 2).await.unwrap();
        trunk.srtp = SrtpMode::Required;
        trunk.upsert(&mut conn, "h2", 3).await.unwrap();
        let stored = TrunkConfig::load_all(&pool).await.unwrap();
        let secure = stored.iter().find(|t| t.name == "secure").unwrap();
        assert_eq!(secure.srtp, SrtpMode::Required, "the upsert updates it");
        let bad = sqlx::query("UPDATE trunks SET srtp = 'off' WHERE name = 'secure'").execute(&pool).await;
        assert!(bad.is_err(), "the column takes the three modes only");
    }

    /// `transfer` survives the round trip through Postgres and its upsert; a row written
    /// before migration 0010 reads as `none`; the column takes the two modes only.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn transfer_round_trips_and_defaults_to_none(pool: sqlx::PgPool) {
        sqlx::query(INSERT_TRUNK).execute(&pool).await.unwrap();
        assert_eq!(TrunkConfig::load_all(&pool).await.unwrap()[0].transfer, TransferMode::None);
        let mut trunk = TrunkConfig::loopback("carrier", [("127.0.0.1".to_string(), 5060)]);
        let mut conn = pool.acquire().await.unwrap();
        trunk.upsert(&mut conn, "h", 2).await.unwrap();
        trunk.transfer = TransferMode::Refer;
        trunk.upsert(&mut conn, "h2", 3).await.unwrap();
        let stored = TrunkConfig::load_all(&pool).await.unwrap();
        let carrier = stored.iter().find(|t| t.name == "carrier").unwrap();
        assert_eq!(carrier.transfer, TransferMode::Refer, "the upsert updates it");
        let bad = sqlx::query("UPDATE trunks SET transfer = 'blind' WHERE name = 'carrier'").execute(&pool).await;
        assert!(bad.is_err(), "the column takes refer and none only");
        let mut json = serde_json::to_value(&trunk).unwrap();
        json.as_object_mut().unwrap().remove("transfer").expect("the field is serialized");
        let old: TrunkConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old.transfer, TransferMode::None, "a snapshot saved before the field loads");
    }

    /// A trunk serialized before `srtp` existed (a node's saved snapshot) reads as disabled.
    #[test]
    fn a_trunk_saved_without_srtp_reads_as_disabled() {
        let mut json = serde_json::to_value(TrunkConfig::loopback("old", [("127.0.0.1".to_string(), 5060)])).unwrap();
        json.as_object_mut().unwrap().remove("srtp").expect("the field is serialized");
        let trunk: TrunkConfig = serde_json::from_value(json).unwrap();
        assert_eq!(trunk.srtp, SrtpMode::Disabled);
    }
}
