//! Binds the two listeners and runs until SIGTERM or SIGINT, then shuts down gracefully: stop
//! accepting, close every connection with the shutdown code (reconnect range), wait for them to
//! go (bounded), exit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use plaza_core::CloseCode;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::bachata::Bachata;
use crate::backend_key::{self, KeySource};
use crate::config::Config;
use crate::hightemplar::HighTemplar;
use crate::hub::Hub;
use crate::live::Live;
use crate::node::Node;
use crate::{api, engine, keepalive, ws};

pub async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let (key, source) =
        backend_key::load_or_create(config.backend_key.as_deref(), &config.data_dir)?;
    match source {
        KeySource::Configured => {
            if key.len() < 16 {
                tracing::warn!("the configured backend key is shorter than 16 characters");
            }
        }
        KeySource::File(path) => {
            tracing::info!(path = %path.display(), "backend key read from file");
        }
        KeySource::Generated(path) => tracing::info!(
            path = %path.display(),
            "no backend key configured: generated one and saved it to this file"
        ),
    }

    let node_id = backend_key::random_hex(4)?;
    let hub = Arc::new(Hub::default());
    let engine::Engine {
        store,
        broker,
        embedded,
    } = engine::open(&config, &node_id, Arc::clone(&hub)).await?;
    let auth = Auth::from_config(&config.auth)?;
    if let Some(jwt) = &auth.jwt {
        tracing::info!(algorithm = jwt.algorithm(), "connection tokens accepted");
    }
    if auth.anonymous {
        tracing::info!("anonymous connections are allowed");
    }
    let live = Live::from_config(&config.live).map_err(|e| anyhow::anyhow!("live: {e}"))?;
    let node = Node::new(
        config.settings(),
        node_id.clone(),
        hub,
        store,
        broker,
        auth,
        live,
        config.chat.clone(),
    );
    node.chat.start_webhook();

    // High-templar (`[hightemplar]`): its WebSocket paths, triggers from RabbitMQ and HTTP.
    let hightemplar = match &config.hightemplar {
        Some(ht) => Some(HighTemplar::start(ht, Arc::clone(&node))?),
        None => None,
    };

    // Bachata (`[bachata]`): its WebSocket path over chat.
    let bachata = match &config.bachata {
        Some(b) => Some(Bachata::start(b, Arc::clone(&node))?),
        None => None,
    };

    // RSocket chat (`[rsocket]`): its TCP listener and WebSocket path over chat.
    let rsocket = match &config.rsocket {
        Some(r) => Some(crate::rsocket::start(r, Arc::clone(&node)).await?),
        None => None,
    };

    // Snorky (`[snorky]`): its WebSocket path and its backend path.
    let snorky = match &config.snorky {
        Some(s) => Some(crate::snorky::Snorky::start(s, Arc::clone(&node))?),
        None => None,
    };

    let mut public = Router::new().route(&config.native_path, get(ws::upgrade));
    if let Some(s) = &snorky {
        public = public.merge(s.router());
    }
    if let Some(b) = &bachata {
        public = public.merge(b.router());
    }
    if let Some(router) = rsocket.as_ref().and_then(|r| r.router()) {
        public = public.merge(router);
    }
    if let (Some(ht), Some(cfg)) = (&hightemplar, &config.hightemplar) {
        public = public.merge(ht.router(&cfg.paths));
    }
    let public = public
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such endpoint\n") })
        .with_state(Arc::clone(&node));
    let key: Arc<str> = Arc::from(key);
    let mut backend = api::router(Arc::clone(&node), Arc::clone(&key), hightemplar);
    if let Some(s) = &snorky {
        backend = backend.merge(s.backend_router(key));
    }

    let public_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let backend_listener = TcpListener::bind(config.backend_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.backend_listen))?;
    let public_addr = public_listener.local_addr()?;
    let backend_addr = backend_listener.local_addr()?;
    tracing::info!(
        node = %node_id,
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %config.data_dir.display(),
        "plaza starting"
    );
    tracing::info!(addr = %public_addr, native = %config.native_path, "public listener bound");
    tracing::info!(addr = %backend_addr, "backend listener bound");

    let (stop_tx, stop_rx) = watch::channel(false);
    let keepalive = tokio::spawn(keepalive::run(Arc::clone(&node)));
    let maintenance = tokio::spawn(maintenance(Arc::clone(&node)));
    let send_buffer = config.tcp_send_buffer_size;
    let public_listener = public_listener.tap_io(move |tcp| tune_socket(tcp, send_buffer));
    let public_server = tokio::spawn(
        axum::serve(public_listener, public)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    let backend_server = tokio::spawn(
        axum::serve(backend_listener, backend)
            .with_graceful_shutdown(stopped(stop_rx))
            .into_future(),
    );

    let signal = shutdown_signal().await?;
    tracing::info!(signal, "shutting down");
    let _ = stop_tx.send(true);
    node.hub.close_all(CloseCode::Shutdown);
    if let Some(s) = &snorky {
        s.close_all(CloseCode::Shutdown);
    }
    let open = || node.hub.connection_count() + snorky.as_ref().map_or(0, |s| s.connection_count());
    let deadline = Instant::now() + Duration::from_secs(config.shutdown_timeout_secs);
    while open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = open();
    if left > 0 {
        tracing::warn!(left, "connections still open at the shutdown deadline");
    }
    keepalive.abort();
    maintenance.abort();
    for server in [public_server, backend_server] {
        match tokio::time::timeout(Duration::from_secs(1), server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "listener ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "listener task failed"),
            _ => {}
        }
    }
    // Every acknowledged publish is already durable; closing releases the file cleanly.
    drop(node);
    match embedded.map(Arc::try_unwrap) {
        Some(Ok(store)) => {
            if let Err(e) = store.close().await {
                tracing::warn!(error = %e, "closing the store failed");
            }
        }
        Some(Err(_)) => tracing::debug!("store still referenced at exit; the OS releases it"),
        None => {}
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often history is trimmed by age and old idempotency keys are forgotten.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);

/// Background upkeep, off the publish path.
async fn maintenance(node: Arc<Node>) {
    let mut ticker = tokio::time::interval(MAINTENANCE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        node.expire_idempotency_keys(Instant::now());
        node.chat.prune_locks();
        let expired = node.live.expire(Instant::now());
        if expired > 0 {
            tracing::debug!(expired, "live tokens expired before they were redeemed");
        }
        match node.store.trim_expired(std::time::SystemTime::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "history trimmed by age"),
            Err(e) => tracing::warn!(error = %e, "trimming history failed"),
        }
    }
}

/// Small frames must leave at once (no Nagle delay); the send buffer is bounded if configured.
fn tune_socket(tcp: &mut tokio::net::TcpStream, send_buffer: Option<usize>) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if let Some(size) = send_buffer
        && let Err(e) = socket2::SockRef::from(&*tcp).set_send_buffer_size(size)
    {
        tracing::debug!(error = %e, "cannot set SO_SNDBUF");
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        })
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")?;
        Ok("ctrl-c")
    }
}
