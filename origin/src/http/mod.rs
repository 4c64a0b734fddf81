//! HTTP: one router per resource, merged here, plus the extractors that turn
//! bad input into typed [`ApiError`]s.
//!
//! Public routes are registered through `utoipa_axum`'s `OpenApiRouter`, so a
//! route cannot exist without appearing in `/openapi.json`. Internal routes
//! (edge → origin) are a separate router with its own body limit and are left
//! out of the public document.

mod auth;
mod conversations;
mod internal;
pub mod media;
mod messages;
mod openapi;
mod ops;
mod push;
pub mod request_id;
mod search;
mod users;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::state::AppState;

/// Largest body a public route accepts.
const PUBLIC_BODY_LIMIT: usize = shared::domain::MAX_FRAME_BYTES;
/// Largest body an internal route accepts: a full ingest batch of
/// maximum-size messages (4,000 chars × 4 bytes × 1,000) plus JSON overhead.
const INTERNAL_BODY_LIMIT: usize = 24 * 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Vibe Chat origin",
        description = "REST API of Vibe Chat. The routes tagged `edge` (WebSocket, SSE, the SSE fallback's POSTs, tickets) are answered by the edge; the rest by the origin, through the edge's proxy. Every error is JSON: `{code, message}`."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Sessions"),
        (name = "conversations", description = "Conversations, members and history"),
        (name = "search", description = "Full-text search of the caller's messages"),
        (name = "users", description = "Active users and presence"),
        (name = "push", description = "Web Push notifications: the VAPID key, subscriptions, notification settings and per-conversation preferences"),
        (name = "ops", description = "Health and metrics"),
    )
)]
struct ApiDoc;

/// Declares the bearer scheme that the routes' `security(...)` refers to.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub use openapi::document as openapi_document;

/// The public routes and the OpenAPI document generated from them (without
/// the completions of [`openapi_document`]).
pub fn public_api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth::router())
        .merge(conversations::router())
        .merge(messages::router())
        .merge(search::router())
        .merge(media::router())
        .merge(users::router())
        .merge(push::router())
        .merge(ops::router())
        .split_for_parts()
}

/// The whole application: public API, internal API, ops, and the middleware
/// stack.
pub fn app(state: AppState, config: &crate::config::Config) -> Router {
    let (public, _) = public_api();
    let public = public.layer(DefaultBodyLimit::max(PUBLIC_BODY_LIMIT));
    let internal = internal::router()
        .merge(media::internal_router())
        .layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT));

    let mut app = Router::new()
        .merge(public)
        .merge(internal)
        .fallback(|| async { ApiError::NotFound("route") })
        // JSON like every other error (axum's own 405 has an empty body).
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // A router's layer wraps each route after routing (so the matched
        // route is known) and, added after them, the fallbacks too (404s
        // count, as `unmatched`).
        .layer(middleware::from_fn(crate::metrics::track_requests))
        .with_state(state)
        .layer(CompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    // Never log a raw URI: it may carry a token.
                    let uri = shared::redact::redact_url(
                        req.uri().path_and_query().map_or("/", |pq| pq.as_str()),
                    )
                    .into_owned();
                    // Set by the request id layer, which runs first.
                    let id = req
                        .extensions()
                        .get::<request_id::RequestId>()
                        .map_or("", |r| r.0.as_str());
                    tracing::info_span!("request", method = %req.method(), uri = %uri, request_id = %id)
                })
                .on_response(
                    tower_http::trace::DefaultOnResponse::new()
                        .level(tracing::Level::INFO)
                        .latency_unit(tower_http::LatencyUnit::Micros),
                ),
        )
        // Outside the trace layer, so the request's span has the id.
        .layer(middleware::from_fn(request_id::middleware));
    if !config.allowed_origins.is_empty() {
        let origins: Vec<HeaderValue> = config
            .allowed_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([
                    Method::GET,
                    Method::POST,
                    Method::PUT,
                    Method::PATCH,
                    Method::DELETE,
                ])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app
}

/// `axum::Json`, with rejections turned into `{code, message}` bodies:
/// 400 for malformed JSON, 413 for an oversize body, 415 for a missing
/// content type, 422 for a well-formed body with a bad field.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::Unprocessable {
            code: "invalid_field",
            message: e.body_text(),
        },
        JsonRejection::JsonSyntaxError(e) => ApiError::BadRequest {
            code: "invalid_json",
            message: e.body_text(),
        },
        JsonRejection::MissingJsonContentType(e) => ApiError::UnsupportedMediaType(e.body_text()),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge("request body is too large".to_owned())
        }
        other => ApiError::BadRequest {
            code: "bad_request",
            message: other.body_text(),
        },
    }
}

/// `axum::extract::Path` with a typed 400 on a malformed segment.
#[derive(Debug, Clone, Copy)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    axum::extract::Path<T>: FromRequestParts<S, Rejection = PathRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e| ApiError::BadRequest {
                code: "invalid_path",
                message: e.body_text(),
            })
    }
}

/// `axum::extract::Query` with a typed 422 on a bad parameter.
#[derive(Debug, Clone, Copy)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    axum::extract::Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::Unprocessable {
                code: "invalid_query",
                message: e.body_text(),
            })
    }
}
