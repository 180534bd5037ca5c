//! [`plan`] driven with plain values: a desired state and what is "stored", no database. Each
//! case is one rule of the module doc; `tests/reconcile_postgres.rs` checks the same rules end to
//! end through the transaction that writes the plan.

use std::collections::HashMap;

use serde_json::{Value, json};
use switchboard_model::config::StoredHash;

use super::status::{StoredStatus, reason};
use super::{PendingStatus, Plan, RowGeneration, Stored, fingerprint, plan, trunk_config};
use crate::source::{BrokenResource, DesiredResource, DesiredState, Kind, ResourceKey, Spec};
use crate::validate;

const NS: &str = "default";

fn key(kind: Kind, name: &str) -> ResourceKey {
    ResourceKey { kind, namespace: NS.into(), name: name.into() }
}

/// A resource from `name.yaml`, its spec parsed as a manifest's would be.
fn resource(kind: Kind, name: &str, spec: Value) -> DesiredResource {
    let key = key(kind, name);
    let spec = validate::parse_spec(&key, spec).unwrap_or_else(|e| panic!("{e}"));
    DesiredResource { key, generation: Some(1), origin: format!("{name}.yaml"), spec }
}

/// A trunk with IP authentication (no Secret needed), optionally with backup trunks.
fn trunk(name: &str, backups: &[&str]) -> DesiredResource {
    resource(
        Kind::Trunk,
        name,
        json!({
            "provider": "acme",
            "authMethod": "ip",
            "gateways": [{"address": "sip.example.com", "port": 5060, "transport": "UDP"}],
            "inbound": {"enabled": true, "allowedSourceCidrs": ["203.0.113.0/24"]},
            "outbound": {"enabled": true},
            "backupTrunks": backups,
        }),
    )
}

fn number(name: &str, number: &str, trunk: &str) -> DesiredResource {
    resource(Kind::PhoneNumber, name, json!({"number": number, "trunkRef": trunk}))
}

fn outbound_rule(name: &str, trunks: &[&str]) -> DesiredResource {
    resource(
        Kind::RoutingRule,
        name,
        json!({"direction": "outbound", "match": {"destinationPatterns": ["^\\+1"]}, "trunks": trunks}),
    )
}

fn state(resources: Vec<DesiredResource>) -> DesiredState {
    DesiredState { resources, ..DesiredState::default() }
}

fn nothing_stored() -> Stored {
    Stored { hashes: HashMap::new(), numbers: HashMap::new(), number_of: HashMap::new(), statuses: HashMap::new() }
}

/// Records rows of `key` with `hash`, written in `generation`, and a status from `origin`.
fn store(stored: &mut Stored, key: &ResourceKey, hash: &str, generation: i64, origin: &str) {
    stored.hashes.insert(
        key.clone(),
        StoredHash {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            spec_hash: hash.into(),
            config_generation: generation,
        },
    );
    stored.statuses.insert(
        key.clone(),
        StoredStatus {
            observed_generation: Some(1),
            ready: true,
            reason: reason::RECONCILED.into(),
            message: String::new(),
            origin: Some(origin.into()),
            config_generation: Some(generation),
            ready_since: None,
        },
    );
}

/// Records a stored PhoneNumber holding `number`.
fn store_number(stored: &mut Stored, key: &ResourceKey, number: &str, generation: i64) {
    store(stored, key, "old", generation, &format!("{}.yaml", key.name));
    stored.numbers.insert(number.into(), key.clone());
    stored.number_of.insert(key.clone(), number.into());
}

/// The hash the pass computes for a trunk resource, as if its rows were current.
fn trunk_hash(resource: &DesiredResource) -> String {
    let Spec::Trunk(spec) = &resource.spec else { panic!("not a trunk") };
    fingerprint(&trunk_config(&resource.key.namespace, &resource.key.name, spec), None)
}

fn status_of<'a>(plan: &'a Plan, key: &ResourceKey) -> &'a PendingStatus {
    plan.statuses.iter().find(|s| &s.key == key).unwrap_or_else(|| panic!("no status for {key}"))
}

fn reason_of(plan: &Plan, key: &ResourceKey) -> Option<&'static str> {
    status_of(plan, key).problem.as_ref().map(|(reason, _)| *reason)
}

fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|item| name(item).to_string()).collect()
}

#[test]
fn a_new_resource_is_written_and_ready() {
    let state = state(vec![trunk("main", &[])]);
    let plan = plan(&state, &nothing_stored());
    assert_eq!(names(&plan.trunks, |(config, _, _)| &config.name), ["main"]);
    assert_eq!(plan.trunks[0].2, trunk_hash(&state.resources[0]), "the row carries the spec's fingerprint");
    assert!(plan.writes_rows());
    let status = status_of(&plan, &key(Kind::Trunk, "main"));
    assert_eq!((status.rows, &status.problem), (RowGeneration::New, &None));
    assert_eq!((status.observed_generation, status.origin.as_str()), (Some(1), "main.yaml"));
}

