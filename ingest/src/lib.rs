//! Ingest is botline's front door. It reads messages from outside (the
//! generic JSON API for custom integrations, the web chat's WebSocket, and
//! its own scheduler), turns each into a [`UnifiedMessage`] and adds it to
//! `in` for classify. It writes only `in`, the dedup keys, and the person's
//! turns of web chat transcripts; it reads the `classify` group's lag to
//! push back (429) rather than let `in` grow without bound, and follows the
//! transcripts (pub/sub) to show the bot's replies in the web chat.
//!
//! Owns: `POST /v1/messages`, `POST /v1/broadcast`, `/` (the chat page),
//! `/ws` (the chat socket), `/hooks/<platform>` (platform webhooks, see
//! [`platforms`]) and `/hooks/<platform>/ws` (sockets platforms open to
//! ingest). Never calls another stage; the frames egress relays over a
//! platform socket ingest holds come through Redis
//! ([`platforms::relay`]).
//!
//! [`UnifiedMessage`]: botline_shared::message::UnifiedMessage

pub mod api;
pub mod auth;
pub mod backlog;
pub mod config;
pub mod error;
pub mod generic;
pub mod inbox;
pub mod limits;
pub mod platforms;
pub mod scheduler;
pub mod webchat;

use crate::auth::JwtAuth;
use crate::backlog::Backlog;
use crate::config::{IngestSettings, Schedule};
use crate::error::IngestError;
use crate::inbox::Inbox;
use crate::limits::SourceLimits;
use crate::platforms::InboundPlatform;
use crate::webchat::Notice;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use botline_shared::config::{Env, ProcessConfig, Settings, StreamSettings};
use botline_shared::redis_conn::Pool;
use botline_shared::streams::Streams;
use botline_shared::telemetry::Health;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Everything ingest needs from outside, built by `main` (or a test).
pub struct Ingest {
    pub settings: IngestSettings,
    /// The scheduler's entries, parsed from `settings.schedule`.
    pub schedules: Vec<Schedule>,
    pub stream_settings: StreamSettings,
    pub streams: Streams,
    /// For the one pub/sub connection following transcripts.
    pub client: redis::Client,
    pub pool: Pool,
    /// `BOTLINE_JWT_SECRET`; `None` disables the generic API.
    pub jwt_secret: Option<String>,
    /// The platform webhooks `[ingest.platforms]` enables.
    pub platforms: Vec<Arc<dyn InboundPlatform>>,
    /// Per-source request limits, from `settings`.
    pub limits: Arc<SourceLimits>,
    pub health: Health,
}

impl Ingest {
    /// Settings and connections for the binary: `[ingest]` and `[streams]`
    /// from `settings`, a pool and a client for `process.redis_url`, the
    /// platforms' secrets from `env`.
    pub fn connect(
        process: &ProcessConfig,
        settings: &Settings,
        env: &dyn Env,
        jwt_secret: Option<String>,
        health: Health,
    ) -> Result<Self, botline_shared::Error> {
        let ingest_settings = IngestSettings::load(settings)?;
        Ok(Ingest {
            platforms: platforms::build(&ingest_settings.platforms, env)?,
            limits: Arc::new(SourceLimits::new(&ingest_settings)?),
            schedules: ingest_settings.schedules()?,
            settings: ingest_settings,
            stream_settings: settings.section("streams")?,
            streams: process.streams(settings)?,
            client: botline_shared::redis_conn::client(process)?,
            pool: botline_shared::redis_conn::pool(process, 16)?,
            jwt_secret,
            health,
        })
    }
}

/// The `platform` label of a refusal at a path no enabled platform owns.
pub const UNKNOWN_PLATFORM: &str = "unknown";

