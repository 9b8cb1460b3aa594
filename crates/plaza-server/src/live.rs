//! Live views on this node: subscriptions to the app's models, granted by the app (a single-use
//! token from `POST /api/live/authorize`) or opened by a client with its own filter where a dealer
//! allows it, and the routing of the app's deltas (`POST /api/deltas`) to them.
//!
//! A granted subscription is live from the moment the app authorises it: deltas that arrive before
//! the client redeems the token wait in the subscription and go out first. So the app can read its
//! database, authorise, and hand the result and the token to the client without losing a change
//! that happens in between.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use plaza_core::live::DeltaKind;
use plaza_core::{DealerConfig, Delta, LiveError, LiveIndex, OutDelta, SubId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conn::ConnHandle;

/// Deltas one granted subscription may hold while its token waits to be redeemed.
pub const MAX_BUFFERED_DELTAS: usize = 10_000;

/// The `[live]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LiveConfig {
    /// Seconds a token from `/api/live/authorize` may wait to be redeemed.
    pub token_ttl_secs: u64,
    /// The dealers: how each model's changes are matched to subscriptions.
    pub dealers: Vec<DealerConfig>,
    /// Dealers a client may subscribe to with its own query, without the app.
    pub client_dealers: Vec<String>,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            token_ttl_secs: 120,
            dealers: Vec::new(),
            client_dealers: Vec::new(),
        }
    }
}

impl LiveConfig {
    pub fn validate(&self) -> Result<(), String> {
        let index = LiveIndex::<()>::from_config(&self.dealers).map_err(|e| e.to_string())?;
        for name in &self.client_dealers {
            if index.dealer(name).is_none() {
                return Err(format!(
                    "client_dealers names '{name}', which is not a dealer"
                ));
            }
        }
        if !(1..=86_400).contains(&self.token_ttl_secs) {
            return Err("token_ttl_secs must be 1 to 86400".into());
        }
        Ok(())
    }
}

/// How a connection's delta frames look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaFormat {
    /// `{"push":"delta","subscription":"<id>","delta":D}`.
    Native,
    /// Snorky DataSync: `{"service": S, "message": {"type": "delta", "delta": D}}` in
    /// `json.dumps` layout, S the service's name.
    Snorky(Arc<str>),
}

impl DeltaFormat {
    /// The frame of `body` (the delta's compact JSON) for subscription `id`.
    fn frame(&self, id: SubId, body: &str) -> Utf8Bytes {
        Utf8Bytes::from(match self {
            DeltaFormat::Native => {
                format!("{{\"push\":\"delta\",\"subscription\":\"{id}\",\"delta\":{body}}}")
            }
            DeltaFormat::Snorky(service) => plaza_protocol::snorky::delta(service, body),
        })
    }
}

/// Where a subscription's deltas go.
enum Target {
    /// Granted, not redeemed yet: deltas (their compact JSON) wait here, framed once the
    /// redeeming connection's format is known.
    Waiting(Vec<Arc<str>>),
    /// More deltas arrived than a waiting subscription may hold.
    Overflowed,
    Attached(Arc<ConnHandle>, DeltaFormat),
}

/// One live subscription; the handle kept in the index.
pub struct LiveSub {
    pub id: SubId,
    target: Mutex<Target>,
}

impl LiveSub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Target> {
        self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues or keeps one delta. `frames` makes (once per format and delta) the frame of an
    /// attached subscription.
    fn deliver(&self, body: &Arc<str>, frames: &mut Frames) -> bool {
        let mut target = self.lock();
        match &mut *target {
            Target::Attached(conn, format) => {
                conn.push_text(frames.get(self.id, format, body)).is_ok()
            }
            Target::Waiting(buffer) if buffer.len() < MAX_BUFFERED_DELTAS => {
                buffer.push(Arc::clone(body));
                true
            }
            Target::Waiting(_) => {
                *target = Target::Overflowed;
                false
            }
            Target::Overflowed => false,
        }
    }

    fn is_overflowed(&self) -> bool {
        matches!(*self.lock(), Target::Overflowed)
    }

    /// Sends what waited, then everything new, to `conn`. `false` if too much had waited: the
    /// caller cancels the view and says so.
    pub fn attach(&self, conn: &Arc<ConnHandle>) -> bool {
        self.attach_as(conn, DeltaFormat::Native)
    }

