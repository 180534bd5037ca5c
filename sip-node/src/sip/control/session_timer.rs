//! RFC 4028 session timers: a dialog whose peer vanished (a crashed PBX, a NAT binding gone)
//! would otherwise hold a call, a channel and a media relay until someone notices; carriers
//! that require `timer` tear calls down when nobody refreshes them (the "15-minute drop").
//!
//! Two parts:
//! - negotiation, per transaction: [`negotiate_uas`] for a request the node answers (the
//!   initial INVITE or a refresh from the peer), [`UacOffer`] for a request the node sends
//!   (its headers, `422` handling, [`UacOffer::negotiate`] on the 2xx). The result is a
//!   [`Negotiated`] interval and refresher.
//! - the schedule of a dialog, [`SessionTimer`]: when the node is the refresher it refreshes at
//!   half the interval (section 10); either way, a session not refreshed by
//!   `interval - min(32, interval / 3)` has expired and the node sends BYE (section 10).
//!
//! The `refresher` parameter names a role in *the transaction* that negotiated it (`uac` is the
//! sender of that INVITE/UPDATE), so a refresh sent by the other side swaps the roles; every
//! negotiation here therefore says directly whether the node refreshes.

use std::time::Duration;

use rsip::Header;

use super::{has_option_tag, header_values};

/// RFC 4028 section 4: no Min-SE may be below 90 seconds.
pub const MIN_SE_FLOOR: u32 = 90;

/// The interval the node asks for when nothing else is configured (RFC 4028 section 4
/// recommends 1800 s).
pub const DEFAULT_SESSION_EXPIRES: u32 = 1800;

/// The option tag of RFC 4028 in `Supported`/`Require`.
pub const OPTION_TAG: &str = "timer";

/// The status code of a request whose Session-Expires is below the local Min-SE.
pub const TOO_SMALL: u16 = 422;

/// The reason phrase of [`TOO_SMALL`].
pub const TOO_SMALL_REASON: &str = "Session Interval Too Small";

/// Why a session-timer header is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionTimerError {
    #[error("Session-Expires is malformed: {0}")]
    BadSessionExpires(String),
    #[error("Min-SE is malformed: {0}")]
    BadMinSe(String),
    #[error("422 asks for Min-SE {asked} s, not above the {offered} s already offered")]
    TooSmallLoop { asked: u32, offered: u32 },
    #[error("a 422 without a usable Min-SE")]
    TooSmallWithoutMinSe,
}

/// Who sends the refreshes, as the `refresher` parameter names it: a role in the transaction
/// that negotiated the timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresher {
    Uac,
    Uas,
}

impl Refresher {
    fn as_str(self) -> &'static str {
        match self {
            Refresher::Uac => "uac",
            Refresher::Uas => "uas",
        }
    }
}

/// A `Session-Expires` value: `delta-seconds *(;se-params)` (RFC 4028 section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionExpires {
    /// The session interval in seconds.
    pub delta: u32,
    /// The `refresher` parameter, when present.
    pub refresher: Option<Refresher>,
}

impl SessionExpires {
    /// Parses a header value. Unknown parameters are ignored (the grammar allows generic ones);
    /// a `refresher` with another value than `uac`/`uas` is an error.
    pub fn parse(value: &str) -> Result<SessionExpires, SessionTimerError> {
        let bad = || SessionTimerError::BadSessionExpires(value.chars().take(40).collect());
        let mut parts = value.split(';');
        let delta = parse_delta(parts.next().unwrap_or_default()).ok_or_else(bad)?;
        let mut refresher = None;
        for param in parts {
            let (name, val) = param.split_once('=').unwrap_or((param, ""));
            if name.trim().eq_ignore_ascii_case("refresher") {
                refresher = Some(match val.trim().to_ascii_lowercase().as_str() {
                    "uac" => Refresher::Uac,
                    "uas" => Refresher::Uas,
                    _ => return Err(bad()),
                });
            }
        }
        Ok(SessionExpires { delta, refresher })
    }

