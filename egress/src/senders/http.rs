//! What the HTTP platform senders share: a client made the same way (a
//! timeout, no redirects, botline's user agent), one request turned into
//! either the platform's answer or a retryable [`Attempt`] (timeouts and
//! broken connections), and error bodies quoted briefly. Reasons never
//! carry a URL, since some platforms put the bot token in it (Telegram).

use super::{Attempt, Verdict};
use crate::backoff::parse_retry_after;
use botline_shared::Error;
use reqwest::StatusCode;
use std::time::{Duration, SystemTime};

/// How much of an error answer's body a dead letter quotes.
const BODY_QUOTE_CHARS: usize = 200;

/// A client for one platform; `setting` names its table in errors.
pub fn client(setting: &str, timeout: Duration) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("botline-egress/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| Error::config(setting, error))
}

/// A platform's client (made by [`client`]) and the timeout it was made
/// with, which a timed-out attempt's reason names.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    timeout: Duration,
}

impl Http {
    /// The client for `[egress.platforms.<platform>]`, timing out after `timeout_ms`.
    pub fn new(platform: &str, timeout_ms: u64) -> Result<Http, Error> {
        let timeout = Duration::from_millis(timeout_ms);
        Ok(Http {
            client: client(&format!("egress.platforms.{platform}"), timeout)?,
            timeout,
        })
    }

    pub fn get(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        self.client.get(url)
    }

    pub fn post(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        self.client.post(url)
    }

    /// [`send`] with this client's timeout; `what` names the platform (or
    /// its endpoint) in reasons.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<Answered, Attempt> {
        send(request, what, self.timeout).await
    }

    /// One request as one attempt: the platform's answer as `judge` reads
    /// it, or the failure to get one.
    pub async fn attempt(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
        judge: fn(&Answered) -> Verdict,
    ) -> Attempt {
        match self.send(request, what).await {
            Ok(answered) => answered.attempt(judge(&answered)),
            Err(attempt) => attempt,
        }
    }
}

/// A platform's answer to one request.
#[derive(Debug)]
pub struct Answered {
    pub status: StatusCode,
    /// The `Retry-After` header, as a wait.
    pub retry_after: Option<Duration>,
    /// Every header, for platforms with their own retry hints
    /// (`x-ogw-ratelimit-reset`, say).
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answered {
    /// The status as `botline_egress_platform_responses_total` counts it.
    pub fn response(&self) -> Option<String> {
        Some(self.status.as_u16().to_string())
    }

    /// An attempt with this answer's status and `verdict`.
    pub fn attempt(&self, verdict: Verdict) -> Attempt {
        Attempt {
            response: self.response(),
            verdict,
        }
    }

    /// What a non-2xx status means for a platform whose errors otherwise
    /// come in 2xx bodies: 429 and 503 are retried when `Retry-After` says,
    /// 408 and other 5xx after a backoff, any other status never. `None`
    /// for a 2xx: the body decides.
    pub fn status_verdict(&self, platform: &str) -> Option<Verdict> {
        let status = self.status;
        if status.is_success() {
            return None;
        }
        let reason = format!(
            "{platform} answered {}: {}",
            status.as_u16(),
            quote(&self.body)
        );
        Some(match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Verdict::RetryAfter {
                    wait: self.retry_after,
                    reason,
                }
            }
            StatusCode::REQUEST_TIMEOUT => Verdict::RetryAfter { wait: None, reason },
            status if status.is_server_error() => Verdict::RetryAfter { wait: None, reason },
            _ => Verdict::Permanent(reason),
        })
    }
}

/// Send `request`; a timeout or a failed connection is an attempt worth
/// retrying, named after `platform`.
pub async fn send(
    request: reqwest::RequestBuilder,
    platform: &str,
    timeout: Duration,
) -> Result<Answered, Attempt> {
    let response = request.send().await.map_err(|error| {
        let (response, reason) = if error.is_timeout() {
            ("timeout", format!("{platform} timed out after {timeout:?}"))
        } else {
            (
                "error",
                format!("{platform} request failed: {}", error.without_url()),
            )
        };
        Attempt {
            response: Some(response.into()),
            verdict: Verdict::RetryAfter { wait: None, reason },
        }
    })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));
    let headers = response.headers().clone();
    let body = response.text().await.unwrap_or_default();
    Ok(Answered {
        status,
        retry_after,
        headers,
        body,
    })
}

