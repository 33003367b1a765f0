//! The body budget: how many bytes of request bodies ingress holds in
//! memory (`ingress.max_buffered_bytes`), and who may hold them.
//!
//! Three rules, each against a way of holding memory for nothing:
//! - **Nothing is held before the body's first byte.** A request with a
//!   `Content-Length` takes all of it when its first byte arrives (and
//!   waits for it then); a chunked one, chunk by chunk. 64 requests
//!   declaring 1 MiB and sending nothing hold nothing (they held the whole
//!   64 MiB budget for `body_read_timeout` before, issue 23). Charging a
//!   declared body byte by byte instead was rejected: requests holding
//!   parts of their bodies can fill the budget with none of them able to
//!   finish (600 concurrent 1 MiB uploads against 64 MiB would all wait
//!   out their timeout); all of a body or none cannot deadlock.
//! - **One client address holds at most a quarter of the budget** (or one
//!   body, if a body is larger), so a sender that trickles large bodies
//!   (many HTTP/2 streams on one connection, which
//!   `max_connections_per_ip` does not see) leaves the rest to everyone
//!   else; its own further requests wait for its own share.
//! - **Small callbacks have a reserve**: a request whose body is at most
//!   [`SMALL_BODY`] may take from a reserve of its own (a sixteenth of the
//!   budget) when the budget is full, so a ThingSpace callback (a few KiB)
//!   gets through while large bodies from many addresses fill it. Memory
//!   for bodies is thus bounded by `max_buffered_bytes` plus a sixteenth.
//!
//! Everything taken is given back when the request is answered
//! ([`Held`] is dropped).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// A body at most this large is a small callback (may use the reserve).
pub const SMALL_BODY: u64 = 64 << 10;

/// Why bytes could not be had within the deadline.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This client address holds its whole share already.
    Peer,
    /// The budget (and, for a small callback, the reserve) stayed full.
    Full,
}

pub struct BodyBudget {
    all: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    peer_share: u32,
    peers: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

/// What one request holds; given back on drop.
pub struct Held {
    /// Of its address's share (at most the whole share, however large
    /// the body), of the budget, of the reserve.
    own: Option<OwnedSemaphorePermit>,
    shared: Option<OwnedSemaphorePermit>,
    reserved: Option<OwnedSemaphorePermit>,
    bytes: u64,
    gauge: prometheus::IntGauge,
    budget: Arc<BodyBudget>,
    peer: IpAddr,
    /// The address's share, once looked up (once per request).
    share: Option<Arc<Semaphore>>,
}

impl BodyBudget {
    pub fn new(max_buffered_bytes: u64) -> Arc<BodyBudget> {
        let total = u32::try_from(max_buffered_bytes).unwrap_or(u32::MAX).min(Semaphore::MAX_PERMITS as u32);
        let reserve = (total / 16).max(1);
        Arc::new(BodyBudget {
            all: Arc::new(Semaphore::new(total as usize)),
            reserve: Arc::new(Semaphore::new(reserve as usize)),
            peer_share: (total / 4).max(1),
            peers: Mutex::default(),
        })
    }

    /// An empty hold for a request from `peer`.
    pub fn hold(self: &Arc<Self>, peer: IpAddr, gauge: prometheus::IntGauge) -> Held {
        Held { own: None, shared: None, reserved: None, bytes: 0, gauge, budget: self.clone(), peer, share: None }
    }

    fn peer(&self, ip: IpAddr) -> Arc<Semaphore> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.entry(ip).or_insert_with(|| Arc::new(Semaphore::new(self.peer_share as usize))).clone()
    }

    /// Forgets `ip`'s entry if nothing of it is held (and nobody waits).
    fn release(&self, ip: IpAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = peers.get(&ip) {
            if Arc::strong_count(s) == 1 && s.available_permits() == self.peer_share as usize {
                peers.remove(&ip);
            }
        }
    }
}