    /// The header value, as [`SessionExpires::parse`] reads it.
    pub fn header_value(&self) -> String {
        match self.refresher {
            Some(r) => format!("{};refresher={}", self.delta, r.as_str()),
            None => self.delta.to_string(),
        }
    }

    /// The `Session-Expires` header.
    pub fn header(&self) -> Header {
        Header::Other("Session-Expires".into(), self.header_value())
    }
}

/// `delta-seconds` (RFC 3261 25.1: 1*DIGIT); values beyond `u32` are errors, not clamped.
fn parse_delta(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses a `Min-SE` value (`delta-seconds *(;generic-param)`).
pub fn parse_min_se(value: &str) -> Result<u32, SessionTimerError> {
    parse_delta(value.split(';').next().unwrap_or_default())
        .ok_or_else(|| SessionTimerError::BadMinSe(value.chars().take(40).collect()))
}

/// The `Min-SE` header.
pub fn min_se_header(seconds: u32) -> Header {
    Header::Other("Min-SE".into(), seconds.to_string())
}

/// The node's local session-timer policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerPolicy {
    /// The interval the node asks for and the largest it accepts without lowering it.
    pub session_expires: u32,
    /// The smallest interval the node accepts (refreshing more often than this costs a
    /// re-INVITE per call; `422` below it).
    pub min_se: u32,
}

impl Default for TimerPolicy {
    fn default() -> Self {
        TimerPolicy { session_expires: DEFAULT_SESSION_EXPIRES, min_se: MIN_SE_FLOOR }
    }
}

impl TimerPolicy {
    /// The policy with the RFC's bounds applied: Min-SE at least 90 s, the interval at least
    /// Min-SE.
    pub fn new(session_expires: u32, min_se: u32) -> TimerPolicy {
        let min_se = min_se.max(MIN_SE_FLOOR);
        TimerPolicy { session_expires: session_expires.max(min_se), min_se }
    }
}

/// The node's session-timer settings (command line / environment).
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimerArgs {
    /// RFC 4028 session interval (seconds) the node asks for on both legs of a call and the
    /// largest it accepts without lowering it; the refresher re-INVITEs at half of it, and a
    /// session not refreshed in time is ended with BYE.
    #[arg(long = "session-expires", env = "SWITCHBOARD_SESSION_EXPIRES", default_value_t = DEFAULT_SESSION_EXPIRES,
          value_parser = clap::value_parser!(u32).range(90..=86_400))]
    pub session_expires: u32,
    /// Smallest session interval (seconds) the node accepts; a request asking for less gets
    /// `422` (RFC 4028 section 9). At least 90.
    #[arg(long = "min-se", env = "SWITCHBOARD_MIN_SE", default_value_t = MIN_SE_FLOOR,
          value_parser = clap::value_parser!(u32).range(90..=86_400))]
    pub min_se: u32,
}

impl Default for SessionTimerArgs {
    fn default() -> Self {
        SessionTimerArgs { session_expires: DEFAULT_SESSION_EXPIRES, min_se: MIN_SE_FLOOR }
    }
}

impl SessionTimerArgs {
    /// The policy these settings make.
    pub fn policy(&self) -> TimerPolicy {
        TimerPolicy::new(self.session_expires, self.min_se)
    }
}

/// What a request says about session timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimerRequest {
    pub session_expires: Option<SessionExpires>,
    pub min_se: Option<u32>,
    /// `Supported: timer`: the UAC can refresh.
    pub uac_supports: bool,
}

impl TimerRequest {
    /// Reads the headers of a request (compact `x:` is expanded by the message parser).
    pub fn from_headers(headers: &rsip::Headers) -> Result<TimerRequest, SessionTimerError> {
        let session_expires =
            header_values(headers, "Session-Expires").first().map(|v| SessionExpires::parse(v)).transpose()?;
        let min_se = header_values(headers, "Min-SE").first().map(|v| parse_min_se(v)).transpose()?;
        let uac_supports = has_option_tag(headers, "Supported", OPTION_TAG);
        Ok(TimerRequest { session_expires, min_se, uac_supports })
    }
}

