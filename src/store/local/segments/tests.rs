//! Tests of the message log on the real disk: reopening, rolling, torn
//! tails, damage, cuts.

use super::*;

fn open(dir: &Path, seen: &mut Vec<(u64, Bytes)>) -> Result<SegmentLog, crate::store::StoreError> {
    open_after(dir, None, seen)
}

fn open_after(
    dir: &Path,
    clean_end: Option<(u64, u64)>,
    seen: &mut Vec<(u64, Bytes)>,
) -> Result<SegmentLog, crate::store::StoreError> {
    SegmentLog::open(Arc::new(crate::store::local::disk::RealDisk), None, dir, 100, clean_end, false, |s| {
        seen.push((s.id, Bytes::copy_from_slice(s.record)));
        Ok(())
    })
}

/// Large records are written in place next to small ones copied into the
/// batch buffer: every frame must land where `Placed` says, whole.
#[test]
fn large_and_small_records_mixed_in_one_batch_read_back_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seen = Vec::new();
    let log = open(dir.path(), &mut seen).expect("open");
    let sizes = [10, INLINE_RECORD + 1, 3, 200_000, 0, INLINE_RECORD, 70_000, 5];
    let records: Vec<Bytes> = sizes.iter().enumerate().map(|(i, n)| Bytes::from(vec![b'a' + i as u8; *n])).collect();
    for (i, r) in records.iter().enumerate() {
        log.push(|| i as u64 + 1, r.clone());
    }
    let placed = log.flush().expect("flush");
    for ((id, loc), r) in placed.records.iter().zip(&records) {
        assert_eq!(&log.read(*id, *loc).expect("read"), r, "record {id}");
    }
    drop(log);
    open(dir.path(), &mut seen).expect("reopen");
    assert_eq!(seen.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), records);
}

#[test]
fn records_survive_reopen_in_order_and_segments_roll() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seen = Vec::new();
    let log = open(dir.path(), &mut seen).expect("open");
    let mut next = 0u64;
    let mut sealed = Vec::new();
    let mut locs = Vec::new();
    for batch in 0..4 {
        for i in 0..3 {
            next += 1;
            let id = next;
            log.push(|| id, Bytes::from(format!("record {batch}.{i}")));
        }
        let placed = log.flush().expect("flush");
        sealed.extend(placed.sealed);
        locs.extend(placed.records);
    }
    assert!(!sealed.is_empty(), "100-byte segments roll");
    for (id, loc) in &locs {
        assert!(log.read(*id, *loc).expect("read").starts_with(b"record "));
    }
    assert!(log.read(locs[0].0 + 1, locs[0].1).is_err(), "a location that names another id is refused");
    drop(log);
    let log = open(dir.path(), &mut seen).expect("reopen");
    assert_eq!(seen.iter().map(|(id, _)| *id).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    assert_eq!(seen[0].1, Bytes::from_static(b"record 0.0"));
    assert!(!log.sealed().contains(&log.current()));
}

#[test]
fn a_torn_tail_is_cut_and_corruption_elsewhere_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seen = Vec::new();
    let log = open(dir.path(), &mut seen).expect("open");
    // Batches of 80 bytes (24-byte header, 56-byte frame) in 100-byte
    // segments: the second flush seals segment 1, the third writes to
    // segment 2.
    for id in 1..=3u64 {
        log.push(|| id, Bytes::from_static(b"0123456789012345678901234567890123456789"));
        log.flush().expect("flush");
    }
    let first = log.sealed()[0];
    let current = log.current();
    assert_eq!((first, current), (1, 2));
    drop(log);
    // A crash in the middle of writing a frame to the last segment.
    let last = seg_path(dir.path(), current);
    let mut torn = std::fs::read(&last).expect("read");
    torn.extend_from_slice(&[0, 0, 0, 40, 1, 2]);
    std::fs::write(&last, &torn).expect("write");
    let _ = open(dir.path(), &mut seen).expect("torn tail is cut");
    assert_eq!(std::fs::metadata(&last).expect("meta").len(), (torn.len() - 6) as u64);
    assert_eq!(seen.len(), 3);

    // A flipped byte in an earlier segment is corruption.
    let path = seg_path(dir.path(), first);
    let mut data = std::fs::read(&path).expect("read");
    let n = data.len();
    data[n - 1] ^= 0xff;
    std::fs::write(&path, &data).expect("write");
    let err = open(dir.path(), &mut Vec::new()).err().expect("refused");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert_eq!(std::fs::read(&path).expect("untouched"), data);
}

