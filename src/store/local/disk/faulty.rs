//! A disk that fails on purpose, for tests: an in-memory filesystem that
//! knows which bytes a completed `fdatasync` made durable.
//!
//! - [`FaultyDisk::power_loss`]: every file goes back to what its last
//!   completed sync covered, plus a random number of the writes made since,
//!   in order, the last of them torn at a random byte (what a real disk may
//!   keep of writes it was never asked to make durable).
//! - [`FaultyDisk::fail_next`]: the next write, sync, read or create fails
//!   with EIO or ENOSPC. A failed sync makes nothing durable (as on Linux,
//!   where the kernel may also drop the dirty pages).
//! - [`FaultyDisk::flip_bit`]: one bit of synced data changes, as a bad
//!   sector or a bit rot would.
//!
//! Handles opened before a power loss are dead afterwards (their process
//! "died"): every operation on them fails.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, IoSlice, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};

use super::{Disk, SegFile};

/// An operation a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultOp {
    Write,
    Sync,
    Read,
    Create,
}

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    Eio,
    Enospc,
}

impl FaultKind {
    fn error(self) -> io::Error {
        match self {
            FaultKind::Eio => io::Error::from_raw_os_error(nix::libc::EIO),
            FaultKind::Enospc => io::Error::from_raw_os_error(nix::libc::ENOSPC),
        }
    }
}

/// A change not yet covered by a sync.
#[derive(Debug, Clone)]
enum Change {
    Write(u64, Vec<u8>),
    Truncate(u64),
}

#[derive(Debug, Default, Clone)]
struct FileState {
    /// What a power loss keeps for sure.
    durable: Vec<u8>,
    /// What reads see (the page cache).
    current: Vec<u8>,
    /// Changes since the last completed sync, in order.
    unsynced: Vec<Change>,
}

fn apply(data: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write(at, bytes) => {
            let end = *at as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*at as usize..end].copy_from_slice(bytes);
        }
        Change::Truncate(len) => data.truncate(*len as usize),
    }
}

#[derive(Debug)]
struct State {
    files: BTreeMap<PathBuf, FileState>,
    /// Faults waiting for their operation.
    faults: Vec<(FaultOp, FaultKind)>,
    /// Bumped by a power loss: older handles are dead.
    generation: u64,
    rng: rand::rngs::StdRng,
}

/// The in-memory disk; cheap to clone (clones share it).
#[derive(Clone)]
pub(crate) struct FaultyDisk(Arc<Mutex<State>>);

