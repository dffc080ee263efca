//! The retry loop around a sender, the one place attempts are repeated:
//! exponential backoff with full jitter, at most `max_attempts` attempts,
//! never beyond the send budget in total, and the platform's `Retry-After`
//! honoured when it fits. It also counts every platform answer, retry and
//! rate-limit wait, so those metrics cannot drift between platforms.

use crate::backoff;
use crate::limits::{Limiter, Refusal};
use crate::senders::{Sender, Verdict};
use botline_shared::message::Reply;
use botline_shared::runner::Write;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How hard one delivery of an entry tries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// All attempts and waits end within this long.
    pub budget: Duration,
}

/// What all the attempts came to.
#[derive(Debug)]
pub enum Delivery {
    Delivered {
        attempts: u32,
        platform_message_id: Option<String>,
        writes: Vec<Write>,
    },
    /// The platform refused for good: the entry belongs in `dead`.
    Refused { attempts: u32, reason: String },
    /// Out of attempts, budget or time to stop: leave the entry pending.
    GaveUp { attempts: u32, reason: String },
}

/// Try `sender` on `reply` until it is delivered, refused, or the policy says stop.
/// Before each attempt a slot is taken in each of the sender's rate limits
/// (with `limiter`; senders without limits need none). On `shutdown` a wait
/// is cut short and the delivery given up.
pub async fn deliver(
    sender: &dyn Sender,
    reply: &Reply,
    policy: &RetryPolicy,
    limiter: Option<&Limiter>,
    shutdown: &CancellationToken,
) -> Delivery {
    let platform = sender.platform();
    let deadline = Instant::now() + policy.budget;
    let limits = sender.limits(reply);
    let mut attempts = 0;
    loop {
        if let (Some(limiter), false) = (limiter, limits.is_empty()) {
            let taken = tokio::select! {
                taken = limiter.take(&limits, deadline) => taken,
                _ = shutdown.cancelled() => {
                    return Delivery::GaveUp {
                        attempts,
                        reason: "waiting for a rate limit; shutting down".into(),
                    }
                }
            };
            match taken {
                Ok(waited) if !waited.is_zero() => {
                    metrics::histogram!("botline_egress_rate_limit_wait_seconds", "platform" => platform)
                        .record(waited.as_secs_f64());
                }
                Ok(_) => {}
                Err(Refusal::TooLate { wait }) => {
                    return Delivery::GaveUp {
                        attempts,
                        reason: format!(
                            "rate limited: the next free slot, in {wait:?}, is past the send budget of {:?}",
                            policy.budget
                        ),
                    }
                }
                Err(Refusal::Redis(error)) => {
                    return Delivery::GaveUp {
                        attempts,
                        reason: format!("taking a rate limit slot failed: {error}"),
                    }
                }
            }
        }
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt = match tokio::time::timeout(remaining, sender.attempt(reply)).await {
            Ok(attempt) => attempt,
            Err(_) => {
                count_response(platform, "timeout".into());
                return Delivery::GaveUp {
                    attempts,
                    reason: format!(
                        "send budget of {:?} spent during attempt {attempts}",
                        policy.budget
                    ),
                };
            }
        };
        if let Some(response) = attempt.response {
            count_response(platform, response);
        }
        let (asked_wait, reason) = match attempt.verdict {
            Verdict::Delivered {
                platform_message_id,
                writes,
            } => {
                return Delivery::Delivered {
                    attempts,
                    platform_message_id,
                    writes,
                }
            }
            Verdict::Permanent(reason) => return Delivery::Refused { attempts, reason },
            Verdict::RetryAfter { wait, reason } => (wait, reason),
        };
        if attempts >= policy.max_attempts {
            return Delivery::GaveUp {
                attempts,
                reason: format!("{reason} (after {attempts} attempts)"),
            };
        }
        let pause = asked_wait.unwrap_or_else(|| {
            backoff::full_jitter(
                policy.backoff_base,
                policy.backoff_cap,
                attempts,
                &mut rand::rng(),
            )
        });
        if Instant::now() + pause >= deadline {
            return Delivery::GaveUp {
                attempts,
                reason: format!(
                    "{reason} (after {attempts} attempts; waiting {pause:?} more would pass the send budget of {:?})",
                    policy.budget
                ),
            };
        }
        debug!(message = "attempt failed; retrying", platform, attempts, wait = ?pause, %reason);
        metrics::counter!("botline_egress_retries_total", "platform" => platform).increment(1);
        let waiting = Instant::now();
        let interrupted = tokio::select! {
            _ = tokio::time::sleep(pause) => false,
            _ = shutdown.cancelled() => true,
        };
        if asked_wait.is_some() {
            metrics::histogram!("botline_egress_rate_limit_wait_seconds", "platform" => platform)
                .record(waiting.elapsed().as_secs_f64());
        }
        if interrupted {
            return Delivery::GaveUp {
                attempts,
                reason: format!("{reason} (after {attempts} attempts; shutting down)"),
            };
        }
    }
}

