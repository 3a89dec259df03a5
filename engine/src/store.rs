//! store: content-addressed artifacts, run records, per-key locks, work dirs and gc.
//!
//! ```text
//! .smelt/
//!   store.lock              shared by every run, exclusive for gc
//!   artifacts/<id>/         published outputs; files are read-only
//!   artifacts/<id>.json     manifest: path, stat and hash of each file (integrity checks)
//!   records/<key>.json      run cache: stage key → artifact id, params, metrics
//!   locks/<key>.lock        flock held while a key is being built (file-*.lock: file updates)
//!   tmp/<key>.<pid>.<n>/    outputs being written; renamed into artifacts/ when complete
//!   work/<key>/             checkpoints of a stage key; survives failures, removed on success
//!   memo/<hash>             intermediates a stage keys on part of its inputs (see `StageContext::memo_file`)
//!   statcache/<path hash>   stat → hash cache of each external dependency
//!   lockfiles               pipeline lockfiles that use this store (gc keeps what they name)
//! ```
//!
//! Invariants: an `artifacts/<id>` directory is only ever created by a rename of a complete
//! directory whose Merkle hash is `<id>`; records are written after their artifact; every file
//! written in place is written to a temp file and renamed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::hash::{hash_files, hash_tree, walk, FileEntry, Stat};

/// The BLAKE3 key of a stage's inputs (see `key.rs`), as hex.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageKey(pub String);

/// The BLAKE3 Merkle hash of an output directory, as hex.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ArtifactId(pub String);

impl fmt::Display for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ArtifactId {
    /// The first 12 hex digits, for people.
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }
}

/// What one execution of a stage key produced: the run cache entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub key: StageKey,
    pub artifact: ArtifactId,
    pub kind: String,
    pub version: u32,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, Vec<ArtifactId>>,
    pub deps: BTreeMap<String, String>,
    /// Name of the stage that built it (informational; not part of the key).
    pub stage: String,
    /// Unix seconds when the run finished.
    pub finished_at: u64,
    pub duration_s: f64,
    /// The machine that ran it, and with how many worker threads: measurements of the run,
    /// like its duration and the metrics' speeds, kept here and never in the artifact.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub threads: usize,
    pub metrics: BTreeMap<String, serde_json::Value>,
}

/// The state of a published artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Integrity {
    Intact,
    Missing,
    Corrupt(String),
}

/// What re-hashing every file of an artifact found (`smelt verify`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactCheck {
    Intact,
    /// Neither its directory nor its files are in the store (a record or a lockfile names it,
    /// or only its manifest is left): nothing to repair, the next run builds it.
    Missing,
    Corrupt(Damage),
}

/// How an artifact's files differ from its manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// Files whose bytes no longer have the hash the manifest records.
    pub changed: Vec<String>,
    /// Files the manifest lists that are gone.
    pub missing: Vec<String>,
    /// Files the manifest does not list.
    pub extra: Vec<String>,
    /// Anything else: no manifest or an unreadable one, a file that cannot be read, files that
    /// match the manifest but do not hash to the id (the manifest was changed too).
    pub problem: Option<String>,
}

/// An open store; holds a shared lock on it for its lifetime so gc cannot run underneath.
pub struct Store {
    root: PathBuf,
    _lock: File,
    exclusive: bool,
}

/// Exclusive ownership of one stage key while it is built; released on drop (or process death).
pub struct KeyLock {
    _file: File,
}

impl std::os::fd::AsRawFd for KeyLock {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self._file.as_raw_fd()
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> io::Result<Store> {
        Self::open_with(root, false)
    }

    /// Opens the store for gc: waits for no run to be using it.
    pub fn open_exclusive(root: &Path) -> io::Result<Store> {
        Self::open_with(root, true)
    }

