//! `transport = "ws"`: `send_msg` over the WebSocket ingest holds for the
//! bot (OneBot's forward or reverse WebSocket), relayed through Redis
//! ([`crate::senders::relay`]): the action frame
//! `{"action": "send_msg", "params": …, "echo": "<reply id>.<ulid>"}` (a new
//! echo per attempt) waits up to `pickup_timeout_ms` for the ingest replica
//! holding the bot's connection, which writes it and reports the answer
//! that comes back with its echo, within `timeout_ms`.
//!
//! The answer is judged as the HTTP API's body is (`retcode` 0 or 1
//! delivered, anything else permanent). A frame no replica took in time
//! (none connected) was never sent: retried with backoff. A frame sent
//! whose answer was lost (the connection closed first, the holder died) is
//! not sent again: QQ is better off without a duplicate, and the dead
//! letter says to requeue it if it did not arrive.

use super::super::relay::{Relay, Sent};
use super::super::{Attempt, Kit, Verdict};
use super::{judge_answer, OneBotSettings, PLATFORM};
use botline_shared::message::Reply;
use botline_shared::relay;
use botline_shared::Error;
use serde_json::{json, Value};
use std::time::Duration;

pub struct Socket {
    relay: Relay,
}

impl Socket {
    pub fn new(kit: &Kit, settings: &OneBotSettings) -> Result<Socket, Error> {
        let window = relay::WINDOW.as_millis() as u64;
        if !(1..=window).contains(&settings.pickup_timeout_ms) {
            return Err(Error::config(
                "egress.platforms.onebot.pickup_timeout_ms",
                format!("must be between 1 and {window} (frames older are trimmed)"),
            ));
        }
        Ok(Socket {
            relay: Relay::new(
                kit.pool.clone(),
                kit.streams.clone(),
                PLATFORM.name,
                Duration::from_millis(settings.pickup_timeout_ms),
                Duration::from_millis(settings.timeout_ms),
            ),
        })
    }

    /// One attempt at `reply`, whose `send_msg` parameters are `params`.
    pub async fn attempt(&self, reply: &Reply, params: Value) -> Attempt {
        let frame = |echo: &str| {
            json!({ "action": "send_msg", "params": params, "echo": echo }).to_string()
        };
        let (response, verdict) = match self.relay.send(&reply.bot, &reply.id, frame).await {
            Ok(Sent::Answered(answer)) => {
                let verdict = judge_answer(&answer);
                let ok = matches!(verdict, Verdict::Delivered { .. });
                (if ok { "ok" } else { "failed" }, verdict)
            }
            Ok(Sent::NotTaken) => (
                "timeout",
                Verdict::RetryAfter {
                    wait: None,
                    reason: format!(
                        "onebot: no ingest replica holding bot {}'s connection took send_msg within {} ms; not sent",
                        reply.bot,
                        self.relay.pickup.as_millis()
                    ),
                },
            ),
            Ok(Sent::Unconfirmed(why)) => (
                "unconfirmed",
                Verdict::Permanent(format!(
                    "onebot send_msg went out over bot {}'s connection but its answer was lost ({why}); \
                     not sent again, to avoid a duplicate: requeue it if it did not arrive",
                    reply.bot
                )),
            ),
            Err(error) => {
                return Attempt {
                    response: None,
                    verdict: Verdict::RetryAfter {
                        wait: None,
                        reason: format!("onebot: relaying send_msg through Redis failed: {error}"),
                    },
                }
            }
        };
        Attempt {
            response: Some(response.into()),
            verdict,
        }
    }
}
