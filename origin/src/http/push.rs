//! Web Push: the VAPID public key, subscriptions, the user's notification
//! settings, and per-conversation preferences.
//!
//! Subscriptions are idempotent per endpoint (a browser has one per
//! application server key): registering a known endpoint again re-binds it
//! to the caller and the caller's session, with the keys sent. Logging that
//! session out deletes it ([`crate::sessions::revoke`]).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Datelike as _, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, ApiPath};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::metrics::Timed;
use crate::push::MAX_SUBSCRIPTIONS_PER_USER;
use crate::push::webpush::Keys;
use crate::state::AppState;
use crate::store;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(vapid_public_key))
        .routes(routes!(subscribe))
        .routes(routes!(unsubscribe))
        .routes(routes!(get_settings, put_settings))
        .routes(routes!(get_conversation_prefs, put_conversation_prefs))
}

/// `GET /api/v1/push/vapid-public-key`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VapidPublicKey {
    /// The application server key to subscribe with
    /// (`pushManager.subscribe({applicationServerKey})`): the uncompressed
    /// P-256 point (65 bytes), base64url without padding.
    #[schema(
        example = "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
    )]
    pub key: String,
}

/// A browser's push subscription, as `PushSubscription.toJSON()` gives it
/// (other fields, such as `expirationTime`, are ignored).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({
    "endpoint": "https://fcm.googleapis.com/fcm/send/dGVzdC1zdWJzY3JpcHRpb24",
    "keys": {
        "p256dh": "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        "auth": "BTBZMqHH6r4Tts7J_aSIgg"
    }
}))]
pub struct NewSubscription {
    /// The push service URL: `https` on one of the deployment's push
    /// service hosts (`PUSH_ALLOWED_HOSTS`), default port, no user info;
    /// anything else is `422 endpoint_not_allowed`.
    #[schema(min_length = 1, max_length = 2048)]
    pub endpoint: String,
    pub keys: SubscriptionKeys,
}

/// The subscription's keys.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SubscriptionKeys {
    /// The browser's public key: an uncompressed P-256 point (65 bytes)
    /// in base64url (unpadded, or with its one `=`); it must be on the
    /// curve.
    #[schema(min_length = 87, max_length = 88, pattern = "^[A-Za-z0-9_-]{87}=?$")]
    pub p256dh: String,
    /// The authentication secret: 16 bytes in base64url (unpadded, or with
    /// its `==`).
    #[schema(min_length = 22, max_length = 24, pattern = "^[A-Za-z0-9_-]{22}(==)?$")]
    pub auth: String,
}

/// A stored subscription.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionView {
    pub id: i64,
    pub endpoint: String,
    pub created_at: DateTime<Utc>,
}

/// The caller's notification settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NotificationSettings {
    /// Whether a notification may show the message's text (up to 200
    /// characters). Off by default: it says only who wrote.
    pub show_content: bool,
    /// When no notification is sent, in the user's time zone; `null` for
    /// none.
    #[serde(default)]
    pub quiet_hours: Option<QuietHours>,
}

/// A daily window, `[start, end)`; it crosses midnight when `end` is
/// before `start` (22:00 to 07:00).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QuietHours {
    /// `HH:MM`, 24-hour.
    #[schema(example = "22:00", pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    pub start: String,
    /// `HH:MM`, 24-hour; not equal to `start`.
    #[schema(example = "07:00", pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    pub end: String,
    /// An IANA time zone PostgreSQL knows (`Europe/Berlin`).
    #[schema(
        example = "Europe/Berlin",
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_+/-]{1,64}$"
    )]
    pub time_zone: String,
}

/// Which messages of a conversation notify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotificationLevel {
    /// Every message.
    All,
    /// Only messages that mention the caller.
    Mentions,
    /// Nothing.
    None,
}

impl NotificationLevel {
    fn as_str(self) -> &'static str {
        match self {
            NotificationLevel::All => "all",
            NotificationLevel::Mentions => "mentions",
            NotificationLevel::None => "none",
        }
    }

    fn from_db(level: &str) -> Self {
        match level {
            "mentions" => NotificationLevel::Mentions,
            "none" => NotificationLevel::None,
            _ => NotificationLevel::All,
        }
    }
}

/// The caller's preferences for one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConversationNotifications {
    pub level: NotificationLevel,
    /// No notification before this time (RFC 3339); `null`, or a past
    /// time, for none. Years 1 to 9999.
    #[serde(default)]
    pub muted_until: Option<DateTime<Utc>>,
}

