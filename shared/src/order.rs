//! Per-chat order across consumers. Several respond (or egress) consumers
//! read one stream, so two messages of one chat can be in two consumers'
//! hands at once; without a rule the later one may be answered first, and
//! answered without the earlier turn in its context.
//!
//! The rule: each chat has a sorted set of its unfinished entries' ULIDs,
//! scored by arrival (the entry id of the `XADD` that made them, in the same
//! script: ingest's for `in`, respond's acknowledgement for `out`). A stage
//! handles an entry only when every earlier member of its set is done or in
//! its own batch (handled first, in order); the acknowledgement that
//! finishes an entry removes it ([`Write::Unorder`]) together with the
//! entry's other writes.
//!
//! An entry whose turn has not come is put back at the end of its stream
//! ([`Outcome::Defer`]), not left pending (that would count deliveries
//! against it). It first waits up to `runner.order_wait_ms` for the earlier
//! entry, but only when another consumer holds that entry (each look marks
//! the members it lets go as held, `<order>:held`, for `claim_idle_ms`):
//! an earlier entry nobody holds is still unread, and waiting for it would
//! only stall the batch. classify sends a chat's messages to the queue its
//! earlier unfinished ones are in ([`Write::AddToLane`]), so respond reads
//! them in order whatever their priorities.
//!
//! An earlier entry that has held its chat up for `runner.order_skip_ms`
//! (counted from when a later one first found it in the way, `<order>:blocked`,
//! not from its arrival: a message queued behind a backlog is not lost) is
//! taken out of the set, logged and counted, so a lost entry cannot hold its
//! chat up for ever. Entries in no set (written before ordering existed, or
//! put back from `dead`) are not held.
//!
//! [`Write::Unorder`]: crate::runner::Write::Unorder
//! [`Write::AddToLane`]: crate::runner::Write::AddToLane
//! [`Outcome::Defer`]: crate::runner::Outcome::Defer

use crate::config::RunnerSettings;
use crate::redis_conn::Pool;
use crate::runner::Outcome;
use crate::Error;
use redis::Value;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// The order of messages in `in` and the queues, gated by respond.
pub const LANE_IN: &str = "in";
/// The order of replies in `out:<platform>`, gated by egress.
pub const LANE_OUT: &str = "out";

/// How long a chat's order set lives after its last addition.
pub const ORDER_TTL: Duration = Duration::from_secs(24 * 3600);

/// The score of a stream entry id in an order set, in Lua: milliseconds ×
/// 1000 + sequence (capped at 999), exact in a double.
pub const SCORE_LUA: &str = "tonumber(ms) * 1000 + math.min(tonumber(seq), 999)";

/// KEYS: per chat its order set, held marker and blocked marker. ARGV: how
/// long a mark of held lasts and how long a blocked marker lives (ms), then
/// per chat member count and members. Returns per chat: blocker (or ""),
/// whether another consumer holds it ("1"/"0"), for how long it has been
/// found in the way (ms), how many members are ready in set order, those
/// members, then the members in no set (ready too). Only the first n
/// members of a set are read for n members asked about: either they are all
/// among them, or one of those is the blocker. The ready members are marked
/// held (the score of the last of them) before the caller handles them.
static LOOK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local held_ms, blocked_ms = ARGV[1], ARGV[2]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local p = 3
local result = {}
for i = 1, #KEYS / 3 do
  local key, held_key, blocked_key = KEYS[i * 3 - 2], KEYS[i * 3 - 1], KEYS[i * 3]
  local n = tonumber(ARGV[p])
  local wanted = {}
  for j = 1, n do wanted[ARGV[p + j]] = true end
  p = p + n + 1
  local members = redis.call('ZRANGE', key, 0, n - 1, 'WITHSCORES')
  local blocker, held, blocked_for = '', '0', '0'
  local ready, last = {}, nil
  for j = 1, #members, 2 do
    local member = members[j]
    if wanted[member] then
      ready[#ready + 1] = member
      wanted[member] = nil
      last = members[j + 1]
    else
      blocker = member
      local mark = redis.call('GET', held_key)
      if mark and tonumber(mark) >= tonumber(members[j + 1]) then held = '1' end
      local since = redis.call('GET', blocked_key)
      local sep = since and string.find(since, ' ', 1, true)
      if sep and string.sub(since, sep + 1) == member then
        blocked_for = tostring(now - tonumber(string.sub(since, 1, sep - 1)))
      else
        redis.call('SET', blocked_key, now .. ' ' .. member, 'PX', blocked_ms)
      end
      break
    end
  end
  if last then redis.call('SET', held_key, last, 'PX', held_ms) end
  local chat = {blocker, held, blocked_for, tostring(#ready)}
  for _, member in ipairs(ready) do chat[#chat + 1] = member end
  for member in pairs(wanted) do
    if not redis.call('ZSCORE', key, member) then chat[#chat + 1] = member end
  end
  result[i] = chat
end
return result
"#,
    )
});

/// Removes `ARGV[1]` from the set only if it is still its first member.
static SKIP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if first[1] == ARGV[1] then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"#,
    )
});

