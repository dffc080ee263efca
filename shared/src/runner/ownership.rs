//! Who owns which partition, among one stage's consumers.
//!
//! Every second (or third of `lease_ttl_ms`, if less) each consumer announces itself in the
//! group's member set (`shared/lua/members.lua`: live members and their
//! expiry, by Redis's clock), reads every partition's owner key
//! (`{botline:pK}:owner:<group>`, a consumer name under a lease), renews the
//! keys it holds (`shared/lua/lease.lua`), and moves towards its share of
//! the partitions ([`assignment`]): the live members sorted by name, the
//! first `P mod n` of them own one more than the others, and consumers
//! beyond `P` own none (they stand by). It never takes a partition that has
//! an owner: it takes free ones (`SET NX PX`) up to its share, and gives up
//! the ones over its share only after the dispatcher has finished and
//! acknowledged what it had in hand of them. A partition whose owner died
//! becomes free when the owner's lease runs out. That is Kafka's cooperative
//! sticky rebalancing without a coordinator: a partition keeps its owner
//! until the owner gives it up, so a join never makes two consumers handle
//! one chat (what went wrong in Pulsar's Key_Shared, apache/pulsar#6554).

use crate::redis_conn::Pool;
use crate::scripts;
use crate::streams::{Partition, Streams};
use crate::telemetry::Health;
use crate::Error;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What the dispatcher is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// This consumer owns the partition now: read it.
    Gained(Partition),
    /// Give it up: stop reading it, finish what is in hand, then say so.
    Release(Partition),
    /// Its lease was lost (this consumer stalled past it): another may own
    /// it already; drop everything of it, its acknowledgements would be refused.
    Lost(Partition),
}

/// Which partitions `me` should take and give up, given the live `members`
/// and each partition's owner (`None`: free), keeping what it has where it
/// can. `held` are the partitions `me` owns, `releasing` those of them
/// already being given up.
pub fn assignment(
    me: &str,
    members: &[String],
    owners: &[Option<String>],
    held: &BTreeSet<Partition>,
    releasing: &BTreeSet<Partition>,
) -> (Vec<Partition>, Vec<Partition>) {
    let partitions = owners.len();
    let mut sorted: Vec<&str> = members.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let Some(rank) = sorted.iter().position(|member| *member == me) else {
        return (Vec::new(), held.difference(releasing).copied().collect());
    };
    let n = sorted.len();
    let share = partitions / n + usize::from(rank < partitions % n);
    let mut take = Vec::new();
    let mut release = Vec::new();
    // What is already being given up counts as given up.
    let keep: Vec<Partition> = held.difference(releasing).copied().collect();
    if keep.len() > share {
        release.extend(keep.iter().rev().take(keep.len() - share));
    } else if held.len() < share {
        // Start looking at a place of its own, so members seldom race.
        let start = rank * partitions / n;
        take.extend(
            (0..partitions)
                .map(|i| (start + i) % partitions)
                .filter(|p| owners[*p].is_none())
                .take(share - held.len())
                .map(|p| p as Partition),
        );
    }
    (take, release)
}

pub struct Ownership {
    pub streams: Streams,
    pub pool: Pool,
    pub group: &'static str,
    pub consumer: String,
    pub lease: Duration,
    /// How long a read of a partition may block: a partition is dropped
    /// early enough that a read still under way ends before its lease does.
    pub block: Duration,
    pub health: Health,
    pub changes: mpsc::UnboundedSender<Change>,
    /// Partitions the dispatcher has finished with, to be given up.
    pub released: mpsc::UnboundedReceiver<Partition>,
    /// Cancelled by the dispatcher once it has finished everything.
    pub stop: CancellationToken,
}

