//! `GET /api/v1/chat/search` (issue 15).

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;

use crate::helpers::{TestApp, TestUser, assert_error, message_id, spawn_app};

/// Stores messages through the internal ingest, as the edge flushes them:
/// `(seq, content)` from `sender` in `conversation`.
async fn say(app: &TestApp, conversation: i64, sender: &TestUser, lines: &[(i64, &str)]) {
    let messages: Vec<Value> = lines
        .iter()
        .map(|(seq, content)| {
            json!({
                "id": message_id(conversation, *seq),
                "conversation_id": conversation,
                "seq": seq,
                "sender_id": sender.id,
                "content": content,
                "created_at": chrono::Utc::now(),
                "client_msg_id": format!("c-{conversation}-{seq}"),
            })
        })
        .collect();
    let (status, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({ "messages": messages }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], json!([]), "{body}");
}

/// The search path for `q` and extra parameters, `q` URL-encoded.
fn path(q: &str, extra: &str) -> String {
    let mut url = reqwest::Url::parse("http://x/api/v1/chat/search").unwrap();
    url.query_pairs_mut().append_pair("q", q);
    format!("{}?{}{extra}", url.path(), url.query().unwrap())
}

async fn search(app: &TestApp, user: &TestUser, q: &str, extra: &str) -> Value {
    let (status, body) = app.get(user, &path(q, extra)).await;
    assert_eq!(status, StatusCode::OK, "{q:?}{extra}: {body}");
    body
}

