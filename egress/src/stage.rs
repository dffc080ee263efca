//! The egress stage: how a batch of replies becomes outcomes for the runner.
//!
//! Per batch, one script looks at every reply's `sent:<id>` key (a
//! redelivered reply already out is acknowledged and not sent again) and
//! takes its `sending:<id>` lock (`SET NX PX`), so a consumer that took the
//! entry over from a slow one does not send it too. Then each chat's
//! replies go one after another in entry order, different chats at once, at
//! most `max_in_flight` replies being sent. A delivered reply's outcome
//! writes the sender's writes, `sent:<id>` and a receipt to `delivered`, all
//! with the acknowledgement; the locks of replies not delivered are released
//! together at the end of the batch.

use crate::config::EgressSettings;
use crate::delivery::{self, Delivery, RetryPolicy};
use crate::limits::Limiter;
use crate::senders::Sender;
use botline_shared::message::{Receipt, Reply};
use botline_shared::order::{self, ChatOrder, ChatTurn, Turns};
use botline_shared::runner::{Envelope, Input, Outcome, Plumbing, Stage, Write};
use botline_shared::streams::{group, Streams};
use botline_shared::{now_ms, Error};
use futures_util::future::join_all;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

/// Takes each reply's sending lock unless it is already sent.
/// KEYS: sent key, sending key, for each reply. ARGV: token, lock ms, then
/// per reply 1 (lock) or 0 (only check `sent`).
/// Returns per reply 2 sent, 1 taken, 0 held.
static TAKE_LOCKS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local taken = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    taken[#taken + 1] = 2
  elseif ARGV[2 + (i + 1) / 2] == '0' or redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    taken[#taken + 1] = 1
  else
    taken[#taken + 1] = 0
  end
end
return taken
"#,
    )
});

/// Deletes each sending lock in KEYS that is still ours (ARGV[1]).
static RELEASE_LOCKS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    released = released + redis.call('DEL', key)
  end
end
return released
"#,
    )
});

/// How much longer than the send budget a sending lock lives: the time to
/// write the outcome after the last attempt.
const LOCK_MARGIN: Duration = Duration::from_secs(5);

pub struct EgressStage {
    /// The sender of each input stream, in the order they are read.
    senders: Vec<(String, Arc<dyn Sender>)>,
    settings: EgressSettings,
    policy: RetryPolicy,
    /// The platforms' rate limits, shared with every replica.
    limiter: Limiter,
    /// Each chat's replies in the order respond wrote them, across egress consumers.
    order: ChatOrder,
    /// For the sending locks (the runner makes the ack).
    commands: redis::aio::ConnectionManager,
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
            limiter: Limiter::new(plumbing.pool.clone(), streams.clone()),
            order: ChatOrder::new(plumbing.pool.clone(), group::EGRESS, &plumbing.runner),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            commands: plumbing.commands.clone(),
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
        let turns: Vec<ChatTurn> = chats
            .iter()
            .map(|indexes| ChatTurn {
                key: self.order_key(&batch[indexes[0]].record),
                members: indexes
                    .iter()
                    .map(|index| batch[*index].record.id.clone())
                    .collect(),
            })
            .collect();
        let looked = match self.order.turns(&turns).await {
            Ok(looked) => looked,
            Err(error) => {
                let reason = format!("reading chat order: {error}");
                return batch
                    .iter()
                    .map(|_| Outcome::Retry(reason.clone()))
                    .collect();
            }
        };
        let batch = &batch;
        let per_chat = chats
            .into_iter()
            .zip(looked)
            .map(|(indexes, turns)| self.handle_chat(batch, indexes, turns));
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        for (index, outcome) in join_all(per_chat).await.into_iter().flatten() {
            outcomes[index] = Some(match outcome {
                Outcome::Done(mut writes) => {
                    writes.push(self.unorder(&batch[index].record));
                    Outcome::Done(writes)
                }
                other => other,
            });
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every reply has an outcome"))
            .collect()
    }

