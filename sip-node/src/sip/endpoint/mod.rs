//! The transaction layer's driver: one task that owns every client and server transaction,
//! feeds them messages from the transports and timer expiries, carries out what they decide
//! (send, deliver, arm timers), and routes what belongs to a dialog to the task of its call.
//!
//! The state machines themselves live in [`super::transaction`] and know nothing of sockets or
//! clocks; this module is the only place where they meet tokio. Transaction users (calls,
//! registrations) talk to it through the cheap [`Endpoint`] handle and receive [`TuEvent`]s on
//! their own channels, so a slow call never holds up the others.

use foldhash::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use rsip::{Method, Request, Response, SipMessage};
use tokio::sync::mpsc;
use tokio_util::time::{DelayQueue, delay_queue};

use super::guard::{Guard, Slot, SourceClass};
use super::message::{self, Incoming};
use super::transaction::{
    Action, ClientInvite, ClientNonInvite, ServerInvite, ServerInviteState, ServerNonInvite, Timer, TimerConfig,
    TransactionKey, response_to,
};
use super::transport::{Peer, Protocol, Received, TransportLayer};
use crate::metrics::NodeMetrics;

mod entries;
use entries::{ClientEntry, ClientTxn, ServerEntry, ServerTxn, TxnRef};

/// Capacity of the queue of new out-of-dialog requests waiting for the call router; beyond it
/// the node answers `503` at once instead of queueing work it cannot do in time.
const NEW_REQUEST_QUEUE: usize = 4096;

/// What a transaction user hears from the endpoint.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // built once per message and moved, never stored in bulk
pub enum TuEvent {
    /// A response to a request this user sent (or a retransmitted 2xx for its dialog).
    Response(Response),
    /// The request this user sent got no final response in time (Timer B/F): act as on 408.
    Timeout,
    /// A request inside this user's dialog. `key` is `None` for ACK, which has no transaction.
    Request { request: Request, key: Option<TransactionKey>, peer: Peer },
    /// The INVITE this user is answering was cancelled; the endpoint already answered the
    /// CANCEL with 200 and the user must now answer the INVITE with 487.
    Cancelled,
}

/// Sender half through which a transaction user receives its events.
pub type TuSender = mpsc::UnboundedSender<TuEvent>;

/// An out-of-dialog request for the call router (INVITE, OPTIONS, MESSAGE, ...).
#[derive(Debug)]
pub struct NewRequest {
    pub request: Request,
    pub key: TransactionKey,
    pub peer: Peer,
    /// What the configuration says about the source (the call router caps non-carriers).
    pub source: SourceClass,
}

enum Command {
    Send { request: Request, peer: Peer, tu: TuSender },
    Respond { key: TransactionKey, response: Response },
    Stateless { message: SipMessage, peer: Peer },
    Attach { key: TransactionKey, tu: TuSender },
    Dialog { call_id: String, local_tag: String, tu: Option<TuSender> },
    HasDialog { call_id: String, local_tag: String, reply: tokio::sync::oneshot::Sender<Option<TuSender>> },
}

/// Handle to the endpoint task. Cloning is cheap; the task stops when every handle and the
/// transports are gone.
#[derive(Clone)]
pub struct Endpoint {
    commands: mpsc::UnboundedSender<Command>,
    transport: Arc<TransportLayer>,
}

impl Endpoint {
    /// Starts the endpoint task over messages from `received`; new out-of-dialog requests come
    /// out of the returned receiver.
    pub fn start(
        transport: Arc<TransportLayer>,
        received: mpsc::Receiver<Received>,
        timers: TimerConfig,
        guard: Arc<Guard>,
        metrics: NodeMetrics,
    ) -> (Endpoint, mpsc::Receiver<NewRequest>) {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (new_tx, new_rx) = mpsc::channel(NEW_REQUEST_QUEUE);
        let core = Core {
            transport: Arc::clone(&transport),
            timers,
            guard,
            metrics,
            clients: HashMap::default(),
            servers: HashMap::default(),
            dialogs: HashMap::default(),
            queue: DelayQueue::new(),
            armed: HashMap::default(),
            new_requests: new_tx,
        };
        tokio::spawn(core.run(received, command_rx));
        (Endpoint { commands, transport }, new_rx)
    }

