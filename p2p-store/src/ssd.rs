//! The SSD tier: objects spilled from DRAM, one file each, in a directory.
//!
//! This module does real, synchronous file I/O with `std::fs`; the event
//! loop runs it on a blocking thread. It keeps its own capacity limit and
//! least-recently-used order: making room for a new object drops the oldest
//! files, and [`SsdTier::write`] returns their keys so the holder can forget
//! them ([`crate::holder::Holder::forget_ssd`]).
//!
//! File layout: `<dir>/<first 2 hex digits of key>/<64 hex digits>.kvo`,
//! an 88-byte header followed by the payload:
//!
//! ```text
//!  offset  size  field
//!       0     8  magic "KVMESHOB"
//!       8     2  format version (u16 LE) = 1
//!      10     2  flags (0)
//!      12     4  reserved (0)
//!      16    32  object key
//!      48     8  payload length (u64 LE)
//!      56    32  payload checksum (see `key::Checksum`)
//!      88     …  payload
//! ```
//!
//! A file is written under a `.tmp` name and renamed into place, so a crash
//! leaves either no file or a whole one (a `.tmp` leftover is deleted at the
//! next [`SsdTier::open`]). Reads check the header and the payload's
//! checksum; any mismatch deletes the file and returns [`Error::Corrupt`],
//! never the bad bytes. With `fsync` off (the default: it is a cache) a power
//! loss can leave a renamed file whose data never reached the disk; the
//! checksum catches that on read.
//!
//! Must not depend on: the DRAM index or pool, networking, async runtimes.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::key::{Checksum, ChecksumHasher, ObjectKey};

/// First bytes of every object file.
pub const SSD_MAGIC: [u8; 8] = *b"KVMESHOB";
/// Format version written in the header.
pub const SSD_FORMAT_VERSION: u16 = 1;
/// Bytes before the payload.
pub const SSD_HEADER_LEN: u64 = 88;

const EXT: &str = "kvo";
const TMP_EXT: &str = "tmp";

/// SSD tier settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsdConfig {
    /// Directory holding the object files (created if missing).
    pub dir: PathBuf,
    /// Most bytes of files (headers included) kept.
    pub capacity: u64,
    /// `fsync` each file before renaming it into place.
    pub fsync: bool,
}

impl SsdConfig {
    /// `capacity` bytes in `dir`, no fsync.
    pub fn new(dir: impl Into<PathBuf>, capacity: u64) -> SsdConfig {
        SsdConfig {
            dir: dir.into(),
            capacity,
            fsync: false,
        }
    }
}

/// An object held on SSD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SsdObject {
    /// Its key.
    pub key: ObjectKey,
    /// Payload length.
    pub len: u64,
    /// Payload checksum.
    pub checksum: Checksum,
}

/// What [`SsdTier::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Objects kept, least recently written first.
    pub restored: Vec<SsdObject>,
    /// Torn or damaged files (and `.tmp` leftovers) deleted.
    pub removed: Vec<PathBuf>,
    /// Objects deleted because they no longer fit the capacity.
    pub dropped: Vec<ObjectKey>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: u64,
    checksum: Checksum,
    tick: u64,
}

/// The SSD tier. See the module docs.
#[derive(Debug)]
pub struct SsdTier {
    config: SsdConfig,
    entries: HashMap<ObjectKey, Entry>,
    lru: BTreeMap<u64, ObjectKey>,
    used: u64,
    next_tick: u64,
}

#[derive(Debug)]
struct Header {
    key: ObjectKey,
    len: u64,
    checksum: Checksum,
}

fn encode_header(key: &ObjectKey, len: u64, checksum: &Checksum) -> [u8; SSD_HEADER_LEN as usize] {
    let mut h = [0u8; SSD_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SSD_MAGIC);
    h[8..10].copy_from_slice(&SSD_FORMAT_VERSION.to_le_bytes());
    h[16..48].copy_from_slice(key.as_bytes());
    h[48..56].copy_from_slice(&len.to_le_bytes());
    h[56..88].copy_from_slice(checksum.as_bytes());
    h
}