/// The outcome of a negotiation: the session interval and who refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The session interval in seconds.
    pub interval: u32,
    /// The `refresher` parameter, as it appears in the 2xx.
    pub refresher: Refresher,
    /// Whether the node sends the refreshes (the refresher's role is the node's role in the
    /// negotiating transaction).
    pub we_refresh: bool,
}

impl Negotiated {
    /// The headers a UAS adds to its 2xx: `Session-Expires` with the refresher, and `Require:
    /// timer` when the UAC is to refresh (RFC 4028 section 9).
    pub fn uas_response_headers(&self) -> Vec<Header> {
        let mut headers = vec![SessionExpires { delta: self.interval, refresher: Some(self.refresher) }.header()];
        if self.refresher == Refresher::Uac {
            headers.push(Header::Require(OPTION_TAG.into()));
        }
        headers
    }
}

/// The node's answer to a request it serves as UAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UasDecision {
    /// Refuse with `422 Session Interval Too Small` and this `Min-SE` (section 9).
    TooSmall { min_se: u32 },
    /// Serve the request and add [`Negotiated::uas_response_headers`] to the 2xx.
    Accept(Negotiated),
}

/// RFC 4028 section 9 for a request the node answers.
///
/// With a `Session-Expires` below the node's Min-SE the request is refused with 422. Otherwise
/// the node keeps the interval, lowering it to its own preference but never below the
/// request's Min-SE (nor its own). The refresher is the request's when it named one and the
/// UAC supports timers; a UAC that does not say `Supported: timer` cannot refresh, so the node
/// does (`uas`). A request without `Session-Expires` still gets a timer with the node as
/// refresher: the node keeps its own legs alive whether the peer cares or not, which is the
/// point of the extension for a B2BUA holding media resources.
pub fn negotiate_uas(request: &TimerRequest, policy: &TimerPolicy) -> UasDecision {
    let floor = request.min_se.unwrap_or(MIN_SE_FLOOR).max(policy.min_se);
    match request.session_expires {
        Some(se) if se.delta < policy.min_se => UasDecision::TooSmall { min_se: policy.min_se },
        Some(se) => {
            let interval = se.delta.min(policy.session_expires.max(floor));
            let refresher = if request.uac_supports { se.refresher.unwrap_or(Refresher::Uac) } else { Refresher::Uas };
            UasDecision::Accept(Negotiated { interval, refresher, we_refresh: refresher == Refresher::Uas })
        }
        None => UasDecision::Accept(Negotiated {
            interval: policy.session_expires.max(floor),
            refresher: Refresher::Uas,
            we_refresh: true,
        }),
    }
}

/// The headers of a `422` response (section 9: it carries the UAS's Min-SE).
pub fn too_small_headers(min_se: u32) -> Vec<Header> {
    vec![min_se_header(min_se)]
}

/// What a 2xx to the node's request says about session timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimerResponse {
    pub session_expires: Option<SessionExpires>,
}

impl TimerResponse {
    /// Reads the headers of a 2xx.
    pub fn from_headers(headers: &rsip::Headers) -> Result<TimerResponse, SessionTimerError> {
        let session_expires =
            header_values(headers, "Session-Expires").first().map(|v| SessionExpires::parse(v)).transpose()?;
        Ok(TimerResponse { session_expires })
    }
}

/// The session-timer side of a request the node sends (RFC 4028 section 7): an INVITE or a
/// refresh, with `Supported: timer`, `Session-Expires` and `Min-SE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UacOffer {
    /// The interval asked for.
    pub session_expires: u32,
    /// The Min-SE sent: the node's own, raised by any 422 in this dialog (section 7.4: a
    /// later request keeps the largest Min-SE seen).
    pub min_se: u32,
    /// The refresher asked for, if any (a refresh by the node asks to stay the refresher).
    pub refresher: Option<Refresher>,
}

impl UacOffer {
    /// The offer of an initial INVITE under `policy`: the refresher is left to the UAS.
    pub fn new(policy: &TimerPolicy) -> UacOffer {
        UacOffer { session_expires: policy.session_expires, min_se: policy.min_se, refresher: None }
    }

