//! Every Redis key botline uses is named here, from one configurable prefix
//! (`botline` by default) and the number of partitions.
//!
//! A chat belongs to one of `partitions` partitions ([`partition_of`]: a
//! stable hash of its platform and chat id, the same on every process and
//! release). Every key that one entry's processing touches (its input
//! stream, the outputs, the chat's context, dedup, `sent:`/`sending:`
//! keys, receipts and dead letters, the partition's owner) carries its
//! partition's Redis Cluster hash tag, `{botline:p7}`, so each script stays
//! in one slot and partitions spread over a cluster's shards. Keys that
//! belong to no chat (consumer leases, rate limits, tokens, socket frames,
//! group membership) have the tag `{botline}`: no script mixes them with a
//! partition's keys.

pub const DEFAULT_PREFIX: &str = "botline";

/// Consumer group names: one per stage, named after it.
pub mod group {
    pub const CLASSIFY: &str = "classify";
    pub const RESPOND: &str = "respond";
    pub const EGRESS: &str = "egress";
}

/// One of a deployment's partitions, `0 .. partitions`.
pub type Partition = u32;

/// The partition of a chat: FNV-1a (32 bits: offset basis 2166136261,
/// prime 16777619) over the platform's name, one zero byte and the chat id,
/// modulo `partitions`. Written out rather than taken from a hashing crate
/// because its value is part of the contract between releases and must
/// never change with a dependency; the test vectors below pin it.
pub fn partition_of(platform: &str, chat: &str, partitions: u32) -> Partition {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in platform.bytes().chain([0]).chain(chat.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streams {
    prefix: String,
    partitions: u32,
}

impl Streams {
    pub fn new(prefix: impl Into<String>, partitions: u32) -> Self {
        Streams {
            prefix: prefix.into(),
            partitions: partitions.max(1),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Every partition, in order.
    pub fn all(&self) -> std::ops::Range<Partition> {
        0..self.partitions
    }

    /// The partition of a chat (see [`partition_of`]).
    pub fn partition_of(&self, platform: &str, chat: &str) -> Partition {
        partition_of(platform, chat, self.partitions)
    }

    /// A key of no partition, under the tag `{prefix}`.
    fn key(&self, name: &str) -> String {
        format!("{{{}}}:{}", self.prefix, name)
    }

    /// A key of partition `p`, under the tag `{prefix:p<p>}`.
    fn part(&self, p: Partition, name: &str) -> String {
        format!("{{{}:p{p}}}:{name}", self.prefix)
    }

    /// A key without its tag, and its partition if it has one: the
    /// `stream` and `partition` labels of metrics.
    pub fn short<'a>(&self, key: &'a str) -> (&'a str, Option<Partition>) {
        let Some(rest) = key.strip_prefix('{') else {
            return (key, None);
        };
        let Some((tag, name)) = rest.split_once("}:") else {
            return (key, None);
        };
        let Some(tail) = tag.strip_prefix(self.prefix.as_str()) else {
            return (key, None);
        };
        match tail.strip_prefix(":p").map(str::parse) {
            Some(Ok(p)) => (name, Some(p)),
            _ if tail.is_empty() => (name, None),
            _ => (key, None),
        }
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

    /// Normalized inbound messages of partition `p`; written by ingest, read by classify.
    pub fn inbound(&self, p: Partition) -> String {
        self.part(p, "in")
    }

    /// Classified messages of partition `p` (every priority: the one
    /// stream keeps each chat's order), read by respond.
    pub fn queue(&self, p: Partition) -> String {
        self.part(p, "q")
    }

    /// Replies of partition `p` for one platform; read by egress.
    pub fn outbound(&self, p: Partition, platform: &str) -> String {
        self.part(p, &format!("out:{platform}"))
    }

    /// Conversation turns of one chat, kept by respond.
    pub fn context(&self, platform: &str, chat: &str) -> String {
        let p = self.partition_of(platform, chat);
        self.part(p, &format!("ctx:{platform}:{chat}"))
    }

    /// Delivery receipts of partition `p`.
    pub fn delivered(&self, p: Partition) -> String {
        self.part(p, "delivered")
    }

    /// Entries of partition `p` no stage could handle, with the reason.
    pub fn dead(&self, p: Partition) -> String {
        self.part(p, "dead")
    }

    /// Who owns partition `p` for `group` (a consumer name, expiring):
    /// the acknowledgement script writes nothing for a consumer that is not it.
    pub fn owner(&self, p: Partition, group: &str) -> String {
        self.part(p, &format!("owner:{group}"))
    }

    /// The live consumers of `group`, each scored by when its membership
    /// runs out (ms, Redis's clock).
    pub fn members(&self, group: &str) -> String {
        self.key(&format!("members:{group}"))
    }

    /// Set while a platform event id has been seen in its chat, so platform
    /// retries are dropped.
    pub fn dedup(&self, platform: &str, chat: &str, event_id: &str) -> String {
        let p = self.partition_of(platform, chat);
        self.part(p, &format!("dedup:{platform}:{event_id}"))
    }

    /// Set once a reply of partition `p` has been delivered, so a
    /// redelivered entry is not sent twice.
    pub fn sent(&self, p: Partition, reply_id: &str) -> String {
        self.part(p, &format!("sent:{reply_id}"))
    }

    /// Set once part `part` of a reply sent as several platform messages
    /// has been accepted (value: the platform's message id), so a retry
    /// sends only the parts not yet out.
    pub fn sent_part(&self, p: Partition, reply_id: &str, part: usize) -> String {
        self.part(p, &format!("sent:{reply_id}:part:{part}"))
    }

    /// Held by the egress consumer sending a reply right now.
    pub fn sending(&self, p: Partition, reply_id: &str) -> String {
        self.part(p, &format!("sending:{reply_id}"))
    }

    /// A web chat's transcript: the person's messages and the bot's replies.
    pub fn transcript(&self, chat: &str) -> String {
        let p = self.partition_of("web", chat);
        self.part(p, &format!("web:{chat}"))
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

/// The default number of partitions (see `[streams] partitions`).
pub const DEFAULT_PARTITIONS: u32 = 48;

impl Default for Streams {
    fn default() -> Self {
        Streams::new(DEFAULT_PREFIX, DEFAULT_PARTITIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_keys_carry_the_partition_tag() {
        let streams = Streams::default();
        assert_eq!(streams.inbound(7), "{botline:p7}:in");
        assert_eq!(streams.queue(0), "{botline:p0}:q");
        assert_eq!(streams.outbound(3, "web"), "{botline:p3}:out:web");
        let p = streams.partition_of("web", "c1");
        assert_eq!(
            streams.context("web", "c1"),
            format!("{{botline:p{p}}}:ctx:web:c1")
        );
        assert_eq!(streams.transcript("c1"), format!("{{botline:p{p}}}:web:c1"));
        assert_eq!(
            streams.rate_limit("telegram:chat:1"),
            "{botline}:rl:telegram:chat:1"
        );
        assert_eq!(Streams::new("t1", 4).dead(2), "{t1:p2}:dead");
    }

    #[test]
    fn short_names_and_partitions_for_labels() {
        let streams = Streams::default();
        assert_eq!(
            streams.short("{botline:p12}:out:slack"),
            ("out:slack", Some(12))
        );
        assert_eq!(
            streams.short("{botline}:members:egress"),
            ("members:egress", None)
        );
        assert_eq!(streams.short("other:key"), ("other:key", None));
        assert_eq!(
            streams.short("{botlinex:p1}:in"),
            ("{botlinex:p1}:in", None)
        );
    }

    /// The hash is part of the contract: these values must never change
    /// (they were computed apart from this code, from the FNV-1a definition).
    #[test]
    fn the_partition_hash_is_stable() {
        let check = |platform: &str, chat: &str, partitions: u32, expected: Partition| {
            assert_eq!(
                partition_of(platform, chat, partitions),
                expected,
                "{platform} {chat} over {partitions}"
            );
        };
        check("web", "c1", u32::MAX, 0x2a92_cd83);
        check("telegram", "42", u32::MAX, 0xc2a7_b0f0);
        check("slack", "C024BE91L", u32::MAX, 0x81df_e125);
        check("web", "c1", 16, 3);
        check("telegram", "42", 16, 0);
        check("slack", "C024BE91L", 16, 5);
        check("slack", "C024BE91L", 1, 0);
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            partition_of("ab", "c", u32::MAX),
            partition_of("a", "bc", u32::MAX)
        );
    }

    #[test]
    fn chats_spread_over_partitions() {
        let mut counts = [0usize; 16];
        for chat in 0..16_000 {
            counts[partition_of("web", &format!("chat-{chat}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|n| (800..1200).contains(n)), "{counts:?}");
    }
}