/// The hits' `(conversation_id, seq)`.
fn found(body: &Value) -> Vec<(i64, i64)> {
    body["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["conversation_id"].as_i64().unwrap(),
                h["seq"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn sql(app: &TestApp, statement: &str) {
    app.pool
        .get()
        .await
        .unwrap()
        .batch_execute(statement)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_participant_finds_a_message_with_its_words_highlighted_and_its_conversation_named() {
    let app = spawn_app().await;
    let coach = app.user("Coach Carter", Role::Trainer).await;
    let alex = app.user("Alex Smith", Role::Member).await;
    let sam = app.user("Sam Jones", Role::Member).await;
    let direct = app.direct(&coach, &alex).await;
    let group = app.group(&coach, "Morning HIIT", &[&alex, &sam]).await;
    say(
        &app,
        direct,
        &alex,
        &[(1, "My knee hurts after the squats"), (2, "Tomorrow at 7?")],
    )
    .await;
    say(
        &app,
        group,
        &coach,
        &[(1, "Squats and lunges today, bring water")],
    )
    .await;

    let body = search(&app, &coach, "squats", "").await;
    assert_eq!(body["next_cursor"], Value::Null);
    let hits = body["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2, "{body}");
    let in_direct = hits
        .iter()
        .find(|h| h["conversation_id"] == direct)
        .unwrap();
    assert_eq!(in_direct["message_id"], json!(message_id(direct, 1)));
    assert_eq!(in_direct["seq"], 1);
    assert_eq!(in_direct["sender_id"], alex.id);
    assert_eq!(in_direct["sender_name"], "Alex Smith");
    // A direct conversation is named by the other person, for each side.
    assert_eq!(in_direct["conversation_name"], "Alex Smith");
    assert_eq!(
        in_direct["snippet"], "My knee hurts after the «squats»",
        "{body}"
    );
    assert!(in_direct["created_at"].as_str().is_some());
    let in_group = hits.iter().find(|h| h["conversation_id"] == group).unwrap();
    assert_eq!(in_group["conversation_name"], "Morning HIIT");
    assert_eq!(in_group["sender_name"], "Coach Carter");
    assert!(
        in_group["snippet"]
            .as_str()
            .unwrap()
            .starts_with("«Squats» and lunges"),
        "{body}"
    );

    let body = search(&app, &alex, "squats", "").await;
    let in_direct = body["hits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["conversation_id"] == direct)
        .unwrap()
        .clone();
    assert_eq!(in_direct["conversation_name"], "Coach Carter");

    // Narrowed to one conversation.
    let body = search(&app, &coach, "squats", &format!("&conversation_id={group}")).await;
    assert_eq!(found(&body), vec![(group, 1)]);
    // Words that are nowhere.
    assert_eq!(found(&search(&app, &coach, "marathon", "").await), vec![]);
}

#[tokio::test]
async fn words_are_stemmed_and_the_last_word_matches_as_a_prefix() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let id = app.direct(&coach, &alex).await;
    say(
        &app,
        id,
        &alex,
        &[
            (1, "New deadlift record today"),
            (2, "Deadlifting twice a week is plenty"),
            (3, "The deadline for the challenge is Friday"),
            (4, "Great session, my legs are dead"),
            (5, "Running in the rain"),
        ],
    )
    .await;
    let seqs = |body: &Value| {
        let mut s: Vec<i64> = found(body).iter().map(|h| h.1).collect();
        s.sort_unstable();
        s
    };

    // Stemming: the plural, the -ing form and the singular find each other.
    assert_eq!(
        seqs(&search(&app, &coach, "deadlifts", "").await),
        vec![1, 2]
    );
    assert_eq!(
        seqs(&search(&app, &coach, "deadlift twice", "").await),
        vec![2]
    );
    assert_eq!(seqs(&search(&app, &coach, "runs", "").await), vec![5]);
    // The last word as a prefix, alone or after others.
    assert_eq!(
        seqs(&search(&app, &coach, "dead", "").await),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        seqs(&search(&app, &coach, "deadl", "").await),
        vec![1, 2, 3]
    );
    assert_eq!(
        seqs(&search(&app, &coach, "record dead", "").await),
        vec![1]
    );
    assert_eq!(seqs(&search(&app, &coach, "Rai", "").await), vec![5]);
    // A word before the last one is a whole word, not a prefix.
    assert!(seqs(&search(&app, &coach, "dead record", "").await).is_empty());
    // A phrase, an exclusion, an alternative.
    assert_eq!(
        seqs(&search(&app, &coach, "\"deadlift record\"", "").await),
        vec![1]
    );
    assert!(seqs(&search(&app, &coach, "\"record deadlift\"", "").await).is_empty());
    assert_eq!(
        seqs(&search(&app, &coach, "deadlift -record", "").await),
        vec![2]
    );
    assert_eq!(
        seqs(&search(&app, &coach, "rain or deadline", "").await),
        vec![3, 5]
    );
    // The prefix is highlighted whole.
    let body = search(&app, &coach, "deadli", "").await;
    let snippets: Vec<&str> = body["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["snippet"].as_str().unwrap())
        .collect();
    assert!(
        snippets.contains(&"The «deadline» for the challenge is Friday"),
        "{snippets:?}"
    );
}

#[tokio::test]
async fn only_current_participants_find_a_conversations_messages() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex, &sam]).await;
    let private = app.direct(&coach, &alex).await;
    say(&app, group, &coach, &[(1, "Kettlebell swings on Monday")]).await;
    say(&app, private, &alex, &[(1, "My kettlebell is too light")]).await;

    // Eve is in neither: nothing, and 403 when she names one.
    assert_eq!(found(&search(&app, &eve, "kettlebell", "").await), vec![]);
    let (s, b) = app
        .get(
            &eve,
            &path("kettlebell", &format!("&conversation_id={group}")),
        )
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    let (s, b) = app
        .get(&eve, &path("kettlebell", "&conversation_id=999999"))
        .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    // Sam sees the group, not the direct conversation of the others.
    assert_eq!(
        found(&search(&app, &sam, "kettlebell", "").await),
        vec![(group, 1)]
    );
    let (s, b) = app
        .get(
            &sam,
            &path("kettlebell", &format!("&conversation_id={private}")),
        )
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");

    // Removed from the group, Sam no longer finds its messages.
    let (s, b) = app
        .delete(
            &coach,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            json!({"user_ids": [sam.id]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(found(&search(&app, &sam, "kettlebell", "").await), vec![]);
    let (s, b) = app
        .get(
            &sam,
            &path("kettlebell", &format!("&conversation_id={group}")),
        )
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    // The others still do.
    assert_eq!(found(&search(&app, &alex, "kettlebell", "").await).len(), 2);
}

#[tokio::test]
async fn a_deleted_message_never_matches_and_an_edited_one_matches_its_new_words_only() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let id = app.direct(&coach, &alex).await;
    say(
        &app,
        id,
        &alex,
        &[
            (1, "Protein shake after the workout"),
            (2, "Protein pancakes for breakfast"),
        ],
    )
    .await;
    assert_eq!(found(&search(&app, &coach, "protein", "").await).len(), 2);

    // A tombstone, as the lifecycle's delete leaves it.
    sql(
        &app,
        &format!(
            "UPDATE messages SET content = '', deleted_at = now()
             WHERE conversation_id = {id} AND seq = 1"
        ),
    )
    .await;
    assert_eq!(
        found(&search(&app, &coach, "protein", "").await),
        vec![(id, 2)]
    );
    assert_eq!(found(&search(&app, &coach, "shake", "").await), vec![]);
    // deleted_at alone excludes it too, whatever the row still holds.
    sql(
        &app,
        &format!(
            "ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_tombstone_check;
             UPDATE messages SET deleted_at = now() WHERE conversation_id = {id} AND seq = 2"
        ),
    )
    .await;
    assert_eq!(found(&search(&app, &coach, "protein", "").await), vec![]);
    sql(
        &app,
        &format!("UPDATE messages SET deleted_at = NULL WHERE conversation_id = {id} AND seq = 2"),
    )
    .await;

    // An edit: the new words at once, the old ones no more.
    sql(
        &app,
        &format!(
            "UPDATE messages SET content = 'Oatmeal with berries for breakfast', edited_at = now()
             WHERE conversation_id = {id} AND seq = 2"
        ),
    )
    .await;
    assert_eq!(found(&search(&app, &coach, "protein", "").await), vec![]);
    assert_eq!(found(&search(&app, &coach, "pancakes", "").await), vec![]);
    let body = search(&app, &coach, "berries", "").await;
    assert_eq!(found(&body), vec![(id, 2)]);
    assert_eq!(
        body["hits"][0]["snippet"],
        "Oatmeal with «berries» for breakfast"
    );
}

#[tokio::test]
async fn pages_follow_the_cursor_without_duplicates_best_first_then_newest() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let a = app.direct(&coach, &alex).await;
    let b = app.group(&coach, "Crew", &[&alex, &sam]).await;
    // 37 messages with "plank" once, all sent in the same second (ties on
    // rank and time, broken by id), 5 with it three times (ranked higher),
    // and noise.
    sql(
        &app,
        &format!(
            "INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
             SELECT gen_random_uuid(), CASE WHEN g % 2 = 0 THEN {a} ELSE {b} END, g, {alex},
                    CASE WHEN g <= 37 THEN 'plank for one minute, number ' || g
                         WHEN g <= 42 THEN 'plank plank plank ' || g
                         ELSE 'squat ' || g END,
                    CASE WHEN g <= 37 THEN timestamptz '2026-01-01 10:00:00'
                         ELSE timestamptz '2026-01-01 10:00:00' + g * interval '1 minute' END,
                    'k' || g
             FROM generate_series(1, 60) g",
            alex = alex.id
        ),
    )
    .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let extra = match &cursor {
            Some(c) => format!("&limit=10&cursor={c}"),
            None => "&limit=10".to_owned(),
        };
        let body = search(&app, &coach, "plank", &extra).await;
        pages += 1;
        let hits = body["hits"].as_array().unwrap();
        assert!(hits.len() <= 10);
        seen.extend(
            hits.iter()
                .map(|h| h["message_id"].as_str().unwrap().to_owned()),
        );
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "the cursor does not end");
    }
    assert_eq!(pages, 5);
    assert_eq!(seen.len(), 42);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 42, "duplicates");
    // The repeated word ranks first, newest first among them.
    let body = search(&app, &coach, "plank", "&limit=6").await;
    let first: Vec<String> = body["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["snippet"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        first[..5],
        [42, 41, 40, 39, 38].map(|g| format!("«plank» «plank» «plank» {g}"))
    );
    assert!(first[5].starts_with("«plank» for one minute"));
    // A page of exactly what is left ends the search.
    let body = search(&app, &coach, "plank", "&limit=42").await;
    assert_eq!(body["hits"].as_array().unwrap().len(), 42);
    assert_eq!(body["next_cursor"], Value::Null);
    let body = search(&app, &coach, "plank", "&limit=41").await;
    assert!(body["next_cursor"].is_string());
}

#[tokio::test]
async fn a_search_ranks_and_pages_only_the_newest_thousand_matches() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let id = app.direct(&coach, &alex).await;
    // 1,030 matches among 2,500 messages (enough to be searched through
    // the GIN index, not read whole); the oldest 30 say it three times
    // (they would rank first if they were ranked at all).
    sql(
        &app,
        &format!(
            "INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
             SELECT gen_random_uuid(), {id}, g, {alex},
                    CASE WHEN g <= 30 THEN 'stretch stretch stretch'
                         WHEN g <= 1030 THEN 'stretch ' || g
                         ELSE 'rest day ' || g END,
                    timestamptz '2026-01-01' + g * interval '1 second', 'k' || g
             FROM generate_series(1, 2500) g;
             UPDATE conversations SET last_seq = 2500 WHERE id = {id}",
            alex = alex.id
        ),
    )
    .await;
    const { assert!(2500 > origin::search::SCAN_BELOW) };
    let mut seqs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let extra = match &cursor {
            Some(c) => format!("&limit=50&cursor={c}"),
            None => "&limit=50".to_owned(),
        };
        let body = search(&app, &coach, "stretch", &extra).await;
        seqs.extend(found(&body).iter().map(|h| h.1));
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seqs, (31..=1030).rev().collect::<Vec<i64>>());
    // Narrower words reach further back.
    let body = search(&app, &coach, "\"stretch stretch\"", "").await;
    assert_eq!(found(&body).len(), 20);
}

