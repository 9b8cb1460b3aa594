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

/// Where a subscription's deltas go.
enum Target {
    /// Granted, not redeemed yet: deltas wait here.
    Waiting(Vec<Utf8Bytes>),
    /// More deltas arrived than a waiting subscription may hold.
    Overflowed,
    Attached(Arc<ConnHandle>),
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

    fn deliver(&self, frame: Utf8Bytes) -> bool {
        let mut target = self.lock();
        match &mut *target {
            Target::Attached(conn) => conn.push_text(frame).is_ok(),
            Target::Waiting(buffer) if buffer.len() < MAX_BUFFERED_DELTAS => {
                buffer.push(frame);
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
        let mut target = self.lock();
        let waiting = match std::mem::replace(&mut *target, Target::Attached(Arc::clone(conn))) {
            Target::Waiting(frames) => frames,
            Target::Attached(_) => Vec::new(),
            Target::Overflowed => {
                *target = Target::Overflowed;
                return false;
            }
        };
        for frame in waiting {
            let _ = conn.push_text(frame);
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
            target: Mutex::new(Target::Attached(Arc::clone(conn))),
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
            // The delta's JSON depends only on its outgoing kind: encode each kind once.
            let mut encoded: [Option<String>; 3] = [None, None, None];
            self.index.route(delta, |id, sub, out| {
                let body = encoded[kind_slot(out.kind())].get_or_insert_with(|| encode_out(out));
                let frame =
                    format!("{{\"push\":\"delta\",\"subscription\":\"{id}\",\"delta\":{body}}}");
                delivered += u64::from(sub.deliver(Utf8Bytes::from(frame)));
            });
        }
        delivered
    }

    /// Live subscriptions, granted or attached.
    pub fn len(&self) -> usize {
        self.index.len()
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
