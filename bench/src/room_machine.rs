//! `cargo xtask bench room`: the room state machine's own share of the
//! per-message cost, natively, without workerd, SQLite or sockets.
//!
//! A room of `members` members, each with one connection, receives `n`
//! message frames (JSON text, as from a socket) round-robin from its
//! members. Every output is drained the way the Durable Object drains it,
//! with a driver that does what the DO's does minus the I/O: it serialises
//! each frame once (the DO then hands that text to every recipient) and
//! counts the recipients. The outbox is answered as it asks, with every
//! message stored. What remains per message is the state machine: parsing
//! the frame, the bucket, the idempotency cache, the window, the outbox,
//! the watermarks, building and serialising the frames.
//!
//! Reported per message, min–max over `BENCH_RUNS` runs (default 3).

use std::time::Instant;

use shared::auth::AuthError;
use shared::protocol::ServerFrame;
use shared::protocol::internal::ConversationNotice;
use shared::receipts::Watermark;
use shared::room::{
    Claim, Confirmed, ConnId, Context, Driver, FlushOutcome, KnownKey, Millis, Recipients, Record,
    Room, RoomConfig, StorageFailed, StoredWatermark, Verified, drain,
};

use crate::report::table;

/// Storage that knows no old keys (every key in the run is new).
struct NoKeys;

impl Context for NoKeys {
    fn claim_key(&self, _: i64, _: &str, _: KnownKey) -> Result<Claim, StorageFailed> {
        Ok(Claim::Claimed)
    }
    fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
        Err(AuthError::Invalid)
    }
}

/// The DO's driver without the I/O: one serialisation per frame, a count
/// of recipients, and the durable writes as no-ops.
#[derive(Default)]
struct Counting {
    conns: Vec<ConnId>,
    bytes: usize,
    deliveries: usize,
    stores: usize,
}

impl Driver for Counting {
    type Error = std::convert::Infallible;
    fn store(&mut self, _: &Record) -> Result<(), Self::Error> {
        self.stores += 1;
        Ok(())
    }
    fn store_change(
        &mut self,
        _: &Record,
        _: &shared::room::lifecycle::MessageState,
    ) -> Result<(), Self::Error> {
        self.stores += 1;
        Ok(())
    }
    fn store_watermark(&mut self, _: &Watermark) -> Result<(), Self::Error> {
        Ok(())
    }
    fn replace_members(&mut self, _: &[StoredWatermark]) -> Result<(), Self::Error> {
        Ok(())
    }
    fn mark_flushed(&mut self, _: &Confirmed) -> Result<(), Self::Error> {
        Ok(())
    }
    fn mark_receipts_synced(&mut self, _: &[Watermark]) -> Result<(), Self::Error> {
        Ok(())
    }
    fn send(&mut self, to: &Recipients<'_>, frame: &ServerFrame) {
        let text = serde_json::to_string(frame).unwrap_or_default();
        self.bytes += text.len();
        self.deliveries += self.conns.iter().filter(|c| to.includes(**c)).count();
    }
    fn close(&mut self, _: ConnId, _: u16, _: &str) {}
    fn notify(&mut self, _: ConversationNotice) {}
    fn forward(&mut self, _: &[i64], _: &ServerFrame) {}
}

struct RunResult {
    ns_per_message: f64,
    deliveries_per_message: f64,
    bytes_per_message: f64,
}

fn one_run(members: usize, n: usize) -> anyhow::Result<RunResult> {
    let config = RoomConfig {
        // A machine sends here, not a person; nothing may be refused.
        rate_burst: u32::MAX / 2,
        rate_per_sec: u32::MAX / 2,
        max_unflushed: usize::MAX,
        ..RoomConfig::default()
    };
    let mut room = Room::new(1, config, 7);
    let users: Vec<i64> = (1..=members as i64).collect();
    let watermarks: Vec<Watermark> = users
        .iter()
        .map(|&user_id| Watermark {
            user_id,
            delivered_seq: 0,
            read_seq: 0,
        })
        .collect();
    let mut now: Millis = 1_800_000_000_000;
    room.set_members(now, &watermarks, 0);
    let mut driver = Counting::default();
    for (i, &user) in users.iter().enumerate() {
        let conn = ConnId(i as u64 + 1);
        room.handle_connect(now, conn, user, None)
            .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
        driver.conns.push(conn);
    }
    let _ = drain(&mut room, &mut driver);
    let frames: Vec<String> = (0..n)
        .map(|k| {
            serde_json::json!({
                "type": "message", "conversation_id": 1,
                "content": format!("bench message number {k}, about as long as a chat line"),
                "client_msg_id": format!("bench-{k}"),
            })
            .to_string()
        })
        .collect();
    let started = Instant::now();
    for (k, frame) in frames.iter().enumerate() {
        // 1,000 messages a second of virtual time.
        now += 1;
        let conn = ConnId((k % members) as u64 + 1);
        room.handle_text(now, conn, frame, &NoKeys);
        let _ = drain(&mut room, &mut driver);
        if room.flush_due().is_some_and(|t| t <= now) {
            while let Some(batch) = room.poll_flush(now) {
                let _ = drain(&mut room, &mut driver);
                let outcome = FlushOutcome {
                    stored: batch.messages.iter().map(|m| m.id).collect(),
                    rejected: Vec::new(),
                    receipts_ok: true,
                };
                room.handle_flush_result(now, batch.id, &outcome);
                let _ = drain(&mut room, &mut driver);
            }
        }
        room.handle_timeout(now);
        let _ = drain(&mut room, &mut driver);
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(driver.stores == n, "{} of {n} stored", driver.stores);
    Ok(RunResult {
        ns_per_message: elapsed.as_nanos() as f64 / n as f64,
        deliveries_per_message: driver.deliveries as f64 / n as f64,
        bytes_per_message: driver.bytes as f64 / n as f64,
    })
}

fn range(values: &[f64], digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.digits$}–{max:.digits$}")
}

pub fn run() -> anyhow::Result<()> {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let n = 200_000;
    let mut rows = Vec::new();
    for members in [10, 60] {
        let mut ns = Vec::new();
        let mut deliveries = 0.0;
        let mut bytes = 0.0;
        for _ in 0..runs {
            let r = one_run(members, n)?;
            ns.push(r.ns_per_message / 1000.0);
            deliveries = r.deliveries_per_message;
            bytes = r.bytes_per_message;
        }
        rows.push(vec![
            members.to_string(),
            n.to_string(),
            range(&ns, 2),
            format!("{deliveries:.1}"),
            format!("{bytes:.0}"),
        ]);
    }
    table(
        &format!("Room state machine, natively (release), {runs} runs"),
        &[
            "members",
            "messages",
            "µs per message (min–max)",
            "frames delivered per message",
            "bytes serialised per message",
        ],
        &rows,
    );
    println!(
        "\nThe state machine's share only: the Durable Object adds SQLite, the \
         JavaScript boundary and the socket sends on top."
    );
    Ok(())
}