#[test]
fn an_unchanged_resource_writes_nothing_and_keeps_its_generation() {
    let state = state(vec![trunk("main", &[])]);
    let mut stored = nothing_stored();
    store(&mut stored, &key(Kind::Trunk, "main"), &trunk_hash(&state.resources[0]), 4, "main.yaml");
    let plan = plan(&state, &stored);
    assert!(plan.trunks.is_empty() && plan.deletions.is_empty());
    assert!(!plan.writes_rows(), "an unchanged folder bumps no generation");
    let status = status_of(&plan, &key(Kind::Trunk, "main"));
    assert_eq!((status.rows, &status.problem), (RowGeneration::Stored(4), &None));
}

#[test]
fn a_changed_resource_is_rewritten() {
    let state = state(vec![trunk("main", &[])]);
    let mut stored = nothing_stored();
    store(&mut stored, &key(Kind::Trunk, "main"), "the hash of an older spec", 4, "main.yaml");
    let plan = plan(&state, &stored);
    assert_eq!(names(&plan.trunks, |(config, _, _)| &config.name), ["main"]);
    assert!(plan.writes_rows());
    assert_eq!(status_of(&plan, &key(Kind::Trunk, "main")).rows, RowGeneration::New);
}

#[test]
fn a_resource_gone_from_the_source_is_deleted_unless_its_file_is_unreadable() {
    let mut stored = nothing_stored();
    store(&mut stored, &key(Kind::Trunk, "gone"), "h", 2, "gone.yaml");
    store(&mut stored, &key(Kind::RoutingRule, "in-broken-file"), "h", 2, "broken.yaml");
    let mut state = state(vec![]);
    state.unreadable_origins.push("broken.yaml".into());
    let plan = plan(&state, &stored);
    assert_eq!(plan.deletions, [key(Kind::Trunk, "gone")]);
    assert!(plan.writes_rows());
    assert!(plan.statuses.is_empty(), "a deleted resource gets no status: {:?}", names(&plan.statuses, |s| &s.origin));
}

#[test]
fn an_invalid_spec_keeps_the_last_good_rows() {
    // "555" parses (a string) but is not E.164: validation refuses it.
    let state = state(vec![number("main-line", "555", "main"), trunk("main", &[])]);
    let mut stored = nothing_stored();
    store_number(&mut stored, &key(Kind::PhoneNumber, "main-line"), "+15551234567", 3);
    store(&mut stored, &key(Kind::Trunk, "main"), &trunk_hash(&state.resources[1]), 3, "main.yaml");
    let plan = plan(&state, &stored);
    assert!(plan.numbers.is_empty() && plan.deletions.is_empty() && plan.numbers_released.is_empty());
    let status = status_of(&plan, &key(Kind::PhoneNumber, "main-line"));
    assert_eq!(reason_of(&plan, &key(Kind::PhoneNumber, "main-line")), Some(reason::INVALID_SPEC));
    assert_eq!(status.rows, RowGeneration::Stored(3));
    let message = &status.problem.as_ref().unwrap().1;
    assert!(message.starts_with("main-line.yaml: "), "{message}");
    assert!(message.ends_with("the last valid configuration stays in force"), "{message}");
}

#[test]
fn a_broken_resource_is_neither_written_nor_deleted() {
    let mut stored = nothing_stored();
    store(&mut stored, &key(Kind::Trunk, "main"), "h", 5, "main.yaml");
    let mut state = state(vec![]);
    state.broken.push(BrokenResource {
        key: key(Kind::Trunk, "main"),
        generation: Some(2),
        origin: "main.yaml".into(),
        message: "main.yaml: spec.gateways: invalid type".into(),
    });
    let plan = plan(&state, &stored);
    assert!(!plan.writes_rows(), "mentioned by the source, so not deleted");
    let status = status_of(&plan, &key(Kind::Trunk, "main"));
    assert_eq!(reason_of(&plan, &key(Kind::Trunk, "main")), Some(reason::INVALID_SPEC));
    assert_eq!((status.rows, status.observed_generation), (RowGeneration::Stored(5), Some(2)));
}

