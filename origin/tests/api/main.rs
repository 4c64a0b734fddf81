//! Integration tests: a real origin, a real PostgreSQL, one fresh database
//! per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod auth;
mod conversations;
mod directory;
mod helpers;
mod history;
mod internal;
mod lifecycle;
mod media;
mod membership;
mod migrations;
mod observability;
mod ops;
mod plans;
mod push;
mod replica;
mod search;
mod sessions;
mod standby;
