use origin::db::{MIGRATIONS, Migration, migrate, migrate_with, pool};

use crate::helpers::{fresh_database, url_for};

async fn tables(pool: &deadpool_postgres::Pool) -> Vec<String> {
    let client = pool.get().await.unwrap();
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn migrations_build_the_schema_from_an_empty_database_and_are_recorded_once() {
    let db = fresh_database().await;
    let pool = pool(&url_for(&db), 2).unwrap();
    assert!(tables(&pool).await.is_empty());
    let applied = migrate(&pool).await.unwrap();
    assert_eq!(applied, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
    assert_eq!(
        tables(&pool).await,
        vec![
            "attachments",
            "conversation_memberships",
            "conversation_notification_prefs",
            "conversation_participants",
            "conversations",
            "message_events",
            "messages",
            "notification_settings",
            "push_jobs",
            "push_notified",
            "push_subscriptions",
            "refresh_tokens",
            "schema_migrations",
            "sessions",
            "user_presence",
            "users"
        ]
    );
    // A second start-up applies nothing.
    assert!(migrate(&pool).await.unwrap().is_empty());
    let client = pool.get().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn concurrent_start_ups_migrate_once() {
    let db = fresh_database().await;
    let pool = pool(&url_for(&db), 4).unwrap();
    let runs = futures::future::join_all((0..4).map(|_| migrate(&pool))).await;
    let applied: usize = runs.into_iter().map(|r| r.unwrap().len()).sum();
    assert_eq!(applied, MIGRATIONS.len());
}

#[tokio::test]
async fn a_failing_migration_stops_start_up_naming_the_file_and_leaves_nothing_half_applied() {
    let db = fresh_database().await;
    let pool = pool(&url_for(&db), 2).unwrap();
    let broken = [
        MIGRATIONS[0],
        Migration {
            version: 2,
            name: "0002_broken.sql",
            sql: "CREATE TABLE half_done (id int); SELECT no_such_function();",
        },
    ];
    let err = migrate_with(&pool, &broken).await.expect_err("must fail");
    assert!(format!("{err:#}").contains("0002_broken.sql"), "{err:#}");
    let t = tables(&pool).await;
    assert!(!t.contains(&"half_done".to_owned()), "rolled back: {t:?}");
    assert!(t.contains(&"users".to_owned()), "the good migration stays");
}

#[tokio::test]
async fn an_edited_released_migration_stops_start_up() {
    let db = fresh_database().await;
    let pool = pool(&url_for(&db), 2).unwrap();
    migrate(&pool).await.unwrap();
    let edited = [Migration {
        sql: "-- edited\nSELECT 1;",
        ..MIGRATIONS[0]
    }];
    let err = migrate_with(&pool, &edited).await.expect_err("must fail");
    assert!(format!("{err:#}").contains("checksum"), "{err:#}");
}

#[tokio::test]
async fn start_up_fails_with_a_clear_error_when_the_database_is_unreachable() {
    let mut config = crate::helpers::config_for("postgres");
    config.database_url = "postgres://postgres@127.0.0.1:1/nothing?connect_timeout=2".to_owned();
    let err = origin::Application::build(config)
        .await
        .expect_err("no database");
    let text = format!("{err:#}");
    assert!(text.contains("migrate"), "{text}");
}
