//! Content hashes: BLAKE3 of files, Merkle hashes of directory trees, and the stat cache that
//! lets an untouched input skip rehashing.
//!
//! The stat cache keeps, per dependency root (a file or a directory named in a stage's deps),
//! each file's (size, mtime, ctime, inode) and hash, in one small file per root, so a pipeline
//! only reads the caches of its own inputs. A file whose stat still matches is not read; a touched
//! file is rehashed (and, if its bytes are the same, nothing downstream reruns). Files changed in
//! the last few seconds are not cached, because a second write within the filesystem's timestamp
//! granularity could leave the stat unchanged.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Files at least this large are hashed with memory mapping and all cores.
const LARGE_FILE: u64 = 1 << 20;
/// A file changed less than this long ago is "racy": its stat is not trusted later.
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

/// A BLAKE3 hash: hex in JSON, raw bytes in the binary stat cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Self {
        Digest(*hash.as_bytes())
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(blake3::Hash::from_bytes(self.0).to_hex().as_str())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if !deserializer.is_human_readable() {
            return <[u8; 32]>::deserialize(deserializer).map(Digest);
        }
        let hex = String::deserialize(deserializer)?;
        blake3::Hash::from_hex(hex)
            .map(Digest::from)
            .map_err(serde::de::Error::custom)
    }
}

/// One file of a tree: its path relative to the tree's root, stat and hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub stat: Stat,
    pub hash: Digest,
}

/// A directory tree's Merkle hash and its files.
pub struct Tree {
    pub hash: blake3::Hash,
    pub files: Vec<FileEntry>,
    /// How many files' hashes came from the stat cache.
    pub cache_hits: usize,
}

/// Remembers file hashes between runs, one cache file per dependency root.
pub struct StatCache {
    /// Where the per-root files live; `None` keeps nothing between processes.
    dir: Option<PathBuf>,
    racy_ns: i64,
    /// Dependencies already hashed by this process (two stages reading one directory).
    memo: Mutex<HashMap<PathBuf, blake3::Hash>>,
}

impl StatCache {
    /// A cache persisted under `dir` (created when first written).
    pub fn new(dir: &Path) -> Self {
        StatCache {
            dir: Some(dir.to_path_buf()),
            racy_ns: RACY_NS,
            memo: Mutex::default(),
        }
    }

    /// A cache that lives only as long as this value.
    pub fn in_memory() -> Self {
        StatCache {
            dir: None,
            racy_ns: RACY_NS,
            memo: Mutex::default(),
        }
    }

    /// The hash of an external dependency: a file's content hash, or a directory's Merkle hash.
    pub fn hash_dependency(&self, path: &Path) -> io::Result<blake3::Hash> {
        if let Some(hash) = self.memo.lock().expect("memo lock").get(path) {
            return Ok(*hash);
        }
        let meta = std::fs::metadata(path)?;
        let cache_file = self
            .dir
            .as_ref()
            .map(|d| d.join(blake3::hash(path.as_os_str().as_bytes()).to_hex().as_str()));
        // Reading the cache and listing the files are independent: do both at once.
        let (cached, files) = rayon::join(
            || cache_file.as_deref().map(load_root).unwrap_or_default(),
            || walk(path),
        );
        let lookup = |rel: &str, stat: &Stat| {
            let i = cached.binary_search_by(|c| c.path.as_str().cmp(rel)).ok()?;
            (cached[i].stat == *stat).then_some(cached[i].hash)
        };
        let tree = hash_files(files?, lookup)?;
        // A file root is its content hash; a directory is the Merkle hash of its files.
        let hash = match (meta.is_dir(), tree.files.first()) {
            (false, Some(file)) => blake3::Hash::from_bytes(file.hash.0),
            _ => tree.hash,
        };
        let unchanged = tree.cache_hits == tree.files.len() && tree.files.len() == cached.len();
        if let Some(file) = cache_file.filter(|_| !unchanged) {
            // Files are sorted by path, as the binary search above needs.
            let trusted: Vec<FileEntry> = tree
                .files
                .into_iter()
                .filter(|f| !f.stat.is_racy(self.racy_ns))
                .collect();
            if trusted != cached {
                save_root(&file, &trusted)?;
            }
        }
        self.memo
            .lock()
            .expect("memo lock")
            .insert(path.to_path_buf(), hash);
        Ok(hash)
    }
}

