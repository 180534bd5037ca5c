//! The reconcile core: desired state in, rows out.
//!
//! A pass takes the complete desired state of a source (level-triggered: a restart converges to
//! the source's contents), compares it with what is stored, and writes only the difference in
//! **one transaction**: the rows, one bump of the configuration generation, the resource statuses
//! and a `NOTIFY` that nodes receive at commit. A pass that fails (the database went away) rolls
//! back as a whole and can simply be retried.
//!
//! Rules the pass follows:
//! - a resource that is invalid keeps its last good rows; its status says what is wrong;
//! - a reference that does not resolve (a number whose trunk is missing) is stored anyway, with
//!   `Ready=False` and a reason, and becomes ready when the reference appears;
//! - a number claimed by two resources stays with the one that holds it (or, for two new claims,
//!   the first in the source's order); the other gets `DuplicateNumber`;
//! - resources that are gone from the source lose their rows, unless they came from a unit the
//!   source could not read (a file with a YAML syntax error).

mod mapping;
pub mod status;
mod tls;

use std::collections::{BTreeSet, HashMap, HashSet};

use sqlx::{PgConnection, PgPool};
use switchboard_model::Direction;
use switchboard_model::config::{
    self as rows, ConfigTable, Credential, NumberConfig, RuleConfig, StoredHash, TrunkConfig,
};

pub(crate) use mapping::{fingerprint, number_config, rule_config, trunk_config, trunk_credential};
pub use status::ResourceStatus;
use status::{StoredStatus, reason};

use crate::source::{DesiredState, Kind, ResourceKey, Spec};
use crate::validate;

/// Advisory lock that serialises reconcile passes of every process (two local runners, operator
/// replicas during a leader hand-over).
const RECONCILE_LOCK: i64 = 0x5357_4243_4f4e_4647; // "SWBCONFG"

/// Errors of a reconcile pass. A failed pass wrote nothing (its transaction rolled back) and can
/// be retried as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database unavailable during reconcile (nothing was written; retrying is safe): {0}")]
    Database(#[from] sqlx::Error),
}

/// What a reconcile pass did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    /// The configuration generation after the pass (unchanged when nothing changed).
    pub generation: i64,
    /// Resources whose rows were written.
    pub changed: Vec<ResourceKey>,
    /// Resources whose rows were deleted.
    pub deleted: Vec<ResourceKey>,
    /// Resources that are not ready, with reason and message.
    pub not_ready: Vec<(ResourceKey, String, String)>,
    /// Status rows written.
    pub statuses_written: usize,
    /// The status of every resource the source mentioned, as stored after the pass.
    pub statuses: Vec<ResourceStatus>,
}

/// Writes desired state into Postgres.
#[derive(Clone)]
pub struct Reconciler {
    pool: PgPool,
}

/// What is stored now, read at the start of a pass inside its transaction.
struct Stored {
    hashes: HashMap<ResourceKey, StoredHash>,
    numbers: HashMap<String, ResourceKey>,
    number_of: HashMap<ResourceKey, String>,
    statuses: HashMap<ResourceKey, StoredStatus>,
}

impl Stored {
    async fn load(conn: &mut PgConnection) -> Result<Self, sqlx::Error> {
        let mut hashes = HashMap::new();
        for (kind, table) in [
            (Kind::Trunk, ConfigTable::Trunks),
            (Kind::PhoneNumber, ConfigTable::PhoneNumbers),
            (Kind::RoutingRule, ConfigTable::RoutingRules),
        ] {
            for hash in table.hashes(&mut *conn).await? {
                let key = ResourceKey { kind, namespace: hash.namespace.clone(), name: hash.name.clone() };
                hashes.insert(key, hash);
            }
        }
        let mut numbers = HashMap::new();
        let mut number_of = HashMap::new();
        for (namespace, name, number) in NumberConfig::holders(&mut *conn).await? {
            let key = ResourceKey { kind: Kind::PhoneNumber, namespace, name };
            numbers.insert(number.clone(), key.clone());
            number_of.insert(key, number);
        }
        let statuses = status::load(conn).await?;
        Ok(Self { hashes, numbers, number_of, statuses })
    }
}