/// After a clean close nothing can be torn: a bad frame in the last
/// segment is damage, and the store refuses to open instead of cutting
/// acknowledged records.
#[test]
fn after_a_clean_close_a_bad_last_frame_is_damage_not_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), &mut Vec::new()).expect("open");
    for id in 1..=2u64 {
        log.push(|| id, Bytes::from_static(b"0123456789"));
    }
    log.flush().expect("flush");
    let end = log.end().expect("end");
    let path = seg_path(dir.path(), end.0);
    drop(log);
    let mut data = std::fs::read(&path).expect("read");
    let n = data.len();
    data[n - 1] ^= 0xff;
    std::fs::write(&path, &data).expect("write");

    let err = open_after(dir.path(), Some(end), &mut Vec::new()).err().expect("refused");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert_eq!(std::fs::read(&path).expect("untouched"), data);
    // A marker from an earlier clean close says nothing about a later segment.
    let err = open_after(dir.path(), Some((end.0 + 1, 0)), &mut Vec::new()).err().expect("refused");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    // A marker of an earlier segment (a crash since) or none at all: the
    // same bytes are a torn tail.
    let mut seen = Vec::new();
    let _ = open_after(dir.path(), Some((0, 0)), &mut seen).expect("cut");
    assert_eq!(seen.len(), 1, "the first record survives, the torn second is cut");
}

/// After a crash, only the last batch can be torn: damage to a frame or
/// a batch header that a later batch of the segment follows refuses the
/// store (data untouched); damage in the last batch is cut.
#[test]
fn after_a_crash_only_the_last_batch_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log =
        SegmentLog::open(Arc::new(crate::store::local::disk::RealDisk), None, dir.path(), 1 << 20, None, false, |_| {
            Ok(())
        })
        .expect("open");
    let locs = six_records_in_three_batches(&log);
    let path = seg_path(dir.path(), log.current());
    drop(log);
    let clean = std::fs::read(&path).expect("read");
    let frame = |i: usize| (locs[i].1.offset + FRAME_HEADER) as usize + ID_LEN;
    // Batch k's header sits right before its first record (records 0, 2, 4).
    let header = |k: usize| (locs[2 * k].1.offset - BATCH_HEADER) as usize + 20;
    let reopen = |flip_at: usize| {
        let mut data = clean.clone();
        data[flip_at] ^= 0xff;
        std::fs::write(&path, &data).expect("write");
        let mut seen = Vec::new();
        let opened = SegmentLog::open(
            Arc::new(crate::store::local::disk::RealDisk),
            None,
            dir.path(),
            1 << 20,
            None,
            false,
            |s| {
                seen.push(s.id);
                Ok(())
            },
        );
        (opened.map(|_| seen), data)
    };

    for (what, at) in [("frame in batch 0", frame(1)), ("header of batch 1", header(1))] {
        let (opened, damaged) = reopen(at);
        let err = opened.err().unwrap_or_else(|| panic!("{what}: damage taken for a torn tail"));
        assert!(err.to_string().contains("mismatch"), "{what}: {err}");
        assert_eq!(std::fs::read(&path).expect("untouched"), damaged, "{what}: data untouched");
    }
    // The last batch (records 5 and 6) may be a torn write: cut.
    let (opened, _) = reopen(frame(5));
    assert_eq!(opened.expect("cut"), [1, 2, 3, 4, 5]);
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), locs[5].1.offset);
    std::fs::write(&path, &clean).expect("restore");
    let (opened, _) = reopen(header(2));
    assert_eq!(opened.expect("cut"), [1, 2, 3, 4]);
}

/// A cut inside a batch rewrites that batch's header: after more
/// segments are written (and a clean close), the cut segment opens as a
/// whole one, not as one that ends inside a batch.
#[test]
fn a_segment_cut_inside_a_batch_opens_cleanly_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    fn ids(seen: &mut Vec<u64>) -> impl FnMut(Scanned<'_>) -> Result<(), crate::store::StoreError> + '_ {
        move |s| {
            seen.push(s.id);
            Ok(())
        }
    }
    let log =
        SegmentLog::open(Arc::new(crate::store::local::disk::RealDisk), None, dir.path(), 1 << 20, None, false, |_| {
            Ok(())
        })
        .expect("open");
    for id in 1..=3u64 {
        log.push(|| id, Bytes::from(format!("record {id}")));
    }
    let locs = log.flush().expect("flush").records;
    let path = seg_path(dir.path(), log.current());
    drop(log);
    // A torn write: the batch's last record is damaged.
    let mut data = std::fs::read(&path).expect("read");
    let n = data.len();
    data[n - 1] ^= 0xff;
    std::fs::write(&path, &data).expect("write");

    let mut seen = Vec::new();
    let log = SegmentLog::open(
        Arc::new(crate::store::local::disk::RealDisk),
        None,
        dir.path(),
        1 << 20,
        None,
        false,
        ids(&mut seen),
    )
    .expect("cut");
    assert_eq!(seen, [1, 2]);
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), locs[2].1.offset);
    log.push(|| 4, Bytes::from_static(b"record 4"));
    log.flush().expect("flush");
    let end = log.end();
    drop(log);

    let mut seen = Vec::new();
    let _ = SegmentLog::open(
        Arc::new(crate::store::local::disk::RealDisk),
        None,
        dir.path(),
        1 << 20,
        end,
        false,
        ids(&mut seen),
    )
    .expect("reopen");
    assert_eq!(seen, [1, 2, 4]);
}

