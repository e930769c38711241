//! Producer ids of idempotent publishers: allocated durably, handed out with a token that
//! binds each id to its API key, client id and stream (PROTOCOL.md §5.2).
//!
//! ```text
//! <store dir>/producers.id   magic "SIBYLPID" | key [32] | reserved_to u64 | crc32c u32 (LE)
//!
//! open:      read (or create with a random key) ─▶ hand out ids from the old reserved_to,
//!            persist reserved_to += BLOCK first (write tmp, fsync, rename, fsync dir)
//! allocate:  next id; when the block is used up, persist the next block first
//! token:     HMAC-SHA256(key, "sibyl producer v1" | id | sha256(api key) | client_id | stream)[..16]
//! ```
//!
//! An id is never handed out before a `reserved_to` above it is on disk, so ids are never
//! reused, also after a SIGKILL (a crash only skips the rest of a block). Reusing one would let
//! a new producer inherit another's dedup state. The file lives in the store directory, under
//! the store's lock, so it goes with the log it describes: a wiped store also resets the ids
//! (and tokens issued before no longer verify).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use sibyl_proto::frame::PRODUCER_TOKEN_LEN;
use subtle::ConstantTimeEq;

/// File name inside the store directory.
pub const PRODUCERS_FILE: &str = "producers.id";
/// Ids reserved on disk at a time.
const BLOCK: u64 = 1024;
const MAGIC: &[u8; 8] = b"SIBYLPID";
const FILE_LEN: usize = 8 + 32 + 8 + 4;

/// Why the producer-id file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerIdError {
    /// Reading or writing the file failed.
    #[error("producer ids {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a producer-id file (wrong length, magic or checksum).
    #[error("producer ids {path}: corrupt file")]
    Corrupt {
        /// The file.
        path: PathBuf,
    },
    /// No randomness for a new key.
    #[error("producer ids: no randomness for a new key")]
    Random,
    /// Every id is used.
    #[error("producer ids exhausted")]
    Exhausted,
}

/// Who a producer id belongs to: the connection's API key and client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerOwner {
    key_hash: [u8; 32],
    client_id: String,
}

impl ProducerOwner {
    /// The owner of ids requested with `api_key` (only its SHA-256 is kept) and `client_id`.
    pub fn new(api_key: &str, client_id: &str) -> Self {
        Self {
            key_hash: Sha256::digest(api_key.as_bytes()).into(),
            client_id: client_id.to_owned(),
        }
    }
}

#[derive(Debug)]
struct Alloc {
    next: u64,
    reserved_to: u64,
}

/// The producer-id allocator and token issuer of a hub.
pub struct ProducerIds {
    path: PathBuf,
    key: [u8; 32],
    alloc: Mutex<Alloc>,
}

