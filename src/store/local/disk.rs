//! The message log's file operations behind one small interface, so tests
//! can run the log on a disk that fails on purpose (`disk/faulty.rs`):
//! power loss that forgets unsynced writes and tears the last one, EIO or
//! ENOSPC from a chosen write, fdatasync or read, bits flipped in synced
//! data. [`RealDisk`] is the one the relay uses: plain `std::fs` and
//! `pwritev`. Only the segment log goes through this; sled has its own files.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

#[cfg(test)]
pub(crate) mod faulty;

/// A directory of segment files.
pub(crate) trait Disk: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Reads the whole file from the start, in order (recovery).
    fn reader(&self, path: &Path) -> io::Result<Box<dyn Read + Send>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegFile>>;
    /// Creates a new, empty file (an error if it exists).
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn SegFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the creation and removal of entries of `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open segment file.
pub(crate) trait SegFile: Send + Sync {
    /// `pwritev`: may write less than asked.
    fn write_vectored_at(&self, slices: &[IoSlice<'_>], offset: u64) -> io::Result<usize>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`: fewer only at the end of
    /// the file. Returns how many.
    fn read_up_to(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates to `len` and makes that durable (`ftruncate` + `fsync`).
    fn truncate(&self, len: u64) -> io::Result<()>;
}

/// Writes every slice, looping over short writes, at most IOV_MAX slices
/// per call.
pub(crate) fn write_all_at(file: &dyn SegFile, mut slices: &mut [IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    while !slices.is_empty() {
        let n = slices.len().min(IOV_MAX);
        let written = file.write_vectored_at(&slices[..n], offset)?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += written as u64;
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// The real filesystem.
pub(crate) struct RealDisk;

/// Segment files are opened without following links: a link planted in the
/// store would make the relay write where it points.
const NO_FOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();

impl Disk for RealDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect()
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }

    fn reader(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(File::open(path)?))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegFile>> {
        Ok(Arc::new(OpenOptions::new().read(true).write(true).custom_flags(NO_FOLLOW).open(path)?))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn SegFile>> {
        Ok(Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(NO_FOLLOW)
                .open(path)?,
        ))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl SegFile for File {
    fn write_vectored_at(&self, slices: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let at = i64::try_from(offset).map_err(|_| io::Error::other("segment offset beyond i64"))?;
        nix::sys::uio::pwritev(self, slices, at).map_err(io::Error::from)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn read_up_to(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        self.sync_all()
    }
}
