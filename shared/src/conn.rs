//! The two types every realtime state machine shares: the driver's clock
//! and its name for a connection. Below both `room` and `user`, so neither
//! imports the other.

/// Milliseconds since the Unix epoch on the driver's clock (virtual in
/// tests). It never goes back between two calls into a state machine.
pub type Millis = u64;

/// A live connection (a WebSocket or an SSE stream), named by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);