impl std::fmt::Debug for ProducerIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerIds")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ProducerIds {
    /// Opens (or creates) `<dir>/producers.id` and reserves the next block of ids.
    pub fn open(dir: &Path) -> Result<Self, ProducerIdError> {
        let path = dir.join(PRODUCERS_FILE);
        let (key, from) = match File::open(&path) {
            Ok(f) => {
                let mut buf = Vec::with_capacity(FILE_LEN);
                f.take(FILE_LEN as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(io(&path))?;
                decode(&buf).ok_or_else(|| ProducerIdError::Corrupt { path: path.clone() })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|_| ProducerIdError::Random)?;
                (key, 1)
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let ids = Self {
            path,
            key,
            alloc: Mutex::new(Alloc {
                next: from,
                reserved_to: from,
            }),
        };
        {
            let mut a = ids.lock();
            ids.reserve(&mut a)?;
        }
        Ok(ids)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Persists the next block before any id of it is handed out.
    fn reserve(&self, a: &mut Alloc) -> Result<(), ProducerIdError> {
        let to = a
            .reserved_to
            .checked_add(BLOCK)
            .ok_or(ProducerIdError::Exhausted)?;
        let tmp = self.path.with_extension("id.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&encode(&self.key, to)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        a.reserved_to = to;
        Ok(())
    }

    /// A new producer id (never 0, never handed out before) and its token for `owner` on
    /// `stream`. Blocks on an fsync once per block of ids.
    pub fn allocate(
        &self,
        owner: &ProducerOwner,
        stream: &str,
    ) -> Result<(u64, [u8; PRODUCER_TOKEN_LEN]), ProducerIdError> {
        let mut a = self.lock();
        if a.next >= a.reserved_to {
            self.reserve(&mut a)?;
        }
        let id = a.next;
        a.next += 1;
        Ok((id, self.token(id, owner, stream)))
    }

    /// The token of `id` for `owner` on `stream`.
    pub fn token(&self, id: u64, owner: &ProducerOwner, stream: &str) -> [u8; PRODUCER_TOKEN_LEN] {
        // Invariant: HMAC accepts keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(b"sibyl producer v1");
        mac.update(&id.to_be_bytes());
        mac.update(&owner.key_hash);
        // Length prefixes keep (client_id, stream) pairs apart.
        mac.update(&(owner.client_id.len() as u64).to_be_bytes());
        mac.update(owner.client_id.as_bytes());
        mac.update(&(stream.len() as u64).to_be_bytes());
        mac.update(stream.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; PRODUCER_TOKEN_LEN];
        out.copy_from_slice(&full[..PRODUCER_TOKEN_LEN]);
        out
    }

    /// Whether `token` is the one issued for `id`, `owner` and `stream` (constant time), and
    /// `id` was handed out by this store.
    pub fn verify(
        &self,
        id: u64,
        token: &[u8; PRODUCER_TOKEN_LEN],
        owner: &ProducerOwner,
        stream: &str,
    ) -> bool {
        let issued = id != 0 && id < self.lock().reserved_to;
        let ok: bool = self.token(id, owner, stream).ct_eq(token).into();
        issued && ok
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProducerIdError + '_ {
    move |source| ProducerIdError::Io {
        path: path.to_owned(),
        source,
    }
}

fn encode(key: &[u8; 32], reserved_to: u64) -> [u8; FILE_LEN] {
    let mut out = [0u8; FILE_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..40].copy_from_slice(key);
    out[40..48].copy_from_slice(&reserved_to.to_le_bytes());
    let crc = crc32c::crc32c(&out[..48]);
    out[48..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(buf: &[u8]) -> Option<([u8; 32], u64)> {
    if buf.len() != FILE_LEN || &buf[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(buf[48..].try_into().ok()?);
    if crc32c::crc32c(&buf[..48]) != crc {
        return None;
    }
    let key: [u8; 32] = buf[8..40].try_into().ok()?;
    let to = u64::from_le_bytes(buf[40..48].try_into().ok()?);
    Some((key, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_reused_across_reopens_and_tokens_are_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let me = ProducerOwner::new("sk_a", "app-1");
        let ids = ProducerIds::open(dir.path()).unwrap();
        let (a, ta) = ids.allocate(&me, "s").unwrap();
        let (b, _) = ids.allocate(&me, "s").unwrap();
        assert_eq!((a, b), (1, 2));
        assert!(ids.verify(a, &ta, &me, "s"));
        // Another key, client or stream, or a guessed id: refused.
        assert!(!ids.verify(a, &ta, &ProducerOwner::new("sk_b", "app-1"), "s"));
        assert!(!ids.verify(a, &ta, &ProducerOwner::new("sk_a", "app-2"), "s"));
        assert!(!ids.verify(a, &ta, &me, "t"));
        assert!(!ids.verify(b, &ta, &me, "s"));
        drop(ids);
        // A restart (as after SIGKILL) continues after the reserved block; tokens still verify.
        let ids = ProducerIds::open(dir.path()).unwrap();
        assert!(ids.verify(a, &ta, &me, "s"));
        let (c, _) = ids.allocate(&me, "s").unwrap();
        assert_eq!(c, 1 + BLOCK);
        // Exhausting a block persists the next one first.
        for _ in 0..BLOCK {
            ids.allocate(&me, "s").unwrap();
        }
        drop(ids);
        let ids = ProducerIds::open(dir.path()).unwrap();
        assert_eq!(ids.allocate(&me, "s").unwrap().0, 1 + 3 * BLOCK);
        // Ids above what was ever reserved are refused even with a matching token.
        let far = 10 * BLOCK;
        assert!(!ids.verify(far, &ids.token(far, &me, "s"), &me, "s"));
    }

    #[test]
    fn a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(ProducerIds::open(dir.path()).unwrap());
        let path = dir.path().join(PRODUCERS_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[45] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            ProducerIds::open(dir.path()),
            Err(ProducerIdError::Corrupt { .. })
        ));
        fs::write(&path, b"short").unwrap();
        assert!(ProducerIds::open(dir.path()).is_err());
    }
}
