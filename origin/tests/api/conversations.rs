use reqwest::StatusCode;
use serde_json::json;
use shared::Role;

use crate::helpers::{assert_error, spawn_app};

#[tokio::test]
async fn creating_a_direct_conversation_twice_returns_the_same_one() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let (status, first) = app
        .post(
            &alex,
            "/api/v1/chat/conversations",
            json!({"type": "direct", "participant_id": sam.id}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["type"], "direct");
    assert_eq!(first["participants"].as_array().unwrap().len(), 2);
    // From the other side, too.
    let (status, second) = app
        .post(
            &sam,
            "/api/v1/chat/conversations",
            json!({"type": "direct", "participant_id": alex.id}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(first["id"], second["id"]);
}

#[tokio::test]
async fn parallel_direct_creates_give_one_conversation() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (from, to) = if i % 2 == 0 {
            (&alex, &sam)
        } else {
            (&sam, &alex)
        };
        tasks.push(app.post(
            from,
            "/api/v1/chat/conversations",
            json!({"type": "direct", "participant_id": to.id}),
        ));
    }
    let results = futures::future::join_all(tasks).await;
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "exactly one create wins: {results:?}");
    let ids: std::collections::HashSet<i64> = results
        .iter()
        .map(|(_, b)| b["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("SELECT count(*) FROM conversations").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM conversation_participants")
            .await,
        2
    );
}

#[tokio::test]
async fn the_database_itself_refuses_a_second_direct_conversation_for_a_pair() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    app.direct(&alex, &sam).await;
    let client = app.pool.get().await.unwrap();
    let (lo, hi) = (alex.id.min(sam.id), alex.id.max(sam.id));
    let err = client
        .execute(
            "INSERT INTO conversations (kind, created_by, direct_user_lo, direct_user_hi)
             VALUES ('direct', $1, $2, $3)",
            &[&sam.id, &lo, &hi],
        )
        .await
        .expect_err("unique pair");
    assert_eq!(
        err.as_db_error().unwrap().constraint(),
        Some("conversations_direct_pair_unique")
    );
    // Nor can the pair be written the other way round.
    let err = client
        .execute(
            "INSERT INTO conversations (kind, created_by, direct_user_lo, direct_user_hi)
             VALUES ('direct', $1, $2, $3)",
            &[&sam.id, &hi, &lo],
        )
        .await
        .expect_err("ordered pair");
    assert_eq!(
        err.as_db_error().unwrap().constraint(),
        Some("conversations_direct_pair_shape")
    );
}