fn invalid_field(message: impl Into<String>) -> ApiError {
    ApiError::Unprocessable {
        code: "invalid_field",
        message: message.into(),
    }
}

/// `text` in base64url with at most `pad` trailing `=`, decoded to exactly
/// `len` bytes: the rule of the schema's pattern, exactly.
fn base64url_bytes(text: &str, len: usize, pad: usize, field: &str) -> ApiResult<Vec<u8>> {
    let chars = (len * 4).div_ceil(3);
    let body = match text.len() {
        n if n == chars => text,
        n if n == chars + pad && text.ends_with(&"=".repeat(pad)) => &text[..chars],
        _ => {
            return Err(invalid_field(format!(
                "{field} must be {len} bytes in base64url"
            )));
        }
    };
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid_field(format!("{field} is not base64url")));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| invalid_field(format!("{field} is not base64url")))?;
    if bytes.len() != len {
        return Err(invalid_field(format!(
            "{field} must be {len} bytes in base64url"
        )));
    }
    Ok(bytes)
}

/// GET /api/v1/push/vapid-public-key
#[utoipa::path(
    get,
    path = "/api/v1/push/vapid-public-key",
    tag = "push",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The key to subscribe with", body = VapidPublicKey),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 503, description = "Push is not enabled on this server (`push_disabled`, no Retry-After), or the database is unreachable (`unavailable`)", body = ErrorBody),
    )
)]
async fn vapid_public_key(
    _: AuthUser,
    State(state): State<AppState>,
) -> ApiResult<Json<VapidPublicKey>> {
    Ok(Json(VapidPublicKey {
        key: state.push.vapid()?.public_key().to_owned(),
    }))
}

/// POST /api/v1/push/subscriptions
///
/// Registers the caller's browser for push. The same endpoint again is
/// `200` with the stored subscription, now the caller's and the caller's
/// session's, with the keys sent. A user keeps at most 20 subscriptions:
/// a new one beyond that drops their oldest.
#[utoipa::path(
    post,
    path = "/api/v1/push/subscriptions",
    tag = "push",
    security(("bearer" = [])),
    request_body = NewSubscription,
    responses(
        (status = 201, description = "Registered", body = SubscriptionView),
        (status = 200, description = "The endpoint was registered already: re-bound to the caller and their session, keys updated", body = SubscriptionView),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 422, description = "Keys that are not a P-256 point and a 16-byte secret in base64url, or a missing field (`invalid_field`); an endpoint that is not https on an allowed push service (`endpoint_not_allowed`)", body = ErrorBody),
        (status = 503, description = "Push is not enabled on this server (`push_disabled`, no Retry-After), or the database is unreachable (`unavailable`)", body = ErrorBody),
    )
)]
async fn subscribe(
    user: AuthUser,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<NewSubscription>,
) -> ApiResult<(StatusCode, Json<SubscriptionView>)> {
    let p256dh = base64url_bytes(&req.keys.p256dh, 65, 1, "keys.p256dh")?;
    let auth = base64url_bytes(&req.keys.auth, 16, 2, "keys.auth")?;
    Keys::from_bytes(&p256dh, &auth).map_err(invalid_field)?;
    state
        .push
        .rule
        .check(&req.endpoint)
        .map_err(|why| ApiError::Unprocessable {
            code: "endpoint_not_allowed",
            message: why.to_owned(),
        })?;
    state.push.vapid()?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO push_subscriptions (user_id, session_id, endpoint, p256dh, auth)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (endpoint) DO UPDATE
             SET user_id = EXCLUDED.user_id, session_id = EXCLUDED.session_id,
                 p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth
             RETURNING id, endpoint, created_at, xmax = 0",
            &[&user.id, &user.sid, &req.endpoint, &p256dh, &auth],
        )
        .timed("push_subscribe")
        .await?;
    let id: i64 = row.get(0);
    // Past the cap, the user's least recently useful subscriptions go.
    tx.execute(
        "DELETE FROM push_subscriptions WHERE id IN (
             SELECT id FROM push_subscriptions
             WHERE user_id = $1 AND id <> $2
             ORDER BY GREATEST(created_at, last_success_at) DESC, id DESC
             OFFSET $3)",
        &[&user.id, &id, &(MAX_SUBSCRIPTIONS_PER_USER - 1)],
    )
    .timed("push_trim_subscriptions")
    .await?;
    tx.commit().await?;
    let created: bool = row.get(3);
    let view = SubscriptionView {
        id,
        endpoint: row.get(1),
        created_at: row.get(2),
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// DELETE /api/v1/push/subscriptions/{id}
#[utoipa::path(
    delete,
    path = "/api/v1/push/subscriptions/{id}",
    tag = "push",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Subscription id")),
    responses(
        (status = 204, description = "Deleted: the browser gets no more pushes"),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 404, description = "No such subscription of the caller (`not_found`)", body = ErrorBody),
        (status = 503, description = "Push is not enabled on this server (`push_disabled`, no Retry-After), or the database is unreachable (`unavailable`)", body = ErrorBody),
    )
)]
async fn unsubscribe(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    state.push.vapid()?;
    let deleted = state
        .pool
        .get()
        .await?
        .execute(
            "DELETE FROM push_subscriptions WHERE id = $1 AND user_id = $2",
            &[&id, &user.id],
        )
        .timed("push_unsubscribe")
        .await?;
    if deleted == 0 {
        return Err(ApiError::NotFound("subscription"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `HH:MM` (24-hour), exactly.
fn clock_time(text: &str, field: &str) -> ApiResult<NaiveTime> {
    let b = text.as_bytes();
    let shaped =
        b.len() == 5 && b[2] == b':' && [0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_digit());
    shaped
        .then(|| NaiveTime::parse_from_str(text, "%H:%M").ok())
        .flatten()
        .ok_or_else(|| invalid_field(format!("{field} must be HH:MM (00:00 to 23:59)")))
}

/// GET /api/v1/push/settings
#[utoipa::path(
    get,
    path = "/api/v1/push/settings",
    tag = "push",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's settings (the defaults until set: content hidden, no quiet hours)", body = NotificationSettings),
        (status = 401, description = "No or bad token", body = ErrorBody),
    )
)]
async fn get_settings(
    user: AuthUser,
    State(state): State<AppState>,
) -> ApiResult<Json<NotificationSettings>> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT show_content, quiet_start, quiet_end, time_zone
             FROM notification_settings WHERE user_id = $1",
            &[&user.id],
        )
        .timed("push_settings")
        .await?;
    Ok(Json(settings_view(row.as_ref())))
}

