//! The egress stage: how a batch of replies becomes outcomes for the runner.
//!
//! Per batch (one partition's; the runner hands each chat's replies out one
//! at a time, in order, and at most `max_in_flight` at once), one script
//! checks that this consumer still owns the partition, looks at every
//! reply's `sent:<id>` key (a redelivered reply already out is acknowledged
//! and not sent again) and takes its `sending:<id>` lock (`SET NX PX`), so
//! a consumer that lost the partition while stalled does not send it too.
//! Then each reply is sent. A delivered reply's outcome writes the
//! sender's writes, `sent:<id>` and a receipt to the partition's
//! `delivered`, all with the acknowledgement; the lock of a reply not
//! delivered is released at once.

use crate::config::EgressSettings;
use crate::delivery::{self, Delivery, RetryPolicy};
use crate::limits::Limiter;
use crate::senders::Sender;
use botline_shared::message::{Receipt, Reply};
use botline_shared::runner::{Envelope, Fence, Outcome, Plumbing, Stage, Write};
use botline_shared::streams::{group, Partition, Streams};
use botline_shared::{now_ms, Error};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

/// `egress/lua/take_locks.lua`: a batch's sending locks, fenced by the partition's owner.
static TAKE_LOCKS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/take_locks.lua")));

/// `egress/lua/release_locks.lua`: the locks still ours, deleted.
static RELEASE_LOCKS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/release_locks.lua")));

/// How much longer than the send budget a sending lock lives: the time to
/// write the outcome after the last attempt.
const LOCK_MARGIN: Duration = Duration::from_secs(5);

pub struct EgressStage {
    /// The enabled senders, in the order their streams are read.
    senders: Vec<Arc<dyn Sender>>,
    settings: EgressSettings,
    policy: RetryPolicy,
    /// The platforms' rate limits, shared with every replica.
    limiter: Limiter,
    /// For the sending locks (the runner makes the ack).
    commands: botline_shared::redis_conn::Connection,
    streams: Streams,
    delivered_max_len: usize,
    /// This process's value in the locks it holds, so it releases only its own.
    lock_token: String,
    /// Cuts retry waits short so the batch in hand finishes quickly on shutdown.
    shutdown: CancellationToken,
}

/// Whether a reply may be sent now.
pub enum Lock {
    Taken,
    AlreadySent,
    Held,
}

impl EgressStage {
    pub fn new(
        settings: EgressSettings,
        senders: Vec<Arc<dyn Sender>>,
        plumbing: &Plumbing,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        if senders.is_empty() {
            return Err(Error::config(
                "egress",
                "no sender is enabled (egress.web.enabled is false and egress.webhook.url is empty)",
            ));
        }
        let streams = plumbing.streams.clone();
        Ok(EgressStage {
            senders,
            policy: RetryPolicy {
                max_attempts: settings.max_attempts,
                backoff_base: settings.backoff_base(),
                backoff_cap: settings.backoff_cap(),
                budget: settings.send_budget(),
            },
            limiter: Limiter::new(plumbing.pool.clone(), streams.clone()),
            settings,
            commands: plumbing.commands.clone(),
            streams,
            delivered_max_len: plumbing.stream_settings.delivered_max_len,
            lock_token: hex::encode(rand::random::<[u8; 16]>()),
            shutdown,
        })
    }

    /// The sender of an `out:<platform>` stream.
    fn sender(&self, stream: &str) -> Option<&Arc<dyn Sender>> {
        let platform = self.streams.short(stream).0.strip_prefix("out:")?;
        self.senders
            .iter()
            .find(|sender| sender.platform() == platform)
    }

