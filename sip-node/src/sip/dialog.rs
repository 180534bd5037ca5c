//! One side of a dialog (RFC 3261 section 12) as the B2BUA holds it: identifiers, the remote
//! target and route set, and our CSeq, so that in-dialog requests (BYE, re-INVITE, UPDATE, ACK)
//! can be built for either leg.

use rsip::headers::{self, Header};
use rsip::prelude::*;
use rsip::{Method, Request, Response, Uri};

use super::message;
use super::transport::Peer;

/// Our view of one dialog.
#[derive(Debug, Clone)]
pub struct Dialog {
    pub call_id: String,
    /// Our tag, and the header value (name-addr with tag) of our side.
    pub local_tag: String,
    pub local: String,
    /// The far side's header value (name-addr with its tag).
    pub remote: String,
    /// Where in-dialog requests go (the far side's Contact).
    pub remote_target: Uri,
    /// Route headers for in-dialog requests, in the order they are sent.
    pub route_set: Vec<String>,
    /// Our next CSeq number.
    pub local_cseq: u32,
    /// The hop in-dialog requests are sent to.
    pub peer: Peer,
    /// Our Contact header value.
    pub contact: String,
}

fn contact_uri(message: &impl HeadersExt) -> Option<Uri> {
    message.contact_header().ok()?.uri().ok()
}

fn record_routes(headers: &rsip::Headers) -> Vec<String> {
    headers
        .iter()
        .filter_map(|h| match h {
            Header::RecordRoute(rr) => Some(rr.value().to_string()),
            _ => None,
        })
        .flat_map(|value| value.split(',').map(|s| s.trim().to_string()).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Dialog {
    /// The UAS side of a dialog created by answering `invite` with our tag `local_tag`.
    /// In-dialog requests go back to where the INVITE came from, which is what works through
    /// NAT; the route set is the INVITE's Record-Route in order (RFC 3261 12.1.1).
    pub fn as_uas(invite: &Request, local_tag: &str, peer: Peer, contact: String) -> Option<Dialog> {
        let to = invite.to_header().ok()?.value().to_string();
        Some(Dialog {
            call_id: message::call_id(invite),
            local_tag: local_tag.to_string(),
            local: format!("{to};tag={local_tag}"),
            remote: invite.from_header().ok()?.value().to_string(),
            remote_target: contact_uri(invite).unwrap_or_else(|| invite.uri.clone()),
            route_set: record_routes(&invite.headers),
            local_cseq: 1,
            peer,
            contact,
        })
    }

    /// The UAC side of a dialog established by `response` (18x with tag or 2xx) to our
    /// `invite`, whose From tag is `local_tag` (passed in: the caller chose it, and reading it
    /// back costs an rsip From parse); the route set is the response's Record-Route reversed
    /// (RFC 3261 12.1.2).
    pub fn as_uac(
        invite: &Request,
        local_tag: &str,
        response: &Response,
        peer: Peer,
        contact: String,
    ) -> Option<Dialog> {
        let mut route_set = record_routes(&response.headers);
        route_set.reverse();
        Some(Dialog {
            call_id: message::call_id(invite),
            local_tag: local_tag.to_string(),
            local: invite.from_header().ok()?.value().to_string(),
            remote: response.to_header().ok()?.value().to_string(),
            remote_target: contact_uri(response).unwrap_or_else(|| invite.uri.clone()),
            route_set,
            local_cseq: message::cseq(invite).map(|(n, _)| n).unwrap_or(1),
            peer,
            contact,
        })
    }

    /// A new in-dialog request with the next CSeq (ACK reuses the INVITE's number: pass
    /// `cseq` for it). `via` is a fresh Via header from the endpoint.
    pub fn request(
        &mut self,
        method: Method,
        via: Header,
        cseq: Option<u32>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Request {
        let cseq = cseq.unwrap_or_else(|| {
            self.local_cseq += 1;
            self.local_cseq
        });
        let mut headers: Vec<Header> = vec![
            via,
            Header::MaxForwards(headers::MaxForwards::from(70u32)),
            Header::From(headers::From::new(self.local.clone())),
            Header::To(headers::To::new(self.remote.clone())),
            Header::CallId(headers::CallId::new(self.call_id.clone())),
            Header::CSeq(headers::CSeq::new(format!("{cseq} {method}"))),
        ];
        for route in &self.route_set {
            headers.push(Header::Route(headers::Route::new(route.clone())));
        }
        if matches!(method, Method::Invite | Method::Update) {
            headers.push(Header::Contact(headers::Contact::new(self.contact.clone())));
        }
        let mut request = Request {
            method,
            uri: self.remote_target.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: vec![],
        };
        let (content_type, bytes) = match body {
            Some((content_type, bytes)) => (Some(content_type), bytes),
            None => (None, vec![]),
        };
        message::set_body(&mut request.headers, &mut request.body, bytes, content_type);
        request
    }

    /// A BYE with the `Reason` header(s) saying why (RFC 3326).
    pub fn bye(&mut self, via: Header, reason: &[Header]) -> Request {
        let mut bye = self.request(Method::Bye, via, None, None);
        bye.headers.extend(reason.to_vec());
        bye
    }
}

/// The Content-Type of a message, if any.
pub fn content_type(headers: &rsip::Headers) -> Option<String> {
    headers.iter().find_map(|h| match h {
        Header::ContentType(ct) => Some(ct.value().to_string()),
        _ => None,
    })
}
