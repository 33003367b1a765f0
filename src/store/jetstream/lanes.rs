//! Ordering per key on JetStream: partitions of the work stream's
//! subjects, each delivered one message at a time by the server.
//!
//! A callback with an ordering key is published to `S.in.<p>`, `p` the
//! key modulo `store.order_partitions` (P); one without to `S.in`. Every
//! `per_key` destination orders by the same `order_key` (the
//! configuration check says so), so one subject serves them all.
//!
//! **Consumers of one destination** (its *lanes*), by its `ordering`:
//! - `none`: `d-<dest>`, both subjects, `max_ack_pending` as configured.
//! - `fifo`: `f-<dest>`, both subjects, `max_ack_pending = 1`.
//! - `per_key`: `u-<dest>` for `S.in` (callbacks without the key,
//!   unordered) and `k<P>-<p>-<dest>` for `S.in.<p>`, `max_ack_pending = 1`
//!   each.
//!
//! `max_ack_pending = 1` is what orders: the server hands out a
//! partition's next message only once the one before is acknowledged, to
//! whichever relay pulls, so the order holds across relays without any
//! owner. A retry is a nak with a delay, which keeps the message pending:
//! the partition waits for it (a failing head holds its partition, one
//! P-th of the keys, never the others). A relay killed with a head in
//! flight holds its partition until `ack_wait` ends; the server then
//! hands the same head to another relay, before anything after it. A
//! dead letter is acknowledged and releases the next. A replayed one goes
//! to the end of its partition (a new message of the stream).
//!
//! **Changing** a destination's `ordering` or `order_partitions` changes
//! its lane names: the new lanes are created starting at the oldest
//! message the old ones had not acknowledged (their lowest ack floor),
//! then the old ones are deleted (a consumer is made before one is
//! deleted: an Interest stream drops a message nobody is interested in).
//! Nothing is lost; what was acknowledged above that floor is sent again.
//! All relays must change together (a relay with the old setting would
//! make its lanes again).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;

use super::setup::setup_error;
use super::{Dest, Jet, Names};
use crate::store::{lock, StoreError};

/// A destination's ordering on JetStream (validated configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JetOrder {
    /// One order for every callback.
    Fifo,
    /// One order per partition of the keys.
    PerKey,
}

/// One consumer a destination pulls from.
pub(super) struct Lane {
    pub name: String,
    pub consumer: jetstream::consumer::PullConsumer,
    /// One message at a time (`max_ack_pending = 1`): pulls ask for one
    /// and do not count against the destination's cap.
    pub single: bool,
}

/// A lane as wanted: its name, subjects and whether it orders.
struct Want {
    name: String,
    subjects: Vec<String>,
    single: bool,
}

/// What marks a consumer as one of `dest`'s lanes.
fn description(dest: &str) -> String {
    format!("switchboard destination {dest}")
}

impl Names<'_> {
    /// The subject of partition `p`.
    pub(super) fn lane_subject(&self, p: u64) -> String {
        format!("{}.in.{p}", self.0)
    }
    /// Every subject of the work stream (`S.in` and `S.in.<p>`).
    pub(super) fn every_inbound(&self) -> String {
        format!("{}.>", self.0)
    }
    /// The partitions' subjects.
    pub(super) fn lane_subjects(&self) -> String {
        format!("{}.in.*", self.0)
    }
    /// The kept stream's subjects (`kept.rs`).
    pub(super) fn kept_subjects(&self) -> String {
        format!("{}.kept.>", self.0)
    }
    /// Where callback `id`'s kept copy is.
    pub(super) fn kept_subject(&self, id: u64) -> String {
        format!("{}.kept.{id}", self.0)
    }
}

impl Jet {
    /// The partition of a callback with ordering `keys` (per destination),
    /// if a `per_key` destination of it has its key.
    pub(super) fn partition(&self, keys: &[(Arc<str>, u64)]) -> Option<u64> {
        if keys.is_empty() {
            return None;
        }
        let ordered = lock(&self.inner.ordered);
        keys.iter()
            .find(|(dest, _)| ordered.get(&**dest) == Some(&JetOrder::PerKey))
            .map(|(_, key)| key % self.inner.config.order_partitions.max(1))
    }

    /// The lanes `dest` should have.
    fn wanted(&self, dest: &str) -> Vec<Want> {
        let c = &self.inner.config;
        let names = Names(&c.stream);
        let both = vec![names.inbound(), names.lane_subjects()];
        let order = lock(&self.inner.ordered).get(dest).copied();
        match order {
            None => vec![Want { name: Names::consumer(dest), subjects: both, single: false }],
            Some(JetOrder::Fifo) => vec![Want { name: format!("f-{dest}"), subjects: both, single: true }],
            Some(JetOrder::PerKey) => {
                let n = c.order_partitions;
                let mut out = vec![Want { name: format!("u-{dest}"), subjects: vec![names.inbound()], single: false }];
                out.extend((0..n).map(|p| Want {
                    name: format!("k{n}-{p}-{dest}"),
                    subjects: vec![names.lane_subject(p)],
                    single: true,
                }));
                out
            }
        }
    }

