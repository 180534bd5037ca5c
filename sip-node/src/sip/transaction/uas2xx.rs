//! Dialog-level helpers around a 2xx to INVITE, which RFC 3261 takes out of the transaction
//! layer: the UAS core retransmits its 2xx until the ACK comes (13.3.1.4), and the UAC core
//! builds and sends the ACK (13.2.2.4) as a request of its own, with a new branch.
//! Sans-IO like the transactions: inputs are the ACK and timer expiries, outputs are actions.

use std::time::Duration;

use rsip::headers::UntypedHeader as _;
use rsip::{Header, Headers, Method, Request, Response, Uri};

use super::{TimerConfig, new_branch};

/// The two timers of a [`Uas2xxRetransmitter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Uas2xxTimer {
    /// Next 2xx retransmission: T1, 2*T1, ... capped at T2.
    Retransmit,
    /// 64*T1 after the 2xx: the ACK never came.
    GiveUp,
}

/// What a [`Uas2xxRetransmitter`] asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uas2xxAction {
    /// Send the 2xx again to the peer of the INVITE (through the server transaction in
    /// Accepted, which passes 2xx from the TU through, or statelessly).
    Send(Response),
    /// Arm (or re-arm) the timer.
    Schedule(Uas2xxTimer, Duration),
    /// Disarm the timer.
    CancelTimer(Uas2xxTimer),
    /// No ACK within 64*T1: the dialog is confirmed but the session should end; the TU sends
    /// a BYE (RFC 3261 13.3.1.4).
    SendBye,
    /// Nothing more to do: drop the retransmitter.
    Done,
}

/// Retransmits the 2xx to an INVITE until the ACK arrives (RFC 3261 13.3.1.4).
///
/// The first transmission is not its business: the server transaction sends the 2xx when the
/// TU responds; create the retransmitter at the same time. On reliable transports nothing is
/// retransmitted (the hop is reliable; stacks such as PJSIP and sipp do the same), but the
/// 64*T1 wait for the ACK still runs.
#[derive(Debug)]
pub struct Uas2xxRetransmitter {
    response: Response,
    cseq: Option<u32>,
    reliable: bool,
    cfg: TimerConfig,
    interval: Duration,
    done: bool,
}

impl Uas2xxRetransmitter {
    /// Starts retransmitting `response` (a 2xx to an INVITE, already sent once).
    pub fn new(response: Response, reliable: bool, cfg: &TimerConfig) -> (Self, Vec<Uas2xxAction>) {
        let mut actions = Vec::new();
        if !reliable {
            actions.push(Uas2xxAction::Schedule(Uas2xxTimer::Retransmit, cfg.t1));
        }
        actions.push(Uas2xxAction::Schedule(Uas2xxTimer::GiveUp, cfg.timeout()));
        let cseq = cseq_number(&response.headers);
        let txn = Uas2xxRetransmitter { response, cseq, reliable, cfg: *cfg, interval: cfg.t1, done: false };
        (txn, actions)
    }

    /// Whether the ACK came or the retransmitter gave up.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Feeds an ACK received in the dialog. It ends the retransmissions when its CSeq number is
    /// the one of the 2xx (an ACK for an older INVITE changes nothing).
    pub fn on_ack(&mut self, ack: &Request) -> Vec<Uas2xxAction> {
        if self.done || ack.method != Method::Ack || cseq_number(&ack.headers) != self.cseq {
            return Vec::new();
        }
        self.done = true;
        let mut actions = Vec::new();
        if !self.reliable {
            actions.push(Uas2xxAction::CancelTimer(Uas2xxTimer::Retransmit));
        }
        actions.extend([Uas2xxAction::CancelTimer(Uas2xxTimer::GiveUp), Uas2xxAction::Done]);
        actions
    }

    /// Feeds an expired timer.
    pub fn on_timer(&mut self, timer: Uas2xxTimer) -> Vec<Uas2xxAction> {
        if self.done {
            return Vec::new();
        }
        match timer {
            Uas2xxTimer::Retransmit if !self.reliable => {
                self.interval = self.cfg.next_capped(self.interval);
                vec![
                    Uas2xxAction::Send(self.response.clone()),
                    Uas2xxAction::Schedule(Uas2xxTimer::Retransmit, self.interval),
                ]
            }
            Uas2xxTimer::Retransmit => Vec::new(),
            Uas2xxTimer::GiveUp => {
                self.done = true;
                let mut actions = Vec::new();
                if !self.reliable {
                    actions.push(Uas2xxAction::CancelTimer(Uas2xxTimer::Retransmit));
                }
                actions.extend([Uas2xxAction::SendBye, Uas2xxAction::Done]);
                actions
            }
        }
    }
}