    /// Each reply's lock, taken unless the reply is already sent, in one
    /// script that first checks the partition is still ours; by reply id.
    async fn take_locks(
        &self,
        fence: &Fence,
        batch: &[Envelope<Reply>],
    ) -> Result<HashMap<String, Lock>, String> {
        let lock_ms = (self.settings.send_budget() + LOCK_MARGIN).as_millis() as u64;
        let mut invocation = TAKE_LOCKS.prepare_invoke();
        invocation.key(&fence.owner_key);
        for envelope in batch {
            invocation
                .key(self.streams.sent(envelope.partition, &envelope.record.id))
                .key(
                    self.streams
                        .sending(envelope.partition, &envelope.record.id),
                );
        }
        invocation
            .arg(&fence.consumer)
            .arg(&self.lock_token)
            .arg(lock_ms);
        for envelope in batch {
            let locks = self
                .sender(&envelope.stream)
                .is_some_and(|sender| !sender.delivers_within_redis());
            invocation.arg(if locks { "1" } else { "0" });
        }
        let mut connection = self.commands.clone();
        let taken: redis::Value = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|error| format!("could not take the sending locks: {error}"))?;
        let redis::Value::Array(taken) = taken else {
            return Err("this consumer no longer owns the partition".into());
        };
        Ok(batch
            .iter()
            .zip(taken)
            .map(|(envelope, taken)| {
                let lock = match taken {
                    redis::Value::Int(2) => Lock::AlreadySent,
                    redis::Value::Int(1) => Lock::Taken,
                    _ => Lock::Held,
                };
                (envelope.record.id.clone(), lock)
            })
            .collect())
    }

    async fn release_locks(&self, replies: &[&Envelope<Reply>]) {
        if replies.is_empty() {
            return;
        }
        let released: Result<i64, Error> = async {
            let mut invocation = RELEASE_LOCKS.prepare_invoke();
            for envelope in replies {
                invocation.key(
                    self.streams
                        .sending(envelope.partition, &envelope.record.id),
                );
            }
            invocation.arg(&self.lock_token);
            let mut connection = self.commands.clone();
            Ok(invocation.invoke_async(&mut connection).await?)
        }
        .await;
        if let Err(error) = released {
            warn!(message = "could not release sending locks; they expire by themselves", %error);
        }
    }

    async fn deliver_one(&self, envelope: &Envelope<Reply>, lock: &Lock) -> Outcome {
        let reply = &envelope.record;
        let Some(sender) = self.sender(&envelope.stream) else {
            return Outcome::Dead(format!("no sender reads {}", envelope.stream));
        };
        let platform = sender.platform();
        let span = info_span!("reply", reply_id = %reply.id, trace_id = %reply.trace_id, platform, chat = %reply.chat.id);
        async move {
            match lock {
                Lock::AlreadySent => return self.skip_duplicate(platform),
                Lock::Held => {
                    debug!(message = "another consumer is sending this reply");
                    return Outcome::Retry("another consumer is sending".into());
                }
                Lock::Taken => {}
            }
            if reply.replay && !self.settings.send_replays {
                debug!(message = "replayed reply acknowledged unsent");
                metrics::counter!("botline_egress_replays_skipped_total", "platform" => platform)
                    .increment(1);
                return Outcome::Done(Vec::new());
            }
            let delivery =
                delivery::deliver(
                    sender.as_ref(),
                    reply,
                    &self.policy,
                    Some(&self.limiter),
                    &self.shutdown,
                ).await;
            match delivery {
                Delivery::Delivered {
                    attempts,
                    platform_message_id,
                    writes,
                } => self.delivered(
                    envelope.partition,
                    reply,
                    platform,
                    attempts,
                    platform_message_id,
                    writes,
                ),
                Delivery::Refused { attempts, reason } => {
                    warn!(message = "reply refused by the platform", attempts, %reason);
                    Outcome::Dead(reason)
                }
                Delivery::GaveUp { attempts, reason } => {
                    warn!(message = "reply not delivered; left pending for a later try", attempts, %reason);
                    Outcome::Retry(reason)
                }
            }
        }
        .instrument(span)
        .await
    }

    fn skip_duplicate(&self, platform: &'static str) -> Outcome {
        debug!(message = "reply already sent; acknowledged without sending");
        metrics::counter!("botline_egress_duplicates_skipped_total", "platform" => platform)
            .increment(1);
        Outcome::Done(Vec::new())
    }

    /// The writes of a delivered reply: the sender's, `sent:<id>`, and a receipt.
    fn delivered(
        &self,
        partition: Partition,
        reply: &Reply,
        platform: &'static str,
        attempts: u32,
        platform_message_id: Option<String>,
        mut writes: Vec<Write>,
    ) -> Outcome {
        let now = now_ms();
        let latency_ms = now - reply.received_at_ms;
        metrics::histogram!("botline_egress_end_to_end_seconds", "platform" => platform)
            .record(latency_ms.max(0) as f64 / 1000.0);
        debug!(message = "reply delivered", attempts, latency_ms);
        writes.push(Write::Set {
            key: self.streams.sent(partition, &reply.id),
            value: "1".into(),
            expire: self.settings.sent_ttl(),
        });
        let receipt = Receipt {
            reply_id: reply.id.clone(),
            message_id: reply.in_reply_to.clone(),
            platform: platform.to_string(),
            chat: reply.chat.id.clone(),
            latency_ms,
            attempts,
            platform_message_id,
            delivered_at_ms: now,
            trace_id: reply.trace_id.clone(),
        };
        let mut add = Write::add(self.streams.delivered(partition), &receipt);
        if let Write::Add { cap, .. } = &mut add {
            *cap = Some(self.delivered_max_len);
        }
        writes.push(add);
        Outcome::Done(writes)
    }
}

