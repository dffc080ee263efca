//! Platform `webhook`: each reply is POSTed as JSON to `[egress.webhook] url`.
//!
//! The body is one JSON object:
//!
//! ```json
//! {
//!   "id": "01J…",              // the reply's ULID; also the Idempotency-Key
//!   "in_reply_to": "01J…",     // the message it answers
//!   "platform": "webhook",
//!   "bot": "botline",
//!   "chat": {"id": "c1", "kind": "direct"},   // kind: direct | group | channel
//!   "thread": null,            // or a string
//!   "reply_to": null,          // platform id of the inbound message, or null
//!   "text": "…",
//!   "mentions": ["u1"],
//!   "attachments": [           // pictures and files to go with the text (may be empty)
//!     {"kind": "image", "url": "https://…", "name": "alt text",   // kind: image | audio | video | file | sticker
//!      "file_id": null, "mime": null, "size": null}
//!   ],
//!   "priority": "normal",      // urgent | normal | batch
//!   "trace_id": "…",
//!   "created_at_ms": 1700000000000
//! }
//! ```
//!
//! Headers: `Content-Type: application/json`, `Idempotency-Key: <reply id>`,
//! `X-Botline-Timestamp: <unix seconds>` and
//! `X-Botline-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`,
//! the secret being `BOTLINE_WEBHOOK_SECRET`. A receiver should recompute the
//! signature over the raw body, refuse old timestamps, and drop repeated
//! idempotency keys (a reply may arrive twice if egress dies between the
//! receiver's answer and the acknowledgement).
//!
//! Answers: 2xx is delivered (a JSON body's string `message_id`, if any, is
//! kept as the platform message id); 408, 429 and 5xx are retried (429/503
//! honour `Retry-After`); any other status is permanent. Redirects are not followed.

use super::{Attempt, Sender, Verdict};
use crate::backoff::parse_retry_after;
use crate::config::WebhookSettings;
use botline_shared::config::{secret_env, Env};
use botline_shared::message::Reply;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use sha2::Sha256;
use std::time::{Duration, SystemTime};

/// The environment variable holding the signing secret.
pub const SECRET_ENV: &str = "BOTLINE_WEBHOOK_SECRET";
/// The shortest secret accepted.
pub const SECRET_MIN_LEN: usize = 16;
/// How much of an error answer's body a dead letter quotes.
const BODY_QUOTE_CHARS: usize = 200;

pub struct WebhookSender {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Vec<u8>,
    timeout: Duration,
}

impl WebhookSender {
    pub fn new(settings: &WebhookSettings, env: &(impl Env + ?Sized)) -> Result<Self, Error> {
        let secret = secret_env(env, SECRET_ENV, SECRET_MIN_LEN)?;
        let url = reqwest::Url::parse(&settings.url)
            .map_err(|error| Error::config("egress.webhook.url", error))?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("botline-egress/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| Error::config("egress.webhook", error))?;
        Ok(WebhookSender {
            client,
            url,
            secret: secret.into_bytes(),
            timeout,
        })
    }

    async fn post(&self, reply: &Reply) -> Attempt {
        let body = payload(reply).to_string();
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or_default();
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &reply.id)
            .header("X-Botline-Timestamp", timestamp.to_string())
            .header(
                "X-Botline-Signature",
                signature(&self.secret, timestamp, body.as_bytes()),
            )
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                let (response, reason) = if error.is_timeout() {
                    (
                        "timeout",
                        format!("webhook timed out after {:?}", self.timeout),
                    )
                } else {
                    (
                        "error",
                        format!("webhook request failed: {}", error.without_url()),
                    )
                };
                return Attempt {
                    response: Some(response.into()),
                    verdict: Verdict::RetryAfter { wait: None, reason },
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        let text = response.text().await.unwrap_or_default();
        Attempt {
            response: Some(status.as_u16().to_string()),
            verdict: judge(status, retry_after, &text),
        }
    }
}

impl Sender for WebhookSender {
    fn platform(&self) -> &'static str {
        "webhook"
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(self.post(reply))
    }
}