fn decode_header(h: &[u8; SSD_HEADER_LEN as usize]) -> std::result::Result<Header, String> {
    if h[0..8] != SSD_MAGIC {
        return Err("bad magic".into());
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != SSD_FORMAT_VERSION {
        return Err(format!("format version {version}"));
    }
    if h[10..16].iter().any(|&b| b != 0) {
        return Err("unknown flags".into());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&h[48..56]);
    Ok(Header {
        key: ObjectKey::from_slice(&h[16..48]).map_err(|e| e.to_string())?,
        len: u64::from_le_bytes(len),
        checksum: Checksum::from_slice(&h[56..88]).map_err(|e| e.to_string())?,
    })
}

fn file_size(len: u64) -> u64 {
    SSD_HEADER_LEN.saturating_add(len)
}

impl SsdTier {
    /// Opens (creating if needed) the directory and rebuilds the tier from
    /// the files in it: valid ones are kept (oldest modification time =
    /// least recently used), torn ones and `.tmp` leftovers deleted, the
    /// oldest dropped if they exceed the capacity. Files that are not ours
    /// (other names) are left alone.
    pub fn open(config: SsdConfig) -> Result<(SsdTier, ScanReport)> {
        fs::create_dir_all(&config.dir).map_err(|e| Error::io(&config.dir, e))?;
        let mut report = ScanReport::default();
        let mut found: Vec<(SystemTime, SsdObject)> = Vec::new();
        for shard in read_dir(&config.dir)? {
            let is_shard = shard
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()));
            if !is_shard || !shard.is_dir() {
                continue;
            }
            for path in read_dir(&shard)? {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(&format!(".{EXT}.{TMP_EXT}")) {
                    remove_file(&path)?;
                    report.removed.push(path);
                    continue;
                }
                let Some(stem) = name.strip_suffix(&format!(".{EXT}")) else {
                    continue;
                };
                let Ok(key) = stem.parse::<ObjectKey>() else {
                    continue;
                };
                match check_file(&path, &key) {
                    Ok((header, mtime)) => found.push((
                        mtime,
                        SsdObject {
                            key,
                            len: header.len,
                            checksum: header.checksum,
                        },
                    )),
                    Err(_) => {
                        remove_file(&path)?;
                        report.removed.push(path);
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.key.cmp(&b.1.key)));
        let mut tier = SsdTier {
            config,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            used: 0,
            next_tick: 0,
        };
        let total: u64 = found.iter().map(|(_, o)| file_size(o.len)).sum();
        let mut excess = total.saturating_sub(tier.config.capacity);
        for (_, obj) in found {
            if excess > 0 {
                excess = excess.saturating_sub(file_size(obj.len));
                remove_file(&tier.path_of(&obj.key))?;
                report.dropped.push(obj.key);
                continue;
            }
            tier.insert_entry(obj.key, obj.len, obj.checksum);
            report.restored.push(obj);
        }
        Ok((tier, report))
    }

    /// The configuration.
    pub fn config(&self) -> &SsdConfig {
        &self.config
    }

    /// Bytes of files held (headers included).
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// The capacity limit.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }

    /// Objects held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.entries.contains_key(key)
    }

    /// What is known about `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<SsdObject> {
        self.entries.get(key).map(|e| SsdObject {
            key: *key,
            len: e.len,
            checksum: e.checksum,
        })
    }

    /// The file `key` lives in.
    pub fn path_of(&self, key: &ObjectKey) -> PathBuf {
        let hex = key.to_string();
        self.config.dir.join(&hex[..2]).join(format!("{hex}.{EXT}"))
    }

    fn insert_entry(&mut self, key: ObjectKey, len: u64, checksum: Checksum) {
        let tick = self.next_tick;
        self.next_tick += 1;
        self.entries.insert(
            key,
            Entry {
                len,
                checksum,
                tick,
            },
        );
        self.lru.insert(tick, key);
        self.used += file_size(len);
    }

    fn forget(&mut self, key: &ObjectKey) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.lru.remove(&e.tick);
        self.used -= file_size(e.len);
        Some(e)
    }

    fn touch(&mut self, key: &ObjectKey) {
        let tick = self.next_tick;
        if let Some(e) = self.entries.get_mut(key) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, *key);
            self.next_tick += 1;
        }
    }

    /// Stores `data` as `key`. Checks that `data` hashes to `checksum`
    /// first (a bad spill is never persisted). To make room, drops least
    /// recently used objects and returns their keys; on error nothing was
    /// dropped. Writing a key already held only refreshes it.
    pub fn write(
        &mut self,
        key: ObjectKey,
        checksum: Checksum,
        data: &[u8],
    ) -> Result<Vec<ObjectKey>> {
        let len = data.len() as u64;
        let size = file_size(len);
        if size > self.config.capacity {
            return Err(Error::TooLarge {
                len,
                limit: self.config.capacity.saturating_sub(SSD_HEADER_LEN),
            });
        }
        checksum.verify(data)?;
        if self.entries.contains_key(&key) {
            self.touch(&key);
            return Ok(Vec::new());
        }
        let path = self.path_of(&key);
        let tmp = path.with_extension(format!("{EXT}.{TMP_EXT}"));
        if let Err(e) = self.write_tmp(&tmp, &key, &checksum, data) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&path, e));
        }
        // The new file is in place; only now drop the oldest to get back
        // under the limit, so an error above leaves everything as it was.
        let mut dropped = Vec::new();
        while self.used + size > self.config.capacity {
            let Some((_, &victim)) = self.lru.first_key_value() else {
                break;
            };
            self.forget(&victim);
            // Best effort: a file that cannot be deleted is found again by
            // the next scan.
            let _ = fs::remove_file(self.path_of(&victim));
            dropped.push(victim);
        }
        self.insert_entry(key, len, checksum);
        Ok(dropped)
    }

    fn write_tmp(
        &self,
        tmp: &Path,
        key: &ObjectKey,
        checksum: &Checksum,
        data: &[u8],
    ) -> Result<()> {
        if let Some(parent) = tmp.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(&encode_header(key, data.len() as u64, checksum))
            .and_then(|()| f.write_all(data))
            .map_err(|e| Error::io(tmp, e))?;
        if self.config.fsync {
            f.sync_data().map_err(|e| Error::io(tmp, e))?;
        }
        Ok(())
    }

    /// Reads `key`, verified. See [`SsdTier::read_into`] for errors.
    pub fn read(&mut self, key: &ObjectKey) -> Result<Vec<u8>> {
        let len = self.entries.get(key).ok_or(Error::NotFound(*key))?.len;
        let len = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument("object too large for memory".into()))?;
        let mut buf = vec![0u8; len];
        self.read_into(key, &mut buf)?;
        Ok(buf)
    }

    /// Reads `key` into `buf` (exactly its length) and verifies it. On a
    /// damaged file the file is deleted, the key forgotten, `buf` zeroed and
    /// [`Error::Corrupt`] returned; a file that vanished gives
    /// [`Error::NotFound`]. Either way the caller should forget the SSD copy.
    pub fn read_into(&mut self, key: &ObjectKey, buf: &mut [u8]) -> Result<()> {
        let entry = *self.entries.get(key).ok_or(Error::NotFound(*key))?;
        if buf.len() as u64 != entry.len {
            return Err(Error::InvalidArgument(format!(
                "buffer of {} bytes for an object of {}",
                buf.len(),
                entry.len
            )));
        }
        let path = self.path_of(key);
        match read_verified(&path, key, &entry, buf) {
            Ok(()) => {
                self.touch(key);
                Ok(())
            }
            Err(ReadFailure::Missing) => {
                buf.fill(0);
                self.forget(key);
                Err(Error::NotFound(*key))
            }
            Err(ReadFailure::Io(e)) => {
                buf.fill(0);
                Err(Error::io(&path, e))
            }
            Err(ReadFailure::Corrupt(reason)) => {
                buf.fill(0);
                self.forget(key);
                let _ = fs::remove_file(&path);
                Err(Error::Corrupt { path, reason })
            }
        }
    }

    /// Deletes `key`'s file. `Ok(false)` if it was not held.
    pub fn remove(&mut self, key: &ObjectKey) -> Result<bool> {
        if self.forget(key).is_none() {
            return Ok(false);
        }
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Objects held, least recently used first.
    pub fn iter_lru(&self) -> impl Iterator<Item = SsdObject> + '_ {
        self.lru.values().filter_map(|k| self.get(k))
    }
}

