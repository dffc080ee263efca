//! The owner's side of the loop: what was read of each owned partition is
//! queued per chat; chats whose turn it is are handed to the stage in
//! batches (one partition's, urgent chats first by the stage's weights, up
//! to `max_in_flight` messages in the stage's hands); what the stage
//! finished is acknowledged per partition, one script at a time, with
//! everything finished since the last one went out (so acknowledgements may
//! complete out of stream order across chats, never within one). A chat's
//! next message is handed out only once the one before it is acknowledged:
//! its context and its reply are written by then.

use super::ack::{AckCall, Acked};
use super::ownership::{Change, Ownership};
use super::read::{Read, Reader};
use super::{count, Envelope, Fence, Outcome, Plumbing, Stage, Write};
use crate::codec::{self, Fields};
use crate::message::{DeadLetter, Priority};
use crate::streams::Partition;
use crate::{now_ms, Error};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// An entry in the owner's hands.
struct Held<T> {
    envelope: Envelope<T>,
    /// The entry as read, for its dead letter.
    fields: Fields,
}

/// An entry whose outcome is known, waiting for its acknowledgement.
struct Finished {
    stream: String,
    entry_id: String,
    writes: Vec<Write>,
    /// What it is counted as if the acknowledgement takes.
    kind: &'static str,
    /// Its chat, waiting for this acknowledgement (none for what did not decode).
    chat: Option<String>,
}

#[derive(Default)]
struct Chat<T> {
    queue: VecDeque<Held<T>>,
    /// Messages of it with the stage right now.
    in_stage: bool,
    /// Its finished messages not yet acknowledged.
    unacknowledged: usize,
    /// When its first queued message (left for a retry) may go again.
    retry_at: Option<Instant>,
}

/// An owned partition.
struct Owned<T> {
    /// Told apart from an earlier ownership of the same partition, whose
    /// late results are dropped.
    epoch: u64,
    chats: HashMap<String, Chat<T>>,
    /// Chats ready to be handed out, by the priority of their next message.
    ready: [VecDeque<String>; 3],
    /// Entry ids in hand (a reader that starts over reads its pending again).
    known: HashSet<String>,
    finished: Vec<Finished>,
    acking: bool,
    /// A failed acknowledgement is tried again from then.
    ack_again_at: Option<Instant>,
    /// Entries with the stage.
    in_stage: usize,
    window: Arc<Semaphore>,
    stop_reading: CancellationToken,
    /// Being given up to another consumer: nothing more is handed out (what
    /// was read and not started stays pending for the next owner, who takes
    /// it before anything new).
    releasing: bool,
    /// Shutting down: nothing more is read, what was read is finished.
    draining: bool,
}

impl<T> Owned<T> {
    fn idle(&self) -> bool {
        self.in_stage == 0 && self.finished.is_empty() && !self.acking
    }

    /// Nothing in hand but chats waiting for a retry.
    fn drained(&self) -> bool {
        self.idle() && self.ready.iter().all(VecDeque::is_empty)
    }

    /// Whether it can be given up now.
    fn done(&self) -> bool {
        (self.releasing && self.idle()) || (self.draining && self.drained())
    }
}

enum Event<T> {
    Handled {
        partition: Partition,
        epoch: u64,
        chat: String,
        results: Vec<(Held<T>, Outcome)>,
    },
    Acked {
        partition: Partition,
        epoch: u64,
        finished: Vec<Finished>,
        result: Result<Acked, Error>,
    },
}

struct Dispatcher<'a, S: Stage> {
    stage: Arc<S>,
    plumbing: &'a Plumbing,
    consumer: &'a str,
    group: &'static str,
    owned: HashMap<Partition, Owned<S::In>>,
    next_epoch: u64,
    in_stage: usize,
    max_in_flight: usize,
    events: mpsc::UnboundedSender<Event<S::In>>,
    reads: mpsc::UnboundedSender<Read>,
    released: mpsc::UnboundedSender<Partition>,
    /// Where the next round of handing out starts, so no partition starves.
    turn: usize,
}