    /// `dest`'s lanes: created, brought to the configuration (ack_wait,
    /// max_ack_pending, the subjects of an older build's consumer), or, if
    /// its ordering changed, made anew from the old lanes' lowest ack
    /// floor and the old ones deleted. `existing`: the stream's consumers.
    pub(super) async fn lanes(
        &self,
        stream: &stream::Stream,
        dest: &str,
        existing: &HashMap<String, jetstream::consumer::Info>,
    ) -> Result<Vec<Lane>, StoreError> {
        let wanted = self.wanted(dest);
        let mark = description(dest);
        let legacy = Names::consumer(dest);
        let old: Vec<&jetstream::consumer::Info> = existing
            .values()
            .filter(|i| {
                lane_of(&i.name) == Some(dest)
                    && (i.config.description.as_deref() == Some(mark.as_str()) || i.name == legacy)
            })
            .collect();
        let stale: Vec<&str> =
            old.iter().map(|i| i.name.as_str()).filter(|n| !wanted.iter().any(|w| w.name == *n)).collect();
        // New lanes start where the oldest unacknowledged message of the
        // old ones is; with no old lanes, at what arrives from now on (a
        // destination added later gets what arrives after, as locally):
        // the stream's next sequence, read now. Not `DeliverPolicy::New`:
        // the server picks that start when the consumer's leader is
        // elected, which on a busy R3 cluster came seconds after the
        // create was answered and a relay had acknowledged callbacks that
        // the consumer then never saw (the HA test lost them this way).
        let start = match old.iter().map(|i| i.ack_floor.stream_sequence + 1).min() {
            Some(s) => s,
            None => {
                let info = stream.get_info().await.map_err(|e| setup_error("reading the stream", e))?;
                info.state.last_sequence + 1
            }
        };
        let mut lanes = Vec::new();
        for w in &wanted {
            let consumer = self.lane(stream, dest, w, existing.get(&w.name), start).await?;
            lanes.push(Lane { name: w.name.clone(), consumer, single: w.single });
        }
        for name in stale {
            tracing::warn!(
                destination = dest,
                consumer = name,
                "ordering changed: deleting the old consumer (its unacknowledged messages are in the new ones)"
            );
            if let Err(e) = stream.delete_consumer(name).await {
                tracing::warn!(destination = dest, consumer = name, error = %e, "could not delete an old consumer");
            }
        }
        Ok(lanes)
    }

