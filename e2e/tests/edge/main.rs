//! The edge end to end: a real `wrangler dev` (workerd) running the Worker
//! and its Room Durable Objects, the origin, PostgreSQL, and real WebSocket
//! and HTTP clients. `cargo xtask test` builds the Worker first.

#![allow(clippy::print_stdout)]

mod lifecycle;
mod media;
mod membership;
mod metrics;
mod ops;
mod push;
mod realtime;
mod rest;
mod sse;
mod tokens;
mod user;

use std::process::ExitCode;

use e2e::runner::{DEFAULT_TIMEOUT, TestFn, run_with_timeout};
use e2e::{Stack, StackOptions};

#[tokio::main]
async fn main() -> ExitCode {
    // The push tests run the origin as a process of its own: this binary.
    if let Some(code) = e2e::stack::serve_origin_if_asked().await {
        return code;
    }
    // The Worker's settings for this suite.
    let vars: &[(&str, &str)] = &[
        // A small replay window, so that `resync` is cheap to reach.
        ("ROOM_REPLAY_WINDOW", "20"),
        // A tiny idempotency cache, so resends of older keys are
        // answered from the room's SQLite (production: 5,000).
        ("ROOM_DEDUP_HORIZON", "4"),
        ("ROOM_BACKOFF_MAX_MS", "1000"),
        // Small and fast, so that the cap and the heartbeat are cheap
        // to observe (production: 200 subscribers, 15 s).
        ("ROOM_MAX_SSE", "3"),
        ("ROOM_SSE_HEARTBEAT_MS", "1000"),
        ("PRESENCE_GRACE_MS", "1500"),
        // Edge figures reach the origin within 2 s (production: 5 s).
        ("METRICS_COUNTS_MS", "2000"),
        // The per-message log lines too: the request id test reads them.
        ("LOG_LEVEL", "debug"),
    ];
    let tests: &[(&str, TestFn)] = &[
        (
            "metrics_count_connections_messages_and_latency_on_every_transport",
            |s| {
                Box::pin(
                    metrics::metrics_count_connections_messages_and_latency_on_every_transport(s),
                )
            },
        ),
        (
            "the_outbox_gauge_rises_while_the_origin_is_down_and_returns_to_zero",
            |s| {
                Box::pin(
                    metrics::the_outbox_gauge_rises_while_the_origin_is_down_and_returns_to_zero(s),
                )
            },
        ),
        (
            "a_messages_request_id_reaches_the_origins_log_line_for_its_ingest",
            |s| {
                Box::pin(
                    metrics::a_messages_request_id_reaches_the_origins_log_line_for_its_ingest(s),
                )
            },
        ),
        (
            "an_edit_and_a_delete_reach_the_other_member_live_and_after_a_reconnect",
            |s| {
                Box::pin(
                    lifecycle::an_edit_and_a_delete_reach_the_other_member_live_and_after_a_reconnect(s),
                )
            },
        ),
        (
            "only_the_sender_edits_and_only_a_moderator_deletes_anothers_message",
            |s| {
                Box::pin(
                    lifecycle::only_the_sender_edits_and_only_a_moderator_deletes_anothers_message(
                        s,
                    ),
                )
            },
        ),
        (
            "a_deleted_message_is_erased_from_postgres_the_rooms_storage_and_the_bucket",
            |s| {
                Box::pin(
                    lifecycle::a_deleted_message_is_erased_from_postgres_the_rooms_storage_and_the_bucket(s),
                )
            },
        ),
        ("reactions_and_replies_over_http_reach_an_sse_member", |s| {
            Box::pin(lifecycle::reactions_and_replies_over_http_reach_an_sse_member(s))
        }),
        ("changes_travel_on_the_always_on_socket_both_ways", |s| {
            Box::pin(lifecycle::changes_travel_on_the_always_on_socket_both_ways(
                s,
            ))
        }),
        ("search_finds_for_participants_only", |s| {
            Box::pin(lifecycle::search_finds_for_participants_only(s))
        }),
        (
            "a_photo_reaches_the_other_member_with_a_thumbnail_and_without_its_location",
            |s| {
                Box::pin(
                    media::a_photo_reaches_the_other_member_with_a_thumbnail_and_without_its_location(s),
                )
            },
        ),
        ("downloads_need_a_live_signature_and_serve_ranges", |s| {
            Box::pin(media::downloads_need_a_live_signature_and_serve_ranges(s))
        }),
        (
            "uploads_are_refused_by_type_size_integrity_and_quota",
            |s| {
                Box::pin(media::uploads_are_refused_by_type_size_integrity_and_quota(
                    s,
                ))
            },
        ),
        ("a_message_carries_only_its_senders_unsent_uploads", |s| {
            Box::pin(media::a_message_carries_only_its_senders_unsent_uploads(s))
        }),
        ("unsent_uploads_are_reaped_and_sent_ones_kept", |s| {
            Box::pin(media::unsent_uploads_are_reaped_and_sent_ones_kept(s))
        }),
        (
            "an_upload_while_the_origin_is_down_is_refused_and_stores_nothing",
            |s| {
                Box::pin(media::an_upload_while_the_origin_is_down_is_refused_and_stores_nothing(s))
            },
        ),
        ("sessions_rotate_revoke_and_end_through_the_edge", |s| {
            Box::pin(rest::sessions_rotate_revoke_and_end_through_the_edge(s))
        }),
        (
            "the_openapi_document_is_served_at_the_public_host_with_the_edges_routes",
            |s| {
                Box::pin(
                    rest::the_openapi_document_is_served_at_the_public_host_with_the_edges_routes(
                        s,
                    ),
                )
            },
        ),
        (
            "a_flood_of_pings_on_the_users_connection_is_throttled_then_closed",
            |s| {
                Box::pin(user::a_flood_of_pings_on_the_users_connection_is_throttled_then_closed(s))
            },
        ),
        (
            "a_member_removed_at_the_origin_is_cut_off_at_the_edge_on_every_path",
            |s| {
                Box::pin(
                    membership::a_member_removed_at_the_origin_is_cut_off_at_the_edge_on_every_path(
                        s,
                    ),
                )
            },
        ),
        (
            "renaming_and_member_changes_through_the_edge_reach_every_device_of_every_member",
            |s| {
                Box::pin(membership::renaming_and_member_changes_through_the_edge_reach_every_device_of_every_member(s))
            },
        ),
        (
            "probing_unknown_conversations_costs_one_origin_call_and_stores_nothing",
            |s| {
                Box::pin(membership::probing_unknown_conversations_costs_one_origin_call_and_stores_nothing(s))
            },
        ),
        (
            "a_resend_of_a_key_the_room_forgot_returns_the_original_over_ws_and_post",
            |s| {
                Box::pin(membership::a_resend_of_a_key_the_room_forgot_returns_the_original_over_ws_and_post(s))
            },
        ),
        (
            "every_claim_rule_refuses_its_bad_token_on_every_path",
            |s| Box::pin(tokens::every_claim_rule_refuses_its_bad_token_on_every_path(s)),
        ),
        (
            "a_connection_whose_token_expires_is_told_and_closed_unless_renewed",
            |s| {
                Box::pin(
                    tokens::a_connection_whose_token_expires_is_told_and_closed_unless_renewed(s),
                )
            },
        ),
        (
            "two_members_chat_and_each_sees_every_message_in_order",
            |s| Box::pin(realtime::two_members_chat_and_each_sees_every_message_in_order(s)),
        ),
        ("typing_reaches_the_other_member_only", |s| {
            Box::pin(realtime::typing_reaches_the_other_member_only(s))
        }),
        ("an_upgrade_from_a_non_member_is_refused", |s| {
            Box::pin(realtime::an_upgrade_from_a_non_member_is_refused(s))
        }),
        ("bad_and_expired_tokens_are_refused_and_tickets_work", |s| {
            Box::pin(realtime::bad_and_expired_tokens_are_refused_and_tickets_work(s))
        }),
        ("an_upgrade_from_a_foreign_origin_is_refused", |s| {
            Box::pin(realtime::an_upgrade_from_a_foreign_origin_is_refused(s))
        }),
        (
            "a_resend_with_the_same_client_msg_id_stores_one_message",
            |s| Box::pin(realtime::a_resend_with_the_same_client_msg_id_stores_one_message(s)),
        ),
        (
            "a_reconnect_with_since_gets_exactly_the_missed_messages",
            |s| Box::pin(realtime::a_reconnect_with_since_gets_exactly_the_missed_messages(s)),
        ),
        (
            "a_reconnect_older_than_the_window_gets_resync_and_rest_fills_the_gap",
            |s| {
                Box::pin(
                    realtime::a_reconnect_older_than_the_window_gets_resync_and_rest_fills_the_gap(
                        s,
                    ),
                )
            },
        ),
        (
            "each_message_lands_in_postgresql_exactly_once_with_contiguous_seq",
            |s| {
                Box::pin(
                    realtime::each_message_lands_in_postgresql_exactly_once_with_contiguous_seq(s),
                )
            },
        ),
        ("read_receipts_reach_both_members_and_the_origin", |s| {
            Box::pin(realtime::read_receipts_reach_both_members_and_the_origin(s))
        }),
        (
            "bad_frames_get_typed_errors_and_the_connection_survives",
            |s| Box::pin(realtime::bad_frames_get_typed_errors_and_the_connection_survives(s)),
        ),
        ("an_oversize_frame_closes_the_socket_with_1009", |s| {
            Box::pin(realtime::an_oversize_frame_closes_the_socket_with_1009(s))
        }),
        ("a_flood_is_rate_limited_then_closed_with_1008", |s| {
            Box::pin(realtime::a_flood_is_rate_limited_then_closed_with_1008(s))
        }),
        (
            "removing_a_member_through_the_edge_closes_their_socket",
            |s| Box::pin(realtime::removing_a_member_through_the_edge_closes_their_socket(s)),
        ),
        (
            "rest_is_proxied_to_the_origin_with_the_callers_token",
            |s| {
                Box::pin(rest::rest_is_proxied_to_the_origin_with_the_callers_token(
                    s,
                ))
            },
        ),
        ("a_dev_server_offers_the_seeded_demo_logins", |s| {
            Box::pin(rest::a_dev_server_offers_the_seeded_demo_logins(s))
        }),
        ("unknown_routes_and_bad_ids_get_json_errors", |s| {
            Box::pin(rest::unknown_routes_and_bad_ids_get_json_errors(s))
        }),
        (
            "ws_and_sse_members_see_the_same_messages_typing_and_receipts",
            |s| Box::pin(sse::ws_and_sse_members_see_the_same_messages_typing_and_receipts(s)),
        ),
        (
            "the_sse_stream_starts_with_a_retry_hint_and_sends_heartbeats",
            |s| Box::pin(sse::the_sse_stream_starts_with_a_retry_hint_and_sends_heartbeats(s)),
        ),
        (
            "last_event_id_and_since_resume_exactly_after_that_seq",
            |s| {
                Box::pin(sse::last_event_id_and_since_resume_exactly_after_that_seq(
                    s,
                ))
            },
        ),
        (
            "switching_from_websocket_to_sse_mid_conversation_misses_nothing",
            |s| Box::pin(sse::switching_from_websocket_to_sse_mid_conversation_misses_nothing(s)),
        ),
        (
            "posting_the_same_client_msg_id_twice_returns_201_then_200_with_the_same_message",
            |s| {
                Box::pin(sse::posting_the_same_client_msg_id_twice_returns_201_then_200_with_the_same_message(s))
            },
        ),
        (
            "bad_posts_get_400_413_422_and_a_flood_gets_429_with_retry_after",
            |s| Box::pin(sse::bad_posts_get_400_413_422_and_a_flood_gets_429_with_retry_after(s)),
        ),
        (
            "non_members_get_403_and_bad_tokens_401_on_every_sse_path",
            |s| Box::pin(sse::non_members_get_403_and_bad_tokens_401_on_every_sse_path(s)),
        ),
        (
            "a_member_over_the_cap_loses_their_own_oldest_stream_never_anyone_elses",
            |s| {
                Box::pin(
                    sse::a_member_over_the_cap_loses_their_own_oldest_stream_never_anyone_elses(s),
                )
            },
        ),
        (
            "a_standard_eventsource_client_parses_the_stream_and_resumes_by_itself",
            |s| {
                Box::pin(
                    sse::a_standard_eventsource_client_parses_the_stream_and_resumes_by_itself(s),
                )
            },
        ),
        ("b_sees_a_come_online_and_rest_agrees", |s| {
            Box::pin(user::b_sees_a_come_online_and_rest_agrees(s))
        }),
        ("a_with_two_tabs_stays_online_when_one_tab_closes", |s| {
            Box::pin(user::a_with_two_tabs_stays_online_when_one_tab_closes(s))
        }),
        (
            "when_all_tabs_close_a_goes_offline_after_the_grace_period",
            |s| Box::pin(user::when_all_tabs_close_a_goes_offline_after_the_grace_period(s)),
        ),
        ("a_reload_within_the_grace_period_does_not_flap", |s| {
            Box::pin(user::a_reload_within_the_grace_period_does_not_flap(s))
        }),
        (
            "a_message_notifies_the_other_participant_and_reading_clears_the_count",
            |s| {
                Box::pin(
                    user::a_message_notifies_the_other_participant_and_reading_clears_the_count(s),
                )
            },
        ),
        ("non_participants_receive_nothing", |s| {
            Box::pin(user::non_participants_receive_nothing(s))
        }),
        (
            "a_new_conversation_appears_for_its_participants_at_once",
            |s| Box::pin(user::a_new_conversation_appears_for_its_participants_at_once(s)),
        ),
        (
            "the_seed_token_path_and_sse_reach_the_users_object_too",
            |s| Box::pin(user::the_seed_token_path_and_sse_reach_the_users_object_too(s)),
        ),
        (
            "a_seed_client_sends_messages_typing_and_reads_on_its_single_socket",
            |s| {
                Box::pin(
                    user::a_seed_client_sends_messages_typing_and_reads_on_its_single_socket(s),
                )
            },
        ),
        (
            "two_seed_clients_chat_on_their_single_sockets_and_resume_without_a_gap",
            |s| {
                Box::pin(
                    user::two_seed_clients_chat_on_their_single_sockets_and_resume_without_a_gap(s),
                )
            },
        ),
        (
            "an_sse_client_resumes_every_conversation_from_the_url",
            |s| {
                Box::pin(user::an_sse_client_resumes_every_conversation_from_the_url(
                    s,
                ))
            },
        ),
        (
            "an_offline_member_gets_one_push_per_burst_with_the_sender_and_no_content",
            |s| {
                Box::pin(
                    push::an_offline_member_gets_one_push_per_burst_with_the_sender_and_no_content(
                        s,
                    ),
                )
            },
        ),
        ("a_member_with_a_live_connection_gets_no_push", |s| {
            Box::pin(push::a_member_with_a_live_connection_gets_no_push(s))
        }),
        (
            "a_message_during_the_grace_period_is_pushed_once_the_member_is_offline",
            |s| {
                Box::pin(
                    push::a_message_during_the_grace_period_is_pushed_once_the_member_is_offline(s),
                )
            },
        ),
        (
            "muted_conversations_level_none_and_quiet_hours_get_no_push",
            |s| Box::pin(push::muted_conversations_level_none_and_quiet_hours_get_no_push(s)),
        ),
        (
            "content_is_in_the_push_only_when_the_user_allowed_it",
            |s| {
                Box::pin(push::content_is_in_the_push_only_when_the_user_allowed_it(
                    s,
                ))
            },
        ),
        (
            "a_410_or_404_from_the_push_service_deletes_the_subscription",
            |s| Box::pin(push::a_410_or_404_from_the_push_service_deletes_the_subscription(s)),
        ),
        (
            "a_500_or_429_from_the_push_service_is_retried_then_delivered_once",
            |s| {
                Box::pin(push::a_500_or_429_from_the_push_service_is_retried_then_delivered_once(s))
            },
        ),
        (
            "a_429_from_the_push_service_with_retry_after_is_retried_no_sooner_than_asked",
            |s| {
                Box::pin(
                    push::a_429_from_the_push_service_with_retry_after_is_retried_no_sooner_than_asked(
                        s,
                    ),
                )
            },
        ),
        (
            "non_participants_cause_no_push_and_removed_members_get_none",
            |s| Box::pin(push::non_participants_cause_no_push_and_removed_members_get_none(s)),
        ),
        ("logging_out_removes_that_sessions_push_subscription", |s| {
            Box::pin(push::logging_out_removes_that_sessions_push_subscription(s))
        }),
        (
            "an_origin_killed_with_pushes_queued_sends_each_exactly_once",
            |s| Box::pin(push::an_origin_killed_with_pushes_queued_sends_each_exactly_once(s)),
        ),
        (
            "an_origin_killed_with_push_requests_in_flight_sends_each_at_least_once_and_repeats_replace",
            |s| {
                Box::pin(push::an_origin_killed_with_push_requests_in_flight_sends_each_at_least_once_and_repeats_replace(s))
            },
        ),
        (
            "the_origin_exposes_every_metric_the_dashboard_and_alerts_use_and_the_edge_hides_it",
            |s| {
                Box::pin(
                    ops::the_origin_exposes_every_metric_the_dashboard_and_alerts_use_and_the_edge_hides_it(s),
                )
            },
        ),
        // Last: it stops and restarts the origin.
        (
            "while_the_origin_is_down_chat_goes_on_and_the_outbox_drains_after",
            |s| {
                Box::pin(
                    realtime::while_the_origin_is_down_chat_goes_on_and_the_outbox_drains_after(s),
                )
            },
        ),
    ];
    // Web Push on (harmless to the other tests: only the push tests
    // subscribe), with a VAPID key for this run only.
    let (vapid_private, _) = e2e::push::vapid_keys();
    let options = StackOptions {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        origin_vars: push::origin_vars(&vapid_private)
            .into_iter()
            .chain(media::origin_vars())
            .collect(),
        verbose: std::env::var_os("E2E_VERBOSE").is_some(),
        // The Worker's own log lines (console.log) reach the log file.
        wrangler_log_level: Some("log".to_owned()),
    };
    let mut stack = match Stack::start(options).await {
        Ok(s) => s,
        Err(e) => {
            println!("could not start the stack: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    run_with_timeout(&mut stack, tests, DEFAULT_TIMEOUT).await
}
