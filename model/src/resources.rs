//! What a session may hold: the ledger the implementation must match, and that witnesses
//! outside the implementation confirm.

/// A snapshot of what a session holds. The model derives it from its state; the engine keeps
/// it as a ledger; the suite compares the two and checks them against witnesses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// Connections held by tasks (connecting, or carrying an exchange).
    pub open_connections: u32,
    /// Connections kept alive in the session's pool.
    pub idle_connections: u32,
    /// Body bytes read from the network and not yet delivered or written out.
    pub buffered_bytes: u64,
    /// Tasks that are not `Completed`.
    pub live_tasks: u32,
    /// Armed timers: a running task waiting on the network has its request and resource timer.
    pub timers: u32,
    /// Download temp files that exist.
    pub temp_files: u32,
    /// The session holds its delegate.
    pub delegate_held: bool,
    /// Responses kept in the session's cache.
    pub cached_responses: u32,
}

impl Resources {
    /// Nothing held at all: what R4 demands of an invalidated session.
    pub fn is_zero(&self) -> bool {
        *self == Resources::default()
    }
}
