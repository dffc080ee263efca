//! The egress stage: how a batch of replies becomes outcomes for the runner.
//!
//! Per batch: one `MGET` of the replies' `sent:<id>` keys (a redelivered
//! reply already out is acknowledged and not sent again); then each chat's
//! replies one after another in entry order, different chats at once, at
//! most `max_in_flight` replies being sent. Before sending, a reply's
//! `sending:<id>` lock is taken (`SET NX PX`), so a consumer that took the
//! entry over from a slow one does not send it too. A delivered reply's
//! outcome writes the sender's writes, `sent:<id>` and a receipt to
//! `delivered`, all with the acknowledgement.

use crate::config::EgressSettings;
use crate::delivery::{self, Delivery, RetryPolicy};
use crate::senders::Sender;
use botline_shared::message::{Receipt, Reply};
use botline_shared::redis_conn::Pool;
use botline_shared::runner::{Envelope, Input, Outcome, Plumbing, Stage, Write};
use botline_shared::streams::{group, Streams};
use botline_shared::{now_ms, Error};
use futures_util::future::join_all;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

/// Takes a reply's sending lock unless it is already sent.
/// KEYS: sent key, sending key. ARGV: token, lock ms. Returns 2 sent, 1 taken, 0 held.
const TAKE_LOCK_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 2
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"#;

/// Deletes a sending lock only if it is still ours.
const RELEASE_LOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// How much longer than the send budget a sending lock lives: the time to
/// write the outcome after the last attempt.
const LOCK_MARGIN: Duration = Duration::from_secs(5);

pub struct EgressStage {
    /// The sender of each input stream, in the order they are read.
    senders: Vec<(String, Arc<dyn Sender>)>,
    settings: EgressSettings,
    policy: RetryPolicy,
    /// For the `sent` check and the sending locks, never for the ack.
    pool: Pool,
    streams: Streams,
    delivered_max_len: usize,
    /// This process's value in the locks it holds, so it releases only its own.
    lock_token: String,
    in_flight: Arc<Semaphore>,
    /// Cuts retry waits short so the batch in hand finishes quickly on shutdown.
    shutdown: CancellationToken,
}

