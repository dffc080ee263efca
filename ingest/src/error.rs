//! The one error type of ingest's front door. Each variant is a cause, knows
//! its status code and its `reason` label, and is logged and counted in
//! `botline_ingest_rejected_total{platform,reason}` from one place
//! ([`IngestError::record`]): by the connection that read it, or for an
//! HTTP answer by [`count_refusals`], which knows the route's platform.

use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;
use thiserror::Error;
use tracing::{debug, warn};

#[derive(Debug, Error)]
pub enum IngestError {
    /// No usable bearer token; the reason says which check failed.
    #[error("{0}")]
    Unauthorized(String),
    /// A platform request failed the platform's own verification
    /// (signature, timestamp window, verification token); `reason` is the
    /// metric label (`bad_signature`, `stale_timestamp`, …), `detail` what
    /// the log says. No secret is in either.
    #[error("{platform}: {detail}")]
    Unverified {
        platform: &'static str,
        reason: &'static str,
        detail: String,
    },
    /// No enabled platform has this name.
    #[error("no platform `{0}` is enabled here")]
    UnknownPlatform(String),
    /// The generic API has no secret to check tokens against.
    #[error("generic API disabled: BOTLINE_JWT_SECRET is not set")]
    Disabled,
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The input is not JSON of the expected shape (syntax, unknown field, wrong type).
    #[error("{0}")]
    Malformed(String),
    /// The input has the right shape but a value is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// `in` is over its backlog limit.
    #[error("ingest is busy, retry in {retry_after_secs} s")]
    Busy { retry_after_secs: u64 },
    /// This client address is over its per-source limit.
    #[error("too many requests from this address, retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// Redis answered OOM: back-pressure as well, nothing was added.
    #[error("storage is full, retry in {retry_after_secs} s")]
    StorageFull { retry_after_secs: u64 },
    /// Redis is unreachable or failed; the details go to the log only.
    #[error("storage unavailable, retry in {retry_after_secs} s")]
    Unavailable {
        retry_after_secs: u64,
        #[source]
        cause: botline_shared::Error,
    },
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized(_) | IngestError::Disabled => StatusCode::UNAUTHORIZED,
            IngestError::Unverified { .. } => StatusCode::UNAUTHORIZED,
            IngestError::UnknownPlatform(_) => StatusCode::NOT_FOUND,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Malformed(_) => StatusCode::BAD_REQUEST,
            IngestError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::Busy { .. } | IngestError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            IngestError::StorageFull { .. } | IngestError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The `reason` label of `botline_ingest_rejected_total`: a small fixed set.
    pub fn label(&self) -> &'static str {
        match self {
            IngestError::Unauthorized(_) => "unauthorized",
            IngestError::Disabled => "disabled",
            IngestError::Unverified { reason, .. } => reason,
            IngestError::UnknownPlatform(_) => "unknown_platform",
            IngestError::TooLarge { .. } => "too_large",
            IngestError::Malformed(_) => "malformed",
            IngestError::Invalid(_) => "invalid",
            IngestError::Busy { .. } => "backpressure",
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::StorageFull { .. } => "redis_oom",
            IngestError::Unavailable { .. } => "redis_unavailable",
        }
    }

    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            IngestError::Busy { retry_after_secs }
            | IngestError::RateLimited { retry_after_secs }
            | IngestError::StorageFull { retry_after_secs }
            | IngestError::Unavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// Log and count this refusal of a request or frame `platform` sent
    /// (a platform's name, `web` for the web chat, `webhook` for the
    /// generic API); called once per refusal.
    pub fn record(&self, route: &'static str, platform: &'static str) {
        let reason = self.label();
        metrics::counter!("botline_ingest_rejected_total", "platform" => platform, "reason" => reason)
            .increment(1);
        match self {
            IngestError::Unavailable { cause, .. } => {
                warn!(message = "request refused", route, platform, reason, error = %cause)
            }
            IngestError::StorageFull { .. } | IngestError::Busy { .. } => {
                warn!(message = "request refused", route, platform, reason)
            }
            IngestError::Unverified { .. } => {
                warn!(message = "platform request failed verification", route, platform, reason, error = %self)
            }
            _ => debug!(message = "request refused", route, platform, reason, error = %self),
        }
    }

    /// A Redis failure: OOM is back-pressure, anything else is unavailability.
    pub fn from_redis(cause: botline_shared::Error, retry_after_secs: u64) -> Self {
        let oom = matches!(&cause, botline_shared::Error::Redis(error) if is_oom(error));
        if oom {
            IngestError::StorageFull { retry_after_secs }
        } else {
            IngestError::Unavailable {
                retry_after_secs,
                cause,
            }
        }
    }
}

/// Redis answered OOM, to a command or to one of a pipeline's (whose error
/// has no code of its own).
fn is_oom(error: &redis::RedisError) -> bool {
    error.code() == Some("OOM")
        || error
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "OOM"))
}

/// An HTTP refusal on its way out, for [`count_refusals`] to record.
#[derive(Debug, Clone)]
struct Refused(Arc<IngestError>);

/// The answer to a refused request; recorded by [`count_refusals`] on its way out.
impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status(),
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if let Some(seconds) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, IngestError::Unauthorized(_) | IngestError::Disabled) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(Refused(Arc::new(self)));
        response
    }
}

/// Middleware around every route: records each refusal a route (or a
/// layer inside this one) answered, as the platform of the request's path
/// ([`AppState::platform_of`]).
pub async fn count_refusals(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let platform = state.platform_of(request.uri().path());
    let response = next.run(request).await;
    if let Some(Refused(error)) = response.extensions().get::<Refused>() {
        error.record("http", platform);
    }
    response
}