fn settings_view(row: Option<&tokio_postgres::Row>) -> NotificationSettings {
    let Some(row) = row else {
        return NotificationSettings {
            show_content: false,
            quiet_hours: None,
        };
    };
    let start: Option<NaiveTime> = row.get(1);
    let end: Option<NaiveTime> = row.get(2);
    let zone: Option<String> = row.get(3);
    NotificationSettings {
        show_content: row.get(0),
        quiet_hours: match (start, end, zone) {
            (Some(start), Some(end), Some(time_zone)) => Some(QuietHours {
                start: start.format("%H:%M").to_string(),
                end: end.format("%H:%M").to_string(),
                time_zone,
            }),
            _ => None,
        },
    }
}

/// PUT /api/v1/push/settings
#[utoipa::path(
    put,
    path = "/api/v1/push/settings",
    tag = "push",
    security(("bearer" = [])),
    request_body = NotificationSettings,
    responses(
        (status = 200, description = "Saved; the settings as stored", body = NotificationSettings),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 422, description = "A time that is not HH:MM, `start` equal to `end`, a time zone PostgreSQL does not know, or a missing field (`invalid_field`)", body = ErrorBody),
    )
)]
async fn put_settings(
    user: AuthUser,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<NotificationSettings>,
) -> ApiResult<Json<NotificationSettings>> {
    let quiet = match &req.quiet_hours {
        None => None,
        Some(q) => {
            let start = clock_time(&q.start, "quiet_hours.start")?;
            let end = clock_time(&q.end, "quiet_hours.end")?;
            if start == end {
                return Err(invalid_field(
                    "quiet_hours.start and quiet_hours.end must differ",
                ));
            }
            let zone = q.time_zone.as_str();
            let shaped = !zone.is_empty()
                && zone.len() <= 64
                && zone
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_+/-".contains(&b));
            if !shaped {
                return Err(invalid_field(
                    "quiet_hours.time_zone is not a time zone name",
                ));
            }
            Some((start, end, zone))
        }
    };
    let client = state.pool.get().await?;
    if let Some((_, _, zone)) = quiet {
        let known = client
            .query_opt("SELECT 1 FROM pg_timezone_names WHERE name = $1", &[&zone])
            .timed("push_time_zone_known")
            .await?
            .is_some();
        if !known {
            return Err(invalid_field(format!(
                "quiet_hours.time_zone {zone:?} is not a known time zone"
            )));
        }
    }
    let (start, end, zone) = match quiet {
        Some((s, e, z)) => (Some(s), Some(e), Some(z)),
        None => (None, None, None),
    };
    let row = client
        .query_one(
            "INSERT INTO notification_settings (user_id, show_content, quiet_start, quiet_end, time_zone)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id) DO UPDATE
             SET show_content = EXCLUDED.show_content, quiet_start = EXCLUDED.quiet_start,
                 quiet_end = EXCLUDED.quiet_end, time_zone = EXCLUDED.time_zone,
                 updated_at = now()
             RETURNING show_content, quiet_start, quiet_end, time_zone",
            &[&user.id, &req.show_content, &start, &end, &zone],
        )
        .timed("push_settings_update").await?;
    Ok(Json(settings_view(Some(&row))))
}