enum ReadFailure {
    Missing,
    Io(io::Error),
    Corrupt(String),
}

fn read_verified(
    path: &Path,
    key: &ObjectKey,
    entry: &Entry,
    buf: &mut [u8],
) -> std::result::Result<(), ReadFailure> {
    let mut f = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ReadFailure::Missing
        } else {
            ReadFailure::Io(e)
        }
    })?;
    let mut raw = [0u8; SSD_HEADER_LEN as usize];
    read_exact_or_corrupt(&mut f, &mut raw)?;
    let header = decode_header(&raw).map_err(ReadFailure::Corrupt)?;
    if header.key != *key || header.len != entry.len || header.checksum != entry.checksum {
        return Err(ReadFailure::Corrupt(
            "header does not match the index".into(),
        ));
    }
    read_exact_or_corrupt(&mut f, buf)?;
    let mut extra = [0u8; 1];
    match f.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => return Err(ReadFailure::Corrupt("trailing bytes".into())),
        Err(e) => return Err(ReadFailure::Io(e)),
    }
    let actual = ChecksumHasher::new().update(buf).finalize();
    if actual != header.checksum {
        return Err(ReadFailure::Corrupt(format!(
            "payload checksum {actual} != {}",
            header.checksum
        )));
    }
    Ok(())
}