    /// The transports under this endpoint (for Via/Contact addresses).
    pub fn transport(&self) -> &Arc<TransportLayer> {
        &self.transport
    }

    /// Sends a request in a new client transaction; responses and the timeout go to `tu`.
    /// The request must carry its own top Via with a fresh branch ([`Endpoint::via_for`]).
    pub fn send_request(&self, request: Request, peer: Peer, tu: TuSender) {
        let _ = self.commands.send(Command::Send { request, peer, tu });
    }

    /// Answers a request through its server transaction.
    pub fn respond(&self, key: &TransactionKey, response: Response) {
        let _ = self.commands.send(Command::Respond { key: key.clone(), response });
    }

    /// Sends a message outside any transaction (ACK for 2xx, 2xx retransmissions).
    pub fn send_stateless(&self, message: SipMessage, peer: Peer) {
        let _ = self.commands.send(Command::Stateless { message, peer });
    }

    /// Makes `tu` the user of a server transaction, so that a CANCEL reaches it.
    pub fn attach(&self, key: &TransactionKey, tu: TuSender) {
        let _ = self.commands.send(Command::Attach { key: key.clone(), tu });
    }

    /// Routes requests whose Call-ID and our tag match to `tu` from now on.
    pub fn register_dialog(&self, call_id: &str, local_tag: &str, tu: TuSender) {
        let _ = self.commands.send(Command::Dialog {
            call_id: call_id.to_string(),
            local_tag: local_tag.to_string(),
            tu: Some(tu),
        });
    }

    /// Stops routing a dialog (requests for it are then answered 481).
    pub fn unregister_dialog(&self, call_id: &str, local_tag: &str) {
        let _ = self.commands.send(Command::Dialog {
            call_id: call_id.to_string(),
            local_tag: local_tag.to_string(),
            tu: None,
        });
    }

    /// Whether a dialog with this Call-ID and our tag is registered (an INVITE with
    /// `Replaces`, RFC 3891, must name one).
    pub async fn has_dialog(&self, call_id: &str, local_tag: &str) -> bool {
        self.dialog_user(call_id, local_tag).await.is_some()
    }

    /// The user a dialog's requests go to, if the dialog is registered (an INVITE with
    /// `Replaces` is handed to the call that holds the dialog it names).
    pub async fn dialog_user(&self, call_id: &str, local_tag: &str) -> Option<TuSender> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let command = Command::HasDialog { call_id: call_id.to_string(), local_tag: local_tag.to_string(), reply };
        self.commands.send(command).ok()?;
        answer.await.ok().flatten()
    }

    /// A Via header for a request towards `peer` with a fresh branch and `rport` (RFC 3581).
    pub fn via_for(&self, peer: Peer) -> rsip::Header {
        let (host, port) = self.transport.sent_by_peer(peer);
        let branch = super::transaction::new_branch();
        rsip::Header::Via(format!("SIP/2.0/{} {host}:{port};branch={branch};rport", peer.protocol.as_str()).into())
    }

    /// Our Contact URI for a hop towards `peer`, with `user` as the user part.
    pub fn contact_for(&self, peer: Peer, user: &str) -> String {
        let (host, port) = self.transport.sent_by_peer(peer);
        let transport = match peer.protocol {
            Protocol::Udp => "",
            Protocol::Tcp => ";transport=tcp",
            Protocol::Tls => ";transport=tls",
        };
        if user.is_empty() {
            format!("<sip:{host}:{port}{transport}>")
        } else {
            format!("<sip:{user}@{host}:{port}{transport}>")
        }
    }
}

