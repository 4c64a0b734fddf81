//! The Vibe Chat edge: a Cloudflare Worker (Rust → wasm32) and its Durable
//! Objects.
//!
//! - [`router`]: the Worker, the only public entry. It verifies the JWT
//!   (shared rule: HS256 pinned, `exp`, `iss`, `aud`, bounded leeway) and
//!   the `Origin` of upgrades before any Durable Object is touched, then
//!   routes realtime traffic to rooms and proxies the rest of `/api/**` to
//!   the origin.
//! - [`room_do::Room`]: one per conversation; a thin driver around the
//!   sans-IO `shared::room::Room`.
//! - [`user_do::User`]: one per user: their connections on every device,
//!   presence for their contacts, notices, and the seed's single socket.
//!
//! Tokens never reach a log line: the only URL ever logged goes through
//! `shared::redact`.

mod auth;
mod config;
mod conns;
mod error;
mod forward;
mod headers;
mod media;
mod origin;
mod room_do;
mod room_store;
mod router;
mod single_socket;
pub mod telemetry;
mod user_do;

use worker::{Context, Env, Request, Response, event};

pub use room_do::Room;
pub use user_do::User;

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> worker::Result<Response> {
    let config = match config::EdgeConfig::from_env(&env) {
        Ok(config) => config,
        Err(e) => {
            telemetry::isolate::error(e.code());
            return e.to_response();
        }
    };
    let report = config.clone();
    let response = match router::handle(req, &env, config).await {
        Ok(response) => Ok(response),
        Err(e) => {
            telemetry::isolate::error(e.code());
            e.to_response()
        }
    };
    // The isolate's own counts leave after the response, when due.
    if let Some(figures) = telemetry::isolate::report_if_due(&report, auth::now_ms()) {
        ctx.wait_until(async move {
            let ok = origin::OriginClient::new(&report)
                .edge_report(&figures)
                .await
                .is_ok();
            telemetry::isolate::answered(&figures, ok);
        });
    }
    response
}
