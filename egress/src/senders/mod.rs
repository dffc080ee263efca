//! One module per platform behind one trait. A sender makes ONE attempt at
//! one reply and says what happened; retries, backoff, idempotency, receipts
//! and metrics live in the stage ([`crate::stage`]) and the retry loop
//! ([`crate::delivery`]), never here. Adding a platform is a module here
//! with a `PLATFORM` [`Platform`], and a line in [`PLATFORMS`]; its settings
//! are its own `[egress.platforms.<name>]` table. Rate limits a sender names
//! ([`Sender::limits`]) are taken by the retry loop before each attempt, in
//! Redis, so they hold across every egress replica; access tokens are shared
//! the same way through [`Kit::tokens`].

pub mod dingtalk;
pub mod discord;
pub mod feishu;
pub mod http;
pub mod media;
pub mod mentions;
pub mod onebot;
pub mod relay;
pub mod slack;
pub mod split;
pub mod telegram;
pub mod web;
pub mod webhook;
pub mod wecom;

use crate::config::EgressSettings;
use crate::limits::Limit;
use crate::parts::Parts;
use crate::tokens::TokenCache;
use botline_shared::config::{enabled_platforms, Env, StreamSettings};
use botline_shared::message::Reply;
use botline_shared::redis_conn::Pool;
use botline_shared::runner::Write;
use botline_shared::streams::Streams;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Delivers replies to one platform.
pub trait Sender: Send + Sync + 'static {
    /// The platform name: the `<platform>` of `out:<platform>` and the metrics label.
    fn platform(&self) -> &'static str;

    /// Whether delivering is nothing but the attempt's Redis writes (made
    /// with the acknowledgement, so at most once by themselves): such a
    /// sender needs no sending lock.
    fn delivers_within_redis(&self) -> bool {
        false
    }

    /// The rate limits one send of `reply` counts against (per bot, per
    /// chat, …); a slot in each is taken before every attempt.
    fn limits(&self, _reply: &Reply) -> Vec<Limit> {
        Vec::new()
    }

    /// One attempt at delivering `reply`. Must not retry by itself.
    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt>;
}

/// What a platform's sender may use besides its own settings.
pub struct Kit<'a> {
    pub env: &'a dyn Env,
    pub streams: &'a Streams,
    pub pool: &'a Pool,
    /// Access tokens shared by every replica.
    pub tokens: TokenCache,
    /// Progress of replies sent as several messages, shared by every replica.
    pub parts: Parts,
}

/// One platform's sender, built from its `[egress.platforms.<name>]` table
/// (already known to be enabled).
pub struct Platform {
    pub name: &'static str,
    pub build: BuildSender,
}

/// Makes a platform's sender from its settings table.
pub type BuildSender = fn(&toml::Value, &Kit) -> Result<Arc<dyn Sender>, Error>;

/// Every platform egress can deliver to, besides `web` and `webhook`.
pub const PLATFORMS: &[&Platform] = &[
    &dingtalk::PLATFORM,
    &feishu::PLATFORM,
    &slack::PLATFORM,
    &telegram::PLATFORM,
    &wecom::PLATFORM,
    &onebot::PLATFORM,
    &discord::PLATFORM,
];

/// A sender's `[egress.platforms.<platform>]` table as `S`, each of the
/// rate settings `rates` names at least 1. For the senders' `build`.
pub fn settings<S: serde::de::DeserializeOwned>(
    platform: &str,
    table: &toml::Value,
    rates: impl FnOnce(&S) -> Vec<(&'static str, u32)>,
) -> Result<S, Error> {
    let name = format!("egress.platforms.{platform}");
    let settings = botline_shared::config::deserialize_setting(&name, table.clone())?;
    crate::limits::check_rates(&name, &rates(&settings))?;
    Ok(settings)
}

/// What one attempt came to.
#[derive(Debug)]
pub struct Attempt {
    /// The platform's answer for `botline_egress_platform_responses_total`:
    /// an HTTP status code, `timeout` or `error`; `None` for senders that do
    /// no I/O.
    pub response: Option<String>,
    pub verdict: Verdict,
}

#[derive(Debug)]
pub enum Verdict {
    /// The platform has the reply. `writes` are made atomically with the
    /// entry's acknowledgement (for web, they *are* the delivery).
    Delivered {
        platform_message_id: Option<String>,
        writes: Vec<Write>,
    },
    /// Worth another attempt (429, 5xx, timeouts, broken connections);
    /// `wait` is how long the platform asked us to wait, if it did.
    RetryAfter {
        wait: Option<Duration>,
        reason: String,
    },
    /// Will never succeed (4xx other than 408/429): the entry goes to `dead`.
    Permanent(String),
}

impl Attempt {
    pub fn delivered(
        response: Option<String>,
        platform_message_id: Option<String>,
        writes: Vec<Write>,
    ) -> Self {
        Attempt {
            response,
            verdict: Verdict::Delivered {
                platform_message_id,
                writes,
            },
        }
    }
}

/// A platform whose sender is not configured. Its replies still get read,
/// so they do not pile up unseen: each goes to `dead` saying what to set.
struct Unconfigured {
    platform: &'static str,
    reason: &'static str,
}

impl Sender for Unconfigured {
    fn platform(&self) -> &'static str {
        self.platform
    }

    fn attempt<'a>(&'a self, _reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            Attempt {
                response: None,
                verdict: Verdict::Permanent(self.reason.to_string()),
            }
        })
    }
}

/// The enabled senders, in the order their streams are read.
pub fn build(
    settings: &EgressSettings,
    env: &dyn Env,
    streams: &Streams,
    stream_settings: &StreamSettings,
    pool: &Pool,
) -> Result<Vec<Arc<dyn Sender>>, Error> {
    let mut senders: Vec<Arc<dyn Sender>> = Vec::new();
    let known: Vec<&str> = PLATFORMS.iter().map(|platform| platform.name).collect();
    let kit = Kit {
        env,
        streams,
        pool,
        tokens: TokenCache::new(pool.clone(), streams.clone()),
        parts: Parts::new(pool.clone(), streams.clone(), settings.sent_ttl()),
    };
    for (name, table) in enabled_platforms("egress", &settings.platforms, &known)? {
        let platform = PLATFORMS
            .iter()
            .find(|platform| platform.name == name)
            .expect("enabled_platforms returns known names");
        senders.push((platform.build)(table, &kit)?);
        info!(message = "platform sender enabled", platform = name);
    }
    if settings.web.enabled {
        senders.push(Arc::new(web::WebSender::new(
            &settings.web,
            streams.clone(),
            stream_settings,
        )));
    } else {
        info!(message = "web sender disabled by egress.web.enabled; out:web is not read");
    }
    if settings.webhook.url.is_empty() {
        warn!(message = "egress.webhook.url is empty: replies for platform `webhook` go to dead");
        senders.push(Arc::new(Unconfigured {
            platform: "webhook",
            reason: "egress.webhook.url is not set, so no reply for platform `webhook` can be \
                     delivered; set it and requeue this entry",
        }));
    } else {
        senders.push(Arc::new(webhook::WebhookSender::new(
            &settings.webhook,
            env,
        )?));
    }
    Ok(senders)
}