impl Held {
    /// Takes `n` more bytes for this request, waiting until `deadline` at
    /// most; `small`: the whole body is known to be at most [`SMALL_BODY`].
    /// Returns whether it had to wait.
    pub async fn take(&mut self, n: u64, small: bool, deadline: tokio::time::Instant) -> Result<bool, Refused> {
        let budget = self.budget.clone();
        // n <= max_body <= 512 MiB (validation), so it fits a u32. A body
        // larger than a share takes the whole share (and no more, over all
        // its chunks).
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let own_held = self.own.as_ref().map_or(0, |p| p.num_permits() as u32);
        let own = n.min(budget.peer_share.saturating_sub(own_held));
        let mut waited = false;
        if own > 0 {
            let peer = self.share.get_or_insert_with(|| budget.peer(self.peer)).clone();
            let mine = match peer.clone().try_acquire_many_owned(own) {
                Ok(p) => p,
                Err(_) => {
                    waited = true;
                    match tokio::time::timeout_at(deadline, peer.acquire_many_owned(own)).await {
                        Ok(Ok(p)) => p,
                        _ => return Err(Refused::Peer),
                    }
                }
            };
            merge(&mut self.own, mine);
        }
        match budget.all.clone().try_acquire_many_owned(n) {
            Ok(p) => merge(&mut self.shared, p),
            Err(TryAcquireError::NoPermits) if small => match budget.reserve.clone().try_acquire_many_owned(n) {
                Ok(p) => merge(&mut self.reserved, p),
                Err(_) => {
                    waited = true;
                    merge(&mut self.shared, wait(&budget.all, n, deadline).await?);
                }
            },
            Err(_) => {
                waited = true;
                merge(&mut self.shared, wait(&budget.all, n, deadline).await?);
            }
        }
        self.bytes += u64::from(n);
        self.gauge.add(i64::from(n));
        Ok(waited)
    }
}

fn merge(held: &mut Option<OwnedSemaphorePermit>, more: OwnedSemaphorePermit) {
    match held {
        Some(p) => p.merge(more),
        None => *held = Some(more),
    }
}

async fn wait(s: &Arc<Semaphore>, n: u32, deadline: tokio::time::Instant) -> Result<OwnedSemaphorePermit, Refused> {
    match tokio::time::timeout_at(deadline, s.clone().acquire_many_owned(n)).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err(Refused::Full),
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes as i64);
        // The permits go first: `release` forgets the address only once
        // nothing of it is held.
        (self.own, self.shared, self.reserved) = (None, None, None);
        // Only the last request of the address to let go of its share
        // (the map's reference is then the only one) takes the lock to
        // forget it: under load, requests of one address overlap, and
        // locking the map on every answer cost run 2 measurably.
        if let Some(share) = self.share.take() {
            let weak = Arc::downgrade(&share);
            drop(share);
            if weak.strong_count() == 1 {
                self.budget.release(self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gauge() -> prometheus::IntGauge {
        prometheus::IntGauge::new("t", "t").expect("gauge")
    }

    /// One address holding its quarter waits (and is refused at its
    /// deadline) while another address still gets bytes at once; small
    /// callbacks get through from the reserve once the budget is full;
    /// everything comes back on drop.
    #[tokio::test(start_paused = true)]
    async fn one_address_holds_a_quarter_and_small_callbacks_have_a_reserve() {
        let budget = BodyBudget::new(16 << 20);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"), "10.0.0.3".parse().expect("ip"));
        let soon = || tokio::time::Instant::now() + Duration::from_secs(1);
        let mut held_a = budget.hold(a, gauge());
        assert_eq!(held_a.take(4 << 20, false, soon()).await, Ok(false), "a's quarter, at once");
        let mut more_a = budget.hold(a, gauge());
        assert_eq!(more_a.take(1, false, soon()).await, Err(Refused::Peer), "a's share is spent");
        // b and c fill the rest of the budget.
        let mut held_b = budget.hold(b, gauge());
        held_b.take(4 << 20, false, soon()).await.expect("b");
        let mut held_c = budget.hold(c, gauge());
        held_c.take(4 << 20, false, soon()).await.expect("c");
        let mut held_d = budget.hold("10.0.0.4".parse().expect("ip"), gauge());
        held_d.take(4 << 20, false, soon()).await.expect("d");
        // Full: a large body waits and is refused; a small one takes the reserve.
        let mut large = budget.hold("10.0.0.5".parse().expect("ip"), gauge());
        assert_eq!(large.take(100 << 10, false, soon()).await, Err(Refused::Full));
        let mut small = budget.hold("10.0.0.6".parse().expect("ip"), gauge());
        small.take(4 << 10, true, soon()).await.expect("a small callback gets through");
        drop((held_a, more_a, held_b, held_c, held_d, large, small));
        assert_eq!(budget.all.available_permits(), 16 << 20, "all given back");
        assert_eq!(budget.reserve.available_permits(), 1 << 20);
        assert!(budget.peers.lock().expect("lock").is_empty(), "no address kept");
        // A body larger than a share takes the whole share, and fits.
        let mut big = budget.hold(a, gauge());
        assert_eq!(big.take(8 << 20, false, soon()).await, Ok(false));
        let mut next = budget.hold(a, gauge());
        assert_eq!(next.take(1, true, soon()).await, Err(Refused::Peer));
        // So does one chunked body larger than a share, chunk by chunk.
        let mut chunked = budget.hold("10.0.0.9".parse().expect("ip"), gauge());
        for _ in 0..6 {
            assert_eq!(chunked.take(1 << 20, false, soon()).await, Ok(false), "6 MiB in chunks, share 4 MiB");
        }
    }
}
