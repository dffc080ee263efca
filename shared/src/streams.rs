//! Every Redis key botline uses is named here, from one configurable prefix.
//! The default prefix `{botline}` is a Redis Cluster hash tag: all keys
//! share one slot, so the runner's atomic scripts may touch any of them.

use crate::message::Priority;

pub const DEFAULT_PREFIX: &str = "{botline}";

/// Consumer group names: one per stage, named after it.
pub mod group {
    pub const CLASSIFY: &str = "classify";
    pub const RESPOND: &str = "respond";
    pub const EGRESS: &str = "egress";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streams {
    prefix: String,
}

impl Streams {
    pub fn new(prefix: impl Into<String>) -> Self {
        Streams {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{}", self.prefix, name)
    }

    /// The key without the prefix: the `stream` label of metrics.
    pub fn short<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix(':'))
            .unwrap_or(key)
    }

    /// A rate limit's state (GCRA theoretical arrival time), shared by every
    /// egress replica; `name` says whose limit (`telegram:chat:42`).
    pub fn rate_limit(&self, name: &str) -> String {
        self.key(&format!("rl:{name}"))
    }

    /// A platform access token cached for every replica, and its fetch lock.
    pub fn token(&self, name: &str) -> String {
        self.key(&format!("token:{name}"))
    }

    /// The arrival order of one chat's unfinished messages (`lane` `in`,
    /// gated by respond) or replies (`lane` `out`, gated by egress): a
    /// sorted set of their ULIDs, see [`crate::order`].
    pub fn chat_order(&self, lane: &str, platform: &str, chat: &str) -> String {
        self.key(&format!("order:{lane}:{platform}:{chat}"))
    }

    /// The queue a chat's last message went to, so classify sends its next
    /// one after it while the chat has unfinished messages (see
    /// [`crate::runner::Write::AddToLane`]). A chat's order set also has
    /// `<order>:held` and `<order>:blocked` beside it (see [`crate::order`]).
    pub fn chat_queue(&self, platform: &str, chat: &str) -> String {
        self.key(&format!("order:queue:{platform}:{chat}"))
    }

    /// Normalized inbound messages; written by ingest, read by classify.
    pub fn inbound(&self) -> String {
        self.key("in")
    }

    /// Classified messages of one priority; read by respond.
    pub fn queue(&self, priority: Priority) -> String {
        self.key(&format!("q:{}", priority.as_str()))
    }

    /// Replies for one platform; read by egress.
    pub fn outbound(&self, platform: &str) -> String {
        self.key(&format!("out:{platform}"))
    }

    /// Conversation turns of one chat, kept by respond.
    pub fn context(&self, platform: &str, chat: &str) -> String {
        self.key(&format!("ctx:{platform}:{chat}"))
    }

    /// Delivery receipts.
    pub fn delivered(&self) -> String {
        self.key("delivered")
    }

    /// Entries no stage could handle, with the reason.
    pub fn dead(&self) -> String {
        self.key("dead")
    }

    /// Set while a platform event id has been seen, so platform retries are dropped.
    pub fn dedup(&self, platform: &str, event_id: &str) -> String {
        self.key(&format!("dedup:{platform}:{event_id}"))
    }

    /// Set once a reply has been delivered, so a redelivered entry is not sent twice.
    pub fn sent(&self, reply_id: &str) -> String {
        self.key(&format!("sent:{reply_id}"))
    }

    /// Set once part `part` of a reply sent as several platform messages
    /// has been accepted (value: the platform's message id), so a retry
    /// sends only the parts not yet out.
    pub fn sent_part(&self, reply_id: &str, part: usize) -> String {
        self.key(&format!("sent:{reply_id}:part:{part}"))
    }

    /// Held by the egress consumer sending a reply right now.
    pub fn sending(&self, reply_id: &str) -> String {
        self.key(&format!("sending:{reply_id}"))
    }

    /// A web chat's transcript: the person's messages and the bot's replies.
    pub fn transcript(&self, chat: &str) -> String {
        self.key(&format!("web:{chat}"))
    }

    /// Pub/sub channel announcing new transcript entries (message: chat id).
    pub fn transcript_channel(&self) -> String {
        self.key("web:notify")
    }

    /// Lease on a consumer name, so replicas on one host pick distinct names.
    pub fn consumer_lease(&self, group: &str, consumer: &str) -> String {
        self.key(&format!("consumer:{group}:{consumer}"))
    }

    /// Frames egress wants sent over the socket an ingest replica holds
    /// for `bot` on `platform` (OneBot's WebSocket), see [`crate::relay`].
    pub fn socket_frames(&self, platform: &str, bot: &str) -> String {
        self.key(&format!("socket:{platform}:{bot}"))
    }

    /// Whether the frame `echo` was sent, expired or cancelled, set once.
    pub fn socket_state(&self, echo: &str) -> String {
        self.key(&format!("socket-state:{echo}"))
    }

    /// What came of the frame `echo` (a list of one), for egress to read.
    pub fn socket_outcome(&self, echo: &str) -> String {
        self.key(&format!("socket-outcome:{echo}"))
    }

    /// The echo of the last frame made for a reply.
    pub fn socket_reply(&self, reply_id: &str) -> String {
        self.key(&format!("socket-reply:{reply_id}"))
    }
}

impl Default for Streams {
    fn default() -> Self {
        Streams::new(DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix_hash_tag() {
        let streams = Streams::default();
        assert_eq!(streams.inbound(), "{botline}:in");
        assert_eq!(streams.queue(Priority::Urgent), "{botline}:q:urgent");
        assert_eq!(streams.outbound("web"), "{botline}:out:web");
        assert_eq!(streams.context("web", "c1"), "{botline}:ctx:web:c1");
        assert_eq!(streams.short("{botline}:q:batch"), "q:batch");
        assert_eq!(Streams::new("t1").dead(), "t1:dead");
    }
}