/// The endpoint's maps hash with foldhash (seeded per process) rather than the standard
/// library's SipHash: every message is a few lookups by branch, Call-ID and tag, and SipHash
/// was a few per cent of the node's instructions per call (issue 22's profile).
struct Core {
    transport: Arc<TransportLayer>,
    timers: TimerConfig,
    guard: Arc<Guard>,
    metrics: NodeMetrics,
    clients: HashMap<TransactionKey, ClientEntry>,
    servers: HashMap<TransactionKey, ServerEntry>,
    dialogs: HashMap<(String, String), TuSender>,
    queue: DelayQueue<(TxnRef, Timer)>,
    armed: HashMap<(TxnRef, Timer), delay_queue::Key>,
    new_requests: mpsc::Sender<NewRequest>,
}

impl Core {
    async fn run(mut self, mut received: mpsc::Receiver<Received>, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut commands_open = true;
        loop {
            tokio::select! {
                message = received.recv() => match message {
                    Some(message) => self.on_received(message),
                    None => break,
                },
                command = commands.recv(), if commands_open => match command {
                    Some(command) => self.on_command(command),
                    None => commands_open = false,
                },
                Some(expired) = self.queue.next(), if !self.queue.is_empty() => {
                    let (txn, timer) = expired.into_inner();
                    self.armed.remove(&(txn.clone(), timer));
                    self.on_timer(txn, timer);
                }
            }
            self.metrics.set_transactions(self.clients.len() + self.servers.len());
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Send { request, peer, tu } => self.start_client(request, peer, tu),
            Command::Respond { key, response } => {
                let Some(entry) = self.servers.get_mut(&key) else { return };
                let actions = match &mut entry.txn {
                    ServerTxn::Invite(txn) => txn.respond(response),
                    ServerTxn::NonInvite(txn) => txn.respond(response),
                };
                self.apply(TxnRef::Server(key), actions, false);
            }
            Command::Stateless { message, peer } => self.send(peer, &message, false),
            Command::Attach { key, tu } => {
                if let Some(entry) = self.servers.get_mut(&key) {
                    if entry.cancelled {
                        let _ = tu.send(TuEvent::Cancelled);
                    }
                    entry.tu = Some(tu);
                }
            }
            Command::Dialog { call_id, local_tag, tu: Some(tu) } => {
                self.dialogs.insert((call_id, local_tag), tu);
            }
            Command::Dialog { call_id, local_tag, tu: None } => {
                self.dialogs.remove(&(call_id, local_tag));
            }
            Command::HasDialog { call_id, local_tag, reply } => {
                let _ = reply.send(self.dialogs.get(&(call_id, local_tag)).cloned());
            }
        }
    }

    fn start_client(&mut self, request: Request, peer: Peer, tu: TuSender) {
        let Some(key) = TransactionKey::for_client_request(&request) else {
            tracing::warn!("request without a branch cannot start a transaction");
            let _ = tu.send(TuEvent::Timeout);
            return;
        };
        let reliable = peer.protocol.is_reliable();
        if request.method == Method::Cancel {
            // RFC 3261 9.1: once CANCEL is sent, the INVITE must end within 64*T1 even if the
            // callee never sends a final response.
            let invite = self.clients.iter_mut().find(|(k, _)| k.branch() == key.branch() && k.method() == "INVITE");
            if let Some((invite_key, ClientEntry { txn: ClientTxn::Invite(txn), .. })) = invite {
                let invite_key = invite_key.clone();
                let actions = txn.cancel_sent();
                self.apply(TxnRef::Client(invite_key), actions, false);
            }
        }
        let (txn, actions) = if request.method == Method::Invite {
            let (txn, actions) = ClientInvite::new(request, reliable, &self.timers);
            (ClientTxn::Invite(txn), actions)
        } else {
            let (txn, actions) = ClientNonInvite::new(request, reliable, &self.timers);
            (ClientTxn::NonInvite(txn), actions)
        };
        self.clients.insert(key.clone(), ClientEntry { txn, peer, tu });
        self.apply(TxnRef::Client(key), actions, false);
    }

