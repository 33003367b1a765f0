//! Messages kept after delivery (`retain.rs`), on a real store in a temp
//! dir: retained with their attempts, listed, found again after a restart,
//! sent again to one destination (also across a crash in the middle),
//! forgotten when past their time (their segment then deleted).

use std::collections::HashSet;

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

const HOUR: Duration = Duration::from_secs(3600);

/// Segments of about two messages; a retention of an hour, swept only when
/// a test calls the sweep.
fn open_retaining(path: &Path) -> Local {
    let opts = StoreOptions {
        segment_bytes: Some(700),
        retain_delivered: Some(HOUR),
        sweep_every: Some(HOUR),
        ..StoreOptions::default()
    };
    Local::open(path, opts, |_, _| {}).expect("open store")
}

fn append(store: &Local, body: &str, names: &[&str]) -> u64 {
    let names: Vec<Arc<str>> = names.iter().map(|n| Arc::from(*n)).collect();
    let msg = MessageRecord {
        received_ms: now_ms(),
        route: "/in".into(),
        peer: "127.0.0.1".into(),
        headers: vec![],
        body: Bytes::copy_from_slice(body.as_bytes()),
    };
    store.append(&msg, &names).expect("append")
}

fn due(store: &Local, dest: &str) -> Vec<Lease> {
    store.due(dest, u64::MAX, usize::MAX, &HashSet::new()).leases
}

fn attempt(at_ms: u64, status: u16) -> Attempt {
    Attempt { at_ms, duration_ms: 7, status, ..Attempt::default() }
}

fn deliver_all(store: &Local, dest: &str, status: u16) {
    for lease in due(store, dest) {
        store.delivered(dest, &lease, attempt(now_ms(), status)).expect("delivered");
    }
}

fn state_of(found: &Inspection, dest: &str) -> (DeliveryState, Vec<u16>) {
    let d = found.deliveries.iter().find(|d| d.destination == dest).expect("destination");
    (d.state.clone(), d.attempts.iter().map(|a| a.status).collect())
}

fn delivered_to(store: &Local, dest: &str) -> Vec<u64> {
    store.delivered_page(dest, 0, u64::MAX, 1000).expect("page").ids
}

#[test]
fn delivered_messages_are_kept_with_their_attempts_until_swept() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_retaining(dir.path());
        let ids: Vec<u64> = (0..8).map(|i| append(&store, &format!("m{i:0>200}"), &["a", "b"])).collect();
        store.sync().await.expect("sync");
        // The first message to `a` fails once, then everything is delivered.
        let first = due(&store, "a").remove(0);
        let record = QueueRecord { attempts: 1, last_status: 503, last_error: "http 503".into() };
        store.reschedule("a", &first, 0, &record, attempt(1, 503)).expect("retry");
        deliver_all(&store, "a", 200);
        deliver_all(&store, "b", 204);
        assert_eq!(store.retained(), 8);
        assert_eq!(store.bytes(), 0, "retained messages are not counted against max_bytes");
        let sealed = store.inner.log.sealed();
        assert!(!sealed.is_empty());
        assert!(lock(&store.inner.unneeded).is_empty(), "retained messages hold their segments");

        let found = store.inspect(ids[0]).await.expect("inspect").expect("retained");
        assert!(found.retained_until_ms.is_some_and(|t| t > now_ms()));
        let (a, tried) = state_of(&found, "a");
        assert!(matches!(a, DeliveryState::Delivered { at_ms: Some(_) }), "{a:?}");
        assert_eq!(tried, vec![503, 200], "the failed attempt and the delivering one");
        assert_eq!(state_of(&found, "b").1, vec![204]);
        assert_eq!(&found.record.body[..2], b"m0");
        assert_eq!(delivered_to(&store, "a"), ids);
        let page = store.delivered_page("b", 0, u64::MAX, 3).expect("page");
        assert_eq!((page.ids.as_slice(), page.next), (&ids[..3], Some(ids[2])));
        // The next pages, across segments of two messages each.
        let page = store.delivered_page("b", ids[2] + 1, u64::MAX, 3).expect("page");
        assert_eq!((page.ids.as_slice(), page.next), (&ids[3..6], Some(ids[5])));
        let page = store.delivered_page("b", ids[5] + 1, u64::MAX, 3).expect("page");
        assert_eq!((page.ids.as_slice(), page.next), (&ids[6..], None));
        assert!(delivered_to(&store, "c").is_empty());

        // A restart finds them again, still holding their segments.
        store.close().await.expect("close");
        drop(store);
        let store = open_retaining(dir.path());
        assert_eq!(store.retained(), 8);
        let now_sealed = store.inner.log.sealed();
        assert!(sealed.iter().all(|s| now_sealed.contains(s)), "{sealed:?} kept: {now_sealed:?}");
        let unneeded = lock(&store.inner.unneeded).clone();
        assert!(
            unneeded.iter().all(|s| !sealed.contains(s)),
            "recovery counts retained messages as live: {unneeded:?} {:?}",
            lock(&store.inner.live)
        );
        let found = store.inspect(ids[0]).await.expect("inspect").expect("retained after a restart");
        assert_eq!(state_of(&found, "a").1, vec![503, 200]);
        assert_eq!(delivered_to(&store, "a"), ids);

        // Not yet past their time: nothing is forgotten.
        assert_eq!(store.sweep_retained(now_ms()).expect("sweep"), 0);
        // Past it: all are, and their segments go.
        assert_eq!(store.sweep_retained(now_ms() + 2 * HOUR.as_millis() as u64).expect("sweep"), 8);
        assert_eq!(store.retained(), 0);
        assert!(store.inspect(ids[0]).await.expect("inspect").is_none());
        assert!(delivered_to(&store, "a").is_empty());
        store.inner.reclaim_unneeded().await.expect("reclaim");
        assert!(store.inner.log.sealed().is_empty(), "emptied segments deleted");
        store.close().await.expect("close");
        drop(store);
        let store = open_retaining(dir.path());
        assert_eq!(store.retained(), 0);
        assert!(store.inner.retained.is_empty());
        store.close().await.expect("close");
    });
}