    /// One chat of a batch: the sending locks of the replies whose turn it
    /// is, and those replies sent one after another. Outcomes by batch index.
    async fn handle_chat(
        &self,
        batch: &[Envelope<Reply>],
        indexes: Vec<usize>,
        turns: Turns,
    ) -> Vec<(usize, Outcome)> {
        let retry_all = |reason: String| {
            indexes
                .iter()
                .map(|index| (*index, Outcome::Retry(reason.clone())))
                .collect::<Vec<_>>()
        };
        let ready: Vec<&Envelope<Reply>> =
            turns.ready.iter().map(|i| &batch[indexes[*i]]).collect();
        let locks = match self.take_locks(&ready).await {
            Ok(locks) => locks,
            Err(error) => {
                warn!(message = "could not take the sending locks", %error);
                return retry_all(format!("could not take the sending locks: {error}"));
            }
        };
        let mut outcomes = Vec::with_capacity(indexes.len());
        let mut unsent = Vec::new();
        // Once a reply of this chat is not out, the later ones wait for it.
        let mut waiting_for: Option<&str> = None;
        for (envelope, (i, lock)) in ready.iter().zip(turns.ready.iter().zip(&locks)) {
            let outcome = match waiting_for {
                Some(earlier) => Outcome::Retry(format!(
                    "an earlier reply to this chat ({earlier}) is not delivered yet"
                )),
                None => self.deliver_one(envelope, lock).await,
            };
            if matches!(outcome, Outcome::Retry(_)) && waiting_for.is_none() {
                waiting_for = Some(envelope.record.id.as_str());
            }
            if matches!(lock, Lock::Taken)
                && !matches!(&outcome, Outcome::Done(writes) if !writes.is_empty())
            {
                unsent.push(&envelope.record);
            }
            outcomes.push((indexes[*i], outcome));
        }
        // Let another try start at once rather than when the lock expires.
        self.release_locks(&unsent).await;
        for later in &turns.later {
            outcomes.push((indexes[*later], self.order.not_yet(&turns)));
        }
        outcomes
    }

    /// The reply's turn in its chat is over.
    fn unorder(&self, reply: &Reply) -> Write {
        Write::Unorder {
            order: self.order_key(reply),
            member: reply.id.clone(),
        }
    }

    fn order_key(&self, reply: &Reply) -> String {
        self.streams
            .chat_order(order::LANE_OUT, &reply.platform, &reply.chat.id)
    }

    /// Each reply's lock, taken unless the reply is already sent, in one script.
    async fn take_locks(&self, batch: &[&Envelope<Reply>]) -> Result<Vec<Lock>, Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let lock_ms = (self.settings.send_budget() + LOCK_MARGIN).as_millis() as u64;
        let mut invocation = TAKE_LOCKS.prepare_invoke();
        for envelope in batch {
            invocation
                .key(self.streams.sent(&envelope.record.id))
                .key(self.streams.sending(&envelope.record.id));
        }
        invocation.arg(&self.lock_token).arg(lock_ms);
        for envelope in batch {
            let locks = self
                .sender(&envelope.stream)
                .is_some_and(|sender| !sender.delivers_within_redis());
            invocation.arg(if locks { "1" } else { "0" });
        }
        let mut connection = self.commands.clone();
        let taken: Vec<i64> = invocation.invoke_async(&mut connection).await?;
        Ok(taken
            .into_iter()
            .map(|taken| match taken {
                2 => Lock::AlreadySent,
                1 => Lock::Taken,
                _ => Lock::Held,
            })
            .collect())
    }

    async fn release_locks(&self, replies: &[&Reply]) {
        if replies.is_empty() {
            return;
        }
        let released: Result<i64, Error> = async {
            let mut invocation = RELEASE_LOCKS.prepare_invoke();
            for reply in replies {
                invocation.key(self.streams.sending(&reply.id));
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
            let _permit = self
                .in_flight
                .acquire()
                .await
                .expect("the in-flight semaphore is never closed");
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
                } => self.delivered(reply, platform, attempts, platform_message_id, writes),
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

    fn release(&self, reply: &Reply) -> Vec<Write> {
        vec![self.unorder(reply)]
    }
}