/// Whether a reply may be sent now.
enum Lock {
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
            senders: senders
                .into_iter()
                .map(|sender| (streams.outbound(sender.platform()), sender))
                .collect(),
            policy: RetryPolicy {
                max_attempts: settings.max_attempts,
                backoff_base: settings.backoff_base(),
                backoff_cap: settings.backoff_cap(),
                budget: settings.send_budget(),
            },
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            pool: plumbing.pool.clone(),
            streams,
            delivered_max_len: plumbing.stream_settings.delivered_max_len,
            lock_token: hex::encode(rand::random::<[u8; 16]>()),
            shutdown,
        })
    }

    fn sender(&self, stream: &str) -> Option<&Arc<dyn Sender>> {
        self.senders
            .iter()
            .find(|(key, _)| key == stream)
            .map(|(_, sender)| sender)
    }

    async fn handle_batch(&self, batch: Vec<Envelope<Reply>>) -> Vec<Outcome> {
        let sent = match self.already_sent(&batch).await {
            Ok(sent) => sent,
            Err(error) => {
                warn!(message = "could not check which replies are sent", %error);
                let reason = format!("could not check sent keys: {error}");
                return batch
                    .iter()
                    .map(|_| Outcome::Retry(reason.clone()))
                    .collect();
            }
        };
        // Entry indexes per chat, in entry order.
        let mut chats: Vec<Vec<usize>> = Vec::new();
        let mut chat_of: HashMap<(&str, &str), usize> = HashMap::new();
        for (index, envelope) in batch.iter().enumerate() {
            let key = (envelope.stream.as_str(), envelope.record.chat.id.as_str());
            let chat = *chat_of.entry(key).or_insert_with(|| {
                chats.push(Vec::new());
                chats.len() - 1
            });
            chats[chat].push(index);
        }
        let (batch, sent) = (&batch, &sent);
        let per_chat = chats.into_iter().map(|indexes| async move {
            let mut outcomes = Vec::with_capacity(indexes.len());
            // Once a reply of this chat is not out, the later ones wait for it.
            let mut waiting_for: Option<&str> = None;
            for index in indexes {
                let envelope = &batch[index];
                let outcome = match waiting_for {
                    Some(earlier) => Outcome::Retry(format!(
                        "an earlier reply to this chat ({earlier}) is not delivered yet"
                    )),
                    None => self.deliver_one(envelope, sent[index]).await,
                };
                if matches!(outcome, Outcome::Retry(_)) && waiting_for.is_none() {
                    waiting_for = Some(envelope.record.id.as_str());
                }
                outcomes.push((index, outcome));
            }
            outcomes
        });
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        for (index, outcome) in join_all(per_chat).await.into_iter().flatten() {
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every reply has an outcome"))
            .collect()
    }

    /// Whether each reply's `sent:<id>` key exists.
    async fn already_sent(&self, batch: &[Envelope<Reply>]) -> Result<Vec<bool>, Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = batch
            .iter()
            .map(|envelope| self.streams.sent(&envelope.record.id))
            .collect();
        let mut connection = self.pool.get().await?;
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut connection)
            .await?;
        Ok(values.into_iter().map(|value| value.is_some()).collect())
    }

    async fn deliver_one(&self, envelope: &Envelope<Reply>, already_sent: bool) -> Outcome {
        let reply = &envelope.record;
        let Some(sender) = self.sender(&envelope.stream) else {
            return Outcome::Dead(format!("no sender reads {}", envelope.stream));
        };
        let platform = sender.platform();
        let span = info_span!("reply", reply_id = %reply.id, trace_id = %reply.trace_id, platform, chat = %reply.chat.id);
        async move {
            if reply.replay && !self.settings.send_replays {
                debug!(message = "replayed reply acknowledged unsent");
                metrics::counter!("botline_egress_replays_skipped_total", "platform" => platform)
                    .increment(1);
                return Outcome::Done(Vec::new());
            }
            if already_sent {
                return self.skip_duplicate(platform);
            }
            let _permit = self
                .in_flight
                .acquire()
                .await
                .expect("the in-flight semaphore is never closed");
            match self.take_lock(reply).await {
                Ok(Lock::Taken) => {}
                Ok(Lock::AlreadySent) => return self.skip_duplicate(platform),
                Ok(Lock::Held) => {
                    debug!(message = "another consumer is sending this reply");
                    return Outcome::Retry("another consumer is sending".into());
                }
                Err(error) => {
                    warn!(message = "could not take the sending lock", %error);
                    return Outcome::Retry(format!("could not take the sending lock: {error}"));
                }
            }
            let delivery =
                delivery::deliver(sender.as_ref(), reply, &self.policy, &self.shutdown).await;
            match delivery {
                Delivery::Delivered {
                    attempts,
                    platform_message_id,
                    writes,
                } => self.delivered(reply, platform, attempts, platform_message_id, writes),
                Delivery::Refused { attempts, reason } => {
                    self.release_lock(reply).await;
                    warn!(message = "reply refused by the platform", attempts, %reason);
                    Outcome::Dead(reason)
                }
                Delivery::GaveUp { attempts, reason } => {
                    self.release_lock(reply).await;
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
        info!(message = "reply delivered", attempts, latency_ms);
        writes.push(Write::Set {
            key: self.streams.sent(&reply.id),
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
        let mut add = Write::add(self.streams.delivered(), &receipt);
        if let Write::Add { cap, .. } = &mut add {
            *cap = Some(self.delivered_max_len);
        }
        writes.push(add);
        Outcome::Done(writes)
    }

    async fn take_lock(&self, reply: &Reply) -> Result<Lock, Error> {
        let lock_ms = (self.settings.send_budget() + LOCK_MARGIN).as_millis() as u64;
        let mut connection = self.pool.get().await?;
        let taken: i64 = redis::Script::new(TAKE_LOCK_SCRIPT)
            .key(self.streams.sent(&reply.id))
            .key(self.streams.sending(&reply.id))
            .arg(&self.lock_token)
            .arg(lock_ms)
            .invoke_async(&mut connection)
            .await?;
        Ok(match taken {
            2 => Lock::AlreadySent,
            1 => Lock::Taken,
            _ => Lock::Held,
        })
    }

    /// Let another try start at once rather than when the lock expires.
    async fn release_lock(&self, reply: &Reply) {
        let released: Result<i64, Error> = async {
            let mut connection = self.pool.get().await?;
            Ok(redis::Script::new(RELEASE_LOCK_SCRIPT)
                .key(self.streams.sending(&reply.id))
                .arg(&self.lock_token)
                .invoke_async(&mut connection)
                .await?)
        }
        .await;
        if let Err(error) = released {
            warn!(message = "could not release the sending lock; it expires by itself", %error);
        }
    }
}

impl Stage for EgressStage {
    type In = Reply;

    fn group(&self) -> &'static str {
        group::EGRESS
    }

    fn inputs(&self) -> Vec<Input> {
        self.senders
            .iter()
            .map(|(stream, _)| Input {
                stream: stream.clone(),
                weight: 1,
            })
            .collect()
    }

    async fn handle(&self, batch: Vec<Envelope<Reply>>) -> Vec<Outcome> {
        self.handle_batch(batch).await
    }
}