    fn on_received(&mut self, received: Received) {
        let Received { peer, source, to_tag, .. } = received;
        match received.message {
            Incoming::UnknownMethod { method, request } => {
                self.metrics.message_received("unknown");
                // RFC 3261 8.2.1: 405 is for known methods we do not allow; unknown ones get 501.
                tracing::debug!(%method, peer = %peer.addr, "unknown method");
                let response = response_to(&request, 501, Some("Not Implemented"), None);
                self.send(peer, &SipMessage::Response(response), false);
            }
            Incoming::Message(SipMessage::Response(response)) => {
                self.metrics.message_received(&format!("{}xx", message::status(&response) / 100));
                self.on_response(response, peer);
            }
            Incoming::Message(SipMessage::Request(request)) => {
                self.metrics.message_received(&request.method.to_string());
                self.on_request(request, to_tag, peer, source);
            }
        }
    }

    fn on_response(&mut self, response: Response, peer: Peer) {
        if let Some(key) = TransactionKey::for_client_response(&response)
            && let Some(entry) = self.clients.get_mut(&key)
        {
            let actions = match &mut entry.txn {
                ClientTxn::Invite(txn) => txn.on_response(response),
                ClientTxn::NonInvite(txn) => txn.on_response(response),
            };
            self.apply(TxnRef::Client(key), actions, false);
            return;
        }
        // A 2xx retransmission after the INVITE transaction ended belongs to the dialog, whose
        // user re-sends its ACK (RFC 3261 13.2.2.4).
        let is_invite_2xx = matches!(message::cseq(&response), Some((_, Method::Invite)))
            && (200..300).contains(&message::status(&response));
        if is_invite_2xx
            && let Some(tag) = message::from_tag(&response)
            && let Some(tu) = self.dialogs.get(&(message::call_id(&response), tag))
        {
            let _ = tu.send(TuEvent::Response(response));
            return;
        }
        tracing::trace!(peer = %peer.addr, "stray response dropped");
        self.metrics.message_dropped("stray_response");
    }

    /// `to_tag` is the request's To tag as the transport's parse read it ([`Received::to_tag`]).
    fn on_request(&mut self, request: Request, to_tag: Option<String>, peer: Peer, source: SourceClass) {
        let Some(key) = TransactionKey::for_server_request(&request) else {
            // RFC 2543 peers without the magic cookie are not supported; say so.
            if source != SourceClass::Unknown {
                let response = response_to(&request, 400, Some("Via branch must start with z9hG4bK"), None);
                self.send(peer, &SipMessage::Response(response), false);
            }
            return;
        };
        if let Some(entry) = self.servers.get_mut(&key) {
            let actions = match &mut entry.txn {
                ServerTxn::Invite(txn) => txn.on_request(request),
                ServerTxn::NonInvite(txn) => txn.on_request(request),
            };
            self.apply(TxnRef::Server(key), actions, true);
            return;
        }
        // A source no trunk allows only takes part in dialogs the node has: anything else from
        // it gets no answer and no transaction (the transports already dropped what is
        // plainly out of dialog).
        if source == SourceClass::Unknown {
            let dialog = to_tag.as_ref().is_some_and(|tag| {
                let call_id = message::call_id(&request);
                self.dialogs.contains_key(&(call_id, tag.clone()))
            });
            if !dialog {
                self.metrics.message_dropped("unknown_source");
                return;
            }
        }
        match request.method {
            Method::Ack => {
                // ACK for a 2xx: no transaction, it belongs to the dialog.
                if let Some(tag) = to_tag
                    && let Some(tu) = self.dialogs.get(&(message::call_id(&request), tag))
                {
                    let _ = tu.send(TuEvent::Request { request, key: None, peer });
                } else {
                    self.metrics.message_dropped("stray_ack");
                }
            }
            Method::Cancel => self.on_cancel(request, key, peer, source),
            _ => self.start_server(request, to_tag, key, peer, source),
        }
    }

    /// A non-carrier's share of the server transaction budget; `Err` (and a counted drop) when
    /// its source or all non-carriers hold as many as allowed. Carriers need none.
    fn transaction_slot(&self, peer: Peer, source: SourceClass) -> Result<Option<Slot>, ()> {
        if source == SourceClass::Carrier {
            return Ok(None);
        }
        match self.guard.transactions.try_acquire(peer.addr.ip()) {
            Some(slot) => Ok(Some(slot)),
            None => {
                self.metrics.message_dropped("transaction_limit");
                Err(())
            }
        }
    }