#[tokio::test]
async fn a_direct_conversation_with_yourself_or_an_unknown_user_is_refused() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    for participant in [alex.id, 999_999] {
        let (status, body) = app
            .post(
                &alex,
                "/api/v1/chat/conversations",
                json!({"type": "direct", "participant_id": participant}),
            )
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
    }
    let (status, body) = app
        .post(
            &alex,
            "/api/v1/chat/conversations",
            json!({"type": "broadcast", "participant_id": 1}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert_eq!(app.count("SELECT count(*) FROM conversations").await, 0);
}

#[tokio::test]
async fn a_group_includes_its_creator_and_bad_groups_write_nothing() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let (status, body) = app
        .post(
            &coach,
            "/api/v1/chat/conversations",
            json!({"type": "group", "name": "  Morning HIIT ", "participant_ids": [alex.id, alex.id]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "Morning HIIT");
    assert_eq!(body["created_by"], coach.id);
    let members: Vec<i64> = body["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["user_id"].as_i64().unwrap())
        .collect();
    assert_eq!(members.len(), 2);
    assert!(members.contains(&coach.id) && members.contains(&alex.id));

    let bad = [
        (
            json!({"type": "group", "name": "   ", "participant_ids": [alex.id]}),
            "empty_field",
        ),
        (
            json!({"type": "group", "name": "x".repeat(101), "participant_ids": []}),
            "too_long",
        ),
        (
            json!({"type": "group", "name": "Ghosts", "participant_ids": [alex.id, 424242]}),
            "validation_failed",
        ),
        (json!({"type": "group", "name": "No list"}), "invalid_field"),
    ];
    for (req, code) in bad {
        let (status, body) = app.post(&coach, "/api/v1/chat/conversations", req).await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    assert_eq!(app.count("SELECT count(*) FROM conversations").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM conversation_participants")
            .await,
        2
    );
}

#[tokio::test]
async fn the_list_shows_only_my_conversations_newest_activity_first_with_preview_and_unread() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let coach = app.user("Coach", Role::Trainer).await;
    let with_sam = app.direct(&alex, &sam).await;
    let with_coach = app.direct(&alex, &coach).await;
    let not_mine = app.direct(&sam, &coach).await;

    // Sam writes three messages to Alex; that conversation becomes newest.
    app.ingest(with_sam, &sam, 1, 3).await;
    let (status, body) = app.get(&alex, "/api/v1/chat/conversations").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = body["conversations"].as_array().unwrap();
    let ids: Vec<i64> = list.iter().map(|c| c["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![with_sam, with_coach]);
    assert!(!ids.contains(&not_mine));
    let first = &list[0];
    assert_eq!(first["title"], "Sam");
    assert_eq!(first["peer"]["user_id"], sam.id);
    assert_eq!(first["unread_count"], 3);
    assert_eq!(first["last_message"]["seq"], 3);
    assert_eq!(first["last_message"]["content"], "message 3");
    assert_eq!(list[1]["unread_count"], 0);
    assert!(list[1]["last_message"].is_null());

    // Alex reads up to 2; one stays unread. Alex's own messages never count.
    let (status, _) = app
        .internal_post(
            "/internal/v1/receipts",
            &json!({"receipts": [{"conversation_id": with_sam, "user_id": alex.id, "delivered_seq": 3, "read_seq": 2}]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    app.ingest(with_sam, &alex, 4, 2).await;
    let (_, body) = app.get(&alex, "/api/v1/chat/conversations").await;
    assert_eq!(body["conversations"][0]["unread_count"], 1);
    let (_, body) = app.get(&sam, "/api/v1/chat/conversations").await;
    let sams = body["conversations"].as_array().unwrap();
    let with_alex = sams.iter().find(|c| c["id"] == with_sam).unwrap();
    assert_eq!(with_alex["unread_count"], 2);
}

#[tokio::test]
async fn a_conversation_comes_with_its_participants_and_latest_50_messages() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &sam, 1, 120).await;
    let (status, body) = app
        .get(&alex, &format!("/api/v1/chat/conversations/{id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["participants"].as_array().unwrap().len(), 2);
    let seqs: Vec<i64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (71..=120).collect::<Vec<_>>());
    assert_eq!(body["has_more"], true);
    assert_eq!(body["last_seq"], 120);
    assert_eq!(body["messages"][0]["status"], "sent");
}

#[tokio::test]
async fn a_non_participant_gets_403_and_an_unknown_id_gets_404_on_every_conversation_route() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let group = app.group(&alex, "Crew", &[&sam]).await;
    for conv in [id, group] {
        let (s, b) = app
            .get(&eve, &format!("/api/v1/chat/conversations/{conv}"))
            .await;
        assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
        let (s, b) = app
            .get(&eve, &format!("/api/v1/chat/conversations/{conv}/messages"))
            .await;
        assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    }
    let (s, b) = app
        .post(
            &eve,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            json!({"user_ids": [eve.id]}),
        )
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    let (s, b) = app
        .delete(
            &eve,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            json!({"user_ids": [sam.id]}),
        )
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");

    for path in [
        "/api/v1/chat/conversations/987654",
        "/api/v1/chat/conversations/987654/messages",
    ] {
        let (s, b) = app.get(&alex, path).await;
        assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    }
    let (s, b) = app
        .post(
            &alex,
            "/api/v1/chat/conversations/987654/participants",
            json!({"user_ids": [eve.id]}),
        )
        .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    let (s, b) = app
        .get(&alex, "/api/v1/chat/conversations/not-a-number")
        .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_path");
}

#[tokio::test]
async fn only_the_creator_or_an_admin_changes_a_groups_members() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let admin = app.user("Admin", Role::Admin).await;
    let group = app.group(&coach, "Crew", &[&alex]).await;
    let path = format!("/api/v1/chat/conversations/{group}/participants");

    // A plain member may not add anyone.
    let (s, b) = app.post(&alex, &path, json!({"user_ids": [sam.id]})).await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");

    // The creator adds Sam, who starts caught up on what exists.
    app.ingest(group, &coach, 1, 4).await;
    let (s, b) = app.post(&coach, &path, json!({"user_ids": [sam.id]})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let sam_row = b["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["user_id"] == sam.id)
        .cloned()
        .unwrap();
    assert_eq!(sam_row["read_seq"], 4);
    // Adding again is harmless.
    let (s, _) = app.post(&coach, &path, json!({"user_ids": [sam.id]})).await;
    assert_eq!(s, StatusCode::OK);

    // An admin who is not even a member removes Alex.
    let (s, b) = app
        .delete(&admin, &path, json!({"user_ids": [alex.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["participants"].as_array().unwrap().len(), 2);
    let (s, b) = app
        .get(&alex, &format!("/api/v1/chat/conversations/{group}"))
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");

    // Unknown users and empty lists are refused.
    let (s, b) = app
        .post(&coach, &path, json!({"user_ids": [777_777]}))
        .await;
    assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let (s, b) = app.post(&coach, &path, json!({"user_ids": []})).await;
    assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
}

#[tokio::test]
async fn a_member_may_leave_a_group_but_not_remove_others() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex, &sam]).await;
    let path = format!("/api/v1/chat/conversations/{group}/participants");
    let (s, b) = app
        .delete(&alex, &path, json!({"user_ids": [sam.id]}))
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    let (s, b) = app
        .delete(&alex, &path, json!({"user_ids": [alex.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["participants"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_direct_conversations_participants_cannot_change() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let admin = app.user("Admin", Role::Admin).await;
    let id = app.direct(&alex, &sam).await;
    let (s, b) = app
        .post(
            &admin,
            &format!("/api/v1/chat/conversations/{id}/participants"),
            json!({"user_ids": [admin.id]}),
        )
        .await;
    assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(
        app.count("SELECT count(*) FROM conversation_participants")
            .await,
        2
    );
}

#[tokio::test]
async fn active_users_lists_contacts_online_first_and_presence_matches() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let coach = app.user("Coach", Role::Trainer).await;
    let stranger = app.user("Stranger", Role::Trainer).await;
    app.direct(&alex, &sam).await;
    app.group(&coach, "Squad", &[&alex, &stranger]).await;
    // Stranger shares a group with Alex, so is a contact; a user who
    // shares nothing is not.
    let loner = app.user("Loner", Role::Trainer).await;
    let (_, body) = app.get(&loner, "/api/v1/chat/active-users").await;
    assert_eq!(body["users"], json!([]), "no conversations, no contacts");
    let now = chrono::Utc::now();
    let (s, _) = app
        .internal_post(
            "/internal/v1/presence",
            &json!({"updates": [{"user_id": coach.id, "is_online": true, "last_seen": now}]}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body) = app.get(&alex, "/api/v1/chat/active-users").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let users = body["users"].as_array().unwrap();
    assert_eq!(users.len(), 3, "contacts only, never the caller: {body}");
    assert_eq!(users[0]["id"], coach.id);
    assert_eq!(users[0]["is_online"], true);
    assert_eq!(users[0]["role"], "trainer");
    assert_eq!(users[1]["id"], sam.id);
    assert_eq!(users[1]["is_online"], false);
    assert_eq!(users[2]["id"], stranger.id);
    assert!(
        !users.iter().any(|u| u["id"] == loner.id),
        "someone who shares nothing is not listed"
    );

    let (s, body) = app
        .get(&alex, &format!("/api/v1/chat/presence/{}", coach.id))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["is_online"], true);
    let (s, body) = app
        .get(&alex, &format!("/api/v1/chat/presence/{}", sam.id))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["is_online"], false);
    assert!(body["last_seen"].is_null());
    let (s, b) = app.get(&alex, "/api/v1/chat/presence/55555").await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn the_creator_renames_a_group_and_every_member_reads_the_new_name() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex]).await;
    let path = format!("/api/v1/chat/conversations/{group}");
    let (_, before) = app.get(&coach, &path).await;
    let (s, b) = app
        .patch(&coach, &path, json!({"name": "  Evening Yoga  "}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["id"], group);
    assert_eq!(b["name"], "Evening Yoga", "trimmed like a new group's name");
    assert_eq!(b["type"], "group");
    assert_eq!(b["participants"].as_array().unwrap().len(), 2);
    let moved = |b: &serde_json::Value| -> bool {
        let at = |v: &serde_json::Value| {
            chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap()
        };
        at(&b["updated_at"]) > at(&before["updated_at"])
    };
    assert!(moved(&b), "updated_at moves: {b} vs {before}");
    let (s, b) = app.get(&alex, &path).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["name"], "Evening Yoga");
    let (_, list) = app.get(&alex, "/api/v1/chat/conversations").await;
    assert_eq!(list["conversations"][0]["title"], "Evening Yoga");
    // An admin moderates names too, member or not.
    let admin = app.user("Admin", Role::Admin).await;
    let (s, b) = app.patch(&admin, &path, json!({"name": "Crew"})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["name"], "Crew");
}

#[tokio::test]
async fn only_the_creator_while_a_member_or_an_admin_renames_a_group() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex, &sam]).await;
    let path = format!("/api/v1/chat/conversations/{group}");
    // A member who did not create it, and a stranger.
    for who in [&alex, &eve] {
        let (s, b) = app.patch(who, &path, json!({"name": "Mine now"})).await;
        assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    }
    // The creator, once they left.
    let (s, b) = app
        .delete(
            &coach,
            &format!("{path}/participants"),
            json!({"user_ids": [coach.id]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app
        .patch(&coach, &path, json!({"name": "Still mine"}))
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    let (_, b) = app.get(&alex, &path).await;
    assert_eq!(b["name"], "Crew", "nothing changed");
    // An unknown conversation, and a malformed id.
    let (s, b) = app
        .patch(
            &coach,
            "/api/v1/chat/conversations/987654",
            json!({"name": "X"}),
        )
        .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    let (s, b) = app
        .patch(
            &coach,
            "/api/v1/chat/conversations/nope",
            json!({"name": "X"}),
        )
        .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_path");
}

#[tokio::test]
async fn a_direct_conversation_or_a_bad_name_cannot_be_set() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let direct = app.direct(&alex, &sam).await;
    // Alex created it: the rights hold, the kind does not.
    let (s, b) = app
        .patch(
            &alex,
            &format!("/api/v1/chat/conversations/{direct}"),
            json!({"name": "Us"}),
        )
        .await;
    assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let (_, b) = app
        .get(&alex, &format!("/api/v1/chat/conversations/{direct}"))
        .await;
    assert_eq!(b["name"], serde_json::Value::Null);

    let group = app.group(&alex, "Crew", &[&sam]).await;
    let path = format!("/api/v1/chat/conversations/{group}");
    let bad = [
        (json!({"name": "   "}), "empty_field"),
        (json!({"name": ""}), "empty_field"),
        (json!({"name": "x".repeat(101)}), "too_long"),
        (
            json!({"name": format!("{}{}", " ".repeat(10), "x".repeat(95))}),
            "too_long",
        ),
        (json!({"name": "tab\there"}), "invalid_field"),
        (json!({"name": 7}), "invalid_field"),
        (json!({}), "invalid_field"),
    ];
    for (req, code) in bad {
        let (s, b) = app.patch(&alex, &path, req.clone()).await;
        assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    let (_, b) = app.get(&alex, &path).await;
    assert_eq!(b["name"], "Crew", "nothing changed");
}