    fn open_with(root: &Path, exclusive: bool) -> io::Result<Store> {
        for dir in ["artifacts", "records", "locks", "tmp", "work", "memo"] {
            fs::create_dir_all(root.join(dir))?;
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("store.lock"))?;
        if exclusive {
            lock.try_lock().map_err(|_| {
                io::Error::other("another smelt run is using this store; try again when it ends")
            })?;
        } else {
            lock.lock_shared()?;
        }
        let root = std::path::absolute(root)?;
        let store = Store {
            root,
            _lock: lock,
            exclusive,
        };
        store.sweep();
        Ok(store)
    }

    /// Removes what killed processes left half-written: temp files of [`write_atomic`] and temp
    /// dirs in `tmp/` whose process is gone. A run that is killed between writing a file and
    /// renaming it leaves such a file, and nothing else would ever remove it (gc aside).
    ///
    /// A temp dir of a stage key is removed only with that key's lock held, so never while a
    /// run builds it. Best effort: errors are ignored (another run may sweep at the same time).
    fn sweep(&self) {
        for dir in ["", "artifacts", "records", "runs", "statcache"] {
            sweep_temp_files(&self.root.join(dir), None);
        }
        // A stage's work dir goes once its record is written: one left beside a record was
        // left by a run killed in between (a forced rebuild of the key holds its lock).
        if let Ok(entries) = fs::read_dir(self.root.join("work")) {
            for entry in entries.flatten() {
                let key = StageKey(entry.file_name().to_string_lossy().into_owned());
                if self.record_path(&key).exists() {
                    if let Ok(Some(_lock)) = self.try_lock_key(&key) {
                        let _ = remove_tree(&entry.path());
                    }
                }
            }
        }
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((owner, pid)) = temp_owner(&name) else {
                continue;
            };
            if process_alive(pid) {
                continue;
            }
            if owner == "trash" {
                let _ = remove_tree(&entry.path());
            } else if let Ok(Some(_lock)) = self.try_lock_key(&StageKey(owner.to_string())) {
                let _ = remove_tree(&entry.path());
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn artifact_dir(&self, id: &ArtifactId) -> PathBuf {
        self.root.join("artifacts").join(&id.0)
    }

    fn manifest_path(&self, id: &ArtifactId) -> PathBuf {
        self.root.join("artifacts").join(format!("{}.json", id.0))
    }

    fn record_path(&self, key: &StageKey) -> PathBuf {
        self.root.join("records").join(format!("{}.json", key.0))
    }

    pub fn stat_cache_dir(&self) -> PathBuf {
        self.root.join("statcache")
    }

    pub fn memo_dir(&self) -> PathBuf {
        self.root.join("memo")
    }

    pub fn work_dir(&self, key: &StageKey) -> PathBuf {
        self.root.join("work").join(&key.0)
    }

    /// The run cache entry of a key, if one was recorded.
    pub fn record(&self, key: &StageKey) -> Option<RunRecord> {
        let bytes = fs::read(self.record_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save_record(&self, record: &RunRecord) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_atomic(&self.record_path(&record.key), &json)
    }

    /// The files that differ between two artifacts (present in one only, or with other
    /// content), by their manifests; `None` when a manifest is gone or unreadable.
    pub fn differing_files(&self, a: &ArtifactId, b: &ArtifactId) -> Option<Vec<String>> {
        let manifest = |id: &ArtifactId| -> Option<BTreeMap<String, FileEntry>> {
            let bytes = fs::read(self.manifest_path(id)).ok()?;
            let files: Vec<FileEntry> = serde_json::from_slice(&bytes).ok()?;
            Some(files.into_iter().map(|f| (f.path.clone(), f)).collect())
        };
        let (a, b) = (manifest(a)?, manifest(b)?);
        let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        Some(
            paths
                .into_iter()
                .filter(|p| a.get(*p).map(|f| f.hash) != b.get(*p).map(|f| f.hash))
                .cloned()
                .collect(),
        )
    }

    /// Checks an artifact against its manifest: the Merkle hash of its files, recomputed with the
    /// manifest's stats standing in for files whose stat is unchanged, must still be its id.
    pub fn verify(&self, id: &ArtifactId) -> Integrity {
        let dir = self.artifact_dir(id);
        let Ok(bytes) = fs::read(self.manifest_path(id)) else {
            return Integrity::Missing;
        };
        if !dir.is_dir() {
            return Integrity::Missing;
        }
        let Ok(manifest) = serde_json::from_slice::<Vec<FileEntry>>(&bytes) else {
            return Integrity::Corrupt("its manifest is unreadable".into());
        };
        let known = |rel: &str, stat: &Stat| {
            let i = manifest
                .binary_search_by(|f| f.path.as_str().cmp(rel))
                .ok()?;
            (manifest[i].stat == *stat).then_some(manifest[i].hash)
        };
        match walk(&dir).and_then(|files| hash_files(files, known)) {
            Ok(tree) if tree.hash.to_hex().as_str() == id.0 => Integrity::Intact,
            Ok(tree) => Integrity::Corrupt(first_difference(&manifest, &tree.files)),
            Err(e) => Integrity::Corrupt(format!("it cannot be read: {e}")),
        }
    }

    /// Checks an artifact by reading every one of its files (no stat is trusted): what
    /// `smelt verify` reports. Slower than [`Store::verify`], but it also finds bytes that
    /// changed under an unchanged stat (a failing disk, a restored backup).
    pub fn verify_contents(&self, id: &ArtifactId) -> ArtifactCheck {
        let dir = self.artifact_dir(id);
        if !dir.is_dir() {
            return ArtifactCheck::Missing;
        }
        let corrupt = |problem: String| {
            ArtifactCheck::Corrupt(Damage {
                problem: Some(problem),
                ..Damage::default()
            })
        };
        let manifest = match fs::read(self.manifest_path(id)) {
            Ok(bytes) => match serde_json::from_slice::<Vec<FileEntry>>(&bytes) {
                Ok(manifest) => manifest,
                Err(e) => return corrupt(format!("its manifest is unreadable: {e}")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return corrupt("its manifest is missing".into())
            }
            Err(e) => return corrupt(format!("its manifest cannot be read: {e}")),
        };
        let tree = match hash_tree(&dir) {
            Ok(tree) => tree,
            Err(e) => return corrupt(format!("it cannot be read: {e}")),
        };
        let before: BTreeMap<&str, &FileEntry> =
            manifest.iter().map(|f| (f.path.as_str(), f)).collect();
        let now: BTreeMap<&str, &FileEntry> =
            tree.files.iter().map(|f| (f.path.as_str(), f)).collect();
        let mut damage = Damage::default();
        for (path, entry) in &before {
            match now.get(path) {
                None => damage.missing.push(path.to_string()),
                Some(found) if found.hash != entry.hash => damage.changed.push(path.to_string()),
                Some(_) => {}
            }
        }
        damage.extra = now
            .keys()
            .filter(|p| !before.contains_key(*p))
            .map(|p| p.to_string())
            .collect();
        let listed =
            damage.changed.is_empty() && damage.missing.is_empty() && damage.extra.is_empty();
        match (tree.hash.to_hex().as_str() == id.0, listed) {
            (true, true) => ArtifactCheck::Intact,
            (true, false) => {
                damage.problem = Some("its manifest does not describe its files".into());
                ArtifactCheck::Corrupt(damage)
            }
            (false, true) => corrupt(
                "its files match its manifest but do not hash to its id: the manifest was \
                 changed too"
                    .into(),
            ),
            (false, false) => ArtifactCheck::Corrupt(damage),
        }
    }

    /// Every artifact in the store: its directories, and manifests left without one.
    pub fn artifact_ids(&self) -> io::Result<Vec<ArtifactId>> {
        let mut ids = BTreeSet::new();
        for entry in fs::read_dir(self.root.join("artifacts"))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            // `.<id>.json.*.tmp`: a manifest being written (or left by a killed run).
            if name.starts_with('.') {
                continue;
            }
            ids.insert(ArtifactId(
                name.strip_suffix(".json").unwrap_or(&name).to_string(),
            ));
        }
        Ok(ids.into_iter().collect())
    }

    /// Every run record, by key (unreadable ones are skipped).
    pub fn records(&self) -> io::Result<Vec<RunRecord>> {
        let mut records = Vec::new();
        for entry in fs::read_dir(self.root.join("records"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(record) = fs::read(&path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<RunRecord>(&bytes).ok())
                {
                    records.push(record);
                }
            }
        }
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(records)
    }

    /// Removes an artifact, its manifest and the run records that point at it, so that the
    /// next run rebuilds it; returns the keys of those records. Needs the store opened
    /// exclusively: no run may be reading the artifact or publishing it meanwhile.
    ///
    /// Records go first, then the directory (moved out of `artifacts/` at once, then
    /// deleted), then the manifest: stopped anywhere, the store is still consistent (a record
    /// without its artifact, or a manifest without its directory, reads as missing).
    pub fn remove_artifact(&self, id: &ArtifactId) -> io::Result<Vec<StageKey>> {
        if !self.exclusive {
            return Err(io::Error::other(
                "removing an artifact needs the store to itself (Store::open_exclusive)",
            ));
        }
        let mut keys = Vec::new();
        for record in self.records()? {
            if record.artifact == *id {
                remove_tree(&self.record_path(&record.key))?;
                keys.push(record.key);
            }
        }
        self.discard(&self.artifact_dir(id))?;
        remove_tree(&self.manifest_path(id))?;
        Ok(keys)
    }

    /// Blocks until this process owns `key` (another run may be building it).
    pub fn lock_key(&self, key: &StageKey) -> io::Result<KeyLock> {
        let file = self.key_lock_file(key)?;
        file.lock()?;
        Ok(KeyLock { _file: file })
    }

    /// Owns `key` if nobody else does right now.
    pub fn try_lock_key(&self, key: &StageKey) -> io::Result<Option<KeyLock>> {
        let file = self.key_lock_file(key)?;
        Ok(file.try_lock().ok().map(|_| KeyLock { _file: file }))
    }

    fn key_lock_file(&self, key: &StageKey) -> io::Result<File> {
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("locks").join(format!("{}.lock", key.0)))
    }

    /// Serializes read-modify-write updates of `file` (a pipeline's lockfile, the lockfile
    /// registry) between runs sharing this store. Released on drop.
    pub fn lock_for_update(&self, file: &Path) -> io::Result<KeyLock> {
        let id = blake3::hash(std::path::absolute(file)?.as_os_str().as_encoded_bytes());
        let name = format!("file-{}.lock", &id.to_hex()[..32]);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("locks").join(name))?;
        lock.lock()?;
        Ok(KeyLock { _file: lock })
    }

    /// A fresh, empty directory for a stage's output. Call with the key locked: leftovers of
    /// earlier attempts at the same key (a killed run) are removed first.
    pub fn new_output_dir(&self, key: &StageKey, _lock: &KeyLock) -> io::Result<PathBuf> {
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{}.", key.0))
            {
                remove_tree(&entry.path())?;
            }
        }
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = tmp.join(format!("{}.{}.{n}", key.0, std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Makes a finished output directory an artifact: its files become read-only, it is hashed,
    /// and it is renamed into place (or dropped, when an identical artifact already exists).
    pub fn publish(&self, out_dir: &Path) -> io::Result<ArtifactId> {
        set_writable(out_dir, false, false)?;
        let tree = hash_tree(out_dir)?;
        let id = ArtifactId(tree.hash.to_hex().to_string());
        let target = self.artifact_dir(&id);
        match self.verify(&id) {
            Integrity::Intact => {
                remove_tree(out_dir)?;
                return Ok(id);
            }
            Integrity::Corrupt(_) => self.discard(&target)?,
            Integrity::Missing => {}
        }
        let manifest = serde_json::to_vec(&tree.files).map_err(io::Error::other)?;
        write_atomic(&self.manifest_path(&id), &manifest)?;
        if let Err(e) = fs::rename(out_dir, &target) {
            // Another run published the same content first, and its manifest may have been
            // overwritten by ours (same hashes, other stats): describe what is in place.
            let in_place = hash_tree(&target).map_err(|_| e)?;
            if in_place.hash != tree.hash {
                return Err(io::Error::other(format!(
                    "{} does not hash to its id",
                    target.display()
                )));
            }
            let manifest = serde_json::to_vec(&in_place.files).map_err(io::Error::other)?;
            write_atomic(&self.manifest_path(&id), &manifest)?;
            remove_tree(out_dir)?;
            return Ok(id);
        }
        set_writable(&target, true, false)?;
        Ok(id)
    }

    /// Moves a directory out of the way atomically, then deletes it.
    fn discard(&self, dir: &Path) -> io::Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let trash = self
            .root
            .join("tmp")
            .join(format!("trash.{}.{n}", std::process::id()));
        // Moving a directory to another parent rewrites its `..`: it must be writable.
        set_writable(dir, true, true)?;
        fs::rename(dir, &trash)?;
        remove_tree(&trash)
    }

    /// Records that a lockfile refers to artifacts of this store (gc keeps them).
    pub fn register_lockfile(&self, lockfile: &Path) -> io::Result<()> {
        let path = std::path::absolute(lockfile)?
            .to_string_lossy()
            .into_owned();
        if self.lockfiles().contains(&path) {
            return Ok(());
        }
        // Two pipelines registering at once must not lose one, or gc would delete what it
        // refers to.
        let list = self.root.join("lockfiles");
        let _guard = self.lock_for_update(&list)?;
        let mut known = self.lockfiles();
        if known.insert(path) {
            let text: String = known.iter().map(|p| format!("{p}\n")).collect();
            write_atomic(&list, text.as_bytes())?;
        }
        Ok(())
    }

    fn lockfiles(&self) -> BTreeSet<String> {
        fs::read_to_string(self.root.join("lockfiles"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// What gc would delete: artifacts no registered lockfile names, the records pointing at
    /// them, leftover temp directories, lock files and memos (rebuilt when needed). Call on an
    /// exclusively opened store.
    ///
    /// A registered lockfile that no longer exists protects nothing; one that exists but cannot
    /// be read is an error (a merge conflict in it must not cost its artifacts). Work dirs hold
    /// the checkpoints of failed runs and are only collected with `include_work`.
    pub fn garbage(&self, include_work: bool) -> io::Result<Garbage> {
        let mut keep = BTreeSet::new();
        let mut lockfiles = Vec::new();
        for path in self
            .lockfiles()
            .into_iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
        {
            let lock = crate::lockfile::Lockfile::read(&path).map_err(|e| {
                io::Error::other(format!(
                    "{e}\nfix it (or delete it) before collecting garbage"
                ))
            })?;
            keep.extend(lock.stages.values().map(|s| s.artifact.clone()));
            lockfiles.push(path);
        }
        let mut garbage = Garbage {
            lockfiles,
            ..Default::default()
        };
        for entry in fs::read_dir(self.root.join("artifacts"))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = ArtifactId(name.trim_end_matches(".json").to_string());
            if !keep.contains(&id) {
                if entry.path().is_dir() {
                    garbage.bytes += tree_size(&entry.path());
                    garbage.artifacts.push(id);
                }
                garbage.paths.push(entry.path());
            }
        }
        for entry in fs::read_dir(self.root.join("records"))?.flatten() {
            let record: Option<RunRecord> = fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if record.is_none_or(|r| !keep.contains(&r.artifact)) {
                garbage.paths.push(entry.path());
            }
        }
        let dirs: &[&str] = if include_work {
            &["tmp", "work", "locks", "memo"]
        } else {
            &["tmp", "locks", "memo"]
        };
        for dir in dirs {
            for entry in fs::read_dir(self.root.join(dir))?.flatten() {
                garbage.bytes += tree_size(&entry.path());
                garbage.paths.push(entry.path());
            }
        }
        garbage.artifacts.sort();
        garbage.paths.sort();
        Ok(garbage)
    }

    pub fn delete(&self, garbage: &Garbage) -> io::Result<()> {
        for path in &garbage.paths {
            remove_tree(path)?;
        }
        Ok(())
    }
}

/// Says which file differs between a manifest and what is on disk now.
fn first_difference(manifest: &[FileEntry], now: &[FileEntry]) -> String {
    let before: BTreeMap<&str, &FileEntry> =
        manifest.iter().map(|f| (f.path.as_str(), f)).collect();
    let after: BTreeMap<&str, &FileEntry> = now.iter().map(|f| (f.path.as_str(), f)).collect();
    if let Some(path) = before.keys().find(|p| !after.contains_key(*p)) {
        return format!("{path} was deleted");
    }
    if let Some(path) = after.keys().find(|p| !before.contains_key(*p)) {
        return format!("{path} was added");
    }
    match before.iter().find(|(p, f)| after[*p].hash != f.hash) {
        Some((path, _)) => format!("{path} changed"),
        None => "its files do not hash to its id".into(),
    }
}

/// What gc found to delete.
#[derive(Debug, Default)]
pub struct Garbage {
    pub lockfiles: Vec<PathBuf>,
    pub artifacts: Vec<ArtifactId>,
    pub paths: Vec<PathBuf>,
    pub bytes: u64,
}

/// `KEY.PID.N` (a stage's output dir in `tmp/`, or `trash.PID.N`) → (KEY, PID).
fn temp_owner(name: &str) -> Option<(&str, u32)> {
    let mut parts = name.rsplitn(3, '.');
    let n = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let owner = parts.next()?;
    n.parse::<u64>().ok().map(|_| (owner, pid))
}

/// Whether process `pid` exists on this machine. Where that cannot be told (no `/proc`), every
/// process is taken to be alive, so nothing is swept.
fn process_alive(pid: u32) -> bool {
    pid == std::process::id()
        || !Path::new("/proc/self").exists()
        || Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes the temp files [`write_atomic`] left in `dir` (`.NAME.PID.N.tmp`) whose process is
/// gone; with `name`, only those of that file. Best effort.
pub fn sweep_temp_files(dir: &Path, name: Option<&str>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(temp) = file
            .to_str()
            .and_then(|f| f.strip_prefix('.'))
            .and_then(|f| f.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((target, pid)) = temp_owner(temp) else {
            continue;
        };
        if name.is_none_or(|n| n == target) && !process_alive(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Writes a file so that readers see the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Takes write permission away from (or gives it back to) the files or the directories of a
/// tree. Published artifacts are read-only through and through, so a stage cannot change or add
/// to the inputs it reads.
fn set_writable(tree: &Path, dirs: bool, writable: bool) -> io::Result<()> {
    for entry in walkdir::WalkDir::new(tree) {
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_dir() == dirs && !entry.path_is_symlink() {
            let mut perms = entry.metadata().map_err(io::Error::other)?.permissions();
            let mode = if writable {
                perms.mode() | 0o200
            } else {
                perms.mode() & !0o222
            };
            perms.set_mode(mode);
            fs::set_permissions(entry.path(), perms)?;
        }
    }
    Ok(())
}

/// Removes a file or a directory tree (read-only ones included).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            set_writable(path, true, true)?;
            fs::remove_dir_all(path)
        }
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn tree_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run record of a `command` stage keyed `key` that built `artifact`.
    fn test_record(key: &str, artifact: &ArtifactId) -> RunRecord {
        RunRecord {
            key: StageKey(key.into()),
            artifact: artifact.clone(),
            kind: "command".into(),
            version: 1,
            params: serde_json::json!({}),
            inputs: BTreeMap::new(),
            deps: BTreeMap::new(),
            stage: "s".into(),
            finished_at: 0,
            duration_s: 0.0,
            host: String::new(),
            threads: 1,
            metrics: BTreeMap::new(),
        }
    }

    fn output(store: &Store, key: &StageKey, files: &[(&str, &str)]) -> PathBuf {
        let lock = store.lock_key(key).unwrap();
        let dir = store.new_output_dir(key, &lock).unwrap();
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn publish_is_content_addressed_and_detects_corruption() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let key = StageKey("k".into());
        let id = store.publish(&output(&store, &key, &[("a", "1")])).unwrap();
        assert_eq!(store.verify(&id), Integrity::Intact);
        // Same content again: same id, no second copy, temp dir gone.
        let again = store.publish(&output(&store, &key, &[("a", "1")])).unwrap();
        assert_eq!(again, id);
        assert_eq!(fs::read_dir(root.path().join("tmp")).unwrap().count(), 0);
        // Tamper with the published file.
        let file = store.artifact_dir(&id).join("a");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&file, "2").unwrap();
        assert!(matches!(store.verify(&id), Integrity::Corrupt(_)));
        // Republishing repairs it.
        store.publish(&output(&store, &key, &[("a", "1")])).unwrap();
        assert_eq!(store.verify(&id), Integrity::Intact);
    }

    /// Changes file `a` of an artifact and records its new stat in the manifest, as if its
    /// bytes had rotted on disk: the stat no longer tells.
    fn rot(store: &Store, id: &ArtifactId, text: &str) {
        let file = store.artifact_dir(id).join("a");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&file, text).unwrap();
        let path = store.manifest_path(id);
        let mut manifest: Vec<FileEntry> =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let entry = manifest.iter_mut().find(|f| f.path == "a").unwrap();
        entry.stat = Stat::of(&fs::metadata(&file).unwrap());
        write_atomic(&path, &serde_json::to_vec(&manifest).unwrap()).unwrap();
    }

    #[test]
    fn verify_contents_reads_every_file() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let key = StageKey("k".into());
        let files = [("a", "1"), ("b", "2")];
        let id = store.publish(&output(&store, &key, &files)).unwrap();
        assert_eq!(store.verify_contents(&id), ArtifactCheck::Intact);
        rot(&store, &id, "x");
        // The stat matches the manifest, so the quick check trusts the recorded hash.
        assert_eq!(store.verify(&id), Integrity::Intact);
        let ArtifactCheck::Corrupt(damage) = store.verify_contents(&id) else {
            panic!("rot not found");
        };
        assert_eq!(damage.changed, ["a"]);
        assert!(damage.missing.is_empty() && damage.extra.is_empty());
        // A deleted file and an added one are named as such.
        let dir = store.artifact_dir(&id);
        set_writable(&dir, true, true).unwrap();
        fs::remove_file(dir.join("b")).unwrap();
        fs::write(dir.join("c"), "3").unwrap();
        let ArtifactCheck::Corrupt(damage) = store.verify_contents(&id) else {
            panic!("damage not found");
        };
        assert_eq!(
            (damage.changed, damage.missing, damage.extra),
            (
                vec!["a".to_string()],
                vec!["b".to_string()],
                vec!["c".to_string()]
            )
        );
        // Without its manifest it cannot be checked: corrupt. Without its directory: missing.
        fs::remove_file(store.manifest_path(&id)).unwrap();
        assert!(
            matches!(store.verify_contents(&id), ArtifactCheck::Corrupt(d) if d.problem.is_some())
        );
        remove_tree(&dir).unwrap();
        assert_eq!(store.verify_contents(&id), ArtifactCheck::Missing);
    }

    #[test]
    fn removing_an_artifact_takes_its_records_and_needs_the_store_to_itself() {
        let root = tempfile::tempdir().unwrap();
        let key = StageKey("k".into());
        let id = {
            let store = Store::open(root.path()).unwrap();
            let id = store.publish(&output(&store, &key, &[("a", "1")])).unwrap();
            let other = store.publish(&output(&store, &key, &[("a", "2")])).unwrap();
            for (key, artifact) in [("k1", &id), ("k2", &id), ("k3", &other)] {
                store.save_record(&test_record(key, artifact)).unwrap();
            }
            assert!(store.remove_artifact(&id).is_err());
            assert_eq!(store.artifact_ids().unwrap().len(), 2);
            id
        };
        let store = Store::open_exclusive(root.path()).unwrap();
        rot(&store, &id, "x");
        let removed = store.remove_artifact(&id).unwrap();
        assert_eq!(removed, [StageKey("k1".into()), StageKey("k2".into())]);
        assert_eq!(store.verify_contents(&id), ArtifactCheck::Missing);
        assert!(!store.manifest_path(&id).exists());
        assert_eq!(store.artifact_ids().unwrap().len(), 1);
        let left: Vec<StageKey> = store
            .records()
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(left, [StageKey("k3".into())]);
        assert_eq!(fs::read_dir(root.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn opening_the_store_sweeps_what_dead_processes_left() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let key = StageKey("k".into());
        let id = store.publish(&output(&store, &key, &[("a", "1")])).unwrap();
        // No process has pid u32::MAX - 1 (Linux caps pids far lower).
        let dead = u32::MAX - 1;
        let mine = std::process::id();
        let records = root.path().join("records");
        for (dir, name) in [
            (&records, format!(".{}.json.{dead}.3.tmp", "x")),
            (&records, format!(".{}.json.{mine}.4.tmp", "y")),
            (
                &root.path().join("artifacts"),
                format!(".{id}.json.{dead}.0.tmp"),
            ),
        ] {
            fs::write(dir.join(name), "{").unwrap();
        }
        let tmp = root.path().join("tmp");
        for name in [
            format!("k.{dead}.1"),
            format!("trash.{dead}.2"),
            format!("k.{mine}.5"),
        ] {
            fs::create_dir(tmp.join(&name)).unwrap();
            fs::write(tmp.join(&name).join("f"), "x").unwrap();
        }
        // A key being built by a live run is left alone, even with a dead process's name.
        fs::create_dir(tmp.join(format!("busy.{dead}.6"))).unwrap();
        let busy = store.lock_key(&StageKey("busy".into())).unwrap();
        // Work dirs: of a key with a record (a run killed before removing it), of a key without
        // one (checkpoints to resume from), of a key with a record being rebuilt (forced).
        let record = |key: &str| test_record(key, &id);
        for key in ["done", "resumable", "busy"] {
            fs::create_dir_all(store.work_dir(&StageKey(key.into())).join("ckpt")).unwrap();
            if key != "resumable" {
                store.save_record(&record(key)).unwrap();
            }
        }
        drop(store);
        let _store = Store::open(root.path()).unwrap();
        let names = |dir: &Path| -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(&records),
            [
                format!(".y.json.{mine}.4.tmp"),
                "busy.json".into(),
                "done.json".into()
            ]
        );
        assert_eq!(names(&root.path().join("work")), ["busy", "resumable"]);
        assert_eq!(
            names(&root.path().join("artifacts")),
            [id.0.clone(), format!("{id}.json")]
        );
        assert_eq!(
            names(&tmp),
            [format!("busy.{dead}.6"), format!("k.{mine}.5")]
        );
        drop(busy);
    }

    #[test]
    fn key_locks_exclude_each_other() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let key = StageKey("k".into());
        let held = store.lock_key(&key).unwrap();
        assert!(store.try_lock_key(&key).unwrap().is_none());
        drop(held);
        assert!(store.try_lock_key(&key).unwrap().is_some());
    }

    #[test]
    fn gc_needs_the_store_to_itself() {
        let root = tempfile::tempdir().unwrap();
        let _run = Store::open(root.path()).unwrap();
        assert!(Store::open_exclusive(root.path()).is_err());
    }
}
