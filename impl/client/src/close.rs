//! Websocket close codes (RFC 6455, 7.4).

use std::fmt;

/// A websocket close code (RFC 6455, 7.4): what [`WebSocketTask::cancel_with`] sends, what
/// [`WebSocketTask::close_code`] and the delegate's `did_close` report.
///
/// Any `u16` converts into one, but only codes a close frame may carry
/// ([`is_allowed`](Self::is_allowed)) are sent: `cancel_with` refuses the others with
/// [`Error::InvalidCloseCode`](crate::Error::InvalidCloseCode). [`NO_STATUS`](Self::NO_STATUS)
/// (1005) is reported for a peer's close frame without a code, and never sent.
///
/// [`WebSocketTask::cancel_with`]: crate::WebSocketTask::cancel_with
/// [`WebSocketTask::close_code`]: crate::WebSocketTask::close_code
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CloseCode(u16);

impl CloseCode {
    /// 1000: the purpose the websocket was opened for is fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (what a websocket whose handle is dropped sends).
    pub const GOING_AWAY: CloseCode = CloseCode(leakproof_core::GOING_AWAY);
    /// 1002: the peer broke the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: a kind of message the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: the peer's close frame carried no code. Reported, never sent.
    pub const NO_STATUS: CloseCode = CloseCode(leakproof_core::NO_STATUS);
    /// 1006: the connection closed without a close frame. Reserved: never sent.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: a message's data is not consistent with its type (text that is not UTF-8).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: a message violates the endpoint's policy.
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a message is too big to process.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1010: the server did not negotiate an extension the client needs.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// 1011: the server met an unexpected condition.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013: the service is overloaded; try again later.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// The code as a number.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Whether a close frame may carry this code: 1000-1003, 1007-1013 and 3000-4999; not
    /// 1005, 1006 or 1015 (reserved to say what no frame said), nor the unassigned ones.
    pub fn is_allowed(self) -> bool {
        leakproof_core::close_code_allowed(self.0)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

impl PartialEq<u16> for CloseCode {
    fn eq(&self, other: &u16) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::CloseCode;

    #[test]
    fn the_named_codes_are_the_rfcs_and_only_the_reserved_ones_are_refused() {
        let sendable = [
            CloseCode::NORMAL,
            CloseCode::GOING_AWAY,
            CloseCode::PROTOCOL_ERROR,
            CloseCode::UNSUPPORTED_DATA,
            CloseCode::INVALID_PAYLOAD,
            CloseCode::POLICY_VIOLATION,
            CloseCode::MESSAGE_TOO_BIG,
            CloseCode::MANDATORY_EXTENSION,
            CloseCode::INTERNAL_ERROR,
            CloseCode::SERVICE_RESTART,
            CloseCode::TRY_AGAIN_LATER,
        ];
        let numbers: Vec<u16> = sendable.iter().map(|c| c.get()).collect();
        assert_eq!(
            numbers,
            [
                1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013
            ]
        );
        assert!(sendable.iter().all(|c| c.is_allowed()));
        assert!(!CloseCode::NO_STATUS.is_allowed());
        assert!(!CloseCode::ABNORMAL.is_allowed());
        assert_eq!(CloseCode::NO_STATUS, 1005);
        assert_eq!(CloseCode::ABNORMAL, 1006);
        for code in [0, 999, 1004, 1014, 1015, 2999, 5000, u16::MAX] {
            assert!(!CloseCode::from(code).is_allowed(), "{code}");
        }
        assert!(CloseCode::from(3000).is_allowed() && CloseCode::from(4999).is_allowed());
        assert_eq!(u16::from(CloseCode::from(4001)), 4001);
        assert_eq!(CloseCode::NORMAL.to_string(), "1000");
    }
}