    /// The offer of a refresh of `current` that the node sends: same interval, the node as the
    /// UAC of this transaction stays the refresher when it was one.
    pub fn refresh(current: &Negotiated, min_se: u32) -> UacOffer {
        UacOffer {
            session_expires: current.interval.max(min_se),
            min_se,
            refresher: Some(if current.we_refresh { Refresher::Uac } else { Refresher::Uas }),
        }
    }

    /// The headers to add to the request (`Supported: timer` too: a UAC that asks for a timer
    /// must say it can refresh, section 7.1).
    pub fn request_headers(&self) -> Vec<Header> {
        vec![
            Header::Supported(OPTION_TAG.into()),
            SessionExpires { delta: self.session_expires, refresher: self.refresher }.header(),
            min_se_header(self.min_se),
        ]
    }

    /// A `422` came back: retry with its Min-SE as both the interval and the Min-SE (section
    /// 7.4). A 422 that asks for no more than was offered would loop, so it is an error and
    /// the request fails.
    pub fn on_too_small(&mut self, response_headers: &rsip::Headers) -> Result<(), SessionTimerError> {
        let asked = header_values(response_headers, "Min-SE")
            .first()
            .map(|v| parse_min_se(v))
            .transpose()?
            .ok_or(SessionTimerError::TooSmallWithoutMinSe)?;
        if asked <= self.session_expires {
            return Err(SessionTimerError::TooSmallLoop { asked, offered: self.session_expires });
        }
        self.session_expires = asked;
        self.min_se = self.min_se.max(asked);
        Ok(())
    }

    /// The timer of the dialog after the 2xx (section 7.2). A 2xx with `Session-Expires` says
    /// the interval and who refreshes (a missing `refresher` is read as `uac`: the node then
    /// refreshes, which is always safe). A 2xx without one means the UAS does not do session
    /// timers; the RFC then has no expiration, but the node keeps its leg alive anyway by
    /// refreshing at the interval it asked for: a refresh answered 481 or 408 is how a B2BUA
    /// learns that a peer vanished.
    pub fn negotiate(&self, response: &TimerResponse) -> Negotiated {
        match response.session_expires {
            Some(se) => {
                let refresher = se.refresher.unwrap_or(Refresher::Uac);
                Negotiated { interval: se.delta.max(MIN_SE_FLOOR), refresher, we_refresh: refresher == Refresher::Uac }
            }
            None => Negotiated { interval: self.session_expires, refresher: Refresher::Uac, we_refresh: true },
        }
    }
}

/// The two timers of a [`SessionTimer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionTimerKind {
    /// Half the interval after the last refresh: the node, as refresher, refreshes.
    Refresh,
    /// `interval - min(32, interval / 3)` after the last refresh: the session has expired.
    Expiry,
}

/// What a [`SessionTimer`] asks its driver to do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionTimerAction {
    /// Arm (or re-arm: it replaces an armed one) the timer.
    Schedule(SessionTimerKind, Duration),
    /// Disarm the timer.
    Cancel(SessionTimerKind),
    /// Send a refresh (a re-INVITE with the node's current SDP, or an UPDATE) with
    /// [`SessionTimer::refresh_offer`]'s headers, and feed its outcome back.
    SendRefresh,
    /// The session was not refreshed in time: send BYE (reason: session timer expired).
    Expired,
}

/// What to do after a refresh the node sent failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshFailure {
    /// The dialog is gone (481) or the peer does not answer (408): send BYE now
    /// (RFC 3261 12.2.1.2).
    Bye,
    /// The peer wants a larger interval (422): refresh again at once with this offer.
    RetryNow(UacOffer),
    /// The session stays as it is until the expiry, when the node sends BYE.
    WaitForExpiry,
}

/// The refresh/expiry schedule of one dialog (RFC 4028 section 10), sans-IO like the
/// transactions: it asks for timers with durations ([`SessionTimerAction::Schedule`]) and is
/// fed their expiry ([`SessionTimer::on_timer`]) and every successful refresh in either
/// direction ([`SessionTimer::on_refreshed`]); it never reads a clock.
#[derive(Debug, Clone)]
pub struct SessionTimer {
    negotiated: Negotiated,
    min_se: u32,
    refresh_pending: bool,
    expired: bool,
}