/// What request handlers share.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub settings: IngestSettings,
    pub inbox: Inbox,
    pub auth: Option<JwtAuth>,
    pub backlog: Backlog,
    pub platforms: Vec<Arc<dyn InboundPlatform>>,
    pub limits: Arc<SourceLimits>,
    /// Chats whose transcript changed, from the pub/sub listener to the sockets.
    pub notices: broadcast::Sender<Notice>,
    pub shutdown: CancellationToken,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(ingest: &Ingest, shutdown: CancellationToken) -> Self {
        let settings = ingest.settings.clone();
        let (notices, _) = broadcast::channel(1024);
        AppState(Arc::new(Shared {
            inbox: Inbox::new(
                ingest.pool.clone(),
                ingest.streams.clone(),
                settings.dedup_ttl_ms,
                &ingest.stream_settings,
                settings.retry_after_secs,
            ),
            auth: ingest
                .jwt_secret
                .as_deref()
                .map(|secret| JwtAuth::new(secret, settings.audience())),
            backlog: Backlog::default(),
            platforms: ingest.platforms.clone(),
            limits: ingest.limits.clone(),
            notices,
            shutdown,
            settings,
        }))
    }

    /// The platform whose requests come to `path`, as refusals are
    /// counted: the enabled platform a `/hooks/<name>` path names, the web
    /// chat's for its page and socket, the generic API's messages' default
    /// (`webhook`) for `/v1/…`; [`UNKNOWN_PLATFORM`] for any other path.
    pub fn platform_of(&self, path: &str) -> &'static str {
        if let Some(hook) = path.strip_prefix("/hooks/") {
            let name = hook.split('/').next().unwrap_or_default();
            return self
                .platforms
                .iter()
                .map(|platform| platform.name())
                .find(|enabled| *enabled == name)
                .unwrap_or(UNKNOWN_PLATFORM);
        }
        match path {
            "/" | "/ws" => webchat::PLATFORM,
            "/v1/messages" | "/v1/broadcast" => generic::DEFAULT_PLATFORM,
            _ => UNKNOWN_PLATFORM,
        }
    }

    /// 429 while `in` is over its backlog limit.
    pub fn check_backlog(&self) -> Result<(), IngestError> {
        if self.backlog.get() > self.settings.in_max_backlog {
            return Err(IngestError::Busy {
                retry_after_secs: self.settings.retry_after_secs,
            });
        }
        Ok(())
    }
}

/// Every route of the front door.
pub fn app(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    Router::new()
        .route("/", get(webchat::page))
        .route("/ws", get(webchat::socket))
        .route("/v1/messages", post(api::post_message))
        .route("/v1/broadcast", post(api::post_broadcast))
        .route(
            "/hooks/{platform}",
            get(platforms::hook).post(platforms::hook),
        )
        .route("/hooks/{platform}/ws", get(platforms::socket))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), limits::limit))
        // Outermost, so the per-source limits' refusals are counted too.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            error::count_refusals,
        ))
        .with_state(state)
}

/// Serve on `listener`, follow transcripts, watch the backlog and run the
/// scheduler, until `shutdown`.
pub async fn run(
    listener: TcpListener,
    ingest: Ingest,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState::new(&ingest, shutdown.clone());
    tokio::spawn(backlog::watch_backlog(
        ingest.pool.clone(),
        ingest
            .streams
            .all()
            .map(|p| ingest.streams.inbound(p))
            .collect(),
        state.backlog.clone(),
        ingest.settings.backlog_poll(),
        shutdown.clone(),
    ));
    tokio::spawn(webchat::follow_transcripts(
        ingest.client.clone(),
        ingest.streams.transcript_channel(),
        state.notices.clone(),
        ingest.health.clone(),
        shutdown.clone(),
    ));
    let limits = ingest.limits.clone();
    let quiet = shutdown.clone();
    tokio::spawn(async move {
        limits
            .forget_quiet_sources(Duration::from_secs(60), quiet)
            .await
    });
    scheduler::start(ingest.schedules, state.inbox.clone(), shutdown.clone());
    for platform in &ingest.platforms {
        platform
            .clone()
            .start(state.inbox.clone(), ingest.health.clone(), shutdown.clone());
    }
    info!(message = "ingest listening", addr = %listener.local_addr()?);
    ingest.health.set("http", true);
    // The peer's address is what the per-source limits count by.
    let service = app(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
