//! One module per platform behind one trait. A sender makes ONE attempt at
//! one reply and says what happened; retries, backoff, idempotency, receipts
//! and metrics live in the stage ([`crate::stage`]) and the retry loop
//! ([`crate::delivery`]), never here. Adding a platform is a module here,
//! its settings in [`crate::config`], and a line in [`build`].

pub mod web;
pub mod webhook;

use crate::config::EgressSettings;
use botline_shared::config::{Env, StreamSettings};
use botline_shared::message::Reply;
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

    /// One attempt at delivering `reply`. Must not retry by itself.
    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt>;
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
    env: &impl Env,
    streams: &Streams,
    stream_settings: &StreamSettings,
) -> Result<Vec<Arc<dyn Sender>>, Error> {
    let mut senders: Vec<Arc<dyn Sender>> = Vec::new();
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