/// Issue 23, point 7: retention is bounded in bytes too: past
/// `retain_max_bytes` the oldest retained messages are forgotten at the
/// next sweep, before their time; the count survives a restart.
#[test]
fn retained_bytes_are_bounded_oldest_first_and_counted_across_a_restart() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |max: Option<u64>| {
            let opts = StoreOptions {
                segment_bytes: Some(700),
                retain_delivered: Some(HOUR),
                retain_max_bytes: max,
                sweep_every: Some(HOUR),
                ..StoreOptions::default()
            };
            Local::open(dir.path(), opts, |_, _| {}).expect("open store")
        };
        let store = open(None);
        let ids: Vec<u64> = (0..6).map(|i| append(&store, &format!("m{i:0>200}"), &["a"])).collect();
        store.sync().await.expect("sync");
        deliver_all(&store, "a", 200);
        assert_eq!(store.retained(), 6);
        let six = store.retained_bytes();
        assert!(six >= 6 * 200, "{six}");
        let one = six / 6;
        assert_eq!(store.sweep_retained(now_ms()).expect("sweep"), 0, "no byte bound: nothing goes");
        store.close().await.expect("close");
        drop(store);

        // Reopened with room for four: the count is read back, and the two
        // oldest go at the sweep.
        let store = open(Some(4 * one));
        assert_eq!(store.retained_bytes(), six, "counted again at open");
        assert_eq!(store.sweep_retained(now_ms()).expect("sweep"), 2);
        assert_eq!((store.retained(), store.retained_bytes()), (4, 4 * one));
        assert!(store.inspect(ids[0]).await.expect("inspect").is_none(), "the oldest went first");
        assert!(store.inspect(ids[1]).await.expect("inspect").is_none());
        assert!(store.inspect(ids[2]).await.expect("inspect").is_some());
        assert_eq!(delivered_to(&store, "a"), ids[2..]);
        assert_eq!(store.sweep_retained(now_ms()).expect("sweep"), 0, "within the bound now");
        store.close().await.expect("close");
    });
}

/// Without retention a message is deleted once delivered (as before), but
/// while it is pending elsewhere it is listed as delivered to the one that
/// got it, and can be sent to it again.
#[test]
fn a_message_pending_elsewhere_is_listed_as_delivered_and_sent_again() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Local::open(dir.path(), StoreOptions::default(), |_, _| {}).expect("open");
        let id = append(&store, "x", &["a", "b"]);
        store.sync().await.expect("sync");
        deliver_all(&store, "a", 200);
        assert_eq!(delivered_to(&store, "a"), vec![id]);
        assert!(delivered_to(&store, "b").is_empty());
        assert_eq!(store.replay_delivered("a", &Selection::all()).await.expect("replay"), 1);
        assert_eq!(due(&store, "a").len(), 1, "pending for a again");
        let found = store.inspect(id).await.expect("inspect").expect("stored");
        assert!(matches!(state_of(&found, "a").0, DeliveryState::Pending { .. }));
        assert_eq!(state_of(&found, "a").1, vec![200], "its attempt is kept");
        deliver_all(&store, "a", 200);
        deliver_all(&store, "b", 200);
        assert_eq!(store.retained(), 0);
        assert!(store.inspect(id).await.expect("inspect").is_none(), "no retention: deleted");
        store.close().await.expect("close");
    });
}

