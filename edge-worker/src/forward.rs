//! A Room's live frames to its subscribed members' `User` objects
//! (`shared::room::Output::Forward`): one request per member per event, no
//! window, so the always-on connection adds one hop to a message's path.
//!
//! Order is the point. Each member has a queue and at most one request in
//! flight, so their object gets the room's frames in the room's order
//! whatever the runtime does with concurrent requests; different members do
//! not wait for each other. Requests leave without holding up the room's
//! handlers (a socket's next frame waits for its handler to end).
//!
//! A `User` object answers 410 when its user is offline: the room then
//! drops the subscription, unless the member subscribed again meanwhile
//! (each subscription bumps the member's epoch, and a 410 only counts for
//! the epoch it was sent under). A frame that fails otherwise is lost to
//! the always-on connection only; its client sees the seq jump and resumes
//! (see `docs/PROTOCOL.md`).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

use shared::protocol::ServerFrame;
use worker::{Env, Headers, Method, Request, RequestInit, State};

use crate::error::{EdgeError, EdgeResult};
use crate::headers::{CONVERSATION_HEADER, USER_HEADER};

/// Frames waiting for one member's object, beyond which new ones are
/// dropped (their client resumes): a stuck object must not grow the room.
const MAX_QUEUED: usize = 1_024;

#[derive(Debug, Default)]
pub struct Forwarder {
    inner: Rc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    queues: RefCell<HashMap<i64, VecDeque<Rc<str>>>>,
    /// Members whose pump is running.
    running: RefCell<HashSet<i64>>,
    epochs: RefCell<HashMap<i64, u64>>,
    /// Members whose object answered 410, with the epoch of that request.
    gone: RefCell<Vec<(i64, u64)>>,
}

/// What a member's object said to a frame.
enum Relayed {
    Done,
    /// The user is offline: unsubscribe.
    Gone,
}

impl Forwarder {
    /// Queues `frame` for each of `users` (serialised once).
    pub fn push(&self, users: &[i64], frame: &ServerFrame) {
        let text: Rc<str> = match serde_json::to_string(frame) {
            Ok(t) => t.into(),
            Err(e) => {
                crate::log!(Error, "forward failed", "error" => e.to_string());
                return;
            }
        };
        let mut queues = self.inner.queues.borrow_mut();
        for user in users {
            let queue = queues.entry(*user).or_default();
            if queue.len() >= MAX_QUEUED {
                crate::log!(Warn, "forward queue full, dropping a frame", "user" => user);
                continue;
            }
            queue.push_back(Rc::clone(&text));
        }
    }

    /// `user` subscribed (again): a 410 sent before this does not undo it.
    pub fn subscribed(&self, user: i64) {
        *self.inner.epochs.borrow_mut().entry(user).or_insert(0) += 1;
    }

    /// Members whose objects said they are offline, and have not
    /// subscribed since.
    pub fn take_gone(&self) -> Vec<i64> {
        let gone: Vec<(i64, u64)> = self.inner.gone.borrow_mut().drain(..).collect();
        let epochs = self.inner.epochs.borrow();
        gone.into_iter()
            .filter(|(user, epoch)| epochs.get(user).copied().unwrap_or(0) == *epoch)
            .map(|(user, _)| user)
            .collect()
    }

    /// Starts a pump for every member with frames waiting and none running.
    pub fn start(&self, state: &State, env: &Env, conversation_id: i64) {
        let idle: Vec<i64> = {
            let queues = self.inner.queues.borrow();
            let running = self.inner.running.borrow();
            queues
                .iter()
                .filter(|(user, q)| !q.is_empty() && !running.contains(user))
                .map(|(user, _)| *user)
                .collect()
        };
        for user in idle {
            self.inner.running.borrow_mut().insert(user);
            let inner = Rc::clone(&self.inner);
            let env = env.clone();
            state.wait_until(pump(inner, env, user, conversation_id));
        }
    }
}

/// Sends `user`'s frames one at a time until their queue is empty.
async fn pump(inner: Rc<Inner>, env: Env, user: i64, conversation_id: i64) {
    loop {
        let next = inner
            .queues
            .borrow_mut()
            .get_mut(&user)
            .and_then(VecDeque::pop_front);
        let Some(text) = next else {
            inner.queues.borrow_mut().remove(&user);
            inner.running.borrow_mut().remove(&user);
            return;
        };
        let epoch = inner.epochs.borrow().get(&user).copied().unwrap_or(0);
        match relay(&env, user, conversation_id, &text).await {
            Ok(Relayed::Done) => {}
            Ok(Relayed::Gone) => {
                inner.gone.borrow_mut().push((user, epoch));
                inner.queues.borrow_mut().remove(&user);
                inner.running.borrow_mut().remove(&user);
                return;
            }
            Err(e) => {
                crate::log!(Warn, "forward to a user failed", "user" => user, "error" => e.to_string())
            }
        }
    }
}

async fn relay(env: &Env, user: i64, conversation_id: i64, text: &str) -> EdgeResult<Relayed> {
    let headers = Headers::new();
    headers.set(USER_HEADER, &user.to_string())?;
    headers.set(CONVERSATION_HEADER, &conversation_id.to_string())?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(text.into()));
    let req = Request::new_with_init("https://user/relay", &init)?;
    let res = crate::user_do::stub(env, user)?
        .fetch_with_request(req)
        .await?;
    match res.status_code() {
        410 => Ok(Relayed::Gone),
        s if s < 300 => Ok(Relayed::Done),
        s => Err(EdgeError::Internal(format!("user object answered {s}"))),
    }
}
