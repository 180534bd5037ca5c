//! Enumerations shared by the resource types (operator) and the stored configuration (node).
//! They derive `JsonSchema` so that the CRDs are generated from the very same definitions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every accepted spelling, in declaration order (used in error messages).
            pub const ALL: &'static [&'static str] = &[$($text),+];

            /// The spelling used in manifests and in the database.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!("{other:?} is not one of {}", Self::ALL.join(", "))),
                }
            }
        }
    };
}

string_enum! {
    /// SIP transport towards a gateway.
    Transport { Udp = "UDP", Tcp = "TCP", Tls = "TLS" }
}

impl Transport {
    /// The port a gateway listens on when the manifest does not say (RFC 3261 §19.1.2).
    pub fn default_port(self) -> u16 {
        match self {
            Self::Udp | Self::Tcp => 5060,
            Self::Tls => 5061,
        }
    }
}

string_enum! {
    /// How the trunk and the provider authenticate each other.
    AuthMethod {
        /// No authentication (test peers only).
        None = "none",
        /// SIP digest (RFC 8760/2617) with the credentials from the trunk's Secret.
        Digest = "digest",
        /// Source-IP allowlisting (the usual wholesale setup).
        Ip = "ip",
        /// Mutual TLS.
        Certificate = "certificate",
    }
}

string_enum! {
    /// Whether a trunk's media is SRTP (RFC 3711) with SDES keys (RFC 4568 `a=crypto`).
    SrtpMode {
        /// Only SRTP: a plain-RTP offer from the trunk is refused with 488, and offers to it
        /// are `RTP/SAVP` with `a=crypto`.
        Required = "required",
        /// SRTP when the peer does it: offers to the trunk are `RTP/AVP` with `a=crypto`
        /// (best effort), an offer from it is answered in kind.
        Optional = "optional",
        /// Plain RTP only (the default). Spelt `disabled`, not `off`: Kubernetes reads YAML 1.1,
        /// where an unquoted `off` is the boolean false, which the schema would refuse.
        Disabled = "disabled",
    }
}

impl Default for SrtpMode {
    fn default() -> Self {
        Self::Disabled
    }
}

string_enum! {
    /// Audio codecs and the DTMF event payload a trunk may negotiate.
    Codec { Pcmu = "PCMU", Pcma = "PCMA", TelephoneEvent = "telephone-event" }
}

string_enum! {
    /// Direction of a routing rule or a call.
    Direction { Inbound = "inbound", Outbound = "outbound" }
}

string_enum! {
    /// How an outbound rule orders its trunks.
    TrunkSelection {
        /// Try the trunks in the order listed.
        Ordered = "ordered",
        /// Try the trunk with the lowest outbound per-minute rate first.
        Cheapest = "cheapest",
    }
}

string_enum! {
    /// Where an inbound call goes.
    DestinationType {
        /// An AI agent over WebSocket (Twilio Media Streams protocol).
        Websocket = "websocket",
        /// A SIP URI.
        Sip = "sip",
        /// Another number, dialled out through a trunk.
        Number = "number",
        /// Refuse the call with a SIP status code.
        Reject = "reject",
    }
}