impl SessionTimer {
    /// Starts the schedule (when the 2xx that negotiated it was sent or received). `min_se` is
    /// the largest Min-SE seen in the dialog, which the node's refreshes carry.
    pub fn new(negotiated: Negotiated, min_se: u32) -> (SessionTimer, Vec<SessionTimerAction>) {
        let timer = SessionTimer { negotiated, min_se, refresh_pending: false, expired: false };
        let actions = timer.schedule();
        (timer, actions)
    }

    fn schedule(&self) -> Vec<SessionTimerAction> {
        let mut actions = vec![SessionTimerAction::Schedule(SessionTimerKind::Expiry, self.expires_after())];
        actions.push(match self.refresh_after() {
            Some(after) => SessionTimerAction::Schedule(SessionTimerKind::Refresh, after),
            None => SessionTimerAction::Cancel(SessionTimerKind::Refresh),
        });
        actions
    }

    /// The current negotiation.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The headers of the next refresh the node sends.
    pub fn refresh_offer(&self) -> UacOffer {
        UacOffer::refresh(&self.negotiated, self.min_se)
    }

    /// When, after the last refresh, the node as refresher refreshes: half the interval
    /// (section 10); `None` when the peer refreshes.
    pub fn refresh_after(&self) -> Option<Duration> {
        self.negotiated.we_refresh.then(|| Duration::from_secs(u64::from(self.negotiated.interval)) / 2)
    }

    /// When, after the last refresh, the session has expired: the interval minus the smaller
    /// of 32 s and a third of it (section 10), so that a BYE still reaches a peer whose own
    /// timer is about to fire.
    pub fn expires_after(&self) -> Duration {
        let interval = u64::from(self.negotiated.interval);
        Duration::from_secs(interval - (interval / 3).min(32))
    }

    /// A timer fired. A refresh is asked for once per interval (one outstanding at a time).
    pub fn on_timer(&mut self, kind: SessionTimerKind) -> Vec<SessionTimerAction> {
        if self.expired {
            return Vec::new();
        }
        match kind {
            SessionTimerKind::Refresh if self.negotiated.we_refresh && !self.refresh_pending => {
                self.refresh_pending = true;
                vec![SessionTimerAction::SendRefresh]
            }
            SessionTimerKind::Refresh => Vec::new(),
            SessionTimerKind::Expiry => {
                self.expired = true;
                vec![SessionTimerAction::Cancel(SessionTimerKind::Refresh), SessionTimerAction::Expired]
            }
        }
    }

    /// A refresh succeeded (the 2xx to the node's refresh, or the node's 2xx to the peer's),
    /// with the negotiation of that transaction: the schedule restarts.
    pub fn on_refreshed(&mut self, negotiated: Negotiated) -> Vec<SessionTimerAction> {
        if self.expired {
            return Vec::new();
        }
        self.negotiated = negotiated;
        self.refresh_pending = false;
        self.schedule()
    }

    /// The node's refresh got final response `status` (not 2xx) with these headers.
    pub fn on_refresh_failed(&mut self, status: u16, headers: &rsip::Headers) -> RefreshFailure {
        match status {
            408 | 481 => RefreshFailure::Bye,
            TOO_SMALL => {
                let mut offer = self.refresh_offer();
                match offer.on_too_small(headers) {
                    Ok(()) => {
                        self.min_se = offer.min_se;
                        RefreshFailure::RetryNow(offer)
                    }
                    Err(_) => RefreshFailure::WaitForExpiry,
                }
            }
            _ => RefreshFailure::WaitForExpiry,
        }
    }