#[tokio::test]
async fn a_message_cannot_fake_a_highlight() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let id = app.direct(&coach, &alex).await;
    say(
        &app,
        id,
        &alex,
        &[(
            1,
            "«urgent» read this: your «password» expired, see the yoga schedule <b>now</b>",
        )],
    )
    .await;
    let body = search(&app, &coach, "yoga", "").await;
    let snippet = body["hits"][0]["snippet"].as_str().unwrap();
    assert_eq!(
        snippet,
        "urgent read this: your password expired, see the «yoga» schedule <b>now</b>"
    );

    // A long message: up to two fragments around the matches, the same
    // rule for the markers.
    let long = format!(
        "{} «fake» pilates on Thursday {} and pilates again «on» Sunday",
        "warm up first. ".repeat(40),
        "then stretch the calves. ".repeat(40)
    );
    say(&app, id, &alex, &[(2, &long)]).await;
    let body = search(&app, &coach, "pilates", "").await;
    let snippet = body["hits"][0]["snippet"].as_str().unwrap();
    assert!(snippet.chars().count() < 600, "{snippet}");
    assert_eq!(snippet.matches('«').count(), 2, "{snippet}");
    assert_eq!(snippet.matches("«pilates»").count(), 2, "{snippet}");
    assert!(snippet.contains(" … "), "{snippet}");
}