/// The generation a status reports for a resource's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowGeneration {
    /// Rows written by this pass.
    New,
    Stored(i64),
    Absent,
}

/// A status computed before the pass knows its new generation.
struct PendingStatus {
    key: ResourceKey,
    observed_generation: Option<i64>,
    origin: String,
    rows: RowGeneration,
    /// `None`: ready. `Some((reason, message))`: not ready.
    problem: Option<(&'static str, String)>,
}

/// Everything a pass will write, computed without touching the database.
#[derive(Default)]
struct Plan {
    trunks: Vec<(TrunkConfig, Option<Credential>, String)>,
    /// The TLS material of the trunks in `trunks` (namespace, name, what to do with the row).
    trunk_tls: Vec<(String, String, tls::TlsRow)>,
    numbers: Vec<(NumberConfig, String)>,
    rules: Vec<(RuleConfig, String)>,
    /// Number rows removed before any insert, so that a number can move between resources.
    numbers_released: Vec<ResourceKey>,
    deletions: Vec<ResourceKey>,
    statuses: Vec<PendingStatus>,
}

impl Plan {
    fn writes_rows(&self) -> bool {
        !(self.trunks.is_empty()
            && self.numbers.is_empty()
            && self.rules.is_empty()
            && self.numbers_released.is_empty()
            && self.deletions.is_empty())
    }
}

fn stored_rows(stored: &Stored, key: &ResourceKey) -> RowGeneration {
    stored.hashes.get(key).map_or(RowGeneration::Absent, |h| RowGeneration::Stored(h.config_generation))
}

/// Decides what to write. Pure: the unit tests (`tests.rs`) drive it with plain values.
fn plan(state: &DesiredState, stored: &Stored) -> Plan {
    let mut plan = Plan::default();
    let unchanged = |key: &ResourceKey, hash: &str| stored.hashes.get(key).is_some_and(|h| h.spec_hash == hash);

    // Every key the source mentions, valid or not: only the others may be deleted.
    let mut mentioned: HashSet<&ResourceKey> = state.resources.iter().map(|r| &r.key).collect();
    mentioned.extend(state.broken.iter().map(|b| &b.key));
    let protected: HashSet<&str> = state.unreadable_origins.iter().map(String::as_str).collect();

    // Invalid resources keep their rows; their status says why.
    let mut valid = Vec::new();
    for broken in &state.broken {
        plan.statuses.push(invalid_status(
            stored,
            &broken.key,
            broken.generation,
            &broken.origin,
            broken.message.clone(),
        ));
    }
    for resource in &state.resources {
        match validate::validate(&resource.key, &resource.spec) {
            Ok(()) => valid.push(resource),
            Err(invalid) => {
                let reason = if invalid.only_unsupported() { reason::UNSUPPORTED } else { reason::INVALID_SPEC };
                let mut status = invalid_status(
                    stored,
                    &resource.key,
                    resource.generation,
                    &resource.origin,
                    format!("{}: {invalid}", resource.origin),
                );
                if let Some(problem) = status.problem.as_mut() {
                    problem.0 = reason;
                }
                plan.statuses.push(status);
            }
        }
    }

    // Deletions: stored resources the source no longer has.
    let mut gone: BTreeSet<&ResourceKey> = stored.hashes.keys().chain(stored.statuses.keys()).collect();
    gone.retain(|key| !mentioned.contains(key));
    for key in gone {
        let origin = stored.statuses.get(key).and_then(|s| s.origin.as_deref());
        if origin.is_some_and(|o| protected.contains(o)) {
            continue;
        }
        plan.deletions.push(key.clone());
    }
    let deleted: HashSet<&ResourceKey> = plan.deletions.iter().collect();

    // Names that will have rows after the pass, for reference checks.
    let mut present: HashSet<(Kind, &str, &str)> = stored
        .hashes
        .keys()
        .filter(|k| !deleted.contains(k))
        .map(|k| (k.kind, k.namespace.as_str(), k.name.as_str()))
        .collect();
    let mut rule_direction: HashMap<(&str, &str), Direction> = HashMap::new();
    for resource in &valid {
        present.insert((resource.key.kind, &resource.key.namespace, &resource.key.name));
        if let Spec::RoutingRule(spec) = &resource.spec {
            rule_direction.insert((&resource.key.namespace, &resource.key.name), spec.direction);
        }
    }
    let trunk_exists = |ns: &str, name: &str| present.contains(&(Kind::Trunk, ns, name));

    // Numbers: who holds which number after the pass.
    let valid_by_key: HashMap<&ResourceKey, &Spec> = valid.iter().map(|r| (&r.key, &r.spec)).collect();
    let mut claims: HashMap<&str, &ResourceKey> = HashMap::new();
    for (number, key) in &stored.numbers {
        let kept_invalid = mentioned.contains(key) && !valid_by_key.contains_key(key);
        let unchanged_valid = matches!(valid_by_key.get(key), Some(Spec::PhoneNumber(spec)) if &spec.number == number);
        let protected_gone = !mentioned.contains(key) && !deleted.contains(key);
        if kept_invalid || unchanged_valid || protected_gone {
            claims.insert(number.as_str(), key);
        }
    }
    let mut refused: Vec<&ResourceKey> = Vec::new();
    let mut duplicate_of: HashMap<&ResourceKey, &ResourceKey> = HashMap::new();
    for resource in &valid {
        let Spec::PhoneNumber(spec) = &resource.spec else { continue };
        match claims.get(spec.number.as_str()) {
            Some(holder) if *holder != &resource.key => {
                refused.push(&resource.key);
                duplicate_of.insert(&resource.key, holder);
            }
            _ => {
                claims.insert(&spec.number, &resource.key);
            }
        }
    }
    // A refused resource keeps its previous number if nobody took it meanwhile.
    for key in &refused {
        if let Some(old) = stored.number_of.get(*key) {
            match claims.get(old.as_str()) {
                None => {
                    claims.insert(old, key);
                }
                Some(holder) if holder == key => {}
                Some(_) => plan.numbers_released.push((*key).clone()),
            }
        }
    }

    for resource in &valid {
        let key = &resource.key;
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        let mut problem: Option<(&'static str, String)> = None;
        let mut rows = stored_rows(stored, key);
        match &resource.spec {
            Spec::Trunk(spec) => {
                let secret = |secret: &str| state.secrets.get(&(ns.to_string(), secret.to_string())).cloned();
                let credential = match trunk_credential(ns, name, spec, secret) {
                    Ok(credential) => credential,
                    Err(error) => {
                        problem =
                            Some((reason::SECRET_NOT_FOUND, format!("{error}; the last stored password stays in use")));
                        None
                    }
                };
                let missing: Vec<&str> =
                    spec.backup_trunks.iter().map(String::as_str).filter(|b| !trunk_exists(ns, b)).collect();
                if problem.is_none() && !missing.is_empty() {
                    problem = Some((
                        reason::TRUNK_NOT_FOUND,
                        format!(
                            "backup trunk(s) {} do not exist in namespace {ns}; create them or remove them from backupTrunks",
                            missing.join(", ")
                        ),
                    ));
                }
                let tls = match tls::trunk_tls(ns, name, spec, secret) {
                    Ok(Some(row)) => tls::TlsRow::Write(row),
                    Ok(None) => tls::TlsRow::Absent,
                    Err(error) => {
                        if problem.is_none() {
                            problem = Some((
                                reason::SECRET_NOT_FOUND,
                                format!("{error}; the last stored TLS material stays in use"),
                            ));
                        }
                        tls::TlsRow::KeepLast
                    }
                };
                let config = trunk_config(ns, name, spec);
                let hash = tls::fingerprint_with_tls(fingerprint(&config, credential.as_ref()), tls.row());
                if !unchanged(key, &hash) {
                    plan.trunk_tls.push((ns.to_string(), name.to_string(), tls));
                    plan.trunks.push((config, credential, hash));
                    rows = RowGeneration::New;
                }
            }
            Spec::PhoneNumber(spec) => {
                if let Some(holder) = duplicate_of.get(key) {
                    problem = Some((
                        reason::DUPLICATE_NUMBER,
                        format!(
                            "{} is already used by PhoneNumber {}/{}; a number can belong to one resource only: remove it from one of them",
                            spec.number, holder.namespace, holder.name
                        ),
                    ));
                    if plan.numbers_released.contains(key) {
                        rows = RowGeneration::Absent;
                    }
                } else {
                    problem = number_problem(spec, ns, &trunk_exists, &rule_direction, &present);
                    let config = number_config(ns, name, spec);
                    let hash = fingerprint(&config, None);
                    if !unchanged(key, &hash) {
                        if stored.number_of.get(key).is_some_and(|old| old != &spec.number) {
                            plan.numbers_released.push(key.clone());
                        }
                        plan.numbers.push((config, hash));
                        rows = RowGeneration::New;
                    }
                }
            }
            Spec::RoutingRule(spec) => {
                let mut missing: Vec<&str> =
                    spec.trunks.iter().map(String::as_str).filter(|t| !trunk_exists(ns, t)).collect();
                if let Some(trunk) = spec.destination.as_ref().and_then(|d| d.trunk_ref.as_deref())
                    && !trunk_exists(ns, trunk)
                {
                    missing.push(trunk);
                }
                if !missing.is_empty() {
                    problem = Some((
                        reason::TRUNK_NOT_FOUND,
                        format!(
                            "trunk(s) {} do not exist in namespace {ns}; create them or fix the names",
                            missing.join(", ")
                        ),
                    ));
                }
                let config = rule_config(ns, name, spec);
                let hash = fingerprint(&config, None);
                if !unchanged(key, &hash) {
                    plan.rules.push((config, hash));
                    rows = RowGeneration::New;
                }
            }
        }
        plan.statuses.push(PendingStatus {
            key: key.clone(),
            observed_generation: resource.generation,
            origin: resource.origin.clone(),
            rows,
            problem,
        });
    }
    plan
}

fn invalid_status(
    stored: &Stored,
    key: &ResourceKey,
    generation: Option<i64>,
    origin: &str,
    message: String,
) -> PendingStatus {
    let rows = stored_rows(stored, key);
    let message = match rows {
        RowGeneration::Stored(_) => format!("{message}; the last valid configuration stays in force"),
        _ => message,
    };
    PendingStatus {
        key: key.clone(),
        observed_generation: generation,
        origin: origin.to_string(),
        rows,
        problem: Some((reason::INVALID_SPEC, message)),
    }
}

fn number_problem(
    spec: &crate::crd::PhoneNumberSpec,
    ns: &str,
    trunk_exists: &dyn Fn(&str, &str) -> bool,
    rule_direction: &HashMap<(&str, &str), Direction>,
    present: &HashSet<(Kind, &str, &str)>,
) -> Option<(&'static str, String)> {
    if !trunk_exists(ns, &spec.trunk_ref) {
        return Some((
            reason::TRUNK_NOT_FOUND,
            format!("Trunk {ns}/{} does not exist; create it or fix trunkRef", spec.trunk_ref),
        ));
    }
    if let Some(trunk) = spec.destination.as_ref().and_then(|d| d.trunk_ref.as_deref())
        && !trunk_exists(ns, trunk)
    {
        return Some((
            reason::TRUNK_NOT_FOUND,
            format!("Trunk {ns}/{trunk} (destination.trunkRef) does not exist; create it or fix the name"),
        ));
    }
    if let Some(rule) = &spec.routing_rule_ref {
        if !present.contains(&(Kind::RoutingRule, ns, rule.as_str())) {
            return Some((
                reason::ROUTING_RULE_NOT_FOUND,
                format!("RoutingRule {ns}/{rule} does not exist; create it or fix routingRuleRef"),
            ));
        }
        if rule_direction.get(&(ns, rule.as_str())) == Some(&Direction::Outbound) {
            return Some((
                reason::ROUTING_RULE_NOT_INBOUND,
                format!("RoutingRule {ns}/{rule} is an outbound rule; point routingRuleRef at an inbound rule"),
            ));
        }
    }
    None
}

impl Reconciler {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool the reconciler writes to.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Converges the database to `state`, the complete desired state of a source.
    pub async fn reconcile_all(&self, state: &DesiredState) -> Result<ReconcileReport, ReconcileError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(RECONCILE_LOCK).execute(&mut *tx).await?;
        let stored = Stored::load(&mut tx).await?;
        let plan = plan(state, &stored);

        let mut report = ReconcileReport::default();
        let generation = if plan.writes_rows() {
            let generation = rows::bump_generation(&mut tx).await?;
            self.write_rows(&mut tx, &plan, generation, &mut report).await?;
            rows::notify_generation(&mut tx, generation).await?;
            generation
        } else {
            switchboard_model::db::current_generation(&mut *tx).await?
        };
        report.generation = generation;

        let statuses: Vec<ResourceStatus> = plan
            .statuses
            .into_iter()
            .map(|pending| {
                let config_generation = match pending.rows {
                    RowGeneration::New => Some(generation),
                    RowGeneration::Stored(g) => Some(g),
                    RowGeneration::Absent => None,
                };
                let (ready, reason, message) = match pending.problem {
                    None => (
                        true,
                        reason::RECONCILED.to_string(),
                        format!("stored in config generation {}", config_generation.unwrap_or(generation)),
                    ),
                    Some((reason, message)) => {
                        report.not_ready.push((pending.key.clone(), reason.to_string(), message.clone()));
                        (false, reason.to_string(), message)
                    }
                };
                ResourceStatus {
                    key: pending.key,
                    observed_generation: pending.observed_generation,
                    ready,
                    reason,
                    message,
                    origin: pending.origin,
                    config_generation,
                }
            })
            .collect();
        report.statuses_written = status::write_changed(&mut tx, &statuses, &stored.statuses).await?;
        for key in &report.deleted {
            status::delete(&mut tx, key).await?;
        }
        tx.commit().await?;
        report.statuses = statuses;
        Ok(report)
    }

    async fn write_rows(
        &self,
        conn: &mut PgConnection,
        plan: &Plan,
        generation: i64,
        report: &mut ReconcileReport,
    ) -> Result<(), sqlx::Error> {
        for key in &plan.deletions {
            delete_rows(&mut *conn, key).await?;
            report.deleted.push(key.clone());
        }
        for key in &plan.numbers_released {
            ConfigTable::PhoneNumbers.delete(&mut *conn, &key.namespace, &key.name).await?;
        }
        for (namespace, name, tls) in &plan.trunk_tls {
            match tls {
                tls::TlsRow::Write(row) => row.upsert(&mut *conn, generation).await?,
                tls::TlsRow::Absent => {
                    switchboard_model::TrunkTls::delete(&mut *conn, namespace, name).await?;
                }
                tls::TlsRow::KeepLast => {}
            }
        }
        for (config, credential, hash) in &plan.trunks {
            config.upsert(&mut *conn, hash, generation).await?;
            if let Some(credential) = credential {
                credential.upsert(&mut *conn, generation).await?;
            } else if config.auth_method != switchboard_model::AuthMethod::Digest && !config.registration_enabled {
                // Credentials are no longer used; a missing Secret keeps the last one instead.
                Credential::delete(&mut *conn, &config.namespace, &config.name).await?;
            }
            report.changed.push(ResourceKey {
                kind: Kind::Trunk,
                namespace: config.namespace.clone(),
                name: config.name.clone(),
            });
        }
        for (config, hash) in &plan.rules {
            config.upsert(&mut *conn, hash, generation).await?;
            report.changed.push(ResourceKey {
                kind: Kind::RoutingRule,
                namespace: config.namespace.clone(),
                name: config.name.clone(),
            });
        }
        for (config, hash) in &plan.numbers {
            config.upsert(&mut *conn, hash, generation).await?;
            report.changed.push(ResourceKey {
                kind: Kind::PhoneNumber,
                namespace: config.namespace.clone(),
                name: config.name.clone(),
            });
        }
        Ok(())
    }
}

async fn delete_rows(conn: &mut PgConnection, key: &ResourceKey) -> Result<(), sqlx::Error> {
    match key.kind {
        Kind::Trunk => {
            ConfigTable::Trunks.delete(&mut *conn, &key.namespace, &key.name).await?;
            Credential::delete(&mut *conn, &key.namespace, &key.name).await?;
            switchboard_model::TrunkTls::delete(conn, &key.namespace, &key.name).await?;
        }
        Kind::PhoneNumber => {
            ConfigTable::PhoneNumbers.delete(conn, &key.namespace, &key.name).await?;
        }
        Kind::RoutingRule => {
            ConfigTable::RoutingRules.delete(conn, &key.namespace, &key.name).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
