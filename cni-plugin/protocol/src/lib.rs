//! What `keyway-cni` and `keyway-agent` say to each other, below both: neither binary's crate
//! depends on the other's.
//!
//! - [`handoff`]: the messages on the agent's unix socket, their framing and decoder (refusing
//!   anything malformed, with a reason), and the plugin's blocking client;
//! - [`firewall`]: the pod's nftables table, which the plugin installs at ADD (egress closed) and
//!   the agent replaces whenever the pod's egress policy changes;
//! - [`gateway`]: the node's gateway table, device and routes, which the agent makes and the
//!   installer removes;
//! - [`Code`]: the CNI error codes an acknowledgement carries, which the plugin passes on;
//! - [`DEFAULT_AGENT_SOCKET`]: where the agent listens unless told otherwise;
//! - [`fuzzing`]: the checks the handoff decoder's fuzz target makes on arbitrary input.
#![forbid(unsafe_code)]

pub mod firewall;
pub mod fuzzing;
pub mod gateway;
pub mod handoff;

/// Where the agent listens unless configured otherwise; the plugin's default too, so an agent
/// started with no `--socket` serves a plugin configured with none.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/keyway/agent.sock";

/// The CNI specification's error codes (keyway's own would be 100 and up; none are used yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    LimitedConnectivity = 51,
    /// Anything else (the value Go plugins use for plain errors).
    Other = 999,
}

impl Code {
    pub fn from_u32(n: u32) -> Code {
        match n {
            1 => Code::IncompatibleVersion,
            2 => Code::UnsupportedField,
            3 => Code::UnknownContainer,
            4 => Code::InvalidEnvironment,
            5 => Code::IoFailure,
            6 => Code::DecodeFailure,
            7 => Code::InvalidConfig,
            11 => Code::TryAgainLater,
            50 => Code::NotAvailable,
            51 => Code::LimitedConnectivity,
            _ => Code::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn codes_round_trip_and_unknown_ones_are_other() {
        for c in [
            Code::IncompatibleVersion,
            Code::UnsupportedField,
            Code::UnknownContainer,
            Code::InvalidEnvironment,
            Code::IoFailure,
            Code::DecodeFailure,
            Code::InvalidConfig,
            Code::TryAgainLater,
            Code::NotAvailable,
            Code::LimitedConnectivity,
            Code::Other,
        ] {
            assert_eq!(Code::from_u32(c as u32), c);
        }
        assert_eq!(Code::from_u32(12), Code::Other);
    }
}