/// The ACK for a 2xx to `invite` (RFC 3261 13.2.2.4, kept simple): Request-URI = the remote
/// target (the 2xx's Contact URI; the INVITE's Request-URI if the 2xx has none), the INVITE's
/// top Via with a new branch, Route = the 2xx's Record-Route in reverse (loose routing only),
/// From and Call-ID of the INVITE, To of the 2xx (with its tag), CSeq = INVITE's number + ACK,
/// Max-Forwards 70, no body. Send it statelessly, again on every 2xx retransmission.
pub fn ack_for_2xx(invite: &Request, response: &Response) -> Request {
    let mut headers = Headers::default();
    if let Some(via) = invite.headers.iter().find_map(|h| if let Header::Via(v) = h { Some(v.value()) } else { None }) {
        headers.push(Header::Via(with_new_branch(via.split(',').next().unwrap_or_default()).into()));
    }
    headers.push(Header::MaxForwards(70.into()));
    let record_route: Vec<String> = response
        .headers
        .iter()
        .filter_map(|h| if let Header::RecordRoute(rr) = h { Some(rr.value()) } else { None })
        .flat_map(split_list)
        .collect();
    for route in record_route.into_iter().rev() {
        headers.push(Header::Route(route.into()));
    }
    for header in invite.headers.iter() {
        if matches!(header, Header::From(_) | Header::CallId(_)) {
            headers.push(header.clone());
        }
    }
    let to = response.headers.iter().find(|h| matches!(h, Header::To(_)));
    if let Some(to) = to.or_else(|| invite.headers.iter().find(|h| matches!(h, Header::To(_)))) {
        headers.push(to.clone());
    }
    let seq = cseq_number(&invite.headers).unwrap_or(1);
    headers.push(Header::CSeq(format!("{seq} ACK").into()));
    headers.push(Header::ContentLength(Default::default()));
    let uri = remote_target(response).unwrap_or_else(|| invite.uri.clone());
    Request { method: Method::Ack, uri, version: rsip::Version::V2, headers, body: Vec::new() }
}

/// The URI of the first Contact of a message (the remote target of a dialog).
fn remote_target(response: &Response) -> Option<Uri> {
    let contact =
        response.headers.iter().find_map(|h| if let Header::Contact(c) = h { Some(c.value()) } else { None })?;
    let first = split_list(contact).into_iter().next()?;
    let uri = match (first.find('<'), first.rfind('>')) {
        (Some(start), Some(end)) if start < end => &first[start + 1..end],
        _ => first.split(';').next().unwrap_or_default(),
    };
    Uri::try_from(uri.trim()).ok()
}

/// A Via value with its branch replaced by a fresh one.
fn with_new_branch(via: &str) -> String {
    let mut parts = via.trim().split(';');
    let mut out = parts.next().unwrap_or_default().trim_end().to_string();
    for param in parts {
        let name = param.split('=').next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case("branch") && !name.eq_ignore_ascii_case("received") {
            out.push(';');
            out.push_str(param.trim());
        }
    }
    out.push_str(";branch=");
    out.push_str(&new_branch());
    out
}

