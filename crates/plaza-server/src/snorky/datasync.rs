//! `datasync` and `datasync_backend` over the node's live views.

use std::time::Instant;

use plaza_protocol::snorky::{self as proto, Params};

use super::{Client, Reply, Snorky, bind};
use crate::live::{DeltaFormat, RedeemError};

/// Attempts at drawing a token that no live grant holds.
const TOKEN_ATTEMPTS: usize = 4;

impl Snorky {
    pub(super) fn datasync(
        &self,
        client: &mut Client,
        command: Option<&str>,
        params: Option<Params>,
    ) -> Reply {
        match command {
            Some("acquireSubscription") => {
                let [token] = bind(params, ["token"])?;
                let token = proto::as_string(&token).ok_or(proto::TOKEN_MUST_BE_STRING)?;
                let held: usize = client.tokens.values().map(Vec::len).sum();
                let max = self.node.settings.limits.max_channels_per_connection;
                let live = &self.node.live;
                let user = client.identity.as_deref().unwrap_or("");
                let subs = live.redeem(&token, user, Instant::now()).map_err(|e| {
                    tracing::debug!(conn = client.conn.id, error = %e, "Snorky acquireSubscription refused");
                    proto::NO_SUCH_SUBSCRIPTION
                })?;
                if held + subs.len() > max {
                    for sub in &subs {
                        live.cancel(sub.id);
                    }
                    return Err(proto::TOO_MANY_SUBSCRIPTIONS);
                }
                // What waited goes out now, before the answer (as in the reference).
                let format = DeltaFormat::Snorky(std::sync::Arc::clone(&self.datasync));
                let mut ids = Vec::with_capacity(subs.len());
                for sub in &subs {
                    if !sub.attach_as(&client.conn, format.clone()) {
                        for sub in &subs {
                            live.cancel(sub.id);
                        }
                        tracing::debug!(conn = client.conn.id, error = %RedeemError::Overflowed, "Snorky acquireSubscription refused");
                        return Err(proto::NO_SUCH_SUBSCRIPTION);
                    }
                    ids.push(sub.id);
                }
                client.tokens.insert(token, ids);
                Ok("null".into())
            }
            Some("cancelSubscription") => {
                let [token] = bind(params, ["token"])?;
                let token = proto::as_string(&token).ok_or(proto::TOKEN_MUST_BE_STRING)?;
                let ids = client
                    .tokens
                    .remove(&token)
                    .ok_or(proto::NO_SUCH_SUBSCRIPTION)?;
                for id in ids {
                    self.node.live.cancel(id);
                }
                Ok("null".into())
            }
            _ => Err(proto::UNKNOWN_COMMAND),
        }
    }

    pub(super) fn datasync_backend(&self, command: Option<&str>, params: Option<Params>) -> Reply {
        let live = &self.node.live;
        match command {
            Some("authorizeSubscription") => {
                let [items] = bind(params, ["items"])?;
                let items = proto::parse_items(&items, |d| live.has_dealer(d))?;
                let token = self.new_token()?;
                let token = live
                    .authorize(&items, None, token, Instant::now())
                    .map_err(|e| {
                        // A query the dealer cannot use (a filter that is not one, say): the
                        // reference failed these with an internal error too.
                        tracing::info!(error = %e, "Snorky authorizeSubscription refused");
                        proto::INTERNAL_ERROR
                    })?;
                Ok(plaza_core::json_string(&token))
            }
            Some("publishDeltas") => {
                let [deltas] = bind(params, ["deltas"])?;
                let batch = proto::parse_deltas(&deltas)?;
                let delivered = live.route(&batch);
                self.node
                    .hub
                    .metrics
                    .deliveries_total
                    .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
                Ok("null".into())
            }
            _ => Err(proto::UNKNOWN_COMMAND),
        }
    }

    /// A fresh token: 32 characters of `[a-z0-9]` from the operating system's randomness, not
    /// held by any live grant.
    fn new_token(&self) -> Result<String, &'static str> {
        for _ in 0..TOKEN_ATTEMPTS {
            let mut random = [0u8; 64];
            if let Err(e) = getrandom::fill(&mut random) {
                tracing::warn!(error = %e, "no randomness for a Snorky token");
                return Err(proto::INTERNAL_ERROR);
            }
            if let Some(token) = proto::token(random)
                && !self.node.live.has_grant(&token)
            {
                return Ok(token);
            }
        }
        Err(proto::INTERNAL_ERROR)
    }
}
