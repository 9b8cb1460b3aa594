//! The error and close codes every protocol adapter maps to. `docs/PROTOCOL.md` documents this
//! table; a test there keeps the two in step.

use std::fmt;

/// Error codes carried in a reply: `{"code": N, "message": "..."}`.
///
/// The number is the contract; the message explains the particular case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Something failed inside the server. Retrying may help.
    Internal,
    /// The frame is not valid JSON, not an object, or a field is missing or has the wrong type.
    BadRequest,
    /// The method is not part of the protocol.
    UnknownMethod,
    /// A request other than `connect` (or `ping`) came before `connect`.
    NotConnected,
    /// `connect` came twice.
    AlreadyConnected,
    /// The channel name is invalid (empty, too long, bad characters).
    InvalidChannel,
    /// The channel's namespace is not configured.
    UnknownNamespace,
    /// The namespace does not allow this action.
    PermissionDenied,
    /// Already subscribed to that channel on this connection.
    AlreadySubscribed,
    /// Not subscribed to that channel on this connection.
    NotSubscribed,
    /// A limit was reached (channels per connection, ...).
    LimitExceeded,
    /// Binary frames are not part of this protocol.
    BinaryNotSupported,
    /// Missing or wrong credentials (the backend key, a connection token, the app said no).
    Unauthorized,
    /// The user, group or message named does not exist.
    NotFound,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::Internal,
        ErrorCode::BadRequest,
        ErrorCode::UnknownMethod,
        ErrorCode::NotConnected,
        ErrorCode::AlreadyConnected,
        ErrorCode::InvalidChannel,
        ErrorCode::UnknownNamespace,
        ErrorCode::PermissionDenied,
        ErrorCode::AlreadySubscribed,
        ErrorCode::NotSubscribed,
        ErrorCode::LimitExceeded,
        ErrorCode::BinaryNotSupported,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
    ];

    pub fn code(self) -> u16 {
        match self {
            ErrorCode::Internal => 100,
            ErrorCode::BadRequest => 101,
            ErrorCode::UnknownMethod => 102,
            ErrorCode::NotConnected => 103,
            ErrorCode::AlreadyConnected => 104,
            ErrorCode::InvalidChannel => 105,
            ErrorCode::UnknownNamespace => 106,
            ErrorCode::PermissionDenied => 107,
            ErrorCode::AlreadySubscribed => 108,
            ErrorCode::NotSubscribed => 109,
            ErrorCode::LimitExceeded => 110,
            ErrorCode::BinaryNotSupported => 111,
            ErrorCode::Unauthorized => 112,
            ErrorCode::NotFound => 113,
        }
    }

    /// A short stable name, used as the `kind` label of the error counter in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::AlreadyConnected => "already_connected",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::UnknownNamespace => "unknown_namespace",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
        }
    }

    /// Position in [`ErrorCode::ALL`], for counters kept in an array.
    pub fn index(self) -> usize {
        usize::from(self.code() - 100)
    }
}

/// An error reply: a code from the table and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError {
    pub code: ErrorCode,
    pub message: String,
}

impl ReplyError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code.code(),
            self.code.name(),
            self.message
        )
    }
}

impl std::error::Error for ReplyError {}

/// WebSocket close codes the server sends. 3000–3499: the client should reconnect (with backoff);
/// 3500–3999: it should not reconnect without changing something first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// The server is shutting down or restarting.
    Shutdown,
    /// The connection's outgoing queue overflowed: it read too slowly.
    SlowConsumer,
    /// No pong arrived for a server ping within the keep-alive window.
    NoPong,
    /// No `connect` request arrived within the connect timeout.
    ConnectTimeout,
    /// The server failed in a way that a new connection may not.
    InternalError,
    /// The app could not be asked (timeout, 5xx, unreachable): try again later.
    AppUnavailable,
    /// A WebSocket message was larger than `limits.max_frame_size`.
    MessageTooLarge,
    /// The client broke the WebSocket or Plaza protocol in a way that ends the connection.
    ProtocolViolation,
    /// The connection could not be authenticated (bad token, denied by the app, no anonymous).
    Unauthorized,
    /// The app's backend disconnected this user.
    Disconnected,
    /// Publications of a channel it follows may have been missed (the broker's connection was
    /// lost, or a stream was recreated): reconnect and resubscribe with `since` to recover them
    /// or to learn `recovered: false`.
    Resync,
}

impl CloseCode {
    pub const ALL: [CloseCode; 11] = [
        CloseCode::Shutdown,
        CloseCode::SlowConsumer,
        CloseCode::NoPong,
        CloseCode::ConnectTimeout,
        CloseCode::InternalError,
        CloseCode::AppUnavailable,
        CloseCode::MessageTooLarge,
        CloseCode::ProtocolViolation,
        CloseCode::Unauthorized,
        CloseCode::Disconnected,
        CloseCode::Resync,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseCode::Shutdown => 3000,
            CloseCode::SlowConsumer => 3001,
            CloseCode::NoPong => 3002,
            CloseCode::ConnectTimeout => 3003,
            CloseCode::InternalError => 3004,
            CloseCode::AppUnavailable => 3005,
            CloseCode::Resync => 3006,
            CloseCode::MessageTooLarge => 3500,
            CloseCode::ProtocolViolation => 3501,
            CloseCode::Unauthorized => 3502,
            CloseCode::Disconnected => 3503,
        }
    }

    /// The reason text sent in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Shutdown => "shutdown",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::NoPong => "no pong",
            CloseCode::ConnectTimeout => "connect timeout",
            CloseCode::InternalError => "internal error",
            CloseCode::AppUnavailable => "app unavailable",
            CloseCode::Resync => "resync",
            CloseCode::MessageTooLarge => "message too large",
            CloseCode::ProtocolViolation => "protocol violation",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Disconnected => "disconnected",
        }
    }

    pub fn reconnect(self) -> bool {
        self.code() < 3500
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_indexed() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
        }
        let mut close: Vec<u16> = CloseCode::ALL.iter().map(|c| c.code()).collect();
        close.dedup();
        assert_eq!(close.len(), CloseCode::ALL.len());
        assert!(CloseCode::SlowConsumer.reconnect());
        assert!(!CloseCode::MessageTooLarge.reconnect());
    }
}
