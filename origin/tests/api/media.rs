//! Attachments at the origin: the edge's reservations, commits and aborts,
//! linking by the ingest, and the reads that carry signed download paths.
//! (Processing and cleanup call the edge; the end-to-end suite under
//! `wrangler dev` covers them.)

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;
use shared::media::{Signer, Variant};
use uuid::Uuid;

use crate::helpers::{SERVICE_SECRET, TestApp, TestUser, assert_error, spawn_app, spawn_app_with};

async fn reserve(
    app: &TestApp,
    conversation: i64,
    uploader: &TestUser,
    kind: &str,
    size: i64,
) -> (StatusCode, Value) {
    app.internal_post(
        "/internal/v1/attachments",
        &json!({
            "conversation_id": conversation,
            "uploader_id": uploader.id,
            "kind": kind,
            "mime": match kind {
                "image" => "image/jpeg",
                "video" => "video/mp4",
                "audio" => "audio/webm",
                _ => "application/pdf",
            },
            "size": size,
            "name": "../../My Plan (final).pdf",
            "duration_ms": 4200,
        }),
    )
    .await
}

/// A reserved and committed attachment's id.
async fn upload(app: &TestApp, conversation: i64, uploader: &TestUser, kind: &str) -> Uuid {
    let (status, body) = reserve(app, conversation, uploader, kind, 2048).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let (status, body) = app
        .internal_post(
            &format!("/internal/v1/attachments/{id}/commit"),
            &json!({"width": 640, "height": 480}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    id
}

/// A message as the edge flushes it, with attachments.
fn message_with(conversation: i64, sender: i64, seq: i64, content: &str, ids: &[Uuid]) -> Value {
    let mut m = crate::helpers::message(conversation, sender, seq);
    m["content"] = json!(content);
    m["attachment_ids"] = json!(ids);
    m
}

async fn flush(app: &TestApp, messages: Vec<Value>) -> Value {
    let (status, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({ "messages": messages }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Checks a signed path the way the edge will: bound to `id` and
/// `variant`, not expired.
fn assert_signed(path: &Value, id: Uuid, variant: Variant) {
    let path = path.as_str().unwrap_or_else(|| panic!("no path: {path}"));
    let (route, query) = path.split_once('?').unwrap();
    assert_eq!(route, format!("/api/v1/media/{id}/{}", variant.as_str()));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_owned()
    };
    let exp: i64 = param("exp").parse().unwrap();
    let signer = Signer::new(SERVICE_SECRET.as_bytes());
    let now = chrono::Utc::now().timestamp();
    signer
        .verify(id, variant, exp, &param("sig"), now)
        .expect("a valid signature");
    // Bound to its variant: the same signature does not open another copy.
    let other = if variant == Variant::Thumb {
        Variant::Original
    } else {
        Variant::Thumb
    };
    assert!(signer.verify(id, other, exp, &param("sig"), now).is_err());
}

#[tokio::test]
async fn reserve_commit_and_abort() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Trainer).await;
    let conv = app.direct(&alex, &sam).await;

    // An image: reserved, committed (queued for processing), committed again.
    let (status, body) = reserve(&app, conv, &alex, "image", 5000).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let image: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let commit = format!("/internal/v1/attachments/{image}/commit");
    let (status, meta) = app
        .internal_post(&commit, &json!({"width": 4000, "height": 3000}))
        .await;
    assert_eq!(status, StatusCode::OK, "{meta}");
    assert_eq!(meta["id"], image.to_string());
    assert_eq!(meta["conversation_id"], conv);
    assert_eq!(meta["uploader_id"], alex.id);
    assert_eq!(meta["kind"], "image");
    assert_eq!(meta["mime"], "image/jpeg");
    assert_eq!(meta["size"], 5000);
    assert_eq!(
        (meta["width"].clone(), meta["height"].clone()),
        (json!(4000), json!(3000))
    );
    assert_eq!(meta["status"], "processing");
    assert_eq!(meta["has_thumbnail"], false);
    let (status, again) = app
        .internal_post(&commit, &json!({"width": 1, "height": 1}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, meta, "a second commit changes nothing");
    let due = app
        .count(&format!(
            "SELECT count(*) FROM attachments WHERE id = '{image}' AND next_attempt_at IS NOT NULL
               AND NOT notified AND state = 'processing'"
        ))
        .await;
    assert_eq!(due, 1, "queued for the worker");

    // A file is ready at once, its name sanitized, nothing queued.
    let (_, body) = reserve(&app, conv, &alex, "file", 3000).await;
    let file: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let (status, meta) = app
        .internal_post(
            &format!("/internal/v1/attachments/{file}/commit"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{meta}");
    assert_eq!(meta["status"], "ready");
    assert_eq!(meta["name"], "My Plan _final_.pdf");
    assert!(meta.get("width").is_none());
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM attachments WHERE id = '{file}' AND next_attempt_at IS NULL"
        ))
        .await,
        1
    );

    // Abort: only an upload in progress; idempotent; a committed one is 409.
    let (_, body) = reserve(&app, conv, &sam, "video", 9000).await;
    let video: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let path = format!("/internal/v1/attachments/{video}");
    assert_eq!(app.internal_delete(&path).await.0, StatusCode::NO_CONTENT);
    assert_eq!(app.internal_delete(&path).await.0, StatusCode::NO_CONTENT);
    let (status, body) = app
        .internal_post(&format!("{path}/commit"), &json!({}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = app
        .internal_delete(&format!("/internal/v1/attachments/{image}"))
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");
    assert_eq!(app.count("SELECT count(*) FROM attachments").await, 2);

    // Bad commits.
    let (status, body) = app
        .internal_post(
            &format!("/internal/v1/attachments/{}/commit", Uuid::now_v7()),
            &json!({}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, _) = app
        .internal_post("/internal/v1/attachments/not-a-uuid/commit", &json!({}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = app.internal_post(&commit, &json!({"width": 0})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
}

#[tokio::test]
async fn reservations_are_refused_for_outsiders_oversize_bad_sizes_and_without_the_secret() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Trainer).await;
    let eve = app.user("Eve", Role::Member).await;
    let conv = app.direct(&alex, &sam).await;

    let (status, body) = reserve(&app, conv, &eve, "image", 100).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = reserve(&app, conv + 1000, &alex, "image", 100).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    let (status, body) = reserve(&app, conv, &alex, "image", 10 * 1024 * 1024 + 1).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert!(
        body["message"].as_str().unwrap().contains("10 MiB"),
        "{body}"
    );
    // The limit is per kind: the same size is a fine video.
    let (status, _) = reserve(&app, conv, &alex, "video", 10 * 1024 * 1024 + 1).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = reserve(&app, conv, &alex, "video", 100 * 1024 * 1024 + 1).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert!(
        body["message"].as_str().unwrap().contains("100 MiB"),
        "{body}"
    );

    for size in [0, -1] {
        let (status, body) = reserve(&app, conv, &alex, "file", size).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_size");
    }
    let (status, _) = app
        .internal_post(
            "/internal/v1/attachments",
            &json!({"conversation_id": conv, "uploader_id": alex.id, "kind": "exe",
                    "mime": "application/x-msdownload", "size": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Without the service secret, or with a wrong one.
    let body = json!({"conversation_id": conv, "uploader_id": alex.id, "kind": "image",
                      "mime": "image/png", "size": 10});
    let res = app
        .http
        .post(app.url("/internal/v1/attachments"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app
        .http
        .post(app.url("/internal/v1/attachments"))
        .header(
            shared::protocol::internal::SERVICE_SECRET_HEADER,
            "not-the-secret",
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // Nothing was stored by any refusal: only the one video.
    assert_eq!(app.count("SELECT count(*) FROM attachments").await, 1);
}

#[tokio::test]
async fn the_daily_quota_counts_every_reservation_of_the_last_24_hours() {
    let app = spawn_app_with(&[("MEDIA_DAILY_QUOTA_BYTES", "10240")]).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Trainer).await;
    let conv = app.direct(&alex, &sam).await;

    let (status, _) = reserve(&app, conv, &alex, "image", 4000).await;
    assert_eq!(status, StatusCode::CREATED);
    // An aborted upload stored nothing and gives its bytes back.
    let (_, body) = reserve(&app, conv, &alex, "image", 4000).await;
    let id = body["id"].as_str().unwrap().to_owned();
    app.internal_delete(&format!("/internal/v1/attachments/{id}"))
        .await;
    let (status, _) = reserve(&app, conv, &alex, "file", 4000).await;
    assert_eq!(status, StatusCode::CREATED);
    // A committed one counts whatever became of it later.
    let (status, body) = reserve(&app, conv, &alex, "file", 2241).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "quota_exceeded",
    );
    assert!(
        body["message"].as_str().unwrap().contains("10 KiB"),
        "{body}"
    );
    let (status, _) = reserve(&app, conv, &alex, "file", 2240).await;
    assert_eq!(status, StatusCode::CREATED, "exactly up to the quota");
    // Another uploader has their own.
    let (status, _) = reserve(&app, conv, &sam, "image", 9000).await;
    assert_eq!(status, StatusCode::CREATED);
    // A day later the window has moved on.
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE attachments SET created_at = now() - interval '25 hours' WHERE uploader_id = $1",
            &[&alex.id],
        )
        .await
        .unwrap();
    let (status, _) = reserve(&app, conv, &alex, "image", 9000).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn the_ingest_links_attachments_and_history_carries_them_signed() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Trainer).await;
    let conv = app.direct(&alex, &sam).await;
    let photo = upload(&app, conv, &alex, "image").await;
    let plan = upload(&app, conv, &alex, "file").await;
    let sams = upload(&app, conv, &sam, "file").await;

    // Text-less with two attachments (in the sender's order), a caption
    // with someone else's upload (stored, not linked), and an empty one.
    let messages = vec![
        message_with(conv, alex.id, 1, "", &[plan, photo]),
        message_with(conv, alex.id, 2, "see this", &[sams]),
        message_with(conv, alex.id, 3, "", &[]),
        message_with(conv, alex.id, 4, "plain", &[]),
    ];
    let first = flush(&app, messages.clone()).await;
    assert_eq!(first["stored"].as_array().unwrap().len(), 3, "{first}");
    let rejected = first["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{first}");
    assert_eq!(rejected[0]["code"], "empty_field");
    assert_eq!(
        rejected[0]["id"],
        crate::helpers::message_id(conv, 3).to_string()
    );
    // A replay answers the same and links nothing twice.
    assert_eq!(flush(&app, messages).await, first);

    // The image is processed (the worker's write, done by hand here).
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE attachments SET state = 'ready', has_thumbnail = true, width = 480, height = 640
             WHERE id = $1",
            &[&photo],
        )
        .await
        .unwrap();

    for user in [&alex, &sam] {
        let (status, body) = app
            .get(user, &format!("/api/v1/chat/conversations/{conv}/messages"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let messages = body["messages"].as_array().unwrap();
        let m1 = &messages[0];
        assert_eq!(m1["content"], "");
        let attachments = m1["attachments"].as_array().unwrap();
        let ids: Vec<&str> = attachments
            .iter()
            .map(|a| a["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [plan.to_string(), photo.to_string()]);
        assert_eq!(attachments[0]["kind"], "file");
        assert_signed(&attachments[0]["url"], plan, Variant::Original);
        assert!(attachments[0].get("thumbnail_url").is_none());
        assert_eq!(attachments[1]["status"], "ready");
        assert_eq!(attachments[1]["width"], 480);
        assert_signed(&attachments[1]["url"], photo, Variant::Full);
        assert_signed(&attachments[1]["thumbnail_url"], photo, Variant::Thumb);
        // Someone else's upload did not join the caption.
        assert_eq!(messages[1]["content"], "see this");
        assert!(messages[1].get("attachments").is_none(), "{}", messages[1]);
        assert!(messages[2].get("attachments").is_none());
    }
    // The conversation's own latest messages carry them too.
    let (_, body) = app
        .get(&sam, &format!("/api/v1/chat/conversations/{conv}"))
        .await;
    assert_eq!(
        body["messages"][0]["attachments"].as_array().unwrap().len(),
        2
    );

    // The room's resend lookup returns the ids in order.
    let (status, stored) = app
        .internal_get(&format!("/internal/v1/conversations/{conv}/messages/1"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["attachment_ids"], json!([plan, photo]));
    assert_eq!(stored["content"], "");

    // The list previews a text-less last message by what it carries.
    flush(&app, vec![message_with(conv, sam.id, 5, "", &[sams])]).await;
    let (_, list) = app.get(&alex, "/api/v1/chat/conversations").await;
    let preview = &list["conversations"][0]["last_message"];
    assert_eq!(preview["seq"], 5);
    assert_eq!(preview["content"], "📄 My Plan _final_.pdf");
}

#[tokio::test]
async fn the_gallery_pages_newest_first_filters_by_kind_and_is_for_participants() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Trainer).await;
    let eve = app.user("Eve", Role::Member).await;
    let conv = app.direct(&alex, &sam).await;
    let other = app.direct(&alex, &eve).await;

    // Five messages: seq 1 two images, 2 a video, 3 text, 4 a file and an
    // image, 5 an audio; plus an unsent image, a failed one, and an image
    // in another conversation.
    let i1 = upload(&app, conv, &alex, "image").await;
    let i2 = upload(&app, conv, &alex, "image").await;
    let v = upload(&app, conv, &sam, "video").await;
    let f = upload(&app, conv, &alex, "file").await;
    let i3 = upload(&app, conv, &alex, "image").await;
    let a = upload(&app, conv, &sam, "audio").await;
    let broken = upload(&app, conv, &sam, "image").await;
    let _unsent = upload(&app, conv, &alex, "image").await;
    let elsewhere = upload(&app, other, &alex, "image").await;
    flush(
        &app,
        vec![
            message_with(conv, alex.id, 1, "", &[i1, i2]),
            message_with(conv, sam.id, 2, "form check", &[v, broken]),
            message_with(conv, alex.id, 3, "nice", &[]),
            message_with(conv, alex.id, 4, "plan + pic", &[f, i3]),
            message_with(conv, sam.id, 5, "", &[a]),
            message_with(other, alex.id, 1, "", &[elsewhere]),
        ],
    )
    .await;
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE attachments SET state = 'failed' WHERE id = $1",
            &[&broken],
        )
        .await
        .unwrap();

    let base = format!("/api/v1/chat/conversations/{conv}/attachments");
    let (status, all) = app.get(&sam, &base).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let order = |page: &Value| -> Vec<String> {
        page["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let expected: Vec<String> = [a, f, i3, v, i1, i2].iter().map(Uuid::to_string).collect();
    assert_eq!(order(&all), expected);
    assert_eq!(all["next_cursor"], Value::Null);
    let first = &all["attachments"][0];
    assert_eq!(first["seq"], 5);
    assert_eq!(first["sender_id"], sam.id);
    assert_eq!(
        first["message_id"],
        crate::helpers::message_id(conv, 5).to_string()
    );
    assert!(first["created_at"].is_string());
    assert_signed(&first["url"], a, Variant::Original);

    // Two at a time, following the cursor: the same order, no overlap.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("{base}?limit=2&cursor={c}"),
            None => format!("{base}?limit=2"),
        };
        let (status, page) = app.get(&alex, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        paged.extend(order(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, expected);

    let (_, images) = app.get(&alex, &format!("{base}?kind=image")).await;
    assert_eq!(order(&images), [i3, i1, i2].map(|u| u.to_string()));
    let (_, images) = app.get(&alex, &format!("{base}?kind=image&limit=1")).await;
    let cursor = images["next_cursor"].as_str().unwrap().to_owned();
    let (_, rest) = app
        .get(&alex, &format!("{base}?kind=image&cursor={cursor}"))
        .await;
    assert_eq!(order(&rest), [i1, i2].map(|u| u.to_string()));

    for q in [
        "kind=exe",
        "kind=",
        "limit=0",
        "limit=101",
        "limit=many",
        "cursor=nonsense",
        "cursor=MC4w",
    ] {
        let (status, body) = app.get(&alex, &format!("{base}?{q}")).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_query");
    }
    let (status, body) = app.get(&eve, &base).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app
        .get(
            &alex,
            &format!("/api/v1/chat/conversations/{}/attachments", other + 100),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let res = app.http.get(app.url(&base)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn one_attachment_is_signed_afresh_and_an_unsent_one_is_its_uploaders_alone() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Trainer).await;
    let eve = app.user("Eve", Role::Member).await;
    let conv = app.direct(&alex, &sam).await;
    let clip = upload(&app, conv, &alex, "audio").await;
    let path = format!("/api/v1/chat/conversations/{conv}/attachments/{clip}");

    let (status, view) = app.get(&alex, &path).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["id"], clip.to_string());
    assert_eq!(view["kind"], "audio");
    assert_eq!(view["status"], "processing");
    assert_signed(&view["url"], clip, Variant::Original);
    let (status, body) = app.get(&sam, &path).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    flush(&app, vec![message_with(conv, alex.id, 1, "", &[clip])]).await;
    let (status, view) = app.get(&sam, &path).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_signed(&view["url"], clip, Variant::Original);

    let (status, body) = app.get(&eve, &path).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app
        .get(
            &alex,
            &format!(
                "/api/v1/chat/conversations/{conv}/attachments/{}",
                Uuid::now_v7()
            ),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = app
        .get(
            &alex,
            &format!("/api/v1/chat/conversations/{conv}/attachments/xyz"),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_path");
    // Another conversation's id does not reach it.
    let other = app.direct(&alex, &eve).await;
    let (status, _) = app
        .get(
            &alex,
            &format!("/api/v1/chat/conversations/{other}/attachments/{clip}"),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
