//! What each backend can do: the one table. `check` (configuration keys a
//! backend cannot honour), the admin API (501 with the reason), reload,
//! `/api/destinations` (for the status page) and the backends' own
//! refusals ask it; nothing else compares store kinds. When a backend
//! gains a capability, its row here changes and every refusal goes with it.

use std::fmt;

/// Which backend a store is (`store.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded store: a segment log and sled, in `store.path`.
    Local,
    /// NATS JetStream, shared by several relays.
    JetStream,
}

impl StoreKind {
    /// As written in `store.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Local => "local",
            StoreKind::JetStream => "jetstream",
        }
    }

    pub fn capabilities(self) -> Capabilities {
        Capabilities(self)
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something an operator relies on that a backend may not provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// `GET /api/messages/{id}`: a message's deliveries and attempts.
    Inspection,
    /// `GET /api/messages?destination&state`: messages by state and time.
    Listing,
    /// `routes[].index` and lookups by an indexed body field.
    Lookup,
    /// `store.retain_delivered`: delivered messages kept for a while.
    Retention,
    /// Sending a delivered message again (`messages replay`).
    ReplayDelivered,
    /// `destinations.*.ordering`: one key's messages one at a time, in order.
    Ordering,
    /// `[store.encryption]`: records sealed with the relay's keys.
    EncryptionAtRest,
    /// Bringing waiting retries forward (`retry-now`, a recovered destination).
    RetryNow,
    /// Adding or removing destinations with a reload (SIGHUP).
    DestinationsOnReload,
}

impl Capability {
    pub const ALL: [Capability; 9] = [
        Capability::Inspection,
        Capability::Listing,
        Capability::Lookup,
        Capability::Retention,
        Capability::ReplayDelivered,
        Capability::Ordering,
        Capability::EncryptionAtRest,
        Capability::RetryNow,
        Capability::DestinationsOnReload,
    ];

    /// Its name in the admin API (`/api/destinations`'s `store.capabilities`).
    pub fn name(self) -> &'static str {
        match self {
            Capability::Inspection => "inspection",
            Capability::Listing => "listing",
            Capability::Lookup => "lookup",
            Capability::Retention => "retention",
            Capability::ReplayDelivered => "replay_delivered",
            Capability::Ordering => "ordering",
            Capability::EncryptionAtRest => "encryption_at_rest",
            Capability::RetryNow => "retry_now",
            Capability::DestinationsOnReload => "destinations_on_reload",
        }
    }

    /// What it is, for a sentence ("... is not available with ...").
    pub fn what(self) -> &'static str {
        match self {
            Capability::Inspection => "message inspection",
            Capability::Listing => "message listing",
            Capability::Lookup => "lookup by an indexed field",
            Capability::Retention => "keeping delivered messages",
            Capability::ReplayDelivered => "replay of delivered messages",
            Capability::Ordering => "ordering per key",
            Capability::EncryptionAtRest => "encryption at rest",
            Capability::RetryNow => "bringing retries forward",
            Capability::DestinationsOnReload => "adding or removing destinations without a restart",
        }
    }
}

/// One backend's row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities(StoreKind);

impl Capabilities {
    pub fn kind(self) -> StoreKind {
        self.0
    }

    /// `None` if the backend can; otherwise why not.
    pub fn lacks(self, c: Capability) -> Option<&'static str> {
        match self.0 {
            StoreKind::Local => None,
            StoreKind::JetStream => match c {
                // Sealed before the publish (`jetstream/flow.rs`); inspection
                // from the work stream and the history bucket (`history.rs`);
                // delivered messages kept and replayed from a stream the
                // server copies into (`kept.rs`).
                // Listing walks the stream that holds the state asked for
                // (`listing.rs`); lookups read an index stream (`lookup.rs`).
                // Ordering: partitions of the subjects, one message of each
                // pending at a time (`lanes.rs`).
                // Destinations on reload: an added one's consumers are made
                // then, a removed one's stay (its deliveries kept).
                Capability::EncryptionAtRest
                | Capability::DestinationsOnReload
                | Capability::Ordering
                | Capability::Inspection
                | Capability::Listing
                | Capability::Lookup
                | Capability::Retention
                | Capability::ReplayDelivered => None,
                Capability::RetryNow => {
                    Some("a retry is a nak the server holds until its delay is over; it cannot be asked for sooner")
                }
            },
        }
    }

    /// Whether the backend can do `c`.
    pub fn has(self, c: Capability) -> bool {
        self.lacks(c).is_none()
    }

    /// The refusal for `c`, if the backend lacks it: "<what> is not
    /// available with store.kind = \"<kind>\" (<why>)".
    pub fn refusal(self, c: Capability) -> Option<String> {
        self.lacks(c).map(|why| format!("{} is not available with store.kind = \"{}\" ({why})", c.what(), self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_store_can_do_everything_and_jetstream_says_why_not() {
        let local = StoreKind::Local.capabilities();
        assert!(Capability::ALL.iter().all(|c| local.has(*c)));
        let jet = StoreKind::JetStream.capabilities();
        let jet_has = [
            Capability::EncryptionAtRest,
            Capability::Inspection,
            Capability::Listing,
            Capability::Lookup,
            Capability::Retention,
            Capability::ReplayDelivered,
            Capability::Ordering,
            Capability::DestinationsOnReload,
        ];
        assert!(jet_has.iter().all(|c| jet.has(*c)));
        for c in Capability::ALL.into_iter().filter(|c| !jet_has.contains(c)) {
            let refusal = jet.refusal(c).expect("JetStream lacks it today (issue 25 closes these)");
            assert!(refusal.starts_with(c.what()) && refusal.contains("store.kind = \"jetstream\""), "{refusal}");
        }
        let names: std::collections::HashSet<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Capability::ALL.len(), "names are unique");
    }
}