fn load_root(file: &Path) -> Vec<FileEntry> {
    std::fs::read(file)
        .ok()
        .and_then(|bytes| postcard::from_bytes(&bytes).ok())
        .unwrap_or_default()
}

fn save_root(file: &Path, files: &[FileEntry]) -> io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = postcard::to_allocvec(files).map_err(io::Error::other)?;
    crate::store::write_atomic(file, &bytes)
}

/// A regular file found by [`walk`].
pub struct Walked {
    /// Path relative to the walked root, `/`-separated; "" when the root is the file.
    pub rel: String,
    found: Found,
}

enum Found {
    /// A directory entry: stat through the directory (fstatat), much cheaper than a full path.
    Entry(std::fs::DirEntry),
    /// A symlink to a file, or the root itself.
    Path(PathBuf),
}

impl Walked {
    pub fn path(&self) -> PathBuf {
        match &self.found {
            Found::Entry(e) => e.path(),
            Found::Path(p) => p.clone(),
        }
    }

    fn metadata(&self) -> io::Result<Metadata> {
        match &self.found {
            Found::Entry(e) => e.metadata(),
            Found::Path(p) => std::fs::metadata(p),
        }
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path().display())))
    }
}

/// Every regular file under `root` (following symlinks, refusing loops), sorted by relative path.
/// A file root yields itself.
pub fn walk(root: &Path) -> io::Result<Vec<Walked>> {
    let meta = std::fs::metadata(root)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", root.display())))?;
    let mut found = Vec::new();
    if meta.is_dir() {
        walk_dir(root, "", &mut vec![(meta.dev(), meta.ino())], &mut found)?;
    } else if meta.is_file() {
        found.push(Walked {
            rel: String::new(),
            found: Found::Path(root.to_path_buf()),
        });
    }
    found.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    Ok(found)
}

fn walk_dir(
    dir: &Path,
    rel: &str,
    ancestors: &mut Vec<(u64, u64)>,
    out: &mut Vec<Walked>,
) -> io::Result<()> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
    for entry in std::fs::read_dir(dir).map_err(context)? {
        let entry = entry.map_err(context)?;
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| {
            io::Error::other(format!(
                "{}: file names must be UTF-8",
                entry.path().display()
            ))
        })?;
        let child = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let file_type = entry.file_type().map_err(context)?;
        let (meta, found) = if file_type.is_symlink() {
            let path = entry.path();
            let meta = std::fs::metadata(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            (Some(meta), Found::Path(path))
        } else if file_type.is_dir() {
            (
                Some(entry.metadata().map_err(context)?),
                Found::Entry(entry),
            )
        } else {
            (None, Found::Entry(entry))
        };
        let is_dir = meta.as_ref().is_some_and(Metadata::is_dir);
        let is_file = meta.as_ref().map_or(file_type.is_file(), Metadata::is_file);
        if is_dir {
            let meta = meta.expect("directories are stat'ed");
            let id = (meta.dev(), meta.ino());
            let path = match &found {
                Found::Entry(e) => e.path(),
                Found::Path(p) => p.clone(),
            };
            if ancestors.contains(&id) {
                return Err(io::Error::other(format!(
                    "{}: symlink loop",
                    path.display()
                )));
            }
            ancestors.push(id);
            walk_dir(&path, &child, ancestors, out)?;
            ancestors.pop();
        } else if is_file {
            out.push(Walked { rel: child, found });
        }
    }
    Ok(())
}

