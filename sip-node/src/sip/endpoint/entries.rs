//! The endpoint's bookkeeping of one live transaction: its state machine, where its messages
//! go and who its user is.

use super::TuSender;
use crate::sip::guard::{Slot, SourceClass};
use crate::sip::transaction::{ClientInvite, ClientNonInvite, ServerInvite, ServerNonInvite, TransactionKey};
use crate::sip::transport::Peer;

#[allow(clippy::large_enum_variant)] // one per live transaction; boxing would only add a pointer chase
pub(super) enum ClientTxn {
    Invite(ClientInvite),
    NonInvite(ClientNonInvite),
}

pub(super) struct ClientEntry {
    pub(super) txn: ClientTxn,
    pub(super) peer: Peer,
    pub(super) tu: TuSender,
}

pub(super) enum ServerTxn {
    Invite(ServerInvite),
    NonInvite(ServerNonInvite),
}

pub(super) struct ServerEntry {
    pub(super) txn: ServerTxn,
    /// The request's To tag as the transport parsed it, for delivering it to its dialog.
    pub(super) to_tag: Option<String>,
    pub(super) peer: Peer,
    pub(super) source: SourceClass,
    pub(super) tu: Option<TuSender>,
    pub(super) cancelled: bool,
    /// A non-carrier's share of the transaction budget, given back when the entry goes.
    pub(super) _slot: Option<Slot>,
}

impl ServerEntry {
    /// A new transaction's entry, its user not known yet.
    pub(super) fn new(
        txn: ServerTxn,
        to_tag: Option<String>,
        peer: Peer,
        source: SourceClass,
        slot: Option<Slot>,
    ) -> Self {
        ServerEntry { txn, to_tag, peer, source, tu: None, cancelled: false, _slot: slot }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) enum TxnRef {
    Client(TransactionKey),
    Server(TransactionKey),
}
