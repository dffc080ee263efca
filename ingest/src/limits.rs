//! Per-source request limits: one token bucket per client address, shared
//! by every route (the generic API, platform hooks, the web chat's page and
//! socket) and by each message a web chat socket sends, so one source
//! cannot take the front door from the others. Over its limit a source
//! gets 429 with `Retry-After` (`reason="rate_limited"`) and nothing else
//! is done for it. The limits are per ingest replica.
//!
//! The address is the connection's peer, or with `[ingest] client_ip_header`
//! the one a trusted proxy in front of ingest puts in that header (for
//! `X-Forwarded-For`, the last one: the address the proxy itself saw).

use crate::config::IngestSettings;
use crate::error::IngestError;
use crate::AppState;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use botline_shared::Error;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The client address a request came from, as the limits see it; put in
/// the request's extensions for the handlers (the web chat's socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source(pub IpAddr);

pub struct SourceLimits {
    /// `None` when `[ingest] per_source_per_second` is 0.
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    header: Option<HeaderName>,
}

impl SourceLimits {
    pub fn new(settings: &IngestSettings) -> Result<Self, Error> {
        let header = match settings.client_ip_header.as_str() {
            "" => None,
            name => Some(HeaderName::from_bytes(name.as_bytes()).map_err(|error| {
                Error::config("ingest.client_ip_header", format!("{name:?}: {error}"))
            })?),
        };
        let limiter = match NonZeroU32::new(settings.per_source_per_second) {
            None => None,
            Some(rate) => {
                let burst = NonZeroU32::new(settings.per_source_burst).ok_or_else(|| {
                    Error::config(
                        "ingest.per_source_burst",
                        "must be greater than 0 while ingest.per_source_per_second is",
                    )
                })?;
                Some(RateLimiter::keyed(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            }
        };
        Ok(SourceLimits { limiter, header })
    }

    /// Where a request came from: the header's address when one is
    /// configured and it holds one, else the connection's peer.
    pub fn source(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Source {
        let from_header = self.header.as_ref().and_then(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            value.rsplit(',').next()?.trim().parse::<IpAddr>().ok()
        });
        Source(
            from_header
                .or(peer.map(|peer| peer.ip()))
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        )
    }

    /// Take one request from `source`'s bucket, or say how long to wait.
    pub fn check(&self, source: Source) -> Result<(), IngestError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&source.0).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            IngestError::RateLimited {
                retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }

    /// Forget the buckets of sources quiet long enough to be full again,
    /// every `every`, until `shutdown`: memory follows the active sources.
    pub async fn forget_quiet_sources(&self, every: Duration, shutdown: CancellationToken) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        }
    }
}

/// The layer in front of every route: find the source, charge it one
/// request, refuse it when over its limit.
pub async fn limit(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let source = state.limits.source(peer, request.headers());
    if let Err(refused) = state.limits.check(source) {
        return refused.into_response();
    }
    request.extensions_mut().insert(source);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(overlay: &str) -> SourceLimits {
        SourceLimits::new(&IngestSettings::from_toml(overlay).unwrap()).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_source_is_the_peer_unless_a_trusted_header_names_one() {
        let peer: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let forwarded = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.7")]);
        let check = |limits: &SourceLimits, headers: &HeaderMap, expected: &str| {
            assert_eq!(
                limits.source(Some(peer), headers),
                Source(expected.parse().unwrap())
            );
        };
        let plain = limits("");
        check(&plain, &forwarded, "10.0.0.9");
        let proxied = limits("[ingest]\nclient_ip_header = \"X-Forwarded-For\"\n");
        check(&proxied, &forwarded, "203.0.113.7");
        check(&proxied, &HeaderMap::new(), "10.0.0.9");
        check(
            &proxied,
            &headers(&[("x-forwarded-for", "not an address")]),
            "10.0.0.9",
        );
    }

    #[test]
    fn a_source_over_its_burst_waits_and_others_do_not() {
        let limited = limits("[ingest]\nper_source_per_second = 1\nper_source_burst = 3\n");
        let one = Source("192.0.2.1".parse().unwrap());
        let other = Source("192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            limited.check(one).unwrap();
        }
        let refused = limited.check(one).unwrap_err();
        assert_eq!(refused.retry_after_secs(), Some(1));
        assert_eq!(refused.label(), "rate_limited");
        limited.check(other).unwrap();
        let unlimited = limits("[ingest]\nper_source_per_second = 0\n");
        for _ in 0..1000 {
            unlimited.check(one).unwrap();
        }
    }

    #[test]
    fn bad_limit_settings_are_named() {
        let error = |overlay: &str| {
            let settings = IngestSettings::from_toml(overlay).unwrap();
            SourceLimits::new(&settings).err().unwrap().to_string()
        };
        assert!(error("[ingest]\nclient_ip_header = \"bad header\"\n")
            .starts_with("setting ingest.client_ip_header: \"bad header\""));
        assert_eq!(
            error("[ingest]\nper_source_burst = 0\n"),
            "setting ingest.per_source_burst: must be greater than 0 while ingest.per_source_per_second is"
        );
    }
}
