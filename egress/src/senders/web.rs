//! Platform `web`: the browser chat that ingest serves. Delivering a reply
//! does no I/O here: it is two writes made with the entry's
//! acknowledgement, appending the bot's turn (its text and attachments,
//! which the page shows: images as pictures, other files as links) to the
//! chat's transcript and
//! publishing the chat id so ingest pushes the new turn to the browser.
//! Because the ack script makes them only if the entry is acknowledged,
//! web delivery is exactly once.

use super::{Attempt, Sender};
use crate::config::WebSettings;
use botline_shared::config::StreamSettings;
use botline_shared::message::{Reply, Role, Turn};
use botline_shared::now_ms;
use botline_shared::runner::Write;
use botline_shared::streams::Streams;
use futures_util::future::BoxFuture;
use std::time::Duration;

pub struct WebSender {
    streams: Streams,
    bot_name: String,
    transcript_max_len: usize,
    transcript_ttl: Duration,
}

impl WebSender {
    pub fn new(settings: &WebSettings, streams: Streams, stream_settings: &StreamSettings) -> Self {
        WebSender {
            streams,
            bot_name: settings.bot_name.clone(),
            transcript_max_len: stream_settings.transcript_max_len,
            transcript_ttl: Duration::from_millis(stream_settings.transcript_ttl_ms),
        }
    }

    /// The writes that deliver `reply`.
    pub fn writes(&self, reply: &Reply) -> Vec<Write> {
        let turn = Turn {
            role: Role::Bot,
            speaker_id: reply.bot.clone(),
            speaker_name: self.bot_name.clone(),
            text: reply.text.clone(),
            message_id: reply.id.clone(),
            at_ms: now_ms(),
            attachments: reply.attachments.clone(),
        };
        vec![
            Write::add_capped(
                self.streams.transcript(&reply.chat.id),
                &turn,
                self.transcript_max_len,
                self.transcript_ttl,
            ),
            Write::Publish {
                channel: self.streams.transcript_channel(),
                message: reply.chat.id.clone(),
            },
        ]
    }
}

impl Sender for WebSender {
    fn platform(&self) -> &'static str {
        "web"
    }

    fn delivers_within_redis(&self) -> bool {
        true
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        let writes = self.writes(reply);
        Box::pin(async move { Attempt::delivered(None, None, writes) })
    }
}
