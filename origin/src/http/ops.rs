//! Health and metrics.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::metrics::Timed;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(api_openapi_json))
}

/// GET /openapi.json
///
/// This document, generated from the routes themselves.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json"))
)]
async fn openapi_json() -> Json<serde_json::Value> {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    Json(DOC.get_or_init(super::openapi_document).clone())
}

/// GET /api/openapi.json
///
/// The same document under `/api/`, which the edge proxies, so the public
/// host serves it too.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "ops",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json"))
)]
async fn api_openapi_json() -> Json<serde_json::Value> {
    openapi_json().await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub database: &'static str,
}

/// GET /healthz
///
/// Healthy when the database answers within two seconds.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses(
        (status = 200, description = "Up, database reachable", body = Health),
        (status = 503, description = "Database unreachable", body = ErrorBody),
    )
)]
async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    let check = async {
        let client = state.pool.get().await?;
        client.query_one("SELECT 1", &[]).timed("healthz").await?;
        Ok::<_, ApiError>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => Ok(Json(Health {
            status: "ok",
            database: "ok",
        })),
        Ok(Err(e)) => Err(match e {
            ApiError::Internal(source) => ApiError::Unavailable(source),
            other => other,
        }),
        Err(_) => Err(ApiError::Unavailable(anyhow::anyhow!(
            "database health check timed out"
        ))),
    }
}

/// GET /metrics
///
/// Prometheus text format: request counts and latency per route, messages
/// ingested, and the database pool.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"))
)]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    crate::metrics::record_pool(&state.pool);
    crate::metrics::record_hasher(&state.hasher);
    let mut body = state.metrics.render();
    // Figures read from PostgreSQL (cached), rendered per application.
    body.push_str(&state.figures.render(&state.pool).await);
    // The edge's, as its objects reported them.
    body.push_str(&state.edge_figures.render());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
}