impl FaultyDisk {
    pub(crate) fn new(seed: u64) -> FaultyDisk {
        FaultyDisk(Arc::new(Mutex::new(State {
            files: BTreeMap::new(),
            faults: Vec::new(),
            generation: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `op` fails with `kind`.
    pub(crate) fn fail_next(&self, op: FaultOp, kind: FaultKind) {
        self.state().faults.push((op, kind));
    }

    /// Forgets pending faults (say, one whose operation never came).
    pub(crate) fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Power is lost: see the module doc. Open handles die.
    pub(crate) fn power_loss(&self) {
        let mut st = self.state();
        st.generation += 1;
        let State { files, rng, .. } = &mut *st;
        for f in files.values_mut() {
            let mut kept = f.durable.clone();
            let survive = rng.gen_range(0..=f.unsynced.len());
            for change in &f.unsynced[..survive] {
                apply(&mut kept, change);
            }
            if let Some(Change::Write(at, bytes)) = f.unsynced.get(survive) {
                let torn = rng.gen_range(0..=bytes.len());
                apply(&mut kept, &Change::Write(*at, bytes[..torn].to_vec()));
            }
            f.durable = kept.clone();
            f.current = kept;
            f.unsynced.clear();
        }
    }

    /// Flips bit `bit` (0-7) of the byte at `offset` of `path`, in synced
    /// and cached data alike. Returns false if the file is shorter.
    pub(crate) fn flip_bit(&self, path: &Path, offset: u64, bit: u8) -> bool {
        let mut st = self.state();
        let Some(f) = st.files.get_mut(path) else { return false };
        let i = offset as usize;
        if i >= f.durable.len() || i >= f.current.len() {
            return false;
        }
        f.durable[i] ^= 1 << (bit % 8);
        f.current[i] ^= 1 << (bit % 8);
        true
    }

    /// Files with synced data, and their synced length.
    pub(crate) fn synced_files(&self) -> Vec<(PathBuf, u64)> {
        let st = self.state();
        st.files
            .iter()
            .filter(|(_, f)| !f.durable.is_empty())
            .map(|(p, f)| (p.clone(), f.durable.len() as u64))
            .collect()
    }

    /// A random number below `n` from the disk's own generator (so one seed
    /// reproduces a whole run).
    pub(crate) fn random_below(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.state().rng.gen_range(0..n)
    }

    fn fault(st: &mut State, op: FaultOp) -> io::Result<()> {
        match st.faults.iter().position(|(o, _)| *o == op) {
            Some(i) => Err(st.faults.remove(i).1.error()),
            None => Ok(()),
        }
    }

    fn handle(&self, path: &Path, generation: u64) -> Arc<dyn SegFile> {
        Arc::new(FaultyFile { disk: self.clone(), path: path.to_path_buf(), generation })
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display()))
}

impl Disk for FaultyDisk {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let st = self.state();
        Ok(st
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect())
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        self.state().files.get(path).map(|f| f.current.len() as u64).ok_or_else(|| not_found(path))
    }

    fn reader(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        let mut st = self.state();
        Self::fault(&mut st, FaultOp::Read)?;
        let data = st.files.get(path).map(|f| f.current.clone()).ok_or_else(|| not_found(path))?;
        Ok(Box::new(io::Cursor::new(data)))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegFile>> {
        let st = self.state();
        if !st.files.contains_key(path) {
            return Err(not_found(path));
        }
        Ok(self.handle(path, st.generation))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn SegFile>> {
        let mut st = self.state();
        Self::fault(&mut st, FaultOp::Create)?;
        if st.files.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())));
        }
        // Directory entries are durable at once here: the log syncs the
        // directory right after creating a segment anyway.
        st.files.insert(path.to_path_buf(), FileState::default());
        Ok(self.handle(path, st.generation))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.state().files.remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

struct FaultyFile {
    disk: FaultyDisk,
    path: PathBuf,
    generation: u64,
}

impl FaultyFile {
    fn with<T>(&self, op: Option<FaultOp>, f: impl FnOnce(&mut FileState) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.disk.state();
        if st.generation != self.generation {
            return Err(io::Error::other("handle from before a power loss"));
        }
        if let Some(op) = op {
            FaultyDisk::fault(&mut st, op)?;
        }
        let file = st.files.get_mut(&self.path).ok_or_else(|| not_found(&self.path))?;
        f(file)
    }
}

impl SegFile for FaultyFile {
    fn write_vectored_at(&self, slices: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        self.with(Some(FaultOp::Write), |f| {
            // One change per slice: a power loss may keep some and tear one.
            let mut at = offset;
            for s in slices {
                let change = Change::Write(at, s.to_vec());
                apply(&mut f.current, &change);
                f.unsynced.push(change);
                at += s.len() as u64;
            }
            Ok((at - offset) as usize)
        })
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(Some(FaultOp::Read), |f| {
            let end = offset as usize + buf.len();
            let src = f.current.get(offset as usize..end).ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn read_up_to(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(Some(FaultOp::Read), |f| {
            let start = (offset as usize).min(f.current.len());
            let src = &f.current[start..f.current.len().min(start + buf.len())];
            buf[..src.len()].copy_from_slice(src);
            Ok(src.len())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(Some(FaultOp::Sync), |f| {
            f.durable = f.current.clone();
            f.unsynced.clear();
            Ok(())
        })
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.with(Some(FaultOp::Sync), |f| {
            apply(&mut f.current, &Change::Truncate(len));
            f.durable = f.current.clone();
            f.unsynced.clear();
            Ok(())
        })
    }
}