    fn on_cancel(&mut self, request: Request, key: TransactionKey, peer: Peer, source: SourceClass) {
        let Ok(slot) = self.transaction_slot(peer, source) else { return };
        let target = TransactionKey::cancel_target(&request).and_then(|target| self.servers.get_mut(&target));
        let code = match target {
            Some(entry) => {
                // RFC 3261 9.2: a CANCEL for an INVITE that already has its final response is
                // answered 200 and changes nothing.
                if let ServerTxn::Invite(txn) = &entry.txn
                    && txn.state() == ServerInviteState::Proceeding
                {
                    entry.cancelled = true;
                    if let Some(tu) = &entry.tu {
                        let _ = tu.send(TuEvent::Cancelled);
                    }
                }
                200
            }
            None => 481,
        };
        let (txn, mut actions) = ServerNonInvite::new(request.clone(), peer.protocol.is_reliable(), &self.timers);
        actions.retain(|a| !matches!(a, Action::Deliver(_)));
        self.metrics.server_transaction_started();
        self.servers.insert(key.clone(), ServerEntry::new(ServerTxn::NonInvite(txn), None, peer, source, slot));
        self.apply(TxnRef::Server(key.clone()), actions, false);
        let response = response_to(&request, code, None, None);
        self.on_command(Command::Respond { key, response });
    }

    fn start_server(
        &mut self,
        request: Request,
        to_tag: Option<String>,
        key: TransactionKey,
        peer: Peer,
        source: SourceClass,
    ) {
        let Ok(slot) = self.transaction_slot(peer, source) else { return };
        let reliable = peer.protocol.is_reliable();
        let (txn, actions) = if request.method == Method::Invite {
            let (txn, actions) = ServerInvite::new(request, reliable, &self.timers);
            (ServerTxn::Invite(txn), actions)
        } else {
            let (txn, actions) = ServerNonInvite::new(request, reliable, &self.timers);
            (ServerTxn::NonInvite(txn), actions)
        };
        self.metrics.server_transaction_started();
        self.servers.insert(key.clone(), ServerEntry::new(txn, to_tag, peer, source, slot));
        self.apply(TxnRef::Server(key), actions, false);
    }

    /// Hands a new server transaction's request to its dialog or to the router, unless it
    /// requires an extension the node does not implement (`420`, in or out of a dialog).
    fn deliver_request(&mut self, key: TransactionKey, request: Request) {
        let Some((peer, source, to_tag)) = self.servers.get(&key).map(|e| (e.peer, e.source, e.to_tag.clone())) else {
            return;
        };
        let unsupported = message::unsupported_requirements(&request.headers);
        if !unsupported.is_empty() {
            tracing::debug!(method = %request.method, peer = %peer.addr, ?unsupported, "request requires unsupported extensions");
            let mut response = response_to(&request, 420, Some("Bad Extension"), None);
            response.headers.push(rsip::Header::Unsupported(unsupported.join(", ").into()));
            self.on_command(Command::Respond { key, response });
            return;
        }
        if let Some(tag) = to_tag {
            if let Some(tu) = self.dialogs.get(&(message::call_id(&request), tag)).cloned() {
                if let Some(entry) = self.servers.get_mut(&key) {
                    entry.tu = Some(tu.clone());
                }
                let _ = tu.send(TuEvent::Request { request, key: Some(key), peer });
            } else {
                let response = response_to(&request, 481, Some("Call/Transaction Does Not Exist"), None);
                self.on_command(Command::Respond { key, response });
            }
            return;
        }
        if let Err(error) = self.new_requests.try_send(NewRequest { request, key: key.clone(), peer, source }) {
            let request = match error {
                mpsc::error::TrySendError::Full(new) | mpsc::error::TrySendError::Closed(new) => new.request,
            };
            self.metrics.message_dropped("overload");
            let mut response = response_to(&request, 503, Some("Service Unavailable"), None);
            response.headers.push(rsip::Header::RetryAfter("5".into()));
            self.on_command(Command::Respond { key, response });
        }
    }

