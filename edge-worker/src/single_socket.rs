//! The seed's single socket: `message`, `typing` and `read` frames sent on a
//! user's always-on connection go into that conversation's Room, which
//! decides everything about them exactly as for its own socket and its
//! POST fallback (membership, validation, idempotency, rate limits,
//! durability). This module only carries the frame there and the Room's
//! answer back as the frame the Room socket would have sent: an `ack` for a
//! stored message (the original's, for a resend), nothing for typing and
//! reads, an `error` with the Room's code for a refusal.
//!
//! It also subscribes a user's object to a Room (`subscribe`): the Room's
//! live frames come back through `crate::forward`.
//!
//! The User object runs one connection's frames one at a time, in arrival
//! order (`user_do::User::queued`), each waiting for its Room's answer, so
//! one connection's frames reach their rooms in the order sent.

use serde::Deserialize;
use shared::protocol::{ClientFrame, MessageView, ServerFrame};
use worker::{Env, Response};

use crate::error::{EdgeError, EdgeResult};

/// Whether `frame` belongs in a room (and which).
pub fn room_of(frame: &ClientFrame) -> Option<i64> {
    match frame {
        ClientFrame::Message {
            conversation_id, ..
        }
        | ClientFrame::Typing { conversation_id }
        | ClientFrame::Read {
            conversation_id, ..
        }
        | ClientFrame::Edit {
            conversation_id, ..
        }
        | ClientFrame::Delete {
            conversation_id, ..
        }
        | ClientFrame::React {
            conversation_id, ..
        } => Some(*conversation_id),
        ClientFrame::Ping
        | ClientFrame::Auth { .. }
        | ClientFrame::Pong { .. }
        | ClientFrame::Resume { .. } => None,
    }
}

/// Hands `frame` from `user` to its Room; the frame to send back, if any.
pub async fn into_room(
    env: &Env,
    user: i64,
    frame: &ClientFrame,
    figures: &crate::telemetry::Figures,
) -> Option<ServerFrame> {
    match deliver(env, user, frame, figures).await {
        Ok(reply) => reply,
        Err(e) => Some(ServerFrame::Error {
            code: e.code().to_owned(),
            message: e.to_string(),
        }),
    }
}

async fn deliver(
    env: &Env,
    user: i64,
    frame: &ClientFrame,
    figures: &crate::telemetry::Figures,
) -> EdgeResult<Option<ServerFrame>> {
    // The ack is timed here, where the clock sees the hop to the Room.
    let arrived = crate::auth::now_ms();
    let (conversation_id, action, body) = match frame {
        ClientFrame::Message {
            conversation_id,
            content,
            client_msg_id,
            attachment_ids,
            reply_to,
            mentions,
        } => (
            *conversation_id,
            "messages",
            serde_json::json!({
                "content": content,
                "client_msg_id": client_msg_id,
                "attachment_ids": attachment_ids,
                "reply_to": reply_to,
                "mentions": mentions,
            }),
        ),
        // A change goes to the room as the frame itself: the room's
        // `/change` route takes exactly these.
        ClientFrame::Edit {
            conversation_id, ..
        }
        | ClientFrame::Delete {
            conversation_id, ..
        }
        | ClientFrame::React {
            conversation_id, ..
        } => (
            *conversation_id,
            "change",
            serde_json::to_value(frame).unwrap_or_default(),
        ),
        ClientFrame::Typing { conversation_id } => {
            (*conversation_id, "typing", serde_json::json!({}))
        }
        ClientFrame::Read {
            conversation_id,
            seq,
        } => (*conversation_id, "read", serde_json::json!({"seq": seq})),
        ClientFrame::Ping
        | ClientFrame::Auth { .. }
        | ClientFrame::Pong { .. }
        | ClientFrame::Resume { .. } => {
            return Ok(None);
        }
    };
    // Each frame is a request of its own, followed by its id to the origin.
    let request_id = crate::telemetry::new_request_id();
    let mut res = crate::room_do::post_with(
        env,
        conversation_id,
        Some(user),
        &format!("/{action}"),
        body.to_string(),
        &[
            (crate::telemetry::REQUEST_ID_HEADER, &request_id),
            (crate::headers::TRANSPORT_HEADER, "user_socket"),
        ],
    )
    .await?;
    if !(200..300).contains(&res.status_code()) {
        return Ok(Some(refusal(&mut res).await));
    }
    if matches!(
        frame,
        ClientFrame::Edit { .. } | ClientFrame::Delete { .. } | ClientFrame::React { .. }
    ) {
        // The room answers `{ack, event}`; the event reaches this socket
        // live like everyone's, the ack is the sender's alone.
        #[derive(Deserialize)]
        struct Answer {
            ack: ServerFrame,
        }
        let answer: Answer = res.json().await?;
        return Ok(Some(answer.ack));
    }
    if !matches!(frame, ClientFrame::Message { .. }) {
        return Ok(None);
    }
    // 201: a new message (a resend of a known one answers 200).
    if res.status_code() == 201 {
        figures.ack_since(arrived);
    }
    let stored: MessageView = res.json().await?;
    Ok(Some(ServerFrame::Ack {
        client_msg_id: stored.client_msg_id,
        seq: stored.seq,
        id: stored.id,
        conversation_id,
    }))
}

/// `user`'s object subscribes to a conversation's Room: its live frames
/// come to the object from now on, and the answer is what follows `since`
/// (nothing without it). A refusal is the `error` frame the Room's socket
/// would have sent.
pub async fn subscribe(
    env: &Env,
    user: i64,
    conversation_id: i64,
    since: Option<i64>,
) -> Result<Vec<ServerFrame>, ServerFrame> {
    #[derive(Deserialize)]
    struct Answer {
        frames: Vec<ServerFrame>,
    }
    let body = serde_json::json!({ "since": since });
    let answer = async {
        let mut res = crate::room_do::post(
            env,
            conversation_id,
            Some(user),
            "/subscribe",
            body.to_string(),
        )
        .await?;
        if !(200..300).contains(&res.status_code()) {
            return Ok(Err(refusal(&mut res).await));
        }
        let answer: Answer = res.json().await?;
        EdgeResult::Ok(Ok(answer.frames))
    };
    match answer.await {
        Ok(answer) => answer,
        Err(e) => Err(ServerFrame::Error {
            code: e.code().to_owned(),
            message: e.to_string(),
        }),
    }
}

/// The Room's typed refusal (`{code, message}`), as an `error` frame.
async fn refusal(res: &mut Response) -> ServerFrame {
    #[derive(Deserialize)]
    struct Body {
        code: String,
        message: String,
    }
    let status = res.status_code();
    match res.json::<Body>().await {
        Ok(b) => ServerFrame::Error {
            code: b.code,
            message: b.message,
        },
        Err(_) => {
            let e = EdgeError::Internal(format!("room answered {status} without a body"));
            crate::log!(Error, "user socket frame failed", "error" => e.to_string());
            ServerFrame::Error {
                code: e.code().to_owned(),
                message: e.to_string(),
            }
        }
    }
}