#[tokio::test]
async fn bad_parameters_get_422_and_odd_queries_are_just_searches() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let id = app.direct(&coach, &alex).await;
    say(
        &app,
        id,
        &alex,
        &[(
            1,
            "Łódź half marathon: 1:45 ☺, dziękuję! Café au lait after",
        )],
    )
    .await;

    for bad in [
        "/api/v1/chat/search".to_owned(),
        "/api/v1/chat/search?q=".to_owned(),
        path("   ", ""),
        path("\t\n", ""),
        path(&"a".repeat(201), ""),
        path(&"é".repeat(201), ""),
        path("run", "&limit=0"),
        path("run", "&limit=51"),
        path("run", "&limit=-1"),
        path("run", "&limit=ten"),
        path("run", "&conversation_id=abc"),
        path("run", "&conversation_id=0"),
        path("run", "&conversation_id=-5"),
        path("run", "&cursor=abc"),
        path("run", "&cursor="),
        path("run", "&cursor=%27%3B--"),
        // Valid base64url, but not the length of a cursor.
        path("run", &format!("&cursor={}", "A".repeat(40))),
    ] {
        let (s, b) = app.get(&coach, &bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {b}");
        assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_query");
    }
    let (s, b) = app.get_as("not-a-token", &path("run", "")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");

    // Whatever the text, a search answers 200: the input is only ever a
    // parameter, and websearch_to_tsquery never fails to parse.
    for q in [
        "'",
        "''",
        "\"",
        ":*",
        "dead:*",
        "&|!()",
        "!!!",
        "a & b | !c",
        "(((",
        "\\",
        "\\'",
        "'; DROP TABLE messages; --",
        "-",
        "--",
        "- -",
        "-marathon",
        "-marathon or lait",
        "or",
        "or or",
        "the and of",
        "\u{0}",
        "x\u{0}y",
        "<b>",
        "😀",
        "«»",
        "日本語",
        "e-mail",
        "don't",
        "%",
        "_",
        "*",
        "a:*b:*",
        "\"unclosed phrase",
    ] {
        let body = search(&app, &coach, q, "").await;
        assert!(body["hits"].is_array(), "{q:?}: {body}");
    }
    let q200 = "a".repeat(200);
    search(&app, &coach, &q200, "").await;
    // Words with marks, in any case.
    assert_eq!(
        found(&search(&app, &coach, "łódź", "").await),
        vec![(id, 1)]
    );
    assert_eq!(
        found(&search(&app, &coach, "DZIĘKUJĘ", "").await),
        vec![(id, 1)]
    );
    assert_eq!(
        found(&search(&app, &coach, "café", "").await),
        vec![(id, 1)]
    );
    assert_eq!(found(&search(&app, &coach, "caf", "").await), vec![(id, 1)]);
    // Stop words alone find nothing (they are not indexed), and an
    // exclusion alone finds nothing rather than everything.
    assert_eq!(found(&search(&app, &coach, "the after", "").await), vec![]);
    assert_eq!(found(&search(&app, &coach, "-cats", "").await), vec![]);
    // The table is still there.
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 1);
}