#[test]
fn a_retained_message_is_sent_again_to_one_destination_across_a_restart() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_retaining(dir.path());
        let ids: Vec<u64> = (0..3).map(|i| append(&store, &format!("m{i}"), &["a", "b"])).collect();
        store.sync().await.expect("sync");
        deliver_all(&store, "a", 200);
        deliver_all(&store, "b", 200);
        let sel = Selection { since_ms: id_received_ms(ids[1]), only: Some(ids[1]), ..Selection::default() };
        assert_eq!(store.replay_delivered("a", &sel).await.expect("replay"), 1);
        assert_eq!(due(&store, "a").iter().map(|l| l.id).collect::<Vec<_>>(), vec![ids[1]]);
        assert!(due(&store, "b").is_empty(), "only the destination asked for");
        assert_eq!(store.retained(), 2);
        assert!(store.inner.get_retained(ids[1]).expect("get").is_none());
        // Sent again is pending, and survives a crash.
        store.crash().await;
        drop(store);
        let store = open_retaining(dir.path());
        assert_eq!(due(&store, "a").iter().map(|l| l.id).collect::<Vec<_>>(), vec![ids[1]]);
        assert_eq!(store.retained(), 2);
        deliver_all(&store, "a", 202);
        assert_eq!(store.retained(), 3);
        let found = store.inspect(ids[1]).await.expect("inspect").expect("retained again");
        assert_eq!(state_of(&found, "a").1, vec![200, 202], "both deliveries' attempts");
        // Nothing matches: nothing sent.
        assert_eq!(store.delivered_ids("c", &Selection::all()).expect("ids").len(), 0);
        store.close().await.expect("close");
    });
}

/// A crash in the middle of sending a retained message again: the retry
/// state written and the `Done` mark gone, the retained key still there.
/// Recovery goes by what is pending: the message is live, the key dropped.
/// With the mark still there, it stays retained (the retry state is
/// dropped).
#[test]
fn recovery_settles_a_send_again_cut_by_a_crash() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_retaining(dir.path());
        let (x, y) = (append(&store, "x", &["a", "b"]), append(&store, "y", &["a"]));
        store.sync().await.expect("sync");
        deliver_all(&store, "a", 200);
        deliver_all(&store, "b", 200);
        let Some(RetainedRecord { place: RetainedPlace::Log(loc), .. }) = store.retained_record(x).expect("get") else {
            panic!("x retained in the log")
        };
        let retry = StateRecord::Retry { due_ms: 0, record: QueueRecord::default(), history: vec![] }.encode();
        store.inner.state.insert(state_key("a", x), retry.as_slice()).expect("retry state");
        store.inner.remove_mark(loc.seg, "a", x).expect("mark gone");
        store.inner.state.insert(state_key("a", y), retry.as_slice()).expect("retry state only");
        store.inner.flush_sled().expect("flush");
        store.crash().await;
        drop(store);
        let store = open_retaining(dir.path());
        assert_eq!(due(&store, "a").iter().map(|l| l.id).collect::<Vec<_>>(), vec![x]);
        assert!(due(&store, "b").is_empty(), "b's mark still counts");
        assert!(store.retained_record(x).expect("get").is_none(), "live again: not retained");
        assert!(store.retained_record(y).expect("get").is_some(), "y's mark won: still retained");
        assert!(store.inner.state.get(state_key("a", y)).expect("get").is_none(), "its stray state dropped");
        assert_eq!(store.retained(), 1);
        store.close().await.expect("close");
    });
}

/// A message delivered before the flush that writes it (deliveries start
/// when it is queued): retained where that flush puts it.
#[test]
fn a_message_delivered_before_its_flush_is_retained_where_the_flush_puts_it() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_retaining(dir.path());
        let id = append(&store, "early", &["a"]);
        deliver_all(&store, "a", 200);
        assert_eq!(store.retained_record(id).expect("get").map(|r| r.place), Some(RetainedPlace::Unplaced));
        store.sync().await.expect("sync");
        assert!(
            matches!(store.retained_record(id).expect("get").map(|r| r.place), Some(RetainedPlace::Log(_))),
            "placed by the flush"
        );
        let found = store.inspect(id).await.expect("inspect").expect("retained");
        assert_eq!(&found.record.body[..], b"early");
        store.close().await.expect("close");
        drop(store);
        let store = open_retaining(dir.path());
        assert_eq!(store.retained(), 1);
        assert!(store.inspect(id).await.expect("inspect").is_some());
        store.close().await.expect("close");
    });
}