/// `repair`: damage in a sealed segment is cut there on request; the
/// later segments stay whole, and the repaired log then opens normally.
#[test]
fn a_damaged_sealed_segment_is_cut_on_request_and_then_opens_normally() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log =
        SegmentLog::open(Arc::new(crate::store::local::disk::RealDisk), None, dir.path(), 150, None, false, |_| Ok(()))
            .expect("open");
    let locs = six_records_in_three_batches(&log);
    drop(log);
    // Records 1 and 2 are the first batch of segment 1; damage record 2.
    let first = seg_path(dir.path(), locs[1].1.seg);
    assert_ne!(locs[1].1.seg, locs[5].1.seg, "the damaged segment is sealed");
    let mut data = std::fs::read(&first).expect("read");
    data[(locs[1].1.offset + FRAME_HEADER) as usize + ID_LEN] ^= 0xff;
    std::fs::write(&first, &data).expect("write");

    let open_ids = |cut: bool| {
        let mut seen = Vec::new();
        SegmentLog::open(Arc::new(crate::store::local::disk::RealDisk), None, dir.path(), 150, None, cut, |s| {
            seen.push(s.id);
            Ok(())
        })
        .map(|_| seen)
    };
    assert!(open_ids(false).is_err(), "damage in a sealed segment refuses the store");
    let kept = open_ids(true).expect("cut on request");
    assert!(kept.contains(&1) && !kept.contains(&2) && kept.contains(&6), "{kept:?}");
    assert_eq!(open_ids(false).expect("opens normally after the repair"), kept);
}

/// Writes records 1..=6 in three batches of two; their locations.
fn six_records_in_three_batches(log: &SegmentLog) -> Vec<(u64, Loc)> {
    let mut locs = Vec::new();
    for id in 1..=6u64 {
        log.push(|| id, Bytes::from(format!("record {id}")));
        if id % 2 == 0 {
            locs.extend(log.flush().expect("flush").records);
        }
    }
    locs
}

/// Reading ahead returns the whole, checked frames that follow the wanted
/// one, across batch headers, and stops at a frame cut by the read's end
/// or by damage; the wanted frame is checked as a plain read checks it.
#[test]
fn read_ahead_returns_following_frames_across_batches_and_stops_at_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seen = Vec::new();
    let log =
        SegmentLog::open(Arc::new(crate::store::local::disk::RealDisk), None, dir.path(), 1 << 20, None, false, |s| {
            seen.push(s.id);
            Ok(())
        })
        .expect("open");
    let mut locs = Vec::new();
    for batch in 0..3u64 {
        for i in 0..4u64 {
            let id = batch * 4 + i + 1;
            log.push(|| id, Bytes::from(format!("record {id:02}")));
        }
        locs.extend(log.flush().expect("flush").records);
    }
    let (first_id, first) = locs[0];
    let (record, following) = log.read_ahead(first_id, first, 4096).expect("read ahead");
    assert_eq!(record, Bytes::from("record 01"));
    let ids: Vec<u64> = following.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, (2..=12).collect::<Vec<u64>>(), "every later frame, across two batch headers");
    for (id, loc, bytes) in &following {
        assert_eq!(locs.iter().find(|(i, _)| i == id).map(|(_, l)| *l), Some(*loc), "record {id}'s place");
        assert_eq!(bytes, &Bytes::from(format!("record {id:02}")));
    }
    // A read that ends inside the third frame after the wanted one.
    let frame = (FRAME_HEADER + u64::from(first.len)) as usize;
    let (_, cut) = log.read_ahead(first_id, first, 2 * frame + 5).expect("read ahead");
    assert_eq!(cut.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(), vec![2, 3]);
    // Damage in frame 6: the read-ahead stops before it; frame 6 itself reads as corrupt.
    let (id6, loc6) = locs[5];
    let path = seg_path(dir.path(), loc6.seg);
    let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open segment");
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", loc6.offset + FRAME_HEADER + 9).expect("damage");
    let (_, stopped) = log.read_ahead(first_id, first, 4096).expect("read ahead");
    assert_eq!(stopped.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    assert!(matches!(log.read_ahead(id6, loc6, 4096), Err(LogError::Corrupt { .. })));
    // The wanted frame's id must match its index entry.
    assert!(matches!(log.read_ahead(99, first, 4096), Err(LogError::Corrupt { .. })));
}