/// One chat of a batch: its order set and its members in the batch.
#[derive(Debug, Clone)]
pub struct ChatTurn {
    pub key: String,
    pub members: Vec<String>,
}

impl ChatTurn {
    /// Marks the last member let go by a look (its score), while its
    /// consumer handles it.
    fn held_key(&self) -> String {
        format!("{}:held", self.key)
    }

    /// The member found in the way and since when (Redis time, ms).
    fn blocked_key(&self) -> String {
        format!("{}:blocked", self.key)
    }
}

/// Which of a chat's members may be handled now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turns {
    /// Indexes into the chat's members, in the order to handle them.
    pub ready: Vec<usize>,
    /// Indexes of the members whose turn has not come, in batch order.
    pub later: Vec<usize>,
    /// The earlier member they wait for.
    pub blocker: Option<Blocker>,
}

impl Turns {
    /// The earlier member held elsewhere that members of this chat wait
    /// for, if any.
    fn waits_for(&self) -> Option<&Blocker> {
        self.blocker.as_ref().filter(|_| !self.later.is_empty())
    }
}

/// An earlier member in the way of a batch's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub member: String,
    /// Another consumer let it go and is handling it: worth waiting for.
    /// Otherwise it is still unread (or lost).
    pub held: bool,
    /// How long later members have been finding it in the way.
    pub blocked_for: Duration,
}

/// Looks up, waits for and skips turns for one stage.
#[derive(Clone)]
pub struct ChatOrder {
    pool: Pool,
    stage: &'static str,
    wait: Duration,
    skip: Duration,
    held: Duration,
}

impl ChatOrder {
    pub fn new(pool: Pool, stage: &'static str, runner: &RunnerSettings) -> Self {
        // Exported from the start, so the first skip is an increase, not a new series.
        metrics::counter!("botline_order_skipped_total", "stage" => stage).increment(0);
        ChatOrder {
            pool,
            stage,
            wait: runner.order_wait(),
            skip: runner.order_skip(),
            held: runner.claim_idle(),
        }
    }

    /// One look at every chat of a batch, in one script call; marks the
    /// members it lets go as held.
    pub async fn look(&self, chats: &[ChatTurn]) -> Result<Vec<Turns>, Error> {
        if chats.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = LOOK.prepare_invoke();
        invocation
            .arg(self.held.as_millis() as u64)
            .arg(self.skip.as_millis() as u64 * 2);
        for chat in chats {
            invocation
                .key(&chat.key)
                .key(chat.held_key())
                .key(chat.blocked_key())
                .arg(chat.members.len());
            for member in &chat.members {
                invocation.arg(member);
            }
        }
        let mut connection = self.pool.get().await?;
        let reply: Vec<Vec<Value>> = invocation.invoke_async(&mut connection).await?;
        chats
            .iter()
            .zip(reply)
            .map(|(chat, answer)| turns_from(chat, answer))
            .collect()
    }

    /// The turns of a batch's `chats`: a look, settled.
    pub async fn turns(&self, chats: &[ChatTurn]) -> Result<Vec<Turns>, Error> {
        let looked = self.look(chats).await?;
        self.settle(chats, looked).await
    }

