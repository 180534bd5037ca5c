//! Tests of the node's metrics: what is recorded shows in the rendered text.

use std::time::Duration;

use rust_decimal::Decimal;
use switchboard_model::TrunkConfig;

use super::*;

fn line_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn render_shows_every_recorded_series() {
    let metrics = NodeMetrics::new();
    metrics.registration_changed("acme", "acme-main", true);
    metrics.registration_changed("acme", "acme-backup", false);
    metrics.trunk_rate("acme", Decimal::new(12, 3));
    metrics.call_ended("acme", "acme-main", CallStatus::Answered, Some(Duration::from_secs(42)));
    metrics.call_ended("acme", "acme-main", CallStatus::from_final_code(486), None);
    let guard = metrics.call_active(Some("acme-main"));
    let other = metrics.clone().call_active(None);
    metrics.set_transactions(3);
    metrics.retransmission();
    metrics.parse_error("UDP");
    metrics.message_received("INVITE");
    metrics.message_sent("2xx");
    metrics.message_dropped("flood");
    metrics.set_store_pending(7);
    metrics.store_dropped(2);
    metrics.config_applied(5);
    metrics.rtp_ports_capacity(8);
    metrics.rtp_port_exhausted();

    let text = metrics.render();
    let expect = [
        (r#"sip_trunk_registration_status{provider="acme",trunk="acme-main"}"#, 1.0),
        (r#"sip_trunk_registration_status{provider="acme",trunk="acme-backup"}"#, 0.0),
        (r#"sip_trunk_cost_per_minute{provider="acme"}"#, 0.012),
        (r#"sip_calls_total{provider="acme",status="answered",trunk="acme-main"}"#, 1.0),
        (r#"sip_calls_total{provider="acme",status="busy",trunk="acme-main"}"#, 1.0),
        (r#"sip_call_duration_seconds_bucket{provider="acme",trunk="acme-main",le="30"}"#, 0.0),
        (r#"sip_call_duration_seconds_bucket{provider="acme",trunk="acme-main",le="60"}"#, 1.0),
        (r#"sip_call_duration_seconds_bucket{provider="acme",trunk="acme-main",le="3600"}"#, 1.0),
        (r#"sip_call_duration_seconds_sum{provider="acme",trunk="acme-main"}"#, 42.0),
        ("switchboard_active_calls", 2.0),
        (r#"switchboard_trunk_active_calls{trunk="acme-main"}"#, 1.0),
        ("switchboard_sip_transactions", 3.0),
        ("switchboard_sip_retransmissions_total", 1.0),
        (r#"switchboard_sip_parse_errors_total{transport="UDP"}"#, 1.0),
        (r#"switchboard_sip_messages_total{direction="in",kind="INVITE"}"#, 1.0),
        (r#"switchboard_sip_messages_total{direction="out",kind="2xx"}"#, 1.0),
        (r#"switchboard_sip_dropped_total{reason="flood"}"#, 1.0),
        ("switchboard_store_pending", 7.0),
        ("switchboard_store_dropped_total", 2.0),
        ("switchboard_config_generation", 5.0),
        ("switchboard_rtp_ports_capacity", 8.0),
        ("switchboard_rtp_port_exhaustions_total", 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(line_value(&text, series), Some(value), "{series} in\n{text}");
    }
    assert!(text.contains("# TYPE sip_call_duration_seconds histogram"), "{text}");

    drop(guard);
    drop(other);
    let text = metrics.render();
    assert_eq!(line_value(&text, "switchboard_active_calls"), Some(0.0));
    assert_eq!(line_value(&text, r#"switchboard_trunk_active_calls{trunk="acme-main"}"#), Some(0.0));

    metrics.trunk_removed("acme", "acme-main");
    let text = metrics.render();
    assert!(!text.contains(r#"trunk="acme-main""#), "{text}");
}

fn trunk(name: &str, registration: bool, max: Option<u32>, cps: Option<u32>) -> TrunkConfig {
    let mut trunk = crate::sip::routing::tests::trunk(name);
    trunk.provider = "acme".into();
    trunk.registration_enabled = registration;
    trunk.max_concurrent_calls = max;
    trunk.calls_per_second = cps;
    trunk
}

#[test]
fn a_configured_trunk_has_its_series_at_zero_and_its_limits() {
    let metrics = NodeMetrics::new();
    metrics.trunk_configured(&trunk("main", true, Some(50), Some(5)));
    metrics.trunk_configured(&trunk("spare", false, None, None));
    let text = metrics.render();
    for status in CallStatus::ALL {
        let series = format!(r#"sip_calls_total{{provider="acme",status="{}",trunk="main"}}"#, status.as_str());
        assert_eq!(line_value(&text, &series), Some(0.0), "{series} in\n{text}");
    }
    let expect = [
        (r#"sip_call_duration_seconds_count{provider="acme",trunk="main"}"#, Some(0.0)),
        (r#"switchboard_trunk_active_calls{trunk="main"}"#, Some(0.0)),
        (r#"switchboard_trunk_calls_admitted_total{trunk="main"}"#, Some(0.0)),
        (r#"sip_trunk_registration_status{provider="acme",trunk="main"}"#, Some(0.0)),
        (r#"switchboard_trunk_max_concurrent_calls{trunk="main"}"#, Some(50.0)),
        (r#"switchboard_trunk_calls_per_second_limit{trunk="main"}"#, Some(5.0)),
        (r#"sip_trunk_registration_status{provider="acme",trunk="spare"}"#, None),
        (r#"switchboard_trunk_max_concurrent_calls{trunk="spare"}"#, None),
    ];
    for (series, value) in expect {
        assert_eq!(line_value(&text, series), value, "{series} in\n{text}");
    }

    // A later config keeps what happened (a registration, calls) and follows new limits.
    metrics.registration_changed("acme", "main", true);
    metrics.call_ended("acme", "main", CallStatus::Failed, None);
    metrics.trunk_call_admitted("main");
    metrics.trunk_configured(&trunk("main", true, None, Some(7)));
    let text = metrics.render();
    assert_eq!(line_value(&text, r#"sip_trunk_registration_status{provider="acme",trunk="main"}"#), Some(1.0));
    assert_eq!(line_value(&text, r#"sip_calls_total{provider="acme",status="failed",trunk="main"}"#), Some(1.0));
    assert_eq!(line_value(&text, r#"switchboard_trunk_calls_admitted_total{trunk="main"}"#), Some(1.0));
    assert_eq!(line_value(&text, r#"switchboard_trunk_max_concurrent_calls{trunk="main"}"#), None);
    assert_eq!(line_value(&text, r#"switchboard_trunk_calls_per_second_limit{trunk="main"}"#), Some(7.0));

    metrics.trunk_removed("acme", "main");
    assert!(!metrics.render().contains(r#"trunk="main""#));
}

#[test]
fn draining_shows_its_start_and_limit() {
    let metrics = NodeMetrics::new();
    metrics.drain_limit(Duration::from_secs(20));
    let text = metrics.render();
    assert_eq!(line_value(&text, "switchboard_node_draining"), Some(0.0));
    assert_eq!(line_value(&text, "switchboard_node_drain_started_timestamp_seconds"), Some(0.0));
    assert_eq!(line_value(&text, "switchboard_node_drain_limit_seconds"), Some(20.0));
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    metrics.drain_started();
    let text = metrics.render();
    assert_eq!(line_value(&text, "switchboard_node_draining"), Some(1.0));
    let started = line_value(&text, "switchboard_node_drain_started_timestamp_seconds").unwrap();
    assert!(started >= before && started <= before + 5.0, "{started} vs {before}");
}

#[test]
fn network_label_values_are_bounded() {
    let metrics = NodeMetrics::new();
    metrics.message_received("XYZZY");
    metrics.message_received("7xx");
    metrics.parse_error("carrier-pigeon");
    let text = metrics.render();
    assert_eq!(line_value(&text, r#"switchboard_sip_messages_total{direction="in",kind="other"}"#), Some(2.0));
    assert_eq!(line_value(&text, r#"switchboard_sip_parse_errors_total{transport="other"}"#), Some(1.0));
    assert!(!text.contains("XYZZY") && !text.contains("pigeon"), "{text}");
}

#[test]
fn final_codes_map_to_statuses() {
    let cases = [
        (200, CallStatus::Answered),
        (486, CallStatus::Busy),
        (600, CallStatus::Busy),
        (480, CallStatus::NoAnswer),
        (408, CallStatus::NoAnswer),
        (487, CallStatus::Canceled),
        (404, CallStatus::Rejected),
        (603, CallStatus::Rejected),
        (503, CallStatus::Failed),
        (302, CallStatus::Failed),
    ];
    for (code, status) in cases {
        assert_eq!(CallStatus::from_final_code(code), status, "{code}");
    }
    assert_eq!(CallStatus::ALL.len(), 6);
}

#[test]
fn metrics_of_two_nodes_do_not_mix() {
    let a = NodeMetrics::new();
    let b = NodeMetrics::new();
    a.retransmission();
    assert_eq!(line_value(&b.render(), "switchboard_sip_retransmissions_total"), Some(0.0));
}

#[test]
fn rtp_port_gauge_is_sampled_at_each_scrape() {
    let metrics = NodeMetrics::new();
    assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_in_use"), None);
    // The capacity and the exhaustion counter are there from the start, at 0.
    assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_capacity"), Some(0.0));
    assert_eq!(line_value(&metrics.render(), "switchboard_rtp_port_exhaustions_total"), Some(0.0));
    let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(4));
    let sample = std::sync::Arc::clone(&held);
    metrics.track_rtp_ports(move || sample.load(std::sync::atomic::Ordering::Relaxed));
    metrics.track_rtp_ports(|| 99); // ignored
    assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_in_use"), Some(4.0));
    held.store(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(line_value(&metrics.render(), "switchboard_rtp_ports_in_use"), Some(0.0));
}
