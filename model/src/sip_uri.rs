//! SIP URIs an API client names as a destination (a transfer's `to`): `sip:` or `sips:`, an
//! optional user, a host (name, IPv4, `[IPv6]`), an optional port and `;parameters`. The API
//! and the nodes read them with this one parser, so that both judge the same host: which
//! host a URI reaches decides whether it may be dialled (a Trunk's gateway, or a host the
//! egress allow-list names), so anything that could make two readers disagree (headers after
//! `?`, spaces, control characters, escapes in the host) is refused rather than interpreted.

/// The longest URI taken.
pub const MAX_LEN: usize = 256;

/// Why a destination is not a SIP URI the nodes dial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SipUriError {
    #[error("not a sip: or sips: URI")]
    Scheme,
    #[error("longer than {MAX_LEN} characters")]
    TooLong,
    #[error("spaces, control characters and `?` headers are not allowed in a destination URI")]
    Forbidden,
    #[error("the URI names no host")]
    NoHost,
    #[error("the host {0:?} is not a host name or an IP address")]
    BadHost(String),
    #[error("the port {0:?} is not a port number")]
    BadPort(String),
    #[error("the user part {0:?} has characters a SIP URI user may not have")]
    BadUser(String),
}

/// A parsed destination URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    /// `sips:` (TLS end to end).
    pub secure: bool,
    pub user: Option<String>,
    /// Lower-case; an IPv6 address without its brackets.
    pub host: String,
    pub port: Option<u16>,
    /// The `;transport=` parameter, lower-case.
    pub transport: Option<String>,
}

impl SipUri {
    /// Parses `sip:[user@]host[:port][;params]` (see the module doc for what is refused).
    pub fn parse(value: &str) -> Result<SipUri, SipUriError> {
        let (secure, rest) = if let Some(rest) = strip_prefix_ci(value, "sips:") {
            (true, rest)
        } else if let Some(rest) = strip_prefix_ci(value, "sip:") {
            (false, rest)
        } else {
            return Err(SipUriError::Scheme);
        };
        if value.len() > MAX_LEN {
            return Err(SipUriError::TooLong);
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '<' || c == '>') {
            return Err(SipUriError::Forbidden);
        }
        // One `@` at most, and none in the parameters: where the user ends is then beyond doubt.
        if rest.matches('@').count() > 1 {
            return Err(SipUriError::Forbidden);
        }
        let (user, after) = match rest.split_once('@') {
            Some((user, after)) => (Some(user), after),
            None => (None, rest),
        };
        let (hostport, params) = after.split_once(';').unwrap_or((after, ""));
        let user = match user {
            Some(user) if user.is_empty() || !user.chars().all(is_user_char) => {
                return Err(SipUriError::BadUser(user.to_string()));
            }
            other => other.map(str::to_string),
        };
        let (host, port) = split_host_port(hostport)?;
        let transport = params.split(';').find_map(|param| {
            let (name, value) = param.split_once('=')?;
            name.trim().eq_ignore_ascii_case("transport").then(|| value.trim().to_ascii_lowercase())
        });
        Ok(SipUri { secure, user, host, port, transport })
    }
}

impl SipUri {
    /// The number a dial-string user names (digits with `+ - . ( )` only, as a carrier's
    /// gateway would route it), in E.164 form the way the nodes normalise numbers (ten digits
    /// are taken as NANP); `None` for a named user (`support`) or none. A number at a trunk's
    /// gateway must pass the same outbound RoutingRule check as an E.164 target, or a SIP URI
    /// would be a way around the toll-fraud guard.
    pub fn number(&self) -> Option<String> {
        let user = self.user.as_deref()?;
        if !user.chars().all(|c| c.is_ascii_digit() || "+-.()".contains(c)) {
            return None;
        }
        let digits: String = user.chars().filter(char::is_ascii_digit).collect();
        if digits.is_empty() || digits.len() > 15 {
            return None;
        }
        Some(match digits.len() {
            _ if user.starts_with('+') => format!("+{digits}"),
            10 => format!("+1{digits}"),
            _ => format!("+{digits}"),
        })
    }
}

