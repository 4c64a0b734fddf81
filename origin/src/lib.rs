//! The Vibe Chat origin: the system of record.
//!
//! An axum service over PostgreSQL (tokio-postgres with a deadpool pool).
//! It serves the public REST API (auth, conversations, history, presence),
//! the internal API the edge uses (batch ingest, members, presence,
//! receipts), Web Push notifications ([`push`]), and ops endpoints (`/healthz`, `/metrics`, `/openapi.json`).
//!
//! Realtime traffic never comes here directly: the edge's Room Durable
//! Objects order messages, acknowledge them once stored in their own SQLite,
//! and flush them here in idempotent batches.

pub mod auth;
pub mod config;
pub mod db;
pub mod edge;
pub mod edge_report;
pub mod error;
pub mod hashing;
pub mod http;
pub mod ingest;
pub mod login_guard;
pub mod media;
pub mod metrics;
pub mod push;
pub mod queue;
pub mod replica;
pub mod search;
pub mod seed;
pub mod sessions;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use error::{ApiError, ApiResult};
pub use startup::Application;
