//! Ingest: find complete files in the export folders and claim each exactly once.
//!
//! A file is a candidate when notify reports it or a rescan finds it. It is taken when its
//! size and mtime are unchanged across two polls `settle` apart, or at once when it was
//! renamed into the folder (a rename is atomic, so the file is whole). Claiming records the
//! scan and its sealed linkage in the store first, then renames the file into the spool;
//! start-up recovery finishes a claim a crash interrupted between the two.
//!
//! Original paths are PHI (names, MRNs): they go into the sealed linkage and nowhere else —
//! never into a log line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::config::IngestConfig;
use crate::scan::{now_ms, Linkage, ScanId, ScanRecord};
use crate::store::{Store, StoreError};

/// Most files tracked while they settle; beyond that, the next rescan picks them up.
const MAX_CANDIDATES: usize = 10_000;
/// Deepest folder level looked into below a watch folder.
const MAX_DEPTH: usize = 8;
/// Most files claimed in one commit.
const MAX_CLAIM_BATCH: usize = 64;
/// Most watch events taken in one turn of the loop, so a stream of them cannot hold off
/// shutdown and the polls.
const MAX_EVENTS_PER_TURN: usize = 256;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    #[error("cannot watch folder #{index}: {source}")]
    Watch { index: usize, source: notify::Error },
    #[error("cannot create folder: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A claimed scan on its way to a worker.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub scan_id: ScanId,
    pub queued_at: Instant,
}

/// Free space of the state directory, and the alarm raised when it runs low.
pub trait DiskGuard: Send + Sync {
    /// True when intake may go on with a file of `incoming` bytes.
    fn intake_allowed(&self, incoming: u64) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    size: u64,
    mtime: Option<SystemTime>,
}

struct Candidate {
    seen: Seen,
    /// Two equal observations a poll apart make a file complete.
    polls_unchanged: u32,
}

pub struct Ingest {
    config: IngestConfig,
    store: Arc<Store>,
    spool: PathBuf,
    jobs: mpsc::Sender<Job>,
    disk: Arc<dyn DiskGuard>,
    candidates: HashMap<PathBuf, Candidate>,
    /// Files whose claim failed, with what they looked like then: not retried until changed.
    failed: HashMap<PathBuf, Seen>,
    heartbeat: Arc<std::sync::atomic::AtomicU64>,
}

fn eligible_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    !(name.starts_with('.') || name.ends_with(".partial") || name.ends_with(".tmp"))
}

/// Regular files only; symlinks are never followed (a link could point anywhere).
fn regular_file(path: &Path) -> Option<Seen> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type().is_file().then(|| Seen { size: meta.len(), mtime: meta.modified().ok() })
}

impl Ingest {
    pub fn new(
        config: IngestConfig,
        store: Arc<Store>,
        spool: PathBuf,
        jobs: mpsc::Sender<Job>,
        disk: Arc<dyn DiskGuard>,
    ) -> Self {
        Ingest {
            config,
            store,
            spool,
            jobs,
            disk,
            candidates: HashMap::new(),
            failed: HashMap::new(),
            heartbeat: Default::default(),
        }
    }

    /// Stamp `beat` (ms since the epoch) on every turn of the loop, once the watches are
    /// registered: the watchdog's evidence that the watcher is alive.
    pub fn with_heartbeat(mut self, beat: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.heartbeat = beat;
        self
    }