/// Counts one platform answer in `botline_egress_platform_responses_total`.
pub(crate) fn count_response(platform: &'static str, status: String) {
    metrics::counter!("botline_egress_platform_responses_total", "platform" => platform, "status" => status)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::senders::Attempt;
    use botline_shared::message::{Chat, ChatKind, Priority};
    use futures_util::future::BoxFuture;
    use std::sync::Mutex;

    /// Answers from a script, one per attempt, each after `takes`.
    struct Scripted {
        answers: Mutex<Vec<(Option<u64>, &'static str)>>,
        takes: Duration,
        calls: Mutex<Vec<Instant>>,
    }

    impl Sender for Scripted {
        fn platform(&self) -> &'static str {
            "test"
        }
        fn attempt<'a>(&'a self, _reply: &'a Reply) -> BoxFuture<'a, Attempt> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(Instant::now());
                tokio::time::sleep(self.takes).await;
                let (wait, kind) = self.answers.lock().unwrap().remove(0);
                let verdict = match kind {
                    "ok" => Verdict::Delivered {
                        platform_message_id: None,
                        writes: Vec::new(),
                    },
                    "no" => Verdict::Permanent("no".into()),
                    _ => Verdict::RetryAfter {
                        wait: wait.map(Duration::from_secs),
                        reason: kind.into(),
                    },
                };
                Attempt {
                    response: None,
                    verdict,
                }
            })
        }
    }

    fn reply() -> Reply {
        Reply {
            id: "r".into(),
            in_reply_to: "m".into(),
            platform: "test".into(),
            bot: "b".into(),
            chat: Chat {
                id: "c".into(),
                kind: ChatKind::Direct,
            },
            thread: None,
            reply_to: None,
            text: "t".into(),
            mentions: vec![],
            attachments: vec![],
            platform_data: Default::default(),
            priority: Priority::Normal,
            received_at_ms: 0,
            created_at_ms: 0,
            trace_id: "x".into(),
            replay: false,
        }
    }

    /// Run `answers` (retry-after seconds, kind) against a policy of
    /// `max_attempts` and `budget_secs`; the result and the call times in
    /// seconds since the start.
    async fn check(
        answers: &[(Option<u64>, &'static str)],
        takes_ms: u64,
        max_attempts: u32,
        budget_secs: u64,
        expected: &str,
        expected_calls: &[u64],
    ) {
        let sender = Scripted {
            answers: Mutex::new(answers.to_vec()),
            takes: Duration::from_millis(takes_ms),
            calls: Mutex::new(Vec::new()),
        };
        let policy = RetryPolicy {
            max_attempts,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(1),
            budget: Duration::from_secs(budget_secs),
        };
        let start = Instant::now();
        let got = match deliver(&sender, &reply(), &policy, None, &CancellationToken::new()).await {
            Delivery::Delivered { attempts, .. } => format!("delivered after {attempts}"),
            Delivery::Refused { attempts, reason } => format!("refused after {attempts}: {reason}"),
            Delivery::GaveUp { attempts, reason } => format!("gave up after {attempts}: {reason}"),
        };
        assert_eq!(got, expected, "{answers:?}");
        let calls: Vec<u64> = sender
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|at| (*at - start).as_secs())
            .collect();
        assert_eq!(calls, expected_calls, "{answers:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_success_refusal_count_or_budget() {
        check(&[(None, "ok")], 0, 3, 10, "delivered after 1", &[0]).await;
        check(
            &[(None, "5xx"), (None, "ok")],
            0,
            3,
            10,
            "delivered after 2",
            &[0, 0],
        )
        .await;
        check(&[(None, "no")], 0, 3, 10, "refused after 1: no", &[0]).await;
        check(
            &[(None, "5xx"), (None, "no")],
            0,
            3,
            10,
            "refused after 2: no",
            &[0, 0],
        )
        .await;
        check(
            &[(None, "5xx"), (None, "5xx"), (None, "5xx")],
            0,
            3,
            10,
            "gave up after 3: 5xx (after 3 attempts)",
            &[0, 0, 0],
        )
        .await;
        check(
            &[(Some(2), "429"), (None, "ok")],
            0,
            3,
            10,
            "delivered after 2",
            &[0, 2],
        )
        .await;
        check(
            &[(Some(2), "429"), (Some(3), "429"), (None, "ok")],
            0,
            5,
            10,
            "delivered after 3",
            &[0, 2, 5],
        )
        .await;
        check(
            &[(Some(30), "429")],
            0,
            5,
            10,
            "gave up after 1: 429 (after 1 attempts; waiting 30s more would pass the send budget of 10s)",
            &[0],
        )
        .await;
        check(
            &[(None, "slow"), (None, "slow")],
            6_000,
            5,
            10,
            "gave up after 2: send budget of 10s spent during attempt 2",
            &[0, 6],
        )
        .await;
    }
}