/// A message with a dead letter is kept in sled; purging the dead letter
/// finishes it: retained there (purged shown as such), then swept with its
/// copy.
#[test]
fn a_kept_copy_is_retained_and_swept_with_its_keys() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_retaining(dir.path());
        let id = append(&store, "dead for a", &["a", "b"]);
        store.sync().await.expect("sync");
        let lease = due(&store, "a").remove(0);
        let dead = DeadRecord {
            attempts: 1,
            dead_at_ms: 1,
            last_status: 400,
            reason: "http 400".into(),
            history: vec![attempt(1, 400)],
        };
        store.dead_letter("a", &lease, &dead).expect("dead letter");
        deliver_all(&store, "b", 200);
        assert_eq!(store.purge_dead("a", &Selection::all()).await.expect("purge"), 1);
        assert!(matches!(store.retained_record(id).expect("get").map(|r| r.place), Some(RetainedPlace::Kept { .. })));
        store.close().await.expect("close");
        drop(store);
        let store = open_retaining(dir.path());
        let found = store.inspect(id).await.expect("inspect").expect("retained");
        assert_eq!(state_of(&found, "a").0, DeliveryState::Purged);
        assert!(matches!(state_of(&found, "b").0, DeliveryState::Delivered { .. }));
        assert_eq!(delivered_to(&store, "b"), vec![id]);
        assert!(delivered_to(&store, "a").is_empty(), "purged is not delivered");
        assert_eq!(store.sweep_retained(now_ms() + 2 * HOUR.as_millis() as u64).expect("sweep"), 1);
        store.inner.write_retained().expect("write");
        assert!(store.inner.kept.is_empty() && store.inner.state.is_empty() && store.inner.retained.is_empty());
        store.close().await.expect("close");
        drop(store);
        let store = open_retaining(dir.path());
        assert!(store.inspect(id).await.expect("inspect").is_none());
        assert!(due(&store, "a").is_empty() && due(&store, "b").is_empty(), "nothing comes back");
        store.close().await.expect("close");
    });
}

/// Retention yields to new callbacks: with the filesystem under twice
/// `min_free_bytes`, the oldest retained messages are forgotten before
/// their time.
#[test]
fn a_nearly_full_disk_forgets_the_oldest_retained_messages_first() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_retaining(dir.path());
        let ids: Vec<u64> = (0..3).map(|i| append(&store, &format!("m{i}"), &["a"])).collect();
        store.sync().await.expect("sync");
        deliver_all(&store, "a", 200);
        assert_eq!(store.sweep_retained(now_ms()).expect("sweep"), 0, "plenty of room: kept");
        store.close().await.expect("close");
        drop(store);
        // The same disk, with a floor above what it has free.
        let free = open::free_space(dir.path()).expect("statvfs");
        let opts = StoreOptions {
            segment_bytes: Some(700),
            retain_delivered: Some(HOUR),
            sweep_every: Some(HOUR),
            // (twice this is far above what it has, whatever other tests do)
            min_free_bytes: Some(free.max(1)),
            ..StoreOptions::default()
        };
        let store = Local::open(dir.path(), opts, |_, _| {}).expect("open");
        assert_eq!(store.retained(), 3);
        assert_eq!(store.sweep_retained(now_ms()).expect("sweep"), 3, "forgotten before their time");
        assert!(store.inspect(ids[0]).await.expect("inspect").is_none());
        store.close().await.expect("close");
    });
}

/// Encrypted at rest: a retained message reads back from the log and from
/// a kept copy alike.
#[test]
fn retained_messages_read_back_when_sealed_at_rest() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = || {
            StoreOptions {
                segment_bytes: Some(700),
                retain_delivered: Some(HOUR),
                sweep_every: Some(HOUR),
                ..StoreOptions::default()
            }
            .encrypt_with(&[("k1".to_string(), vec![7u8; 32])])
            .expect("sealer")
        };
        let store = Local::open(dir.path(), opts(), |_, _| {}).expect("open");
        let (logged, kept) = (append(&store, "in the log", &["a"]), append(&store, "kept in sled", &["a", "b"]));
        store.sync().await.expect("sync");
        let lease = due(&store, "b").remove(0);
        let dead = DeadRecord { attempts: 1, dead_at_ms: 1, last_status: 400, reason: "no".into(), history: vec![] };
        store.dead_letter("b", &lease, &dead).expect("dead letter");
        deliver_all(&store, "a", 200);
        assert_eq!(store.purge_dead("b", &Selection::all()).await.expect("purge"), 1);
        store.close().await.expect("close");
        drop(store);
        let store = Local::open(dir.path(), opts(), |_, _| {}).expect("reopen");
        assert_eq!(store.retained(), 2);
        for (id, body) in [(logged, "in the log"), (kept, "kept in sled")] {
            let found = store.inspect(id).await.expect("inspect").expect("retained");
            assert_eq!(&found.record.body[..], body.as_bytes());
        }
        assert_eq!(store.replay_delivered("a", &Selection::one(kept)).await.expect("again"), 1);
        assert_eq!(due(&store, "a").iter().map(|l| l.id).collect::<Vec<_>>(), vec![kept]);
        store.close().await.expect("close");
    });
}