    fn beat(&self) {
        self.heartbeat.store(crate::scan::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Watch until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), IngestError> {
        for folder in &self.config.watch {
            std::fs::create_dir_all(folder)?;
        }
        let (event_tx, mut events) = mpsc::channel::<(PathBuf, bool)>(4096);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            let renamed_in =
                matches!(event.kind, EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)));
            let interesting = renamed_in || matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_));
            if interesting {
                // With `Both`, the last path is the destination.
                let paths = if renamed_in { event.paths.last().cloned().into_iter().collect() } else { event.paths };
                for path in paths {
                    // Full channel: drop the event; the periodic rescan finds the file.
                    let _ = event_tx.try_send((path, renamed_in));
                }
            }
        })
        .map_err(|source| IngestError::Watch { index: 0, source })?;
        for (index, folder) in self.config.watch.iter().enumerate() {
            watcher.watch(folder, RecursiveMode::Recursive).map_err(|source| IngestError::Watch { index, source })?;
        }
        self.rescan();
        self.beat();
        let mut poll = tokio::time::interval(self.config.settle);
        let mut rescan = tokio::time::interval(self.config.rescan_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(event) = events.recv() => {
                    // Files renamed in together (a burst, an archive) are claimed together,
                    // sharing a commit and the folders' fsyncs: whatever else is already
                    // waiting joins this one.
                    let mut whole: Vec<(PathBuf, Seen)> = Vec::new();
                    let mut next = Some(event);
                    let mut drained = 0;
                    while let Some((path, renamed_in)) = next.take() {
                        drained += 1;
                        // One rename within the folder is reported twice (`To`, then `Both`).
                        if !whole.iter().any(|(p, _)| *p == path) {
                            match renamed_in.then(|| self.complete(&path)).flatten() {
                                Some(seen) => whole.push((path, seen)),
                                None => self.observe(path),
                            }
                        }
                        if whole.len() < MAX_CLAIM_BATCH && drained < MAX_EVENTS_PER_TURN {
                            next = events.try_recv().ok();
                        }
                    }
                    self.claim_all(whole).await?;
                }
                _ = poll.tick() => {
                    self.beat();
                    self.poll().await?
                }
                _ = rescan.tick() => self.rescan(),
            }
        }
        drop(watcher);
        Ok(())
    }

    fn observe(&mut self, path: PathBuf) {
        if !eligible_name(&path) || self.candidates.contains_key(&path) || self.candidates.len() >= MAX_CANDIDATES {
            return;
        }
        if let Some(seen) = regular_file(&path) {
            if self.failed.get(&path) == Some(&seen) {
                return;
            }
            self.candidates.insert(path, Candidate { seen, polls_unchanged: 0 });
        }
    }

    fn rescan(&mut self) {
        let folders = self.config.watch.clone();
        for folder in folders {
            self.walk(&folder, 0);
        }
        self.failed.retain(|path, _| path.exists());
    }

    fn walk(&mut self, dir: &Path, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() && depth < MAX_DEPTH && eligible_name(&path) => self.walk(&path, depth + 1),
                Ok(t) if t.is_file() => self.observe(path),
                _ => {}
            }
        }
    }

    async fn poll(&mut self) -> Result<(), IngestError> {
        let mut ready = Vec::new();
        self.candidates.retain(|path, candidate| match regular_file(path) {
            None => false,
            Some(seen) if seen == candidate.seen => {
                candidate.polls_unchanged += 1;
                true
            }
            Some(seen) => {
                candidate.seen = seen;
                candidate.polls_unchanged = 0;
                true
            }
        });
        for (path, candidate) in &self.candidates {
            if candidate.polls_unchanged >= 1 {
                ready.push((path.clone(), candidate.seen));
            }
        }
        // Oldest first, so a backlog is processed in the order the scanner wrote it.
        ready.sort_by_key(|(_, seen)| seen.mtime);
        for (path, _) in &ready {
            self.candidates.remove(path);
        }
        self.claim_all(ready).await
    }

    /// A file renamed into a watch folder, whole at once (a rename is atomic): what it looks
    /// like, or None when it is not one to claim now.
    fn complete(&mut self, path: &Path) -> Option<Seen> {
        let seen = regular_file(path).filter(|seen| seen.size > 0 && eligible_name(path))?;
        self.candidates.remove(path);
        Some(seen)
    }

    /// Claim `files` in order, as many at a time as the pipeline has room for (at most
    /// [`MAX_CLAIM_BATCH`]), each group in one commit and one fsync per folder.
    async fn claim_all(&mut self, files: Vec<(PathBuf, Seen)>) -> Result<(), IngestError> {
        let mut files = files.into_iter().peekable();
        let jobs = self.jobs.clone();
        while let Some((path, seen)) = files.next() {
            if !self.disk.intake_allowed(seen.size) {
                // The files stay where they are, watched, until space returns.
                self.requeue(std::iter::once((path, seen)).chain(files));
                return Ok(());
            }
            // Waiting for a busy pipeline is back-pressure, not a hang: keep the heartbeat going.
            let first = loop {
                match tokio::time::timeout(std::time::Duration::from_secs(1), jobs.reserve()).await {
                    Ok(Ok(permit)) => break permit,
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => self.beat(),
                }
            };
            let mut group = vec![(path, seen, first)];
            while group.len() < MAX_CLAIM_BATCH {
                let Some((_, seen)) = files.peek() else { break };
                if !self.disk.intake_allowed(seen.size) {
                    break;
                }
                let Ok(permit) = jobs.try_reserve() else { break };
                let Some((path, seen)) = files.next() else { break };
                group.push((path, seen, permit));
            }
            if !self.claim(group).await? {
                // The store could not record the claims: they stay in the export folder and
                // are tried again at the next poll, while the store recovers.
                self.requeue(files);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                return Ok(());
            }
        }
        Ok(())
    }

    /// Record, then move into the spool, then hand to a worker with the permit that came
    /// with each file. False when nothing could be recorded; the files are then candidates
    /// again.
    async fn claim(&mut self, group: Vec<(PathBuf, Seen, mpsc::Permit<'_, Job>)>) -> Result<bool, IngestError> {
        let mut claims: Vec<(ScanRecord, Linkage)> = Vec::with_capacity(group.len());
        let mut moves: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(group.len());
        for (path, _, _) in &group {
            let scan_id = ScanId::new();
            claims.push((
                ScanRecord::received(scan_id),
                Linkage {
                    original_path: path.to_string_lossy().into_owned(),
                    original_name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    identifiers: Default::default(),
                    claimed_at_ms: now_ms(),
                },
            ));
            moves.push((path.clone(), self.spool.join(scan_id.to_string())));
        }
        let ids: Vec<ScanId> = claims.iter().map(|(record, _)| record.scan_id).collect();
        let store = self.store.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Result<Vec<std::io::Result<()>>, StoreError> {
            store.record_claims(&claims)?;
            let mut moved: Vec<std::io::Result<()>> =
                moves.iter().map(|(source, spool)| crate::fsutil::rename_unsynced(source, spool)).collect();
            let renamed: Vec<(&Path, &Path)> = moves
                .iter()
                .zip(&moved)
                .filter(|(_, result)| result.is_ok())
                .map(|((source, spool), _)| (source.as_path(), spool.as_path()))
                .collect();
            if let Err(e) = crate::fsutil::sync_folders_of(&renamed) {
                for result in moved.iter_mut().filter(|r| r.is_ok()) {
                    *result = Err(std::io::Error::new(e.kind(), e.to_string()));
                }
            }
            Ok(moved)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        let moved = match outcome {
            Ok(moved) => moved,
            Err(e) => {
                tracing::error!(error = %e, files = group.len(), "cannot record a claim; the files stay in the export folder");
                self.requeue(group.into_iter().map(|(path, seen, _)| (path, seen)));
                return Ok(false);
            }
        };
        for (((path, seen, permit), scan_id), moved) in group.into_iter().zip(ids).zip(moved) {
            match moved {
                Ok(()) => tracing::info!(%scan_id, "claimed"),
                Err(e) => {
                    // The record exists; the worker accounts for the missing file (quarantine
                    // record "source_missing"), so nothing is silently dropped.
                    tracing::warn!(%scan_id, error = %e.kind(), "could not move claimed file into the spool");
                    self.failed.insert(path, seen);
                }
            }
            permit.send(Job { scan_id, queued_at: Instant::now() });
        }
        Ok(true)
    }

    fn requeue(&mut self, files: impl IntoIterator<Item = (PathBuf, Seen)>) {
        for (path, seen) in files {
            self.candidates.insert(path, Candidate { seen, polls_unchanged: 0 });
        }
    }
}

/// Finish claims that a crash interrupted between the store record and the rename.
/// Returns the scans whose spool file is now in place or accounted for.
pub fn recover_claim(store: &Store, spool: &Path, scan_id: ScanId) -> Result<bool, StoreError> {
    let target = spool.join(scan_id.to_string());
    if target.exists() {
        return Ok(true);
    }
    let Some(linkage) = store.linkage(scan_id)? else { return Ok(false) };
    let source = PathBuf::from(&linkage.original_path);
    if regular_file(&source).is_some() && crate::fsutil::move_file(&source, &target).is_ok() {
        tracing::info!(%scan_id, "finished an interrupted claim");
        return Ok(true);
    }
    Ok(false)
}