impl Ownership {
    pub async fn run(mut self) {
        // Exported from the start, so the first of each is a rate, not a new series.
        for counter in [
            "botline_stage_partitions_taken_total",
            "botline_stage_partitions_lost_total",
        ] {
            metrics::counter!(counter, "stage" => self.group).increment(0);
        }
        let mut held = BTreeSet::new();
        let mut releasing = BTreeSet::new();
        // When each held partition's lease was last renewed (the renewal's
        // sending: Redis's expiry is later than this plus the lease).
        let mut renewed: HashMap<Partition, Instant> = HashMap::new();
        // At most a second apart: a consumer that joins gets its share
        // within a few ticks of the others'.
        let mut tick = tokio::time::interval((self.lease / 3).min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                released = self.released.recv() => {
                    let Some(p) = released else { break };
                    self.give_up(p).await;
                    held.remove(&p);
                    releasing.remove(&p);
                    metrics::gauge!("botline_stage_partitions_owned", "stage" => self.group)
                        .set(held.len() as f64);
                }
                _ = tick.tick() => {
                    match self.step(&mut held, &mut releasing, &mut renewed).await {
                        Ok(()) => self.health.set(self.group, true),
                        Err(error) => {
                            warn!(message = "could not keep partition ownership", stage = self.group, %error);
                            self.health.set(self.group, false);
                        }
                    }
                    self.drop_unrenewed(&mut held, &mut releasing, &mut renewed);
                    metrics::gauge!("botline_stage_partitions_owned", "stage" => self.group)
                        .set(held.len() as f64);
                }
            }
        }
        for p in std::mem::take(&mut held) {
            self.give_up(p).await;
        }
        if let Err(error) = self.announce(false).await {
            warn!(message = "could not leave the stage's members", %error);
        }
        metrics::gauge!("botline_stage_partitions_owned", "stage" => self.group).set(0.0);
    }

    async fn announce(&self, staying: bool) -> Result<Vec<String>, Error> {
        let mut connection = self.pool.get().await?;
        let ttl = if staying {
            self.lease.as_millis() as u64
        } else {
            0
        };
        Ok(scripts::MEMBERS
            .key(self.streams.members(self.group))
            .arg(&self.consumer)
            .arg(ttl)
            .invoke_async(&mut connection)
            .await?)
    }

    /// A partition whose lease could not be renewed for most of its length
    /// is dropped here, before Redis lets it go: its reader stops while the
    /// lease still holds, so nothing is read into this consumer's pending
    /// list after a new owner has taken that list over.
    fn drop_unrenewed(
        &self,
        held: &mut BTreeSet<Partition>,
        releasing: &mut BTreeSet<Partition>,
        renewed: &mut HashMap<Partition, Instant>,
    ) {
        let horizon = self.lease.saturating_sub(self.block + self.lease / 6);
        let now = Instant::now();
        for p in held.clone() {
            let fresh = renewed
                .get(&p)
                .is_some_and(|at| now.duration_since(*at) < horizon);
            if !fresh {
                warn!(
                    message = "partition dropped: its lease could not be renewed in time",
                    stage = self.group,
                    partition = p
                );
                held.remove(&p);
                releasing.remove(&p);
                renewed.remove(&p);
                metrics::counter!("botline_stage_partitions_lost_total", "stage" => self.group)
                    .increment(1);
                let _ = self.changes.send(Change::Lost(p));
            }
        }
    }

    async fn step(
        &self,
        held: &mut BTreeSet<Partition>,
        releasing: &mut BTreeSet<Partition>,
        renewed: &mut HashMap<Partition, Instant>,
    ) -> Result<(), Error> {
        let members = self.announce(true).await?;
        let mut connection = self.pool.get().await?;
        // Renew what is held; whatever is no longer ours is lost.
        let ttl = self.lease.as_millis() as u64;
        let renewals: Vec<_> = held
            .iter()
            .map(|p| {
                let mut renewal = scripts::LEASE.prepare_invoke();
                renewal
                    .key(self.streams.owner(*p, self.group))
                    .arg(&self.consumer)
                    .arg(ttl);
                renewal
            })
            .collect();
        // Each in its own partition's slot; all at once over one connection.
        let multiplexed = connection.shared();
        let sent = Instant::now();
        let answers: Vec<i64> =
            futures_util::future::try_join_all(renewals.iter().map(|renewal| {
                let mut connection = multiplexed.clone();
                async move { renewal.invoke_async(&mut connection).await }
            }))
            .await?;
        for (p, answer) in held.clone().into_iter().zip(answers) {
            if answer == 1 {
                renewed.insert(p, sent);
            } else {
                warn!(
                    message = "partition lost: its lease ran out",
                    stage = self.group,
                    partition = p
                );
                held.remove(&p);
                releasing.remove(&p);
                metrics::counter!("botline_stage_partitions_lost_total", "stage" => self.group)
                    .increment(1);
                let _ = self.changes.send(Change::Lost(p));
            }
        }
        // Every partition's owner key is in a slot of its own: one GET each, at once.
        let owners: Vec<Option<String>> =
            futures_util::future::try_join_all(self.streams.all().map(|p| {
                let mut connection = multiplexed.clone();
                let key = self.streams.owner(p, self.group);
                async move {
                    redis::cmd("GET")
                        .arg(key)
                        .query_async::<Option<String>>(&mut connection)
                        .await
                }
            }))
            .await?;
        // A key with our name that we do not know of: an earlier run of this
        // consumer (same name, same pending entries) held it. Take it back.
        for (p, owner) in self.streams.all().zip(&owners) {
            if owner.as_deref() == Some(self.consumer.as_str()) && !held.contains(&p) {
                let sent = Instant::now();
                let mut renewal = scripts::LEASE.prepare_invoke();
                renewal
                    .key(self.streams.owner(p, self.group))
                    .arg(&self.consumer)
                    .arg(ttl);
                let mut connection = multiplexed.clone();
                if renewal.invoke_async::<i64>(&mut connection).await? == 1 {
                    held.insert(p);
                    renewed.insert(p, sent);
                    let _ = self.changes.send(Change::Gained(p));
                }
            }
        }
        let (take, release) = assignment(&self.consumer, &members, &owners, held, releasing);
        for p in release {
            info!(
                message = "giving a partition up",
                stage = self.group,
                partition = p,
                members = members.len()
            );
            releasing.insert(p);
            let _ = self.changes.send(Change::Release(p));
        }
        for p in take {
            let sent = Instant::now();
            let taken: Option<String> = redis::cmd("SET")
                .arg(self.streams.owner(p, self.group))
                .arg(&self.consumer)
                .arg("NX")
                .arg("PX")
                .arg(ttl)
                .query_async(&mut connection)
                .await?;
            if taken.is_some() {
                info!(
                    message = "partition taken",
                    stage = self.group,
                    partition = p,
                    members = members.len()
                );
                metrics::counter!("botline_stage_partitions_taken_total", "stage" => self.group)
                    .increment(1);
                held.insert(p);
                renewed.insert(p, sent);
                let _ = self.changes.send(Change::Gained(p));
            }
        }
        Ok(())
    }

    /// Delete the partition's owner key if it is still ours.
    async fn give_up(&self, p: Partition) {
        let given: Result<i64, Error> = async {
            let mut connection = self.pool.get().await?;
            Ok(scripts::LEASE
                .key(self.streams.owner(p, self.group))
                .arg(&self.consumer)
                .arg(0)
                .invoke_async(&mut connection)
                .await?)
        }
        .await;
        match given {
            Ok(_) => info!(
                message = "partition given up",
                stage = self.group,
                partition = p
            ),
            Err(error) => {
                warn!(message = "could not give a partition up; its lease runs out by itself", partition = p, %error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(spec: &str) -> Vec<Option<String>> {
        spec.chars()
            .map(|c| (c != '.').then(|| c.to_string()))
            .collect()
    }

    fn set(items: &[Partition]) -> BTreeSet<Partition> {
        items.iter().copied().collect()
    }

    /// `spec`: each partition's owner (a letter) or `.` for free.
    fn check(
        me: &str,
        members: &str,
        spec: &str,
        releasing: &[Partition],
        take: &[Partition],
        release: &[Partition],
    ) {
        let members: Vec<String> = members.chars().map(String::from).collect();
        let owners = owners(spec);
        let held: BTreeSet<Partition> = owners
            .iter()
            .enumerate()
            .filter(|(_, o)| o.as_deref() == Some(me))
            .map(|(p, _)| p as Partition)
            .collect();
        let got = assignment(me, &members, &owners, &held, &set(releasing));
        assert_eq!(
            got,
            (take.to_vec(), release.to_vec()),
            "{me} of {members:?} over {spec}"
        );
    }

    #[test]
    fn shares_are_balanced_sticky_and_cooperative() {
        // Alone: take every free partition.
        check("a", "a", "....", &[], &[0, 1, 2, 3], &[]);
        // A second member joins: the first gives up the excess, highest first.
        check("a", "ab", "aaaa", &[], &[], &[3, 2]);
        // ...and the newcomer takes nothing that is still owned.
        check("b", "ab", "aaaa", &[], &[], &[]);
        check("b", "ab", "aa..", &[], &[2, 3], &[]);
        // Already giving up: not asked twice.
        check("a", "ab", "aaaa", &[3, 2], &[], &[]);
        // Uneven: the first P mod n members own one more.
        check("a", "abc", "aaaa....", &[], &[], &[3]);
        check("b", "abc", "aaa.....", &[], &[3, 4, 5], &[]);
        check("c", "abc", "aaabbb..", &[], &[6, 7], &[]);
        // More members than partitions: the extras stand by.
        check("c", "abc", "ab", &[], &[], &[]);
        // An owner died (its key ran out): the stand-by takes its partition.
        check("c", "bc", ".b", &[], &[0], &[]);
        // Not (yet) among the members: give everything up.
        check("z", "ab", "zz", &[], &[], &[0, 1]);
    }
}