    fn on_timer(&mut self, txn: TxnRef, timer: Timer) {
        let actions = match &txn {
            TxnRef::Client(key) => match self.clients.get_mut(key) {
                Some(ClientEntry { txn: ClientTxn::Invite(t), .. }) => t.on_timer(timer),
                Some(ClientEntry { txn: ClientTxn::NonInvite(t), .. }) => t.on_timer(timer),
                None => return,
            },
            TxnRef::Server(key) => match self.servers.get_mut(key) {
                Some(ServerEntry { txn: ServerTxn::Invite(t), .. }) => t.on_timer(timer),
                Some(ServerEntry { txn: ServerTxn::NonInvite(t), .. }) => t.on_timer(timer),
                None => return,
            },
        };
        let retransmission = matches!(timer, Timer::A | Timer::E | Timer::G);
        self.apply(txn, actions, retransmission);
    }

    /// Carries out a transaction's actions. `retransmission` marks sends caused by a timer or a
    /// retransmitted request, for the retransmission counter.
    fn apply(&mut self, txn: TxnRef, actions: Vec<Action>, retransmission: bool) {
        for action in actions {
            match action {
                Action::Send(message) => {
                    let peer = match &txn {
                        TxnRef::Client(key) => self.clients.get(key).map(|e| e.peer),
                        TxnRef::Server(key) => self.servers.get(key).map(|e| e.peer),
                    };
                    if let Some(peer) = peer {
                        self.send(peer, &message, retransmission);
                    }
                }
                Action::Deliver(message) => match (&txn, message) {
                    (TxnRef::Client(key), SipMessage::Response(response)) => {
                        if let Some(entry) = self.clients.get(key) {
                            let _ = entry.tu.send(TuEvent::Response(response));
                        }
                    }
                    (TxnRef::Server(key), SipMessage::Request(request)) => {
                        self.deliver_request(key.clone(), request);
                    }
                    _ => {}
                },
                Action::Schedule(timer, after) => self.arm(txn.clone(), timer, after),
                Action::CancelTimer(timer) => {
                    if let Some(key) = self.armed.remove(&(txn.clone(), timer)) {
                        self.queue.remove(&key);
                    }
                }
                Action::Timeout => {
                    if let TxnRef::Client(key) = &txn
                        && let Some(entry) = self.clients.get(key)
                    {
                        let _ = entry.tu.send(TuEvent::Timeout);
                    }
                }
                Action::Terminated => self.terminate(&txn),
            }
        }
    }

    fn arm(&mut self, txn: TxnRef, timer: Timer, after: Duration) {
        let slot = (txn.clone(), timer);
        if let Some(key) = self.armed.get(&slot) {
            self.queue.reset(key, after);
        } else {
            let key = self.queue.insert((txn, timer), after);
            self.armed.insert(slot, key);
        }
    }

    fn terminate(&mut self, txn: &TxnRef) {
        match txn {
            TxnRef::Client(key) => {
                self.clients.remove(key);
            }
            TxnRef::Server(key) => {
                self.servers.remove(key);
            }
        }
        for timer in Timer::ALL {
            if let Some(key) = self.armed.remove(&(txn.clone(), timer)) {
                self.queue.remove(&key);
            }
        }
    }

    fn send(&self, peer: Peer, message: &SipMessage, retransmission: bool) {
        if retransmission {
            self.metrics.retransmission();
        }
        let kind = match message {
            SipMessage::Request(r) => r.method.to_string(),
            SipMessage::Response(r) => format!("{}xx", message::status(r) / 100),
        };
        self.metrics.message_sent(&kind);
        let bytes = message::encode(message);
        let transport = Arc::clone(&self.transport);
        if peer.protocol == Protocol::Udp {
            if let Err(error) = transport.try_send_udp(peer.addr, &bytes) {
                tracing::debug!(%error, "UDP send failed");
            }
        } else {
            tokio::spawn(async move {
                if let Err(error) = transport.send(peer, bytes).await {
                    tracing::debug!(%error, "send failed");
                }
            });
        }
    }
}