#[tokio::test]
async fn a_user_in_no_conversation_finds_nothing() {
    let app = spawn_app().await;
    let loner = app.user("Loner", Role::Member).await;
    let body = search(&app, &loner, "anything", "").await;
    assert_eq!(body, json!({"hits": [], "next_cursor": null}));
}

/// The two statements (the GIN index's and the whole read of small
/// conversations) answer the same, page for page.
#[tokio::test]
async fn the_index_and_the_whole_read_find_the_same_hits() {
    use origin::search::{RANK_WINDOW, SEARCH_HITS, SEARCH_HITS_SCAN};
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let a = app.direct(&coach, &alex).await;
    let b = app.group(&coach, "Crew", &[&alex, &sam]).await;
    sql(
        &app,
        &format!(
            "INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
             SELECT gen_random_uuid(), CASE WHEN g % 3 = 0 THEN {a} ELSE {b} END, g, {alex},
                    (ARRAY['great squat session', 'squats squats and more squats',
                           'rest day, great sleep', 'deadlift form check: great',
                           'the great outdoors run', 'see you tomorrow'])[1 + g % 6] || ' ' || g,
                    timestamptz '2026-01-01' + (g % 50) * interval '1 minute', 'k' || g
             FROM generate_series(1, 300) g;
             UPDATE messages SET content = '', deleted_at = now() WHERE seq % 17 = 0",
            alex = alex.id
        ),
    )
    .await;
    let db = app.pool.get().await.unwrap();
    for tsquery in [
        "'great'",
        "'squat':*",
        "'great' & 'squat'",
        "'great' <-> 'sleep'",
        "'deadlift' | 'run'",
        "'nothing'",
    ] {
        for conversations in [vec![a, b], vec![b]] {
            let mut pages: Vec<Vec<Vec<String>>> = Vec::new();
            for statement in [SEARCH_HITS, SEARCH_HITS_SCAN] {
                let mut all = Vec::new();
                let mut cursor: Option<(f32, chrono::DateTime<chrono::Utc>, uuid::Uuid)> = None;
                loop {
                    let rows = db
                        .query(
                            statement,
                            &[
                                &tsquery,
                                &conversations,
                                &RANK_WINDOW,
                                &8i64,
                                &coach.id,
                                &cursor.map(|c| c.0),
                                &cursor.map(|c| c.1),
                                &cursor.map(|c| c.2),
                            ],
                        )
                        .await
                        .unwrap();
                    let page: Vec<String> = rows
                        .iter()
                        .map(|r| {
                            format!(
                                "{} {} {} {}",
                                r.get::<_, uuid::Uuid>(0),
                                r.get::<_, f32>(5),
                                r.get::<_, String>(6),
                                r.get::<_, String>(8)
                            )
                        })
                        .collect();
                    let last = rows.last().map(|r| (r.get(5), r.get(4), r.get(0)));
                    all.push(page);
                    if rows.len() < 8 {
                        break;
                    }
                    cursor = last;
                }
                pages.push(all);
            }
            assert_eq!(pages[0], pages[1], "{tsquery} in {conversations:?}");
            assert!(
                tsquery == "'nothing'" || conversations.len() == 1 || !pages[0][0].is_empty(),
                "{tsquery} found nothing"
            );
        }
    }
}