/// GET /api/v1/chat/conversations/{id}/notifications
#[utoipa::path(
    get,
    path = "/api/v1/chat/conversations/{id}/notifications",
    tag = "push",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "The caller's preferences for the conversation (`all`, not muted, until set)", body = ConversationNotifications),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not a participant (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorBody),
    )
)]
async fn get_conversation_prefs(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ConversationNotifications>> {
    let client = state.pool.get().await?;
    store::conversation_access(&client, id, user.id).await?;
    let row = client
        .query_opt(
            "SELECT level, muted_until FROM conversation_notification_prefs
             WHERE user_id = $1 AND conversation_id = $2",
            &[&user.id, &id],
        )
        .timed("push_conversation_prefs")
        .await?;
    Ok(Json(match row {
        Some(r) => ConversationNotifications {
            level: NotificationLevel::from_db(r.get(0)),
            muted_until: r.get(1),
        },
        None => ConversationNotifications {
            level: NotificationLevel::All,
            muted_until: None,
        },
    }))
}

/// PUT /api/v1/chat/conversations/{id}/notifications
#[utoipa::path(
    put,
    path = "/api/v1/chat/conversations/{id}/notifications",
    tag = "push",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id")),
    request_body = ConversationNotifications,
    responses(
        (status = 200, description = "Saved; the preferences as stored", body = ConversationNotifications),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not a participant (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorBody),
        (status = 422, description = "An unknown level, a `muted_until` that is not an RFC 3339 time of years 1 to 9999, or a missing field (`invalid_field`)", body = ErrorBody),
    )
)]
async fn put_conversation_prefs(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<ConversationNotifications>,
) -> ApiResult<Json<ConversationNotifications>> {
    if req
        .muted_until
        .is_some_and(|t| !(1..=9999).contains(&t.year()))
    {
        return Err(invalid_field("muted_until must be within years 1 to 9999"));
    }
    let client = state.pool.get().await?;
    store::conversation_access(&client, id, user.id).await?;
    let row = client
        .query_one(
            "INSERT INTO conversation_notification_prefs (user_id, conversation_id, level, muted_until)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, conversation_id) DO UPDATE
             SET level = EXCLUDED.level, muted_until = EXCLUDED.muted_until, updated_at = now()
             RETURNING level, muted_until",
            &[&user.id, &id, &req.level.as_str(), &req.muted_until],
        )
        .timed("push_conversation_prefs_update").await?;
    Ok(Json(ConversationNotifications {
        level: NotificationLevel::from_db(row.get(0)),
        muted_until: row.get(1),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_schema_patterns_exactly() {
        let point = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
        assert_eq!(point.len(), 87);
        assert!(base64url_bytes(point, 65, 1, "p").is_ok());
        assert!(base64url_bytes(&format!("{point}="), 65, 1, "p").is_ok());
        assert!(base64url_bytes(&format!("{point}=="), 65, 1, "p").is_err());
        assert!(base64url_bytes(&point[..86], 65, 1, "p").is_err());
        assert!(base64url_bytes(&point.replace('_', "/"), 65, 1, "p").is_err());
        let auth = "BTBZMqHH6r4Tts7J_aSIgg";
        assert!(base64url_bytes(auth, 16, 2, "a").is_ok());
        assert!(base64url_bytes(&format!("{auth}=="), 16, 2, "a").is_ok());
        assert!(base64url_bytes(&format!("{auth}="), 16, 2, "a").is_err());
        assert!(base64url_bytes("", 16, 2, "a").is_err());
    }

    #[test]
    fn clock_times_are_exactly_hh_mm() {
        assert!(clock_time("00:00", "t").is_ok());
        assert!(clock_time("23:59", "t").is_ok());
        for bad in [
            "24:00", "7:00", "07:0", "07:60", "07:00:00", "0a:00", " 7:00", "07-00",
        ] {
            assert!(clock_time(bad, "t").is_err(), "{bad}");
        }
    }
}
