//! The Lobby Durable Object: presence and notifications on the ChatBox's
//! always-on connection. Declared now so the binding and its SQLite
//! migration exist from the first deploy; its behaviour lands with the
//! Lobby issue, and until then it answers 501.

use worker::{DurableObject, Env, Request, Response, Result, State, durable_object};

use crate::error::EdgeError;

#[durable_object(fetch)]
pub struct Lobby {
    _state: State,
    _env: Env,
}

impl DurableObject for Lobby {
    fn new(state: State, env: Env) -> Self {
        Self {
            _state: state,
            _env: env,
        }
    }

    async fn fetch(&self, _req: Request) -> Result<Response> {
        EdgeError::Client {
            status: 501,
            code: "not_implemented",
            message: "the lobby is not available yet".to_owned(),
        }
        .to_response()
    }
}

impl std::fmt::Debug for Lobby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lobby").finish_non_exhaustive()
    }
}