/// An edit and a delete as the edge flushes them (change events through
/// the ingest): the search sees each in the transaction that stores it.
#[tokio::test]
async fn an_edit_and_a_delete_through_the_ingest_change_what_is_found_at_once() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let id = app.direct(&coach, &alex).await;
    say(
        &app,
        id,
        &alex,
        &[
            (1, "Protein shake after the workout"),
            (2, "Stretch your hamstrings every morning"),
        ],
    )
    .await;
    let change = |seq: i64, target: i64, change: Value| {
        let mut change = change;
        change["target_id"] = json!(message_id(id, target));
        json!({
            "id": message_id(id, seq),
            "conversation_id": id,
            "seq": seq,
            "sender_id": alex.id,
            "content": "",
            "created_at": chrono::Utc::now(),
            "client_msg_id": format!("c-{id}-{seq}"),
            "change": change,
        })
    };
    let (status, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({ "messages": [
                change(3, 1, json!({"kind": "edit", "content": "Electrolytes after the workout"})),
                change(4, 2, json!({"kind": "delete"})),
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], json!([]), "{body}");

    assert_eq!(found(&search(&app, &coach, "protein", "").await), vec![]);
    assert_eq!(found(&search(&app, &coach, "hamstrings", "").await), vec![]);
    assert_eq!(found(&search(&app, &coach, "stretch", "").await), vec![]);
    let body = search(&app, &coach, "electrolytes", "").await;
    assert_eq!(found(&body), vec![(id, 1)]);
    assert_eq!(
        body["hits"][0]["snippet"],
        "«Electrolytes» after the workout"
    );
    // The change events themselves are never hits.
    assert_eq!(
        found(&search(&app, &coach, "workout", "").await),
        vec![(id, 1)]
    );
}