/// What a sender's `judge` makes of an answer, in words: for table tests.
#[cfg(test)]
pub fn judged(
    judge: fn(&Answered) -> Verdict,
    status: u16,
    retry_after: Option<u64>,
    body: &str,
) -> String {
    let verdict = judge(&Answered {
        status: StatusCode::from_u16(status).unwrap(),
        retry_after: retry_after.map(Duration::from_secs),
        headers: Default::default(),
        body: body.into(),
    });
    match verdict {
        Verdict::Delivered {
            platform_message_id,
            ..
        } => format!("delivered {platform_message_id:?}"),
        Verdict::RetryAfter { wait, reason } => format!("retry {wait:?} {reason}"),
        Verdict::Permanent(reason) => format!("permanent {reason}"),
    }
}

/// A reply as respond writes it, for the senders' unit tests: `text` to
/// `chat` (of `kind`) on `platform`, from `bot`, and nothing else.
#[cfg(test)]
pub fn test_reply(
    platform: &str,
    bot: &str,
    chat: &str,
    kind: botline_shared::message::ChatKind,
    text: &str,
) -> botline_shared::message::Reply {
    botline_shared::message::Reply {
        id: "r1".into(),
        in_reply_to: "m1".into(),
        platform: platform.into(),
        bot: bot.into(),
        chat: botline_shared::message::Chat {
            id: chat.into(),
            kind,
        },
        thread: None,
        reply_to: None,
        text: text.into(),
        mentions: Vec::new(),
        attachments: Vec::new(),
        platform_data: Default::default(),
        priority: botline_shared::message::Priority::Normal,
        received_at_ms: 0,
        created_at_ms: 0,
        trace_id: "t".into(),
        replay: false,
    }
}

/// The first characters of a body, for a reason.
pub fn quote(body: &str) -> String {
    body.chars().take(BODY_QUOTE_CHARS).collect()
}

/// Whether an answer with this status may go better later (408, 429,
/// 5xx): a token endpoint refusing otherwise refused the credentials.
pub fn is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// The attempt of a reply for which no access token came: never retried
/// when the platform `refused` the app's credentials (retrying cannot
/// help), else retried.
pub fn without_token(reason: String, refused: bool) -> Attempt {
    let verdict = if refused {
        Verdict::Permanent(reason)
    } else {
        Verdict::RetryAfter { wait: None, reason }
    };
    Attempt {
        response: None,
        verdict,
    }
}

/// Why an attempt failed, as text (for a token fetch, whose failure is a
/// string).
pub fn failure(attempt: Attempt) -> String {
    match attempt.verdict {
        Verdict::RetryAfter { reason, .. } | Verdict::Permanent(reason) => reason,
        Verdict::Delivered { .. } => "delivered".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_status(status: u16, retry_after: Option<u64>, expected: &str) {
        let answered = Answered {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
            headers: Default::default(),
            body: "why".into(),
        };
        let got = match answered.status_verdict("p") {
            None => "body decides".to_string(),
            Some(Verdict::RetryAfter { wait, reason }) => format!("retry {wait:?} {reason}"),
            Some(Verdict::Permanent(reason)) => format!("permanent {reason}"),
            Some(Verdict::Delivered { .. }) => "delivered".to_string(),
        };
        assert_eq!(got, expected, "{status}");
    }

    #[test]
    fn statuses_other_than_2xx_decide_by_themselves() {
        check_status(200, None, "body decides");
        check_status(204, Some(1), "body decides");
        check_status(429, Some(3), "retry Some(3s) p answered 429: why");
        check_status(429, None, "retry None p answered 429: why");
        check_status(503, Some(1), "retry Some(1s) p answered 503: why");
        check_status(408, Some(9), "retry None p answered 408: why");
        check_status(502, None, "retry None p answered 502: why");
        check_status(401, None, "permanent p answered 401: why");
        check_status(404, Some(1), "permanent p answered 404: why");
    }

    #[test]
    fn quotes_are_cut_on_characters() {
        assert_eq!(quote("short"), "short");
        assert_eq!(quote(&"é".repeat(300)), "é".repeat(200));
    }
}