/// The JSON body for `reply` (documented at the top of this module).
pub fn payload(reply: &Reply) -> serde_json::Value {
    serde_json::json!({
        "id": reply.id,
        "in_reply_to": reply.in_reply_to,
        "platform": reply.platform,
        "bot": reply.bot,
        "chat": { "id": reply.chat.id, "kind": reply.chat.kind },
        "thread": reply.thread,
        "reply_to": reply.reply_to,
        "text": reply.text,
        "mentions": reply.mentions,
        "attachments": reply.attachments,
        "priority": reply.priority.as_str(),
        "trace_id": reply.trace_id,
        "created_at_ms": reply.created_at_ms,
    })
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What an answer means: delivered, worth a retry, or never going to work.
pub fn judge(status: StatusCode, retry_after: Option<Duration>, body: &str) -> Verdict {
    let reason = || {
        let quoted: String = body.chars().take(BODY_QUOTE_CHARS).collect();
        format!("webhook answered {}: {quoted}", status.as_u16())
    };
    if status.is_success() {
        let platform_message_id = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|value| value.get("message_id")?.as_str().map(str::to_string));
        return Verdict::Delivered {
            platform_message_id,
            writes: Vec::new(),
        };
    }
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Verdict::RetryAfter {
            wait: retry_after,
            reason: reason(),
        },
        StatusCode::REQUEST_TIMEOUT => Verdict::RetryAfter {
            wait: None,
            reason: reason(),
        },
        status if status.is_server_error() => Verdict::RetryAfter {
            wait: None,
            reason: reason(),
        },
        _ => Verdict::Permanent(reason()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_signature(secret: &str, timestamp: u64, body: &str, expected: &str) {
        assert_eq!(
            signature(secret.as_bytes(), timestamp, body.as_bytes()),
            expected,
            "{secret:?} {timestamp} {body:?}"
        );
    }

    // Expected values from `printf '%s' "<timestamp>.<body>" | openssl dgst -sha256 -hmac <secret>`.
    #[test]
    fn signatures_match_openssl() {
        check_signature(
            "s",
            0,
            "",
            "sha256=2572e102ebbc88d57bc0ef48471ee28bb7fc8c6e9c0558b3c8e5d276f84ac9c3",
        );
        check_signature(
            "s",
            0,
            "{}",
            "sha256=e79b1f685c78e46b2e3f94b5fbf00964e3e3d5ed4d1e270dcf671ac4cd2233fa",
        );
        check_signature(
            "topsecret-0123456789",
            1_700_000_000,
            r#"{"id":"r1"}"#,
            "sha256=7410e4080d9e0697e3398d8b9569abf9bc234f81c084500a963218655f3e0d2c",
        );
        check_signature(
            "k",
            1,
            "hello world",
            "sha256=d04f3c4a09d7f6545ae4a0e0db6afb706a2b62b359cdf4f04eefe80bf09ece83",
        );
        check_signature(
            "密钥",
            42,
            "中文",
            "sha256=23d5a67380ab19f1236070906faea35c11e29a2ee31520e90072e51920998ff1",
        );
    }

    #[test]
    fn a_webhook_without_its_secret_stops_egress_naming_the_variable() {
        let settings = WebhookSettings {
            url: "http://127.0.0.1:1/hook".into(),
            timeout_ms: 1000,
        };
        let missing = WebhookSender::new(&settings, &[]).err().unwrap();
        assert_eq!(
            missing.to_string(),
            "setting BOTLINE_WEBHOOK_SECRET: is not set"
        );
        let short = WebhookSender::new(&settings, &[(SECRET_ENV, "short")])
            .err()
            .unwrap();
        assert_eq!(
            short.to_string(),
            "setting BOTLINE_WEBHOOK_SECRET: must be at least 16 bytes long"
        );
        assert!(WebhookSender::new(&settings, &[(SECRET_ENV, "0123456789abcdef")]).is_ok());
    }

    fn check_judge(status: u16, retry_after: Option<u64>, body: &str, expected: &str) {
        let verdict = judge(
            StatusCode::from_u16(status).unwrap(),
            retry_after.map(Duration::from_secs),
            body,
        );
        let got = match verdict {
            Verdict::Delivered {
                platform_message_id,
                ..
            } => format!("delivered {platform_message_id:?}"),
            Verdict::RetryAfter { wait, reason } => format!("retry {wait:?} {reason}"),
            Verdict::Permanent(reason) => format!("permanent {reason}"),
        };
        assert_eq!(got, expected, "{status} {retry_after:?} {body:?}");
    }

    #[test]
    fn answers_are_judged_by_status() {
        check_judge(200, None, "", "delivered None");
        check_judge(204, None, "", "delivered None");
        check_judge(
            201,
            None,
            r#"{"message_id":"m7"}"#,
            r#"delivered Some("m7")"#,
        );
        check_judge(200, None, r#"{"message_id":7}"#, "delivered None");
        check_judge(
            429,
            Some(2),
            "slow",
            "retry Some(2s) webhook answered 429: slow",
        );
        check_judge(429, None, "", "retry None webhook answered 429: ");
        check_judge(503, Some(1), "", "retry Some(1s) webhook answered 503: ");
        check_judge(
            500,
            Some(9),
            "boom",
            "retry None webhook answered 500: boom",
        );
        check_judge(502, None, "", "retry None webhook answered 502: ");
        check_judge(408, None, "", "retry None webhook answered 408: ");
        check_judge(
            400,
            None,
            "bad json",
            "permanent webhook answered 400: bad json",
        );
        check_judge(401, Some(5), "", "permanent webhook answered 401: ");
        check_judge(404, None, "", "permanent webhook answered 404: ");
        check_judge(301, None, "", "permanent webhook answered 301: ");
        check_judge(
            400,
            None,
            &"é".repeat(300),
            &format!("permanent webhook answered 400: {}", "é".repeat(200)),
        );
    }
}