fn strip_prefix_ci<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &value[prefix.len()..])
}

/// RFC 3261's user characters (unreserved, escapes and the user-unreserved set) but `;`,
/// `?` and `@`, which other readers may take for the end of the user.
fn is_user_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.!~*'()%&=+$,/".contains(c)
}

fn split_host_port(hostport: &str) -> Result<(String, Option<u16>), SipUriError> {
    if hostport.is_empty() {
        return Err(SipUriError::NoHost);
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| SipUriError::BadHost(hostport.into()))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(SipUriError::BadHost(hostport.into()));
        }
        match after {
            "" => (host.to_string(), None),
            _ => (host.to_string(), Some(after.strip_prefix(':').ok_or_else(|| SipUriError::BadPort(after.into()))?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (hostport.to_string(), None),
        }
    };
    let host = host.to_ascii_lowercase();
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .trim_end_matches('.')
            .split('.')
            .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !name_ok && host.parse::<std::net::IpAddr>().is_err() {
        return Err(SipUriError::BadHost(host));
    }
    let port = match port {
        None => None,
        Some(port) => {
            Some(port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| SipUriError::BadPort(port.into()))?)
        }
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_uris_parse_into_their_host() {
        let uri = SipUri::parse("sip:support@PBX.example.com:5080;transport=TCP").unwrap();
        assert_eq!(uri.user.as_deref(), Some("support"));
        assert_eq!(
            (uri.host.as_str(), uri.port, uri.transport.as_deref()),
            ("pbx.example.com", Some(5080), Some("tcp"))
        );
        assert!(!uri.secure);
        let uri = SipUri::parse("sips:+15552223333@[2001:db8::7]:5061").unwrap();
        assert!(uri.secure);
        assert_eq!((uri.host.as_str(), uri.port), ("2001:db8::7", Some(5061)));
        let uri = SipUri::parse("SIP:10.1.2.3").unwrap();
        assert_eq!((uri.user, uri.host.as_str(), uri.port), (None, "10.1.2.3", None));
    }

    #[test]
    fn anything_two_readers_could_read_differently_is_refused() {
        for (bad, error) in [
            ("tel:+15551230000", SipUriError::Scheme),
            ("sip:alice@pbx.example.com?Route=%3Csip:evil%3E", SipUriError::Forbidden),
            ("sip:alice@pbx.example.com\r\nX: 1", SipUriError::Forbidden),
            ("sip:alice@evil.example@pbx.example.com", SipUriError::Forbidden),
            ("sip:alice;x=1@pbx.example.com", SipUriError::BadUser("alice;x=1".into())),
            ("sip:alice@", SipUriError::NoHost),
            ("sip:alice@pbx_example.com", SipUriError::BadHost("pbx_example.com".into())),
            ("sip:alice@pbx.example.com:99999", SipUriError::BadPort("99999".into())),
            ("sip:@pbx.example.com", SipUriError::BadUser(String::new())),
            ("sip:<alice@pbx.example.com>", SipUriError::Forbidden),
        ] {
            assert_eq!(SipUri::parse(bad), Err(error), "{bad:?}");
        }
        assert_eq!(SipUri::parse(&format!("sip:{}@h.example", "a".repeat(300))), Err(SipUriError::TooLong));
    }

    #[test]
    fn a_dial_string_user_is_a_number_and_a_name_is_not() {
        let number = |uri: &str| SipUri::parse(uri).unwrap().number();
        assert_eq!(number("sip:+1-555-222-3333@gw.example").as_deref(), Some("+15552223333"));
        assert_eq!(number("sip:5552223333@gw.example").as_deref(), Some("+15552223333"));
        assert_eq!(number("sip:011442071234567@gw.example").as_deref(), Some("+011442071234567"));
        assert_eq!(number("sip:support@pbx.example"), None);
        assert_eq!(number("sip:agent007@pbx.example"), None);
        assert_eq!(number("sip:pbx.example"), None);
    }
}