impl Stage for EgressStage {
    type In = Reply;
    /// Each reply's sending lock by reply id, or why none could be taken.
    type Prepared = Result<HashMap<String, Lock>, String>;

    fn group(&self) -> &'static str {
        group::EGRESS
    }

    fn inputs(&self, streams: &Streams, p: Partition) -> Vec<String> {
        self.senders
            .iter()
            .map(|sender| streams.outbound(p, sender.platform()))
            .collect()
    }

    fn chat(&self, reply: &Reply) -> String {
        format!("{}:{}", reply.platform, reply.chat.id)
    }

    /// A reply sent through a platform's API is acknowledged (`sent:`
    /// written) as soon as it is out, before the chat's next one goes; one
    /// delivered inside Redis (the web chat) is written by the
    /// acknowledgement itself, so a chat's queued replies go together.
    fn max_run(&self, head: &Reply) -> usize {
        let in_redis = self
            .senders
            .iter()
            .find(|sender| sender.platform() == head.platform)
            .is_some_and(|sender| sender.delivers_within_redis());
        if in_redis {
            usize::MAX
        } else {
            1
        }
    }

    fn max_in_flight(&self) -> usize {
        self.settings.max_in_flight
    }

    async fn prepare(&self, fence: &Fence, batch: &[Envelope<Reply>]) -> Self::Prepared {
        self.take_locks(fence, batch).await.inspect_err(|reason| {
            warn!(message = "could not take the sending locks", %reason);
        })
    }

    async fn handle_chat(&self, locks: &Self::Prepared, run: &[Envelope<Reply>]) -> Vec<Outcome> {
        let locks = match locks {
            Ok(locks) => locks,
            Err(reason) => return vec![Outcome::Retry(reason.clone()); run.len()],
        };
        let mut outcomes = Vec::with_capacity(run.len());
        let mut unsent = Vec::new();
        for envelope in run {
            let lock = locks.get(&envelope.record.id).unwrap_or(&Lock::Held);
            let outcome = match outcomes.last() {
                Some(Outcome::Retry(_)) => {
                    Outcome::Retry("an earlier reply to this chat is not delivered yet".into())
                }
                _ => self.deliver_one(envelope, lock).await,
            };
            if matches!(lock, Lock::Taken)
                && !matches!(&outcome, Outcome::Done(writes) if !writes.is_empty())
            {
                unsent.push(envelope);
            }
            outcomes.push(outcome);
        }
        // Let another try start at once rather than when the lock expires.
        self.release_locks(&unsent).await;
        outcomes
    }
}
