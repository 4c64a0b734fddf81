//! End-to-end harness: the real PostgreSQL, the real origin, and a real
//! `wrangler dev` (workerd) with real WebSocket and HTTP clients.
//!
//! The suites live in `tests/` and run through [`runner::run`], a small
//! sequential runner: the stack is expensive to start, so every test in a
//! binary shares one, and each test isolates itself with its own users and
//! conversations.

#![allow(clippy::print_stdout)]

pub mod client;
pub mod media;
pub mod ops;
pub mod push;
pub mod runner;
pub mod sse;
pub mod stack;

pub use client::{Closed, Event, User, Ws, message_seqs};
pub use push::{Delivery, PushService, Subscription};
pub use sse::{Sse, SseItem, sse_messages};
pub use stack::{Stack, StackOptions};