fn read_exact_or_corrupt(f: &mut File, buf: &mut [u8]) -> std::result::Result<(), ReadFailure> {
    f.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadFailure::Corrupt("file shorter than its header says".into())
        } else {
            ReadFailure::Io(e)
        }
    })
}

/// Header and size check used by the startup scan (the payload checksum is
/// checked on read, not here: a scan must not read the whole tier).
fn check_file(path: &Path, key: &ObjectKey) -> std::result::Result<(Header, SystemTime), String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    let mut raw = [0u8; SSD_HEADER_LEN as usize];
    f.read_exact(&mut raw).map_err(|e| e.to_string())?;
    let header = decode_header(&raw)?;
    if header.key != *key {
        return Err("key does not match file name".into());
    }
    if meta.len() != file_size(header.len) {
        return Err(format!(
            "file is {} bytes, header says {}",
            meta.len(),
            file_size(header.len)
        ));
    }
    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((header, mtime))
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        out.push(entry.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(n: u32) -> ObjectKey {
        ObjectKey::for_content(&n.to_le_bytes())
    }

    fn payload(n: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(n) as u8)
            .collect()
    }

    fn open(dir: &Path, capacity: u64) -> (SsdTier, ScanReport) {
        SsdTier::open(SsdConfig::new(dir, capacity)).unwrap()
    }

    fn store(t: &mut SsdTier, n: u32, len: usize) -> Vec<ObjectKey> {
        let data = payload(n, len);
        t.write(key(n), Checksum::compute(&data), &data).unwrap()
    }

    #[test]
    fn write_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, report) = open(dir.path(), 1 << 20);
        assert_eq!(report, ScanReport::default());
        let data = payload(1, 5000);
        assert!(t
            .write(key(1), Checksum::compute(&data), &data)
            .unwrap()
            .is_empty());
        let path = t.path_of(&key(1));
        assert!(path.starts_with(dir.path().join(&key(1).to_string()[..2])));
        assert_eq!(fs::metadata(&path).unwrap().len(), 5000 + SSD_HEADER_LEN);
        assert_eq!(t.read(&key(1)).unwrap(), data);
        let mut buf = vec![0u8; 5000];
        t.read_into(&key(1), &mut buf).unwrap();
        assert_eq!(buf, data);
        assert!(t.read_into(&key(1), &mut [0u8; 10]).is_err());
        assert_eq!(t.used_bytes(), 5000 + SSD_HEADER_LEN);
        assert!(matches!(t.read(&key(2)), Err(Error::NotFound(_))));
        // Idempotent rewrite.
        assert!(t
            .write(key(1), Checksum::compute(&data), &data)
            .unwrap()
            .is_empty());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_wrong_checksum_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _) = open(dir.path(), 1 << 20);
        let data = payload(1, 100);
        let err = t
            .write(key(1), Checksum::compute(b"other"), &data)
            .unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }));
        assert!(!t.contains(&key(1)));
        assert!(!t.path_of(&key(1)).exists());
    }

    #[test]
    fn flipped_payload_byte_is_corrupt_and_the_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _) = open(dir.path(), 1 << 20);
        store(&mut t, 1, 4096);
        let path = t.path_of(&key(1));
        let mut raw = fs::read(&path).unwrap();
        raw[SSD_HEADER_LEN as usize + 1000] ^= 0x01;
        fs::write(&path, &raw).unwrap();
        let mut buf = vec![0xffu8; 4096];
        let err = t.read_into(&key(1), &mut buf).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(
            buf.iter().all(|&b| b == 0),
            "bad bytes must not be handed out"
        );
        assert!(!path.exists());
        assert!(!t.contains(&key(1)));
        assert_eq!(t.used_bytes(), 0);
    }

    #[test]
    fn damaged_headers_are_corrupt() {
        for (offset, what) in [
            (0usize, "magic"),
            (8, "version"),
            (20, "key"),
            (50, "len"),
            (60, "checksum"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (mut t, _) = open(dir.path(), 1 << 20);
            store(&mut t, 1, 256);
            let path = t.path_of(&key(1));
            let mut raw = fs::read(&path).unwrap();
            raw[offset] ^= 0x40;
            fs::write(&path, &raw).unwrap();
            let err = t.read(&key(1)).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err}");
            assert!(!path.exists(), "{what}");
        }
    }

    #[test]
    fn truncated_or_vanished_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _) = open(dir.path(), 1 << 20);
        store(&mut t, 1, 1000);
        store(&mut t, 2, 1000);
        let p1 = t.path_of(&key(1));
        let raw = fs::read(&p1).unwrap();
        fs::write(&p1, &raw[..raw.len() - 1]).unwrap();
        assert!(matches!(t.read(&key(1)), Err(Error::Corrupt { .. })));
        fs::remove_file(t.path_of(&key(2))).unwrap();
        assert!(matches!(t.read(&key(2)), Err(Error::NotFound(_))));
        assert!(t.is_empty());
        assert_eq!(t.used_bytes(), 0);
    }

    #[test]
    fn capacity_drops_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1000 + SSD_HEADER_LEN;
        let (mut t, _) = open(dir.path(), 3 * size);
        for n in 0..3 {
            assert!(store(&mut t, n, 1000).is_empty());
        }
        // Reading 0 makes 1 the oldest.
        t.read(&key(0)).unwrap();
        assert_eq!(store(&mut t, 3, 1000), vec![key(1)]);
        assert!(!t.path_of(&key(1)).exists());
        // A larger object pushes out two.
        assert_eq!(store(&mut t, 4, 1500), vec![key(2), key(0)]);
        assert_eq!(t.used_bytes(), size + 1500 + SSD_HEADER_LEN);
        let order: Vec<ObjectKey> = t.iter_lru().map(|o| o.key).collect();
        assert_eq!(order, vec![key(3), key(4)]);
        assert!(matches!(
            t.write(key(9), Checksum::compute(&[0; 4000]), &[0; 4000]),
            Err(Error::TooLarge { .. })
        ));
        assert!(t.remove(&key(3)).unwrap());
        assert!(!t.remove(&key(3)).unwrap());
        assert!(!t.path_of(&key(3)).exists());
    }

    #[test]
    fn reopen_rebuilds_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, _) = open(dir.path(), 1 << 20);
        for n in 0..4 {
            store(&mut t, n, 700 + n as usize);
        }
        // Make the modification order explicit: 3 oldest, then 2, 1, 0.
        let base = SystemTime::now() - Duration::from_secs(1000);
        for n in 0..4u32 {
            let f = File::options()
                .write(true)
                .open(t.path_of(&key(n)))
                .unwrap();
            f.set_modified(base + Duration::from_secs(u64::from(10 - n)))
                .unwrap();
        }
        // A torn file, a tmp leftover, and a stranger's file.
        let torn = t.path_of(&key(1));
        let raw = fs::read(&torn).unwrap();
        fs::write(&torn, &raw[..50]).unwrap();
        let tmp = t.path_of(&key(7)).with_extension("kvo.tmp");
        fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        fs::write(&tmp, b"half").unwrap();
        let stranger = dir.path().join("README");
        fs::write(&stranger, b"not ours").unwrap();
        drop(t);

        let (mut t, report) = open(dir.path(), 1 << 20);
        let restored: Vec<ObjectKey> = report.restored.iter().map(|o| o.key).collect();
        assert_eq!(restored, vec![key(3), key(2), key(0)]);
        assert_eq!(report.restored[1].len, 702);
        let mut removed = report.removed.clone();
        removed.sort();
        let mut expect = vec![torn.clone(), tmp.clone()];
        expect.sort();
        assert_eq!(removed, expect);
        assert!(!torn.exists() && !tmp.exists() && stranger.exists());
        assert_eq!(t.read(&key(2)).unwrap(), payload(2, 702));
        assert_eq!(t.used_bytes(), 700 + 702 + 703 + 3 * SSD_HEADER_LEN);
        drop(t);

        // A smaller capacity drops the oldest at open.
        let (t, report) = open(dir.path(), 702 + 700 + 2 * SSD_HEADER_LEN);
        assert_eq!(report.dropped, vec![key(3)]);
        assert_eq!(t.len(), 2);
        assert!(!t.path_of(&key(3)).exists());
        assert!(t.path_of(&key(0)).exists());
    }
}