/// Splits a comma-separated header value (Contact, Record-Route) at commas outside `<...>`
/// and quoted strings.
fn split_list(value: &str) -> Vec<String> {
    let (mut items, mut current) = (Vec::new(), String::new());
    let (mut in_angle, mut in_quote, mut escaped) = (false, false, false);
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '<' if !in_quote => in_angle = true,
            '>' if !in_quote => in_angle = false,
            ',' if !in_quote && !in_angle => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

fn cseq_number(headers: &Headers) -> Option<u32> {
    headers.iter().find_map(|h| match h {
        Header::CSeq(cseq) => cseq.value().split_whitespace().next()?.parse().ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{MAGIC_COOKIE, response_to};
    use super::*;

    fn ok() -> Response {
        let mut ok = response_to(&invite(), 200, None, Some("uas1"));
        ok.headers.push(Header::Contact("\"Bob, B\" <sip:bob@192.0.2.4:5080;transport=udp>;expires=60".into()));
        ok.headers.push(Header::RecordRoute("<sip:p2.example.com;lr>, <sip:p1.example.com;lr>".into()));
        ok.headers.push(Header::RecordRoute("<sip:p0.example.com;lr>".into()));
        ok
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn retransmits_doubling_to_t2_until_ack() {
        let (mut rt, actions) = Uas2xxRetransmitter::new(ok(), false, &TimerConfig::default());
        assert_eq!(
            actions,
            vec![
                Uas2xxAction::Schedule(Uas2xxTimer::Retransmit, ms(500)),
                Uas2xxAction::Schedule(Uas2xxTimer::GiveUp, ms(32_000)),
            ]
        );
        let mut intervals = Vec::new();
        for _ in 0..5 {
            let actions = rt.on_timer(Uas2xxTimer::Retransmit);
            assert_eq!(actions[0], Uas2xxAction::Send(ok()));
            let Some(Uas2xxAction::Schedule(Uas2xxTimer::Retransmit, d)) = actions.last() else {
                panic!("{actions:?}")
            };
            intervals.push(d.as_millis());
        }
        assert_eq!(intervals, vec![1000, 2000, 4000, 4000, 4000]);
        // An ACK for another CSeq does not stop it; the right one does.
        let mut old_ack = ack_for_2xx(&invite(), &ok());
        old_ack.headers.retain(|h| !matches!(h, Header::CSeq(_)));
        old_ack.headers.push(Header::CSeq("1 ACK".into()));
        assert!(rt.on_ack(&old_ack).is_empty());
        assert!(rt.on_ack(&invite()).is_empty(), "not an ACK");
        let ack = ack_for_2xx(&invite(), &ok());
        assert_eq!(
            rt.on_ack(&ack),
            vec![
                Uas2xxAction::CancelTimer(Uas2xxTimer::Retransmit),
                Uas2xxAction::CancelTimer(Uas2xxTimer::GiveUp),
                Uas2xxAction::Done
            ]
        );
        assert!(rt.is_done());
        assert!(rt.on_ack(&ack).is_empty());
        assert!(rt.on_timer(Uas2xxTimer::Retransmit).is_empty());
        assert!(rt.on_timer(Uas2xxTimer::GiveUp).is_empty());
    }

    #[test]
    fn gives_up_after_64_t1_asking_for_bye() {
        let (mut rt, _) = Uas2xxRetransmitter::new(ok(), false, &TimerConfig::default());
        assert_eq!(
            rt.on_timer(Uas2xxTimer::GiveUp),
            vec![Uas2xxAction::CancelTimer(Uas2xxTimer::Retransmit), Uas2xxAction::SendBye, Uas2xxAction::Done]
        );
        assert!(rt.is_done());
    }

    #[test]
    fn reliable_only_waits_for_the_ack() {
        let (mut rt, actions) = Uas2xxRetransmitter::new(ok(), true, &TimerConfig::default());
        assert_eq!(actions, vec![Uas2xxAction::Schedule(Uas2xxTimer::GiveUp, ms(32_000))]);
        assert!(rt.on_timer(Uas2xxTimer::Retransmit).is_empty());
        assert_eq!(rt.on_timer(Uas2xxTimer::GiveUp), vec![Uas2xxAction::SendBye, Uas2xxAction::Done]);
        let (mut rt, _) = Uas2xxRetransmitter::new(ok(), true, &TimerConfig::default());
        assert_eq!(
            rt.on_ack(&ack_for_2xx(&invite(), &ok())),
            vec![Uas2xxAction::CancelTimer(Uas2xxTimer::GiveUp), Uas2xxAction::Done]
        );
    }

    #[test]
    fn ack_for_2xx_content() {
        let ack = ack_for_2xx(&invite(), &ok());
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, Uri::try_from("sip:bob@192.0.2.4:5080;transport=udp").unwrap());
        let via = &header(&ack, "Via")[0];
        assert!(via.starts_with("SIP/2.0/UDP pc33.atlanta.example.com:5060;rport;branch=z9hG4bK"), "{via}");
        assert!(!via.contains("z9hG4bKnashds8"), "new branch");
        let branch = via.rsplit("branch=").next().unwrap();
        assert!(branch.starts_with(MAGIC_COOKIE) && branch.len() > 20);
        assert_eq!(
            header(&ack, "Route"),
            vec!["<sip:p0.example.com;lr>", "<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
        );
        assert_eq!(header(&ack, "From"), vec!["Alice <sip:alice@atlanta.example.com>;tag=1928301774"]);
        assert_eq!(header(&ack, "To"), vec!["Bob <sip:bob@biloxi.example.com>;tag=uas1"]);
        assert_eq!(header(&ack, "Call-ID"), vec!["a84b4c76e66710@pc33.atlanta.example.com"]);
        assert_eq!(header(&ack, "CSeq"), vec!["314159 ACK"]);
        assert_eq!(header(&ack, "Max-Forwards"), vec!["70"]);
        assert_eq!(header(&ack, "Content-Length"), vec!["0"]);
        let text = ack.to_string();
        assert!(Request::try_from(text.as_bytes()).is_ok(), "{text}");
        // Each ACK has its own branch.
        assert_ne!(header(&ack_for_2xx(&invite(), &ok()), "Via"), header(&ack, "Via"));
    }

    #[test]
    fn ack_for_2xx_without_contact_or_record_route() {
        let ok = response_to(&invite(), 200, None, Some("uas1"));
        let ack = ack_for_2xx(&invite(), &ok);
        assert_eq!(ack.uri, invite().uri);
        assert!(header(&ack, "Route").is_empty());
        let mut bare = ok.clone();
        bare.headers.push(Header::Contact("sip:bob@192.0.2.9;expires=30".into()));
        assert_eq!(ack_for_2xx(&invite(), &bare).uri.to_string(), "sip:bob@192.0.2.9");
    }

    #[test]
    fn list_splitting_respects_brackets_and_quotes() {
        assert_eq!(split_list("<sip:a;x=1,2>, \"q,\\\"r\" <sip:b>"), vec!["<sip:a;x=1,2>", "\"q,\\\"r\" <sip:b>"]);
        assert!(split_list(" , ").is_empty());
    }
}