    /// [`attach`](Self::attach) for a connection whose delta frames look like `format`.
    pub fn attach_as(&self, conn: &Arc<ConnHandle>, format: DeltaFormat) -> bool {
        let mut target = self.lock();
        let waiting = match std::mem::replace(
            &mut *target,
            Target::Attached(Arc::clone(conn), format.clone()),
        ) {
            Target::Waiting(bodies) => bodies,
            Target::Attached(..) => Vec::new(),
            Target::Overflowed => {
                *target = Target::Overflowed;
                return false;
            }
        };
        for body in waiting {
            let _ = conn.push_text(format.frame(self.id, &body));
        }
        true
    }
}

/// Subscriptions granted together, waiting for their token.
struct Grant {
    subs: Vec<Arc<LiveSub>>,
    user: Option<String>,
    expires: Instant,
}

/// Why a token could not be redeemed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedeemError {
    #[error("unknown live token (never issued, already used, or expired)")]
    Unknown,
    #[error("this live token expired before it was redeemed")]
    Expired,
    #[error("this live token was issued for another user")]
    OtherUser,
    #[error(
        "more than {MAX_BUFFERED_DELTAS} deltas arrived before the token was redeemed; authorize again"
    )]
    Overflowed,
}

/// Why a client's own subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientSubscribeError {
    #[error("dealer '{0}' takes no client subscriptions (the app authorizes them)")]
    NotOpen(String),
    #[error(transparent)]
    Live(#[from] LiveError),
}

/// Why an authorisation was refused: the item (from 0) and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("item {item}: {error}")]
pub struct AuthorizeError {
    pub item: usize,
    pub error: LiveError,
}

pub struct Live {
    index: LiveIndex<Arc<LiveSub>>,
    grants: DashMap<String, Grant>,
    next_id: AtomicU64,
    token_ttl: Duration,
    client_dealers: HashSet<String>,
}

impl Live {
    pub fn from_config(config: &LiveConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(Self {
            index: LiveIndex::from_config(&config.dealers).map_err(|e| e.to_string())?,
            grants: DashMap::new(),
            next_id: AtomicU64::new(1),
            token_ttl: Duration::from_secs(config.token_ttl_secs),
            client_dealers: config.client_dealers.iter().cloned().collect(),
        })
    }

    pub fn token_ttl(&self) -> Duration {
        self.token_ttl
    }

    /// Whether a dealer of this name is configured.
    pub fn has_dealer(&self, name: &str) -> bool {
        self.index.dealer(name).is_some()
    }

    /// Whether `token` is a grant waiting to be redeemed.
    pub fn has_grant(&self, token: &str) -> bool {
        self.grants.contains_key(token)
    }