    /// The turns of a batch's `chats` (as [`ChatOrder::look`] gave them)
    /// once no chat waits for an earlier member another consumer holds, or
    /// `order_wait_ms` has passed; members behind one nobody holds (still
    /// unread) or behind one in this batch are not waited for. A batch
    /// waits only when no chat has anything ready: it is acknowledged as a
    /// whole, so waiting would keep its ready members unfinished too, and
    /// two consumers could each wait out `order_wait_ms` for the other's.
    /// One look at all the chats per pause. An earlier member that has been
    /// in the way for `order_skip_ms` is skipped, waiting or not.
    pub async fn settle(
        &self,
        chats: &[ChatTurn],
        mut looked: Vec<Turns>,
    ) -> Result<Vec<Turns>, Error> {
        let wait = looked.iter().all(|turns| turns.ready.is_empty());
        let until = Instant::now() + if wait { self.wait } else { Duration::ZERO };
        let mut pause = Duration::from_millis(2);
        loop {
            let mut skipped = false;
            for (chat, turns) in chats.iter().zip(&looked) {
                if let Some(blocker) = turns.waits_for() {
                    if blocker.blocked_for > self.skip {
                        self.skip(chat, blocker).await?;
                        skipped = true;
                    }
                }
            }
            if !skipped {
                let held = looked
                    .iter()
                    .any(|turns| turns.waits_for().is_some_and(|blocker| blocker.held));
                let left = until.saturating_duration_since(Instant::now());
                if !held || left.is_zero() {
                    return Ok(looked);
                }
                tokio::time::sleep(pause.min(left)).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            looked = self.look(chats).await?;
        }
    }

    /// What becomes of a member whose turn has not come: put back at the
    /// end of its stream. Never left pending: a redelivery would count
    /// against `max_deliveries` for what is no fault of its own. (However
    /// many are waiting, a consumer puts back at most a batch per
    /// `order_wait_ms`.)
    pub fn not_yet(&self, turns: &Turns) -> Outcome {
        Outcome::Defer(match &turns.blocker {
            Some(blocker) if blocker.held => format!(
                "an earlier message of this chat ({}) is with another consumer",
                blocker.member
            ),
            Some(blocker) => format!(
                "an earlier message of this chat ({}) is not read yet",
                blocker.member
            ),
            None => "read before an earlier message of this chat in the same batch".into(),
        })
    }

    async fn skip(&self, chat: &ChatTurn, blocker: &Blocker) -> Result<(), Error> {
        let mut connection = self.pool.get().await?;
        let removed: i64 = SKIP
            .key(&chat.key)
            .arg(&blocker.member)
            .invoke_async(&mut connection)
            .await?;
        if removed == 1 {
            warn!(
                message = "an earlier message held its chat up too long; no longer waited for",
                stage = self.stage,
                order = %chat.key,
                skipped = %blocker.member,
                held = blocker.held,
                in_the_way_ms = blocker.blocked_for.as_millis() as u64
            );
            metrics::counter!("botline_order_skipped_total", "stage" => self.stage).increment(1);
        }
        Ok(())
    }
}

/// A look's answer for one chat, as indexes into its members.
fn turns_from(chat: &ChatTurn, answer: Vec<Value>) -> Result<Turns, Error> {
    let mut strings = answer.into_iter().map(crate::redis_conn::string);
    let mut next = || {
        strings
            .next()
            .unwrap_or_else(|| Err(Error::Garbage("short order look reply".into())))
    };
    let blocker = next()?;
    let held = next()? == "1";
    let blocked_for: u64 = next()?.parse().unwrap_or_default();
    let in_order: usize = next()?.parse().unwrap_or_default();
    let index_of = |member: &str| chat.members.iter().position(|m| m == member);
    let mut ordered: Vec<usize> = Vec::with_capacity(in_order);
    for _ in 0..in_order {
        ordered.extend(index_of(&next()?));
    }
    // Acknowledgements, and the writes they carry (the reply, the
    // transcript), go in batch order: a member read before an earlier one
    // of its chat (put back, it came round again) waits for a later batch.
    if let Some(cut) = ordered.windows(2).position(|pair| pair[1] < pair[0]) {
        ordered.truncate(cut + 1);
    }
    // Members in no set go first, in batch order: nothing is before them.
    let mut ready: Vec<usize> = strings
        .filter_map(|member| member.ok().and_then(|member| index_of(&member)))
        .collect();
    ready.sort_unstable();
    ready.extend(ordered);
    let later = (0..chat.members.len())
        .filter(|index| !ready.contains(index))
        .collect();
    Ok(Turns {
        ready,
        later,
        blocker: (!blocker.is_empty()).then(|| Blocker {
            member: blocker,
            held,
            blocked_for: Duration::from_millis(blocked_for),
        }),
    })
}