    /// Whether the session has expired.
    pub fn is_expired(&self) -> bool {
        self.expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> rsip::Headers {
        list.iter().map(|(n, v)| Header::Other((*n).into(), (*v).into())).collect::<Vec<_>>().into()
    }

    fn request(list: &[(&str, &str)]) -> TimerRequest {
        TimerRequest::from_headers(&headers(list)).expect("valid timer headers")
    }

    fn value(headers: &[Header], name: &str) -> Option<String> {
        header_values(&headers.to_vec().into(), name).first().map(|v| v.to_string())
    }

    #[test]
    fn session_expires_parses_and_prints_back() {
        assert_eq!(
            SessionExpires::parse("1800;refresher=UAC").unwrap(),
            SessionExpires { delta: 1800, refresher: Some(Refresher::Uac) }
        );
        assert_eq!(SessionExpires::parse(" 90 ; foo=bar").unwrap(), SessionExpires { delta: 90, refresher: None });
        for bad in ["", "abc", "-5", "+90", "99999999999", "90;refresher=both", "1.5"] {
            assert!(SessionExpires::parse(bad).is_err(), "{bad:?} must be refused");
        }
        let se = SessionExpires { delta: 600, refresher: Some(Refresher::Uas) };
        assert_eq!(se.header_value(), "600;refresher=uas");
        assert_eq!(SessionExpires::parse(&se.header_value()).unwrap(), se);
        assert_eq!(parse_min_se("120;x=y").unwrap(), 120);
        assert!(matches!(parse_min_se("soon"), Err(SessionTimerError::BadMinSe(_))));
    }

    #[test]
    fn the_policy_respects_the_rfc_floor() {
        assert_eq!(TimerPolicy::new(30, 10), TimerPolicy { session_expires: 90, min_se: 90 });
        assert_eq!(TimerPolicy::new(100, 120), TimerPolicy { session_expires: 120, min_se: 120 });
    }

    #[test]
    fn a_uas_refuses_an_interval_below_its_min_se_with_422() {
        let policy = TimerPolicy::new(1800, 120);
        let decision = negotiate_uas(&request(&[("Session-Expires", "100"), ("Supported", "timer")]), &policy);
        assert_eq!(decision, UasDecision::TooSmall { min_se: 120 });
        assert_eq!(value(&too_small_headers(120), "Min-SE").as_deref(), Some("120"));
    }

    #[test]
    fn a_uas_keeps_the_uacs_refresher_when_the_uac_supports_timers() {
        let policy = TimerPolicy::default();
        let asked = request(&[("Session-Expires", "600;refresher=uas"), ("Supported", "timer")]);
        let UasDecision::Accept(n) = negotiate_uas(&asked, &policy) else { panic!("refused") };
        assert_eq!(n, Negotiated { interval: 600, refresher: Refresher::Uas, we_refresh: true });
        let headers = n.uas_response_headers();
        assert_eq!(value(&headers, "Session-Expires").as_deref(), Some("600;refresher=uas"));
        assert_eq!(value(&headers, "Require"), None, "no Require: timer when the UAS refreshes");

        let asked = request(&[("Session-Expires", "600"), ("Supported", "100rel, timer")]);
        let UasDecision::Accept(n) = negotiate_uas(&asked, &policy) else { panic!("refused") };
        assert_eq!(n, Negotiated { interval: 600, refresher: Refresher::Uac, we_refresh: false });
        let headers = n.uas_response_headers();
        assert_eq!(value(&headers, "Session-Expires").as_deref(), Some("600;refresher=uac"));
        assert_eq!(value(&headers, "Require").as_deref(), Some("timer"), "section 9: uac refresher needs Require");
    }

    #[test]
    fn a_uas_refreshes_itself_when_the_uac_cannot() {
        let policy = TimerPolicy::default();
        // A proxy inserted Session-Expires (even naming the UAC); the UAC lacks Supported: timer.
        let asked = request(&[("Session-Expires", "900;refresher=uac")]);
        assert_eq!(
            negotiate_uas(&asked, &policy),
            UasDecision::Accept(Negotiated { interval: 900, refresher: Refresher::Uas, we_refresh: true })
        );
        // No Session-Expires at all: the node keeps the session alive at its own interval.
        assert_eq!(
            negotiate_uas(&request(&[]), &policy),
            UasDecision::Accept(Negotiated { interval: 1800, refresher: Refresher::Uas, we_refresh: true })
        );
    }

    #[test]
    fn a_uas_lowers_a_long_interval_but_not_below_the_requests_min_se() {
        let policy = TimerPolicy::new(600, 90);
        let asked = request(&[("Session-Expires", "7200"), ("Supported", "timer")]);
        assert!(matches!(negotiate_uas(&asked, &policy), UasDecision::Accept(Negotiated { interval: 600, .. })));
        let asked = request(&[("Session-Expires", "7200"), ("Min-SE", "3600"), ("Supported", "timer")]);
        assert!(matches!(negotiate_uas(&asked, &policy), UasDecision::Accept(Negotiated { interval: 3600, .. })));
        // Without Session-Expires the node's interval still honours the request's Min-SE.
        let asked = request(&[("Min-SE", "1000")]);
        assert!(matches!(negotiate_uas(&asked, &policy), UasDecision::Accept(Negotiated { interval: 1000, .. })));
    }

    #[test]
    fn garbage_timer_headers_are_typed_errors() {
        assert!(matches!(
            TimerRequest::from_headers(&headers(&[("Session-Expires", "lots")])),
            Err(SessionTimerError::BadSessionExpires(_))
        ));
        assert!(matches!(TimerRequest::from_headers(&headers(&[("Min-SE", "")])), Err(SessionTimerError::BadMinSe(_))));
    }

    #[test]
    fn a_uac_offers_timers_and_raises_its_interval_on_422() {
        let mut offer = UacOffer::new(&TimerPolicy::new(90, 90));
        let sent = offer.request_headers();
        assert_eq!(value(&sent, "Supported").as_deref(), Some("timer"));
        assert_eq!(value(&sent, "Session-Expires").as_deref(), Some("90"));
        assert_eq!(value(&sent, "Min-SE").as_deref(), Some("90"));

        offer.on_too_small(&headers(&[("Min-SE", "300")])).unwrap();
        assert_eq!((offer.session_expires, offer.min_se), (300, 300));
        let sent = offer.request_headers();
        assert_eq!(value(&sent, "Session-Expires").as_deref(), Some("300"));
        assert_eq!(value(&sent, "Min-SE").as_deref(), Some("300"));

        assert_eq!(
            offer.on_too_small(&headers(&[("Min-SE", "300")])),
            Err(SessionTimerError::TooSmallLoop { asked: 300, offered: 300 }),
            "a second 422 asking for no more must not loop"
        );
        assert_eq!(offer.on_too_small(&headers(&[])), Err(SessionTimerError::TooSmallWithoutMinSe));
    }

    #[test]
    fn a_uac_reads_the_refresher_from_the_2xx() {
        let offer = UacOffer::new(&TimerPolicy::default());
        let read = |list: &[(&str, &str)]| offer.negotiate(&TimerResponse::from_headers(&headers(list)).unwrap());
        assert_eq!(
            read(&[("Session-Expires", "600;refresher=uas")]),
            Negotiated { interval: 600, refresher: Refresher::Uas, we_refresh: false }
        );
        assert_eq!(
            read(&[("Session-Expires", "600;refresher=uac")]),
            Negotiated { interval: 600, refresher: Refresher::Uac, we_refresh: true }
        );
        assert!(read(&[("Session-Expires", "600")]).we_refresh, "no refresher parameter: the node refreshes");
        // A callee without session timers: the node keeps the leg alive at the asked interval.
        assert_eq!(read(&[]), Negotiated { interval: 1800, refresher: Refresher::Uac, we_refresh: true });
    }

    use SessionTimerAction::{Cancel, Expired, Schedule, SendRefresh};
    use SessionTimerKind::{Expiry, Refresh};

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_refresher_refreshes_at_half_the_interval_and_expires_without_a_refresh() {
        let n = Negotiated { interval: 90, refresher: Refresher::Uac, we_refresh: true };
        let (mut timer, actions) = SessionTimer::new(n, 90);
        // Refresh at 45 s; expiry at 90 - min(32, 30) = 60 s.
        assert_eq!(actions, vec![Schedule(Expiry, secs(60)), Schedule(Refresh, secs(45))]);
        assert_eq!(timer.on_timer(Refresh), vec![SendRefresh]);
        assert_eq!(timer.on_timer(Refresh), vec![], "one refresh at a time");
        // The 2xx to the refresh restarts the schedule.
        assert_eq!(timer.on_refreshed(n), vec![Schedule(Expiry, secs(60)), Schedule(Refresh, secs(45))]);
        assert_eq!(timer.on_timer(Refresh), vec![SendRefresh]);
        // No answer this time: the expiry fires.
        assert_eq!(timer.on_timer(Expiry), vec![Cancel(Refresh), Expired]);
        assert!(timer.is_expired());
        assert_eq!(timer.on_timer(Expiry), vec![], "expires once");
        assert_eq!(timer.on_refreshed(n), vec![], "too late");
    }

    #[test]
    fn the_non_refresher_sends_bye_before_the_peer_would() {
        let n = Negotiated { interval: 1800, refresher: Refresher::Uac, we_refresh: false };
        let (mut timer, actions) = SessionTimer::new(n, 90);
        // 1800 - min(32, 600) = 1768 s; no refresh of its own.
        assert_eq!(actions, vec![Schedule(Expiry, secs(1768)), Cancel(Refresh)]);
        assert_eq!(timer.on_timer(Refresh), vec![], "a stale refresh timer does nothing");
        // The peer refreshes (re-INVITE answered by the node): the deadline moves.
        assert_eq!(timer.on_refreshed(n), vec![Schedule(Expiry, secs(1768)), Cancel(Refresh)]);
        assert_eq!(timer.on_timer(Expiry), vec![Cancel(Refresh), Expired]);
        // A short interval: a third of it is less than 32 s.
        let (short, _) = SessionTimer::new(Negotiated { interval: 90, ..n }, 90);
        assert_eq!(short.expires_after(), secs(60));
    }

    #[test]
    fn a_refresh_from_the_peer_can_hand_the_refresher_role_over() {
        let (mut timer, _) =
            SessionTimer::new(Negotiated { interval: 600, refresher: Refresher::Uac, we_refresh: false }, 90);
        assert_eq!(timer.refresh_after(), None);
        // The peer's re-INVITE without Supported: timer: the node (its UAS) now refreshes.
        let asked = request(&[("Session-Expires", "600")]);
        let UasDecision::Accept(n) = negotiate_uas(&asked, &TimerPolicy::default()) else { panic!() };
        assert_eq!(timer.on_refreshed(n), vec![Schedule(Expiry, secs(568)), Schedule(Refresh, secs(300))]);
        // Its refresh asks to stay refresher as the UAC of that transaction.
        let offer = timer.refresh_offer();
        assert_eq!(offer.refresher, Some(Refresher::Uac));
        assert_eq!(offer.session_expires, 600);
    }

    #[test]
    fn a_failed_refresh_ends_the_dialog_or_retries_with_a_larger_interval() {
        let n = Negotiated { interval: 90, refresher: Refresher::Uac, we_refresh: true };
        let (mut timer, _) = SessionTimer::new(n, 90);
        assert_eq!(timer.on_refresh_failed(481, &headers(&[])), RefreshFailure::Bye);
        assert_eq!(timer.on_refresh_failed(408, &headers(&[])), RefreshFailure::Bye);
        assert_eq!(timer.on_refresh_failed(500, &headers(&[])), RefreshFailure::WaitForExpiry);
        let RefreshFailure::RetryNow(offer) = timer.on_refresh_failed(422, &headers(&[("Min-SE", "180")])) else {
            panic!("422 with a larger Min-SE is retried")
        };
        assert_eq!((offer.session_expires, offer.min_se, offer.refresher), (180, 180, Some(Refresher::Uac)));
        assert_eq!(timer.refresh_offer().min_se, 180, "the dialog keeps the largest Min-SE");
        assert_eq!(timer.on_refresh_failed(422, &headers(&[("Min-SE", "60")])), RefreshFailure::WaitForExpiry);
    }
}
