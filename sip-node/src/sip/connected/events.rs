//! The machine's inputs ([`Event`]) and outputs ([`Action`]), with the names they use: the
//! legs, the timers, how a call ended.

use std::time::Duration;

use rsip::{Request, Response, SipMessage};

use super::{PlaceLeg, ReferralUpdate, Replacing};
use crate::sip::control::session_timer::SessionTimerKind;
use crate::sip::transaction::TransactionKey;
use crate::sip::transaction::uas2xx::Uas2xxTimer;

/// Which leg a message belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(crate) enum Leg {
    /// The caller's dialog: the node answered its INVITE (UAS).
    A,
    /// The callee's dialog: the node sent the INVITE (UAC).
    B,
}

impl Leg {
    /// The other leg.
    pub(crate) fn other(self) -> Leg {
        match self {
            Leg::A => Leg::B,
            Leg::B => Leg::A,
        }
    }
}

/// Which side ended a call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Ender {
    Caller,
    Callee,
    System,
}

impl From<Ender> for crate::store::HangupBy {
    fn from(ender: Ender) -> Self {
        match ender {
            Ender::Caller => crate::store::HangupBy::Caller,
            Ender::Callee => crate::store::HangupBy::Callee,
            Ender::System => crate::store::HangupBy::System,
        }
    }
}

/// How the connected phase ended: the CDR's code, reason and who hung up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ending {
    pub(crate) code: u16,
    pub(crate) reason: String,
    pub(crate) by: Ender,
}

/// The machine's timers. New features (session refresh, ...) add their own variant.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(crate) enum Timer {
    /// The 2xx retransmission timers of leg A.
    Uas2xx(Uas2xxTimer),
    /// The wait for the final response to our BYE ran out.
    ByeWait,
    /// The call's maximum duration passed.
    MaxDuration,
    /// A leg's session timer (RFC 4028): refresh or expiry.
    Session(Leg, SessionTimerKind),
}

/// What happened to the call.
#[derive(Debug)]
pub(crate) enum Event {
    /// A request in a leg's dialog; `key` is `None` for ACK (no transaction).
    Request { leg: Leg, request: Request, key: Option<TransactionKey> },
    /// A response on a leg (to a request the machine sent, or a retransmitted 2xx).
    Response { leg: Leg, response: Response },
    /// A request the machine sent on `leg` got no final response (Timer B/F).
    TransactionTimeout { leg: Leg },
    /// A timer the machine asked for expired.
    Timer(Timer),
    /// The node is stopping: calls in progress are ended.
    Draining,
    /// No RTP for `silent_for`.
    MediaTimeout { silent_for: Duration },
    /// The AI agent's session ended; `reason` is the CDR text.
    AgentEnded { reason: String },
    /// A leg's event channel closed (the endpoint stopped).
    ChannelClosed { leg: Leg },
    /// How placing a referred leg goes (`refer.rs`).
    Referral(ReferralUpdate),
    /// An INVITE with `Replaces` for a leg's dialog (`replaces.rs`).
    Replacing(Box<Replacing>),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Answer a request through its server transaction.
    Respond { key: TransactionKey, response: Response },
    /// Send a request on a leg through a client transaction (its events come back on the leg).
    Send { leg: Leg, request: Request },
    /// Send a message statelessly to the leg's peer (ACK for a 2xx).
    SendStateless { leg: Leg, message: SipMessage },
    /// Retransmit the 2xx to the caller statelessly (counted in the node's metrics).
    Retransmit { leg: Leg, response: Response },
    /// Arm (or re-arm) a timer.
    Schedule(Timer, Duration),
    /// Disarm a timer.
    CancelTimer(Timer),
    /// Check a REFER's target and place the new leg (`refer.rs`); the outcome comes back as
    /// [`Event::Referral`].
    PlaceLeg(Box<PlaceLeg>),
    /// The referred leg took `leg`'s place: its channels replace the old ones, and the old
    /// dialog is unregistered.
    ReplaceLeg { leg: Leg, old_call_id: String, old_local_tag: String },
    /// A new dialog with `peer` took `leg`'s place on the same channel (INVITE with
    /// `Replaces`): register it (Call-ID, our tag), unregister the old one.
    Rebind { leg: Leg, peer: crate::sip::transport::Peer, register: (String, String), unregister: (String, String) },
    /// The call is over; nothing more will be asked.
    End(Ending),
}