pub async fn run<S: Stage>(
    stage: S,
    plumbing: &Plumbing,
    consumer: &str,
    shutdown: &CancellationToken,
) {
    let group = stage.group();
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let (released_tx, released_rx) = mpsc::unbounded_channel();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (reads_tx, mut reads) = mpsc::unbounded_channel();
    let stop_ownership = CancellationToken::new();
    let ownership = tokio::spawn(
        Ownership {
            streams: plumbing.streams.clone(),
            pool: plumbing.pool.clone(),
            group,
            consumer: consumer.to_string(),
            lease: plumbing.runner.lease_ttl(),
            block: plumbing.runner.block(),
            health: plumbing.health.clone(),
            changes: changes_tx,
            released: released_rx,
            stop: stop_ownership.clone(),
        }
        .run(),
    );
    let max_in_flight = stage.max_in_flight().max(1);
    let mut dispatcher = Dispatcher {
        stage: Arc::new(stage),
        plumbing,
        consumer,
        group,
        owned: HashMap::new(),
        next_epoch: 0,
        in_stage: 0,
        max_in_flight,
        events: events_tx,
        reads: reads_tx,
        released: released_tx,
        turn: 0,
    };
    let mut deadline: Option<Instant> = None;
    loop {
        if shutdown.is_cancelled() && deadline.is_none() {
            info!(
                message = "stopping: finishing the messages read, then giving the partitions up",
                stage = group
            );
            deadline = Some(Instant::now() + plumbing.runner.shutdown_deadline());
            for owned in dispatcher.owned.values_mut() {
                owned.draining = true;
                owned.stop_reading.cancel();
            }
        }
        dispatcher.hand_out();
        dispatcher.acknowledge();
        if deadline.is_some() && dispatcher.owned.is_empty() {
            break;
        }
        let wake = match (dispatcher.next_wake(), deadline) {
            (Some(next), Some(deadline)) => Some(next.min(deadline)),
            (next, deadline) => next.or(deadline),
        };
        tokio::select! {
            _ = shutdown.cancelled(), if deadline.is_none() => {}
            _ = sleep_until(wake) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    warn!(message = "shutdown deadline passed; what is still in hand stays pending", stage = group);
                    break;
                }
                dispatcher.wake_retries();
            }
            Some(change) = changes.recv() => dispatcher.change(change, deadline.is_some()),
            Some(read) = reads.recv() => dispatcher.take(read),
            Some(event) = events.recv() => dispatcher.event(event),
        }
    }
    for owned in dispatcher.owned.values() {
        owned.stop_reading.cancel();
    }
    stop_ownership.cancel();
    let _ = ownership.await;
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<S: Stage> Dispatcher<'_, S> {
    fn change(&mut self, change: Change, stopping: bool) {
        match change {
            Change::Gained(p) if !stopping => self.gain(p),
            Change::Gained(p) => {
                let _ = self.released.send(p);
            }
            Change::Release(p) => match self.owned.get_mut(&p) {
                Some(owned) => {
                    owned.releasing = true;
                    owned.stop_reading.cancel();
                }
                None => {
                    let _ = self.released.send(p);
                }
            },
            Change::Lost(p) => {
                if let Some(owned) = self.owned.remove(&p) {
                    owned.stop_reading.cancel();
                }
            }
        }
    }

    fn gain(&mut self, p: Partition) {
        if self.owned.contains_key(&p) {
            return;
        }
        self.next_epoch += 1;
        let runner = &self.plumbing.runner;
        let window = Arc::new(Semaphore::new(runner.window));
        let stop_reading = CancellationToken::new();
        let reader = Reader {
            partition: p,
            inputs: self.stage.inputs(&self.plumbing.streams, p),
            group: self.group,
            consumer: self.consumer.to_string(),
            client: self.plumbing.client.clone(),
            commands: self.plumbing.commands.clone(),
            batch_size: runner.batch_size,
            block: runner.block(),
            window: window.clone(),
            to_dispatcher: self.reads.clone(),
            stop: stop_reading.clone(),
        };
        tokio::spawn(reader.run());
        self.owned.insert(
            p,
            Owned {
                epoch: self.next_epoch,
                chats: HashMap::new(),
                ready: Default::default(),
                known: HashSet::new(),
                finished: Vec::new(),
                acking: false,
                ack_again_at: None,
                in_stage: 0,
                window,
                stop_reading,
                releasing: false,
                draining: false,
            },
        );
    }

    /// Queue what a reader read, each entry behind its chat's earlier ones.
    fn take(&mut self, read: Read) {
        let Some(owned) = self.owned.get_mut(&read.partition) else {
            return;
        };
        if owned.releasing {
            return;
        }
        if read.claimed {
            count(self.group, "claimed", read.entries.len());
        }
        let mut repeated = 0;
        for entry in read.entries {
            if !owned.known.insert(entry.id.clone()) {
                repeated += 1;
                continue;
            }
            let deliveries = read.deliveries.get(&entry.id).copied().unwrap_or(1);
            let fields = entry.fields.unwrap_or_default();
            let decoded =
                codec::decode::<S::In>(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
            match decoded {
                Ok(record) => {
                    let chat = self.stage.chat(&record);
                    let priority = self.stage.priority(&record);
                    let state = owned.chats.entry(chat.clone()).or_insert_with(|| Chat {
                        queue: VecDeque::new(),
                        in_stage: false,
                        unacknowledged: 0,
                        retry_at: None,
                    });
                    let was_waiting = !state.queue.is_empty();
                    state.queue.push_back(Held {
                        envelope: Envelope {
                            partition: read.partition,
                            stream: entry.stream,
                            entry_id: entry.id,
                            deliveries,
                            record,
                        },
                        fields,
                    });
                    if !was_waiting
                        && !state.in_stage
                        && state.unacknowledged == 0
                        && state.retry_at.is_none()
                    {
                        owned.ready[priority_index(priority)].push_back(chat);
                    }
                }
                Err(error) => {
                    let letter = dead_letter(
                        self.plumbing,
                        self.group,
                        read.partition,
                        &entry.stream,
                        &entry.id,
                        &fields,
                        error.to_string(),
                        deliveries,
                    );
                    owned.finished.push(Finished {
                        stream: entry.stream,
                        entry_id: entry.id,
                        writes: vec![letter],
                        kind: "dead",
                        chat: None,
                    });
                }
            }
        }
        // Entries read again after a reader started over hold no permit twice.
        owned.window.add_permits(repeated);
    }

    /// Hand ready chats to the stage, a partition's batch at a time, while
    /// the stage has room.
    fn hand_out(&mut self) {
        let partitions: Vec<Partition> = {
            let mut all: Vec<Partition> = self.owned.keys().copied().collect();
            all.sort_unstable();
            let turn = self.turn % all.len().max(1);
            all.rotate_left(turn);
            all
        };
        self.turn = self.turn.wrapping_add(1);
        let batch_size = self.plumbing.runner.batch_size;
        let weights = self.stage.weights();
        let max_deliveries = self.plumbing.runner.max_deliveries;
        let mut progress = true;
        while progress && self.in_stage < self.max_in_flight {
            progress = false;
            for p in &partitions {
                let room = (self.max_in_flight - self.in_stage).min(batch_size);
                if room == 0 {
                    break;
                }
                let Some(owned) = self.owned.get_mut(p) else {
                    continue;
                };
                if owned.releasing {
                    continue;
                }
                let mut batch: Vec<Held<S::In>> = Vec::new();
                let mut runs: Vec<(String, usize)> = Vec::new();
                let mut picked = pick(&mut owned.ready, &weights, room).into_iter();
                for chat in picked.by_ref() {
                    let Some(state) = owned.chats.get_mut(&chat) else {
                        continue;
                    };
                    // A chat is in the ready queues at most once, and only
                    // when none of its messages is out; checked again here.
                    if state.in_stage || state.unacknowledged > 0 || state.retry_at.is_some() {
                        continue;
                    }
                    let Some(head) = state.queue.front() else {
                        continue;
                    };
                    if head.envelope.deliveries > max_deliveries {
                        let head = state.queue.pop_front().expect("a head");
                        state.unacknowledged += 1;
                        let reason = format!(
                            "delivered {} times (max {max_deliveries}) without being acknowledged",
                            head.envelope.deliveries
                        );
                        warn!(message = "entry sent to dead", stage = self.group, id = %head.envelope.entry_id, %reason);
                        let letter = dead_letter(
                            self.plumbing,
                            self.group,
                            *p,
                            &head.envelope.stream,
                            &head.envelope.entry_id,
                            &head.fields,
                            reason,
                            head.envelope.deliveries,
                        );
                        owned.finished.push(Finished {
                            stream: head.envelope.stream,
                            entry_id: head.envelope.entry_id,
                            writes: vec![letter],
                            kind: "dead",
                            chat: Some(chat),
                        });
                        continue;
                    }
                    let max_run = self.stage.max_run(&head.envelope.record).max(1);
                    let take = state.queue.len().min(max_run).min(room - batch.len());
                    state.in_stage = true;
                    runs.push((chat, take));
                    batch.extend(state.queue.drain(..take));
                    if batch.len() >= room {
                        break;
                    }
                }
                // Chats picked but not reached keep their place, first in line.
                let unreached: Vec<String> = picked.collect();
                for chat in unreached.into_iter().rev() {
                    if let Some(head) = owned.chats.get(&chat).and_then(|state| state.queue.front())
                    {
                        let index = priority_index(self.stage.priority(&head.envelope.record));
                        owned.ready[index].push_front(chat);
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                progress = true;
                owned.in_stage += batch.len();
                let epoch = owned.epoch;
                self.in_stage += batch.len();
                self.spawn_batch(*p, epoch, batch, runs);
            }
        }
    }

    fn spawn_batch(
        &self,
        partition: Partition,
        epoch: u64,
        batch: Vec<Held<S::In>>,
        runs: Vec<(String, usize)>,
    ) {
        let stage = self.stage.clone();
        let events = self.events.clone();
        let group = self.group;
        let fence = Fence {
            owner_key: self.plumbing.streams.owner(partition, group),
            consumer: self.consumer.to_string(),
        };
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            metrics::histogram!("botline_stage_batch_size", "stage" => group)
                .record(batch.len() as f64);
            let (envelopes, fields): (Vec<Envelope<S::In>>, Vec<Fields>) = batch
                .into_iter()
                .map(|held| (held.envelope, held.fields))
                .unzip();
            let prepared = stage.prepare(&fence, &envelopes).await;
            let mut start = 0;
            let mut slices = Vec::new();
            for (chat, len) in runs {
                slices.push((chat, start, start + len));
                start += len;
            }
            let mut chats: FuturesUnordered<_> = slices
                .iter()
                .map(|(chat, from, to)| {
                    let stage = &stage;
                    let prepared = &prepared;
                    let run = &envelopes[*from..*to];
                    async move { (chat.clone(), *from, stage.handle_chat(prepared, run).await) }
                })
                .collect();
            let mut outcomes: Vec<(String, usize, Vec<Outcome>)> = Vec::new();
            while let Some(done) = chats.next().await {
                outcomes.push(done);
            }
            drop(chats);
            drop(prepared);
            metrics::histogram!("botline_stage_duration_seconds", "stage" => group)
                .record(started.elapsed().as_secs_f64());
            // Hand each chat's results back with its entries.
            let mut envelopes: Vec<Option<(Envelope<S::In>, Fields)>> =
                envelopes.into_iter().zip(fields).map(Some).collect();
            for (chat, from, chat_outcomes) in outcomes {
                let results = chat_outcomes
                    .into_iter()
                    .enumerate()
                    .map(|(i, outcome)| {
                        let (envelope, fields) =
                            envelopes[from + i].take().expect("one outcome per message");
                        (Held { envelope, fields }, outcome)
                    })
                    .collect();
                let _ = events.send(Event::Handled {
                    partition,
                    epoch,
                    chat,
                    results,
                });
            }
        });
    }

    fn event(&mut self, event: Event<S::In>) {
        match event {
            Event::Handled {
                partition,
                epoch,
                chat,
                results,
            } => {
                self.in_stage -= results.len();
                self.handled(partition, epoch, chat, results);
            }
            Event::Acked {
                partition,
                epoch,
                finished,
                result,
            } => self.acked(partition, epoch, finished, result),
        }
    }

    fn handled(
        &mut self,
        p: Partition,
        epoch: u64,
        chat: String,
        results: Vec<(Held<S::In>, Outcome)>,
    ) {
        let Some(owned) = self.owned.get_mut(&p).filter(|owned| owned.epoch == epoch) else {
            return;
        };
        owned.in_stage -= results.len();
        let plumbing = self.plumbing;
        let group = self.group;
        let Some(state) = owned.chats.get_mut(&chat) else {
            return;
        };
        state.in_stage = false;
        let mut again: Vec<Held<S::In>> = Vec::new();
        for (mut held, outcome) in results {
            // Once one is left for a retry, the ones after it wait too: they
            // were not tried, so their delivery count stays.
            if !again.is_empty() {
                again.push(held);
                continue;
            }
            match outcome {
                Outcome::Done(writes) => {
                    state.unacknowledged += 1;
                    owned.finished.push(Finished {
                        stream: held.envelope.stream,
                        entry_id: held.envelope.entry_id,
                        writes,
                        kind: "forwarded",
                        chat: Some(chat.clone()),
                    });
                }
                Outcome::Dead(reason) => {
                    warn!(message = "entry sent to dead", stage = group, stream = %held.envelope.stream, id = %held.envelope.entry_id, %reason, deliveries = held.envelope.deliveries);
                    state.unacknowledged += 1;
                    let letter = dead_letter(
                        plumbing,
                        group,
                        p,
                        &held.envelope.stream,
                        &held.envelope.entry_id,
                        &held.fields,
                        reason,
                        held.envelope.deliveries,
                    );
                    owned.finished.push(Finished {
                        stream: held.envelope.stream,
                        entry_id: held.envelope.entry_id,
                        writes: vec![letter],
                        kind: "dead",
                        chat: Some(chat.clone()),
                    });
                }
                Outcome::Retry(reason) => {
                    debug!(message = "entry left for a retry", stage = group, id = %held.envelope.entry_id, %reason);
                    count(group, "retry", 1);
                    held.envelope.deliveries += 1;
                    again.push(held);
                }
            }
        }
        if !again.is_empty() {
            for held in again.into_iter().rev() {
                state.queue.push_front(held);
            }
            state.retry_at = Some(Instant::now() + plumbing.runner.retry());
        }
        Self::maybe_ready(&self.stage, owned, &chat);
    }

    /// Put `chat` among the ready ones if its turn has come.
    fn maybe_ready(stage: &S, owned: &mut Owned<S::In>, chat: &str) {
        let Some(state) = owned.chats.get(chat) else {
            return;
        };
        if state.in_stage || state.unacknowledged > 0 || state.retry_at.is_some() {
            return;
        }
        match state.queue.front() {
            Some(head) => {
                let index = priority_index(stage.priority(&head.envelope.record));
                owned.ready[index].push_back(chat.to_string());
            }
            None => {
                owned.chats.remove(chat);
            }
        }
    }

    fn wake_retries(&mut self) {
        let now = Instant::now();
        for owned in self.owned.values_mut() {
            let due: Vec<String> = owned
                .chats
                .iter_mut()
                .filter(|(_, state)| state.retry_at.is_some_and(|at| at <= now))
                .map(|(chat, state)| {
                    state.retry_at = None;
                    chat.clone()
                })
                .collect();
            for chat in due {
                Self::maybe_ready(&self.stage, owned, &chat);
            }
            if owned.ack_again_at.is_some_and(|at| at <= now) {
                owned.ack_again_at = None;
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        self.owned
            .values()
            .flat_map(|owned| {
                owned
                    .chats
                    .values()
                    .filter_map(|state| state.retry_at)
                    .chain(owned.ack_again_at)
            })
            .min()
    }

    /// Send each partition's finished entries in one script, if none is on its way.
    fn acknowledge(&mut self) {
        let mut given_up = Vec::new();
        for (p, owned) in self.owned.iter_mut() {
            if owned.acking || owned.finished.is_empty() || owned.ack_again_at.is_some() {
                if owned.done() {
                    given_up.push(*p);
                }
                continue;
            }
            let finished = std::mem::take(&mut owned.finished);
            let owner = self.plumbing.streams.owner(*p, self.group);
            let mut call = AckCall::new(&owner, self.group, self.consumer);
            for entry in &finished {
                call.entry(&entry.stream, &entry.entry_id, &entry.writes);
            }
            owned.acking = true;
            let mut connection = self.plumbing.commands.clone();
            let events = self.events.clone();
            let (partition, epoch) = (*p, owned.epoch);
            tokio::spawn(async move {
                let result = call.run(&mut connection).await;
                let _ = events.send(Event::Acked {
                    partition,
                    epoch,
                    finished,
                    result,
                });
            });
        }
        for p in given_up {
            self.owned.remove(&p);
            let _ = self.released.send(p);
        }
    }

    fn acked(
        &mut self,
        p: Partition,
        epoch: u64,
        finished: Vec<Finished>,
        result: Result<Acked, Error>,
    ) {
        let Some(owned) = self.owned.get_mut(&p).filter(|owned| owned.epoch == epoch) else {
            return;
        };
        owned.acking = false;
        match result {
            Ok(Acked::Entries(acked)) => {
                let mut tally: HashMap<&'static str, usize> = HashMap::new();
                for (entry, acked) in finished.iter().zip(acked) {
                    *tally
                        .entry(if acked { entry.kind } else { "stale" })
                        .or_default() += 1;
                }
                for (kind, n) in tally {
                    count(self.group, kind, n);
                }
                owned.window.add_permits(finished.len());
                let mut chats: HashSet<String> = HashSet::new();
                for entry in finished {
                    owned.known.remove(&entry.entry_id);
                    if let Some(chat) = entry.chat {
                        if let Some(state) = owned.chats.get_mut(&chat) {
                            state.unacknowledged -= 1;
                        }
                        chats.insert(chat);
                    }
                }
                for chat in chats {
                    Self::maybe_ready(&self.stage, owned, &chat);
                }
            }
            Ok(Acked::Lost) => {
                warn!(
                    message = "partition lost before its acknowledgement: nothing was written",
                    stage = self.group,
                    partition = p
                );
                if let Some(owned) = self.owned.remove(&p) {
                    owned.stop_reading.cancel();
                }
            }
            Err(error) => {
                // Sending the same call again is safe: what was acknowledged
                // the first time is not acknowledged, nor written, twice.
                warn!(message = "acknowledgement failed; trying again", stage = self.group, partition = p, %error);
                metrics::counter!("botline_stage_errors_total", "stage" => self.group).increment(1);
                let later = std::mem::take(&mut owned.finished);
                owned.finished = finished;
                owned.finished.extend(later);
                owned.ack_again_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }
}

fn priority_index(priority: Priority) -> usize {
    match priority {
        Priority::Urgent => 0,
        Priority::Normal => 1,
        Priority::Batch => 2,
    }
}

/// Up to `room` chats from the ready queues, each queue its weighted share
/// first, spare room passing down, so none starves.
fn pick(ready: &mut [VecDeque<String>; 3], weights: &[usize; 3], room: usize) -> Vec<String> {
    let total: usize = weights.iter().map(|w| (*w).max(1)).sum();
    let mut picked = Vec::new();
    for (queue, weight) in ready.iter_mut().zip(weights) {
        let share = (room * (*weight).max(1)).div_ceil(total);
        let n = share.min(queue.len()).min(room - picked.len());
        picked.extend(queue.drain(..n));
    }
    for queue in ready.iter_mut() {
        let n = room.saturating_sub(picked.len()).min(queue.len());
        picked.extend(queue.drain(..n));
    }
    picked
}

/// The write that puts an entry in its partition's `dead`.
#[allow(clippy::too_many_arguments)]
fn dead_letter(
    plumbing: &Plumbing,
    group: &'static str,
    p: Partition,
    stream: &str,
    entry_id: &str,
    fields: &Fields,
    error: String,
    deliveries: u64,
) -> Write {
    let letter = DeadLetter {
        stage: group.to_string(),
        stream: stream.to_string(),
        entry_id: entry_id.to_string(),
        error,
        deliveries,
        fields: fields
            .iter()
            .map(|(k, v)| (k.clone(), serde_bytes::ByteBuf::from(v.clone())))
            .collect(),
        at_ms: now_ms(),
    };
    Write::Add {
        stream: plumbing.streams.dead(p),
        fields: codec::encode(&letter),
        cap: Some(plumbing.stream_settings.dead_max_len),
        expire: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_follow_weights_and_pass_spare_room_down() {
        let queues = |u: usize, n: usize, b: usize| -> [VecDeque<String>; 3] {
            [
                (0..u).map(|i| format!("u{i}")).collect(),
                (0..n).map(|i| format!("n{i}")).collect(),
                (0..b).map(|i| format!("b{i}")).collect(),
            ]
        };
        let check = |mut ready: [VecDeque<String>; 3], room: usize, expected: &[&str]| {
            assert_eq!(pick(&mut ready, &[8, 3, 1], room), expected);
        };
        check(
            queues(3, 3, 3),
            4,
            &["u0", "u1", "u2", "n0", "n1", "b0"][..4],
        );
        check(queues(0, 5, 1), 3, &["n0", "b0", "n1"]);
        check(queues(1, 0, 5), 3, &["u0", "b0", "b1"]);
        check(queues(0, 0, 0), 3, &[]);
    }
}