    /// Grants subscriptions to `items` (dealer, query) under one new single-use token, bound to
    /// `user` when given. Every item is checked before any is added.
    pub fn authorize(
        &self,
        items: &[(String, Value)],
        user: Option<String>,
        token: String,
        now: Instant,
    ) -> Result<String, AuthorizeError> {
        let prepared = items
            .iter()
            .enumerate()
            .map(|(item, (dealer, query))| {
                self.index
                    .prepare(dealer, query)
                    .map_err(|error| AuthorizeError { item, error })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut subs = Vec::with_capacity(prepared.len());
        for (item, query) in prepared.into_iter().enumerate() {
            let sub = Arc::new(LiveSub {
                id: self.next_id.fetch_add(1, Relaxed),
                target: Mutex::new(Target::Waiting(Vec::new())),
            });
            if let Err(error) = self.index.insert(sub.id, query, Arc::clone(&sub)) {
                self.drop_subs(&subs);
                return Err(AuthorizeError { item, error });
            }
            subs.push(sub);
        }
        self.grants.insert(
            token.clone(),
            Grant {
                subs,
                user,
                expires: now + self.token_ttl,
            },
        );
        Ok(token)
    }

    /// Redeems a token for a connection of `user`. The caller queues its reply, then
    /// [`LiveSub::attach`]es each subscription: what waited goes out after the reply, then live
    /// deltas.
    pub fn redeem(
        &self,
        token: &str,
        user: &str,
        now: Instant,
    ) -> Result<Vec<Arc<LiveSub>>, RedeemError> {
        // Checked before removal, so another user's attempt does not burn the token.
        match self.grants.get(token) {
            None => return Err(RedeemError::Unknown),
            Some(grant) if grant.user.as_deref().is_some_and(|u| u != user) => {
                return Err(RedeemError::OtherUser);
            }
            Some(_) => {}
        }
        let Some((_, grant)) = self.grants.remove(token) else {
            return Err(RedeemError::Unknown);
        };
        if now >= grant.expires {
            self.drop_subs(&grant.subs);
            return Err(RedeemError::Expired);
        }
        if grant.subs.iter().any(|sub| sub.is_overflowed()) {
            self.drop_subs(&grant.subs);
            return Err(RedeemError::Overflowed);
        }
        Ok(grant.subs)
    }

    /// A subscription with the client's own query, where the dealer allows it.
    pub fn subscribe(
        &self,
        dealer: &str,
        query: &Value,
        conn: &Arc<ConnHandle>,
    ) -> Result<SubId, ClientSubscribeError> {
        if !self.client_dealers.contains(dealer) && self.index.dealer(dealer).is_some() {
            return Err(ClientSubscribeError::NotOpen(dealer.to_owned()));
        }
        let sub = Arc::new(LiveSub {
            id: self.next_id.fetch_add(1, Relaxed),
            target: Mutex::new(Target::Attached(Arc::clone(conn), DeltaFormat::Native)),
        });
        self.index.add(sub.id, dealer, query, Arc::clone(&sub))?;
        Ok(sub.id)
    }

    pub fn cancel(&self, id: SubId) -> bool {
        self.index.remove(id).is_some()
    }

    fn drop_subs(&self, subs: &[Arc<LiveSub>]) {
        for sub in subs {
            self.index.remove(sub.id);
        }
    }

    /// Drops grants whose token was not redeemed in time. Returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut expired = Vec::new();
        self.grants.retain(|_, grant| {
            let keep = now < grant.expires;
            if !keep {
                expired.extend(grant.subs.iter().map(|s| s.id));
            }
            keep
        });
        let n = expired.len();
        for id in expired {
            self.index.remove(id);
        }
        n
    }

    /// Routes deltas, in order, to every matching subscription. Returns the frames queued.
    pub fn route(&self, deltas: &[Delta]) -> u64 {
        let mut delivered = 0u64;
        for delta in deltas {
            // The delta's JSON depends only on its outgoing kind: encode each kind once (and
            // its Snorky frame once).
            let mut encoded: [Option<Arc<str>>; 3] = [None, None, None];
            let mut frames = Frames::default();
            self.index.route(delta, |_, sub, out| {
                let slot = kind_slot(out.kind());
                let body = encoded[slot].get_or_insert_with(|| Arc::from(encode_out(out)));
                frames.slot = slot;
                delivered += u64::from(sub.deliver(body, &mut frames));
            });
        }
        delivered
    }

    /// Live subscriptions, granted or attached.
    pub fn len(&self) -> usize {
        self.index.len()
    }
}

/// The frames of one delta: native ones carry the subscription id; a Snorky one is the same for
/// every subscription of its service, so it is made once per outgoing kind.
#[derive(Default)]
struct Frames {
    slot: usize,
    snorky: [Option<(Arc<str>, Utf8Bytes)>; 3],
}

impl Frames {
    fn get(&mut self, id: SubId, format: &DeltaFormat, body: &str) -> Utf8Bytes {
        match format {
            DeltaFormat::Native => format.frame(id, body),
            DeltaFormat::Snorky(service) => match &self.snorky[self.slot] {
                Some((s, frame)) if s == service => frame.clone(),
                _ => {
                    let frame = format.frame(id, body);
                    self.snorky[self.slot] = Some((Arc::clone(service), frame.clone()));
                    frame
                }
            },
        }
    }
}

fn kind_slot(kind: DeltaKind) -> usize {
    match kind {
        DeltaKind::Insert => 0,
        DeltaKind::Update => 1,
        DeltaKind::Delete => 2,
    }
}

fn encode_out(out: &OutDelta<'_>) -> String {
    serde_json::to_string(out).unwrap_or_else(|_| "null".to_owned())
}
