//! Content hashes: BLAKE3 of files, Merkle hashes of directory trees, and the stat cache that
//! lets an untouched input skip rehashing.
//!
//! The stat cache maps a path to (size, mtime, ctime, inode) → hash. A file whose stat still
//! matches is not read; a touched file is rehashed (and, if its bytes are the same, nothing
//! downstream reruns). Entries for files modified in the last few seconds are not kept, because a
//! second write within the filesystem's timestamp granularity could leave the stat unchanged.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Files at least this large are hashed with memory mapping and all cores.
const LARGE_FILE: u64 = 1 << 20;
/// A file modified less than this long ago is "racy": its stat is not trusted later.
const RACY_NS: i64 = 2_000_000_000;

/// What `stat` says about a file, enough to tell whether it was touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

impl Stat {
    pub fn of(meta: &Metadata) -> Self {
        Stat {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            inode: meta.ino(),
        }
    }

    /// Changed so recently that a further change might not move the timestamps. ctime counts
    /// too: it cannot be set back, unlike an mtime restored by tar or rsync.
    fn is_racy(&self, window_ns: i64) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        now - self.mtime_ns.max(self.ctime_ns) < window_ns
    }
}

/// BLAKE3 of a file's bytes.
pub fn hash_file(path: &Path, size: u64) -> io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    if size >= LARGE_FILE {
        hasher.update_mmap_rayon(path)?;
    } else {
        let mut buf = Vec::with_capacity(size as usize);
        std::fs::File::open(path)?.read_to_end(&mut buf)?;
        hasher.update(&buf);
    }
    Ok(hasher.finalize())
}

/// Path → (stat, hash), persisted in the store between runs.
pub struct StatCache {
    entries: RwLock<HashMap<PathBuf, (Stat, [u8; 32])>>,
    dirty: std::sync::atomic::AtomicBool,
    racy_ns: i64,
}

