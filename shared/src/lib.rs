//! Everything the edge, the origin and the tests must agree on, in one crate
//! that builds for both native targets and `wasm32-unknown-unknown`.
//!
//! - [`protocol`]: the JSON frames on the wire (WS frames and SSE `data:`
//!   carry the same objects) and the REST/internal payloads shared by the edge
//!   and the origin.
//! - [`domain`]: validation newtypes. One rule per field, so the edge, the
//!   origin and the tests cannot drift apart.
//! - [`auth`]: JWT claims and the one verification rule (HS256 pinned, `exp`
//!   required, `iss`/`aud` checked, bounded leeway). The current time is an
//!   argument, because `SystemTime::now()` panics on wasm32.
//! - [`receipts`]: message status derived from read/delivered watermarks.
//! - [`media`]: attachment types, sniffing, the streaming image check and
//!   signed download paths.
//! - [`redact`]: strips tokens from URLs before they reach a log line.
//! - [`room`] and [`user`]: the sans-IO state machines behind the Room and
//!   User Durable Objects.
//! - [`metrics`]: the edge's counts and gauges, and the rule by which the
//!   origin adds up reports from Durable Objects exactly once.
//! - [`admission`] and [`backlog`]: what one connection may cost a Durable
//!   Object (caps per user and per object; unread bytes per socket).
//!
//! Nothing here does I/O or reads a clock: callers pass `now` in.

pub mod admission;
pub mod auth;
pub mod backlog;
pub mod bucket;
pub mod conn;
pub mod domain;
pub mod media;
pub mod metrics;
pub mod protocol;
pub mod receipts;
pub mod redact;
pub mod room;
pub mod user;

pub use domain::{ClientMsgId, ConversationName, DomainError, MessageContent, Role};