#[test]
fn a_missing_reference_is_stored_but_not_ready() {
    let state = state(vec![
        number("main-line", "+15551234567", "nowhere"),
        outbound_rule("out", &["main", "nowhere"]),
        trunk("main", &["nowhere"]),
    ]);
    let plan = plan(&state, &nothing_stored());
    assert_eq!(names(&plan.numbers, |(config, _)| &config.name), ["main-line"]);
    assert_eq!(names(&plan.rules, |(config, _)| &config.name), ["out"]);
    assert_eq!(names(&plan.trunks, |(config, _, _)| &config.name), ["main"]);
    for key in [key(Kind::PhoneNumber, "main-line"), key(Kind::RoutingRule, "out"), key(Kind::Trunk, "main")] {
        assert_eq!(reason_of(&plan, &key), Some(reason::TRUNK_NOT_FOUND), "{key}");
        assert_eq!(status_of(&plan, &key).rows, RowGeneration::New, "{key}");
    }
}

#[test]
fn references_resolve_against_the_same_pass_and_not_against_deleted_rows() {
    // "main" arrives in this pass; "old" is stored but gone from the source.
    let mut stored = nothing_stored();
    store(&mut stored, &key(Kind::Trunk, "old"), "h", 1, "old.yaml");
    let state =
        state(vec![number("a", "+15550000001", "main"), number("b", "+15550000002", "old"), trunk("main", &[])]);
    let plan = plan(&state, &stored);
    assert_eq!(reason_of(&plan, &key(Kind::PhoneNumber, "a")), None);
    assert_eq!(reason_of(&plan, &key(Kind::PhoneNumber, "b")), Some(reason::TRUNK_NOT_FOUND));
    assert_eq!(plan.deletions, [key(Kind::Trunk, "old")]);
}

#[test]
fn a_number_stays_with_its_holder_and_the_second_claim_is_refused() {
    let holder = key(Kind::PhoneNumber, "holder");
    let mut stored = nothing_stored();
    store_number(&mut stored, &holder, "+15551234567", 2);
    let state = state(vec![
        number("newcomer", "+15551234567", "main"),
        number("holder", "+15551234567", "main"),
        trunk("main", &[]),
    ]);
    let plan = plan(&state, &stored);
    assert_eq!(names(&plan.numbers, |(config, _)| &config.name), ["holder"], "the holder's row is rewritten");
    let newcomer = key(Kind::PhoneNumber, "newcomer");
    assert_eq!(reason_of(&plan, &newcomer), Some(reason::DUPLICATE_NUMBER));
    assert!(status_of(&plan, &newcomer).problem.as_ref().unwrap().1.contains("PhoneNumber default/holder"));
    assert_eq!(reason_of(&plan, &holder), None);
}

#[test]
fn of_two_new_claims_the_first_in_source_order_wins() {
    let state = state(vec![
        number("first", "+15551234567", "main"),
        number("second", "+15551234567", "main"),
        trunk("main", &[]),
    ]);
    let plan = plan(&state, &nothing_stored());
    assert_eq!(names(&plan.numbers, |(config, _)| &config.name), ["first"]);
    assert_eq!(reason_of(&plan, &key(Kind::PhoneNumber, "second")), Some(reason::DUPLICATE_NUMBER));
    assert_eq!(status_of(&plan, &key(Kind::PhoneNumber, "second")).rows, RowGeneration::Absent);
}

#[test]
fn a_number_that_changes_releases_its_old_row_first() {
    let line = key(Kind::PhoneNumber, "line");
    let mut stored = nothing_stored();
    store_number(&mut stored, &line, "+15550000001", 2);
    let state = state(vec![number("line", "+15550000002", "main"), trunk("main", &[])]);
    let plan = plan(&state, &stored);
    assert_eq!(plan.numbers_released, [line], "so that another resource may take the old number");
    assert_eq!(names(&plan.numbers, |(config, _)| &config.number), ["+15550000002"]);
}

#[test]
fn a_trunk_whose_password_secret_is_missing_keeps_the_stored_password() {
    let trunk = resource(
        Kind::Trunk,
        "digest",
        json!({
            "provider": "acme",
            "authMethod": "digest",
            "gateways": [{"address": "sip.example.com"}],
            "credentials": {"username": "u", "passwordSecretRef": {"name": "creds", "key": "password"}},
            "outbound": {"enabled": true},
        }),
    );
    let digest = key(Kind::Trunk, "digest");
    let plan_without = plan(&state(vec![trunk.clone()]), &nothing_stored());
    assert_eq!(reason_of(&plan_without, &digest), Some(reason::SECRET_NOT_FOUND));
    assert!(plan_without.trunks[0].1.is_none(), "no credential row is written");

    let mut with_secret = state(vec![trunk]);
    with_secret
        .secrets
        .insert((NS.into(), "creds".into()), [("password".to_string(), b"secret".to_vec())].into_iter().collect());
    let plan_with = plan(&with_secret, &nothing_stored());
    assert_eq!(reason_of(&plan_with, &digest), None);
    assert!(plan_with.trunks[0].1.is_some(), "the credential row is written");
    assert_ne!(plan_with.trunks[0].2, plan_without.trunks[0].2, "the password is part of the fingerprint");
}