impl Default for StatCache {
    fn default() -> Self {
        StatCache {
            entries: Default::default(),
            dirty: Default::default(),
            racy_ns: RACY_NS,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredEntry {
    path: Vec<u8>,
    stat: Stat,
    hash: [u8; 32],
}

impl StatCache {
    /// Loads the cache; a missing or unreadable file is an empty cache (it is only a cache).
    pub fn load(file: &Path) -> Self {
        let stored: Vec<StoredEntry> = std::fs::read(file)
            .ok()
            .and_then(|bytes| postcard::from_bytes(&bytes).ok())
            .unwrap_or_default();
        let entries = stored
            .into_iter()
            .map(|e| {
                (
                    PathBuf::from(std::ffi::OsStr::from_bytes(&e.path)),
                    (e.stat, e.hash),
                )
            })
            .collect();
        StatCache {
            entries: RwLock::new(entries),
            ..Default::default()
        }
    }

    /// Writes the cache atomically, if anything changed.
    pub fn save(&self, file: &Path) -> io::Result<()> {
        if !self.dirty.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let entries = self.entries.read().expect("stat cache lock");
        let stored: Vec<StoredEntry> = entries
            .iter()
            .map(|(p, (stat, hash))| StoredEntry {
                path: p.as_os_str().as_bytes().to_vec(),
                stat: *stat,
                hash: *hash,
            })
            .collect();
        let bytes = postcard::to_allocvec(&stored).map_err(io::Error::other)?;
        crate::store::write_atomic(file, &bytes)
    }

    /// The hash of a file, from the cache when its stat is unchanged.
    pub fn hash(&self, path: &Path, meta: &Metadata) -> io::Result<blake3::Hash> {
        let stat = Stat::of(meta);
        if let Some((cached, hash)) = self.entries.read().expect("stat cache lock").get(path) {
            if *cached == stat {
                return Ok(blake3::Hash::from_bytes(*hash));
            }
        }
        let hash = hash_file(path, stat.size)?;
        if !stat.is_racy(self.racy_ns) {
            self.entries
                .write()
                .expect("stat cache lock")
                .insert(path.to_path_buf(), (stat, *hash.as_bytes()));
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(hash)
    }
}

/// One file of a tree: its path relative to the tree's root, stat and hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub stat: Stat,
    pub hash: String,
}

/// A directory tree's Merkle hash and its files.
pub struct Tree {
    pub hash: blake3::Hash,
    pub files: Vec<FileEntry>,
}

/// Hashes every file under `root` (following symlinks) in parallel and combines them, in path
/// order, with their relative paths: renaming a file changes the hash, touching one does not.
pub fn hash_tree(root: &Path, cache: Option<&StatCache>) -> io::Result<Tree> {
    let mut found = Vec::new();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| io::Error::other(format!("{}: {e}", root.display())))?;
        if entry.file_type().is_file() {
            let meta = entry.metadata().map_err(io::Error::other)?;
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("walk stays under root");
            let rel = rel.to_str().ok_or_else(|| {
                io::Error::other(format!(
                    "{}: file names must be UTF-8",
                    entry.path().display()
                ))
            })?;
            found.push((entry.path().to_path_buf(), rel.to_string(), meta));
        }
    }
    let files = found
        .into_par_iter()
        .map(|(path, rel, meta)| {
            let hash = match cache {
                Some(c) => c.hash(&path, &meta)?,
                None => hash_file(&path, meta.len())?,
            };
            Ok(FileEntry {
                path: rel,
                stat: Stat::of(&meta),
                hash: hash.to_hex().to_string(),
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(Tree {
        hash: merkle(&files),
        files,
    })
}

/// The Merkle hash of a list of files sorted by path.
pub fn merkle(files: &[FileEntry]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"smelt-tree-1\n");
    for f in files {
        hasher.update(f.path.as_bytes());
        hasher.update(b"\0");
        hasher.update(f.hash.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize()
}

/// The hash of an external dependency: a file's content hash, or a directory's Merkle hash.
pub fn hash_dependency(path: &Path, cache: &StatCache) -> io::Result<blake3::Hash> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        Ok(hash_tree(path, Some(cache))?.hash)
    } else {
        cache.hash(path, &meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_hash_depends_on_names_and_bytes_not_times() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "alpha").unwrap();
        std::fs::write(dir.path().join("b.txt"), "beta").unwrap();
        let first = hash_tree(dir.path(), None).unwrap();
        assert_eq!(
            first
                .files
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>(),
            ["b.txt", "sub/a.txt"]
        );
        std::fs::write(dir.path().join("b.txt"), "beta").unwrap();
        assert_eq!(hash_tree(dir.path(), None).unwrap().hash, first.hash);
        std::fs::rename(dir.path().join("b.txt"), dir.path().join("c.txt")).unwrap();
        assert_ne!(hash_tree(dir.path(), None).unwrap().hash, first.hash);
    }

    #[test]
    fn stat_cache_skips_unchanged_files_and_rehashes_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "one").unwrap();
        let cache = StatCache {
            racy_ns: 0,
            ..Default::default()
        };
        let meta = std::fs::metadata(&file).unwrap();
        let h1 = cache.hash(&file, &meta).unwrap();
        // Poison the cached hash: an unchanged stat must return it without reading the file.
        cache.entries.write().unwrap().get_mut(&file).unwrap().1 = [7; 32];
        assert_eq!(cache.hash(&file, &meta).unwrap().as_bytes(), &[7; 32]);
        std::fs::write(&file, "two").unwrap();
        let h2 = cache
            .hash(&file, &std::fs::metadata(&file).unwrap())
            .unwrap();
        assert_ne!(h1, h2);
        assert_eq!(h2, blake3::hash(b"two"));
    }

    #[test]
    fn stat_cache_round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let cache = StatCache {
            racy_ns: 0,
            ..Default::default()
        };
        cache
            .hash(&file, &std::fs::metadata(&file).unwrap())
            .unwrap();
        cache.save(&dir.path().join("cache")).unwrap();
        let loaded = StatCache::load(&dir.path().join("cache"));
        assert!(loaded.entries.read().unwrap().contains_key(&file));
    }

    #[test]
    fn recently_changed_files_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let cache = StatCache::default();
        cache
            .hash(&file, &std::fs::metadata(&file).unwrap())
            .unwrap();
        assert!(cache.entries.read().unwrap().is_empty());
    }
}