    /// One lane: opened (its settings updated if they differ) or created.
    async fn lane(
        &self,
        stream: &stream::Stream,
        dest: &str,
        w: &Want,
        have: Option<&jetstream::consumer::Info>,
        start: u64,
    ) -> Result<jetstream::consumer::PullConsumer, StoreError> {
        let c = &self.inner.config;
        let name = &w.name;
        let want = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(description(dest)),
            filter_subjects: w.subjects.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            // Retries are ours (nak with the policy's delay); the server
            // redelivers without end, and the retry policy dead-letters.
            max_deliver: -1,
            max_ack_pending: if w.single { 1 } else { c.max_ack_pending as i64 },
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        };
        let Some(have) = have else {
            return match stream.create_consumer(want).await {
                Ok(c) => Ok(c),
                // Relays starting together race to create it: the loser
                // takes the winner's.
                Err(e) => {
                    stream.get_consumer(name).await.map_err(|_| setup_error(&format!("creating consumer {name}"), e))
                }
            };
        };
        let h = &have.config;
        let subjects =
            if h.filter_subjects.is_empty() { vec![h.filter_subject.clone()] } else { h.filter_subjects.clone() };
        if h.ack_wait == want.ack_wait
            && h.max_ack_pending == want.max_ack_pending
            && subjects == want.filter_subjects
            && h.description == want.description
        {
            return stream.get_consumer(name).await.map_err(|e| setup_error(&format!("opening consumer {name}"), e));
        }
        tracing::info!(destination = dest, consumer = %name, "bringing the consumer's settings to the configuration's");
        let update = pull::Config { deliver_policy: h.deliver_policy, ..want };
        stream.update_consumer(update).await.map_err(|e| setup_error(&format!("updating consumer {name}"), e))
    }

    /// Starts pulling `lanes` for `d`, unless its pullers run already.
    pub(super) fn spawn_pullers(&self, d: &Arc<Dest>, lanes: Vec<Lane>) {
        if d.started.swap(true, Ordering::SeqCst) {
            return;
        }
        *lock(&d.lanes) = lanes.iter().map(|l| l.name.clone()).collect();
        for lane in lanes {
            let (me, d) = (self.clone(), d.clone());
            self.inner.tasks.spawn(async move { me.pull(d, lane).await });
        }
    }

    /// Makes (or opens) `d`'s lanes and starts pulling them, if not yet.
    pub(super) async fn start_destination(&self, d: &Arc<Dest>) -> Result<(), StoreError> {
        if d.started.load(Ordering::SeqCst) {
            return Ok(());
        }
        let stream = &self.ready()?.stream;
        let existing = Self::consumers_of(stream).await?;
        let lanes = self.lanes(stream, &d.name, &existing).await?;
        self.spawn_pullers(d, lanes);
        Ok(())
    }

    /// A destination added by a reload: its lanes made and pulled now (or
    /// when the relay connects). A destination removed and added again
    /// finds its consumers as it left them: what it had not acknowledged
    /// waited for it in the stream.
    pub async fn add_destination(
        &self,
        name: Arc<str>,
        concurrency: usize,
        order: Option<JetOrder>,
    ) -> Result<(), StoreError> {
        if let Some(o) = order {
            lock(&self.inner.ordered).insert(name.to_string(), o);
        }
        lock(&self.inner.removed).remove(&name);
        let d = Dest::new(name.clone(), concurrency, &self.inner.stop);
        lock(&self.inner.dests).insert(name, d.clone());
        match self.ready() {
            Ok(_) => self.start_destination(&d).await,
            // Not connected yet: `set_up` starts it.
            Err(StoreError::Unavailable(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A destination removed by a reload: its pullers stop, what this
    /// relay held goes back to the server; its consumers stay, so the
    /// stream keeps what it has not acknowledged (as the local store
    /// keeps a removed destination's deliveries) until it comes back or
    /// its consumers are deleted; `/api/destinations` goes on showing it
    /// (not configured, with what waits for it).
    pub async fn remove_destination(&self, name: &str) {
        let Some(d) = lock(&self.inner.dests).remove(name) else { return };
        d.stop.cancel();
        super::give_back(&d).await;
        // Still reported (depth, oldest) from its consumers.
        lock(&self.inner.removed).insert(d.name.clone(), d);
    }

    /// The stream's consumers that are destinations' lanes, by name (by
    /// name first: the server's own consumers, such as a sourcing
    /// stream's, may not parse as a consumer's info in this client).
    pub(super) async fn consumers_of(
        stream: &stream::Stream,
    ) -> Result<HashMap<String, jetstream::consumer::Info>, StoreError> {
        let mut names = Vec::new();
        let mut list = stream.consumer_names();
        while let Some(name) = list.next().await {
            let name = name.map_err(|e| setup_error("listing the stream's consumers", e))?;
            if lane_of(&name).is_some() {
                names.push(name);
            }
        }
        let mut out = HashMap::new();
        for name in names {
            // Gone meanwhile (another relay deleted it): not there.
            if let Ok(info) = stream.consumer_info(&name).await {
                out.insert(name, info);
            }
        }
        Ok(out)
    }
}

/// The destination whose lane `name` is (`d-`, `f-`, `u-` or `k<P>-<p>-`
/// and the destination's name), if it is one.
fn lane_of(name: &str) -> Option<&str> {
    if let Some(rest) = name.strip_prefix("d-").or(name.strip_prefix("f-")).or(name.strip_prefix("u-")) {
        return Some(rest);
    }
    let rest = name.strip_prefix('k')?;
    let (n, rest) = rest.split_once('-')?;
    let (p, dest) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(p) && !dest.is_empty()).then_some(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_lane_names_stay_apart() {
        let n = Names("S");
        assert_eq!(n.lane_subject(3), "S.in.3");
        assert_eq!(n.every_inbound(), "S.>");
        assert_eq!(n.lane_subjects(), "S.in.*");
        // Destination names are letters, digits, '-' and '_': a lane of
        // one destination is never another destination's main consumer.
        assert!(Names::consumer("k16-3-a").starts_with("d-"));
        assert_eq!(lane_of("k16-3-a"), Some("a"));
        assert_eq!(lane_of("k16-0-3-a"), Some("3-a"));
        assert_eq!(lane_of("u-k1-2-b"), Some("k1-2-b"));
        assert_eq!(lane_of("d-x"), Some("x"));
        for not_a_lane in ["k16-a", "k-1-a", "k1-2-", "source-abc", "ka-1-b"] {
            assert_eq!(lane_of(not_a_lane), None, "{not_a_lane}");
        }
    }
}
