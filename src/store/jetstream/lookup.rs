//! Lookup by an indexed body field on JetStream (`routes[].index`,
//! `messages find`): the stream `S-index` holds one small message per
//! (field value, callback), on the subject `S.index.<lookup key>`, whose
//! payload is the callback's id (its work-stream sequence) and the time it
//! was received. A lookup reads the subject's messages in order (the
//! server's next-by-subject get, one request per match), from any relay.
//!
//! Written after the callback's publish was acknowledged, without waiting
//! for the index's own acknowledgement: an entry costs the relay one
//! publish, not a round trip; a relay that crashes between the two loses
//! the entries of that callback (the callback itself is not lost; `messages
//! find` misses it, inspection by id still works). Entries expire after
//! the kept messages do (`retain_delivered`), or after [`INDEX_MAX_AGE`]
//! without retention: the index outlives nothing it could point to by long.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use super::setup::setup_error;
use super::{Jet, Names};
use crate::store::StoreError;

/// How long entries are kept when `retain_delivered` is off.
pub(super) const INDEX_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most matches one lookup returns.
const MAX_MATCHES: usize = 1000;

impl Names<'_> {
    pub(super) fn index_stream(&self) -> String {
        format!("{}-index", self.0)
    }
    fn index_subject(&self, key: u64) -> String {
        format!("{}.index.{key:016x}", self.0)
    }
}

/// Creates `S-index` (or keeps the existing one).
pub(super) async fn ensure_index(
    js: &jetstream::Context,
    names: &Names<'_>,
    replicas: usize,
    max_age: Duration,
) -> Result<stream::Stream, StoreError> {
    let want = stream::Config {
        name: names.index_stream(),
        subjects: vec![format!("{}.index.*", names.0)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    match js.get_stream(&want.name).await {
        Ok(existing) => Ok(existing),
        Err(_) => js.create_stream(want).await.map_err(|e| setup_error("creating the index stream", e)),
    }
}

impl Jet {
    /// Indexes callback `seq` (received at `received_ms`) under `keys`.
    pub(super) async fn index(&self, seq: u64, received_ms: u64, keys: &[u64]) {
        let Ok(ready) = self.ready() else { return };
        let names = Names(&self.inner.config.stream);
        let mut payload = seq.to_be_bytes().to_vec();
        payload.extend_from_slice(&received_ms.to_be_bytes());
        let payload = Bytes::from(payload);
        for key in keys {
            // The acknowledgement is not awaited (see the module's doc).
            if let Err(e) = ready.js.publish(names.index_subject(*key), payload.clone()).await {
                tracing::debug!(error = %e, "index entry not published");
            }
        }
    }

    /// The callbacks indexed under `key`: (id, received at), oldest first.
    pub async fn lookup(&self, key: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let ready = self.ready()?;
        let names = Names(&self.inner.config.stream);
        let subject = names.index_subject(key);
        let mut found = Vec::new();
        let mut seq = 1;
        while found.len() < MAX_MATCHES {
            let got = ready.index.raw_message_builder().sequence(seq).next_by_subject(subject.clone()).send().await;
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(StoreError::Unavailable(format!("JetStream: reading the index: {e}"))),
            };
            seq = m.sequence + 1;
            if m.payload.len() == 16 {
                let (id, at) = m.payload.split_at(8);
                let word = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
                found.push((word(id), word(at)));
            }
        }
        Ok(found)
    }
}