/// Stats and hashes files in parallel (skipping those `known` vouches for) and combines them, in
/// path order, with their relative paths: renaming a file changes the hash, touching one does not.
pub fn hash_files(
    files: Vec<Walked>,
    known: impl Fn(&str, &Stat) -> Option<Digest> + Sync,
) -> io::Result<Tree> {
    let hits = std::sync::atomic::AtomicUsize::new(0);
    let files = files
        .into_par_iter()
        .with_min_len(64)
        .map(|walked| {
            let stat = Stat::of(&walked.metadata()?);
            let hash = match known(&walked.rel, &stat) {
                Some(h) => {
                    hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    h
                }
                None => hash_file(&walked.path(), stat.size)?.into(),
            };
            Ok(FileEntry {
                path: walked.rel,
                stat,
                hash,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(Tree {
        hash: merkle(&files),
        files,
        cache_hits: hits.into_inner(),
    })
}

/// Hashes every file under `root`, reading them all (for fresh outputs).
pub fn hash_tree(root: &Path) -> io::Result<Tree> {
    hash_files(walk(root)?, |_, _| None)
}

/// The Merkle hash of a list of files sorted by path.
pub fn merkle(files: &[FileEntry]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"smelt-tree-1\n");
    for f in files {
        hasher.update(f.path.as_bytes());
        hasher.update(b"\0");
        hasher.update(&f.hash.0);
        hasher.update(b"\n");
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusting(dir: &Path) -> StatCache {
        StatCache {
            racy_ns: 0,
            ..StatCache::new(dir)
        }
    }

    #[test]
    fn tree_hash_depends_on_names_and_bytes_not_times() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "alpha").unwrap();
        std::fs::write(dir.path().join("b.txt"), "beta").unwrap();
        let first = hash_tree(dir.path()).unwrap();
        assert_eq!(
            first
                .files
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>(),
            ["b.txt", "sub/a.txt"]
        );
        std::fs::write(dir.path().join("b.txt"), "beta").unwrap();
        assert_eq!(hash_tree(dir.path()).unwrap().hash, first.hash);
        std::fs::rename(dir.path().join("b.txt"), dir.path().join("c.txt")).unwrap();
        assert_ne!(hash_tree(dir.path()).unwrap().hash, first.hash);
    }

    #[test]
    fn cached_hashes_are_used_while_the_stat_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("f"), "one").unwrap();
        let cache_dir = dir.path().join("cache");
        let h1 = trusting(&cache_dir).hash_dependency(&data).unwrap();
        assert_eq!(h1, hash_tree(&data).unwrap().hash);
        // Poison the cached hash: an unchanged stat must return it without reading the file.
        let file = std::fs::read_dir(&cache_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut cached = load_root(&file);
        cached[0].hash = Digest([7; 32]);
        save_root(&file, &cached).unwrap();
        assert_ne!(trusting(&cache_dir).hash_dependency(&data).unwrap(), h1);
        // A real change is seen through the stat.
        std::fs::write(data.join("f"), "two!").unwrap();
        let h2 = trusting(&cache_dir).hash_dependency(&data).unwrap();
        assert_eq!(h2, hash_tree(&data).unwrap().hash);
        assert_ne!(h1, h2);
    }

    #[test]
    fn single_files_are_cached_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let cache_dir = dir.path().join("cache");
        assert_eq!(
            trusting(&cache_dir).hash_dependency(&file).unwrap(),
            blake3::hash(b"x")
        );
        assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 1);
    }

    #[test]
    fn recently_changed_files_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let cache_dir = dir.path().join("cache");
        StatCache::new(&cache_dir).hash_dependency(&file).unwrap();
        assert!(!cache_dir.exists(), "nothing trustworthy to save");
    }

    #[test]
    fn walk_follows_symlinks_and_refuses_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(dir.path().join("outside.txt"), "o").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside.txt"), root.join("sub/link.txt"))
            .unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        let rels: Vec<String> = walk(&root).unwrap().into_iter().map(|w| w.rel).collect();
        assert_eq!(rels, ["a.txt", "sub/link.txt"]);
        let with_slash = PathBuf::from(format!("{}/", root.display()));
        let rels: Vec<String> = walk(&with_slash)
            .unwrap()
            .into_iter()
            .map(|w| w.rel)
            .collect();
        assert_eq!(rels, ["a.txt", "sub/link.txt"]);
        std::os::unix::fs::symlink(&root, root.join("sub/again")).unwrap();
        let err = walk(&root).err().expect("a loop is an error");
        assert!(err.to_string().contains("symlink loop"), "{err}");
    }
}
