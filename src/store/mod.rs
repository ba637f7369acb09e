//! Durable state in one redb file. Every state change of a scan is one committed write
//! transaction, and a result enters the outbox in the same transaction that marks the scan
//! classified, so a crash never leaves a classified scan without its message.
//!
//! Tables (see docs/architecture.md):
//! - `scans`:   scan_id -> ScanRecord (JSON)
//! - `outbox`:  sequence number -> OutboxMessage (JSON), drained in key order
//! - `linkage`: scan_id -> sealed Linkage (ChaCha20-Poly1305 under a key derived from the
//!   device secret, so the store file alone reveals no identity)
//! - `settings`: name -> bytes (`model_state`: the installed models and the health gate)
//! - `model_events`: sequence number -> the model event as published (JSON): every install, refusal, commit
//!   and rollback, kept for audit

use std::collections::BTreeMap;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::scan::{now_ms, LabelRecord, Linkage, ScanId, ScanRecord, ScanState};
use crate::secret::DeviceSecret;

const SCANS: TableDefinition<&str, &[u8]> = TableDefinition::new("scans");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const LINKAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("linkage");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
/// Monotonic counters; the outbox's next sequence number must never be reused, even when
/// the outbox is empty, or a publisher that has sent N would skip a new message N.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_OUTBOX_SEQ: &str = "outbox_next_seq";
const PROBE_COUNTER: &str = "probe_writes";
const MODEL_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("model_events");
/// outbox seq -> when it was enqueued (ms): the outbox's age without reading its messages.
const OUTBOX_TIMES: TableDefinition<u64, u64> = TableDefinition::new("outbox_times");
/// Set once the per-state scan counters (`scans_<state>` in COUNTERS) are maintained.
const SCAN_COUNTS_READY: &str = "scan_counts_v1";
const MODEL_STATE: &str = "model_state";
/// label seq -> LabelRecord (JSON): every revision of every verdict, in arrival order.
const LABELS: TableDefinition<u64, &[u8]> = TableDefinition::new("labels");
/// scan_id -> seq of its latest revision (the one that counts).
const LABEL_LATEST: TableDefinition<&str, u64> = TableDefinition::new("label_latest");
/// label seq -> the reviewer's comment, sealed like the linkage (free text may name a patient).
const LABEL_COMMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("label_comments");
/// The seqs that are some scan's latest revision, so the live-accuracy window is a plain
/// read of the newest entries however often scans were corrected.
const LABEL_LATEST_SEQS: TableDefinition<u64, ()> = TableDefinition::new("label_latest_seqs");
/// A sender's verdict id -> the seq stored for it: a verdict sent again is not a new revision.
const LABEL_IDS: TableDefinition<&str, u64> = TableDefinition::new("label_ids");
/// label seq -> UplinkState (JSON): verdicts still to deliver to the trainer, in order.
const UPLINK: TableDefinition<u64, &[u8]> = TableDefinition::new("uplink");
/// label seq -> why the trainer refused it for good (kept for the field engineer, alarmed).
const UPLINK_REFUSED: TableDefinition<u64, &[u8]> = TableDefinition::new("uplink_refused");
/// Who revealed which scan's identity in the reading room, and when (never the identity).
const REVEALS: TableDefinition<u64, &[u8]> = TableDefinition::new("identity_reveals");
const NEXT_LABEL_SEQ: &str = "label_next_seq";
/// Whether the live-accuracy alarm is raised (survives restarts, so it is raised and cleared once).
const ACCURACY_ALARM: &str = "accuracy_alarm";

pub const STORE_FILE: &str = "octd.redb";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store database: {0}")]
    Db(#[from] redb::Error),
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error("scan {0} is not in the store")]
    UnknownScan(ScanId),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
    )*};
}
db_err!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// A verdict's delivery to the trainer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UplinkState {
    pub attempts: u32,
    /// Not before this (ms since the epoch).
    pub next_try_ms: u64,
    pub last_error: Option<String>,
    /// The upload as first built, resent byte for byte at every retry (the trainer refuses a
    /// revision sent again with another body).
    #[serde(default)]
    pub frozen: Option<FrozenUpload>,
}

/// What a delivery sends, fixed at its first attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrozenUpload {
    /// The label revision's JSON body.
    pub body: String,
    pub image_sha256: String,
    pub image_kind: String,
    /// The trainer has the image: a retry sends the label only.
    pub image_done: bool,
}

/// What `Store::record_label` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    New(LabelRecord),
    /// The verdict id was stored before: this is that record.
    Duplicate(LabelRecord),
    /// An undo with nothing to undo: the scan has no verdict, or its latest revision is
    /// another reviewer's (`code`, `detail`).
    NothingToUndo {
        code: &'static str,
        detail: &'static str,
    },
}

/// A message waiting for its PUBACK.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxMessage {
    pub topic: String,
    pub payload: String,
    pub retain: bool,
    /// When set, the PUBACK of this message moves the scan to `published`.
    pub completes_scan: Option<ScanId>,
}

pub struct Store {
    db: Database,
    seal: ChaCha20Poly1305,
    group: GroupCommit,
}

/// State changes from several threads written in one durable transaction: while one commit
/// is under way, the changes that arrive queue up and the first of their callers commits
/// them all at once when it ends (a leader, no thread of its own). Each caller returns only
/// once its change is durable, so nothing is published earlier than before; a burst pays
/// one commit per group, not one per change.
#[derive(Default)]
struct GroupCommit {
    state: std::sync::Mutex<GroupState>,
    committed: std::sync::Condvar,
}

#[derive(Default)]
struct GroupState {
    queue: Vec<Change>,
    committing: bool,
    next_ticket: u64,
    done: std::collections::HashMap<u64, Outcome>,
}

/// A change's commit: its result, or the panic it caused (raised again in its own caller,
/// not in whichever caller led the group).
type Outcome = std::thread::Result<Result<Option<u64>, StoreError>>;

/// One caller's state change (its record stamped when it was made), waiting for its commit.
struct Change {
    ticket: u64,
    record: ScanRecord,
    message: Option<OutboxMessage>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct StoreCounts {
    pub by_state: BTreeMap<String, u64>,
    pub outbox: u64,
    pub outbox_oldest_ms: Option<u64>,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// redb's page cache. Its default (1 GiB) let a burst of writes keep growing the daemon's
/// memory; the store's hot pages (recent scans, the outbox, counters) fit in far less.
const STORE_CACHE_BYTES: usize = 16 << 20;

impl Store {
    pub fn open(path: &Path, secret: &DeviceSecret) -> Result<Store, StoreError> {
        let db = Database::builder().set_cache_size(STORE_CACHE_BYTES).create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(SCANS)?;
            txn.open_table(OUTBOX)?;
            txn.open_table(LINKAGE)?;
            txn.open_table(SETTINGS)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(MODEL_EVENTS)?;
            txn.open_table(OUTBOX_TIMES)?;
            txn.open_table(LABELS)?;
            txn.open_table(LABEL_LATEST)?;
            txn.open_table(LABEL_COMMENTS)?;
            txn.open_table(LABEL_LATEST_SEQS)?;
            txn.open_table(LABEL_IDS)?;
            txn.open_table(UPLINK)?;
            txn.open_table(UPLINK_REFUSED)?;
            txn.open_table(REVEALS)?;
        }
        Self::count_scans_once(&txn)?;
        txn.commit()?;
        let key = secret.mac("octd linkage seal v1", b"");
        Ok(Store { db, seal: ChaCha20Poly1305::new(Key::from_slice(&key)), group: GroupCommit::default() })
    }

    fn seal_linkage(&self, linkage: &Linkage) -> Result<Vec<u8>, StoreError> {
        self.seal_bytes(&encode(linkage)?)
    }

    fn seal_bytes(&self, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        out.extend(
            self.seal
                .encrypt(Nonce::from_slice(&nonce), plain)
                .map_err(|_| StoreError::Corrupt("sealing failed".into()))?,
        );
        Ok(out)
    }

    fn open_sealed(&self, sealed: &[u8], what: &str) -> Result<Vec<u8>, StoreError> {
        if sealed.len() < 12 {
            return Err(StoreError::Corrupt(format!("{what} record too short")));
        }
        self.seal
            .decrypt(Nonce::from_slice(&sealed[..12]), &sealed[12..])
            .map_err(|_| StoreError::Corrupt(format!("{what} does not open with this device's key")))
    }

    /// Counters per state are kept with every change (so `/status` and `/metrics` never read
    /// the whole scans table); a store from before them is counted once, here.
    fn count_scans_once(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut counters = txn.open_table(COUNTERS)?;
        if counters.get(SCAN_COUNTS_READY)?.is_some() {
            return Ok(());
        }
        let mut by_state = BTreeMap::<&'static str, u64>::new();
        for entry in txn.open_table(SCANS)?.iter()? {
            let (_, v) = entry?;
            let record: ScanRecord = decode(v.value())?;
            *by_state.entry(record.state.as_str()).or_default() += 1;
        }
        for state in ScanState::ALL {
            let n = by_state.get(state.as_str()).copied().unwrap_or(0);
            counters.insert(format!("scans_{}", state.as_str()).as_str(), n)?;
        }
        counters.insert(SCAN_COUNTS_READY, 1)?;
        Ok(())
    }

    fn bump(txn: &redb::WriteTransaction, from: Option<ScanState>, to: Option<ScanState>) -> Result<(), StoreError> {
        if from == to {
            return Ok(());
        }
        let mut counters = txn.open_table(COUNTERS)?;
        if let Some(from) = from {
            let key = format!("scans_{}", from.as_str());
            let n = counters.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
            counters.insert(key.as_str(), n.saturating_sub(1))?;
        }
        if let Some(to) = to {
            let key = format!("scans_{}", to.as_str());
            let n = counters.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
            counters.insert(key.as_str(), n + 1)?;
        }
        Ok(())
    }

    /// Write a scan's record and keep the counters right.
    fn put_scan(txn: &redb::WriteTransaction, record: &ScanRecord) -> Result<(), StoreError> {
        let key = record.scan_id.to_string();
        let old = {
            let mut scans = txn.open_table(SCANS)?;
            let old = scans.insert(key.as_str(), encode(record)?.as_slice())?;
            old.map(|v| decode::<ScanRecord>(v.value())).transpose()?.map(|r| r.state)
        };
        Self::bump(txn, old, Some(record.state))
    }

    /// A claimed file: its record and its (sealed) linkage, in one transaction.
    pub fn record_claim(&self, record: &ScanRecord, linkage: &Linkage) -> Result<(), StoreError> {
        self.record_claims(&[(record.clone(), linkage.clone())])
    }

    /// As [`Store::record_claim`] for several files in one durable commit: files renamed
    /// into the folder together (a burst, an archive) are claimed together.
    pub fn record_claims(&self, claims: &[(ScanRecord, Linkage)]) -> Result<(), StoreError> {
        let sealed = claims
            .iter()
            .map(|(record, linkage)| Ok((record.scan_id.to_string(), self.seal_linkage(linkage)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(LINKAGE)?;
            for (key, sealed) in &sealed {
                table.insert(key.as_str(), sealed.as_slice())?;
            }
        }
        for (record, _) in claims {
            Self::put_scan(&txn, record)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Extra identifiers found while de-identifying (DICOM) join the claim's linkage.
    pub fn extend_linkage(&self, scan_id: ScanId, identifiers: BTreeMap<String, String>) -> Result<(), StoreError> {
        let mut linkage = self.linkage(scan_id)?.unwrap_or_default();
        linkage.identifiers.extend(identifiers);
        let sealed = self.seal_linkage(&linkage)?;
        let key = scan_id.to_string();
        let txn = self.db.begin_write()?;
        txn.open_table(LINKAGE)?.insert(key.as_str(), sealed.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn linkage(&self, scan_id: ScanId) -> Result<Option<Linkage>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LINKAGE)?;
        let Some(sealed) = table.get(scan_id.to_string().as_str())? else { return Ok(None) };
        let plain = self.open_sealed(sealed.value(), "linkage")?;
        decode(&plain).map(Some)
    }

    pub fn get(&self, scan_id: ScanId) -> Result<Option<ScanRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SCANS)?;
        let value = table.get(scan_id.to_string().as_str())?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Commit a state change, with its outgoing message when it has one; returns once it is
    /// durable, with the message's outbox sequence number. Changes made at the same time by
    /// other threads share the commit (see [`GroupCommit`]).
    pub fn transition(&self, record: &ScanRecord, message: Option<&OutboxMessage>) -> Result<Option<u64>, StoreError> {
        let lock = || self.group.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let mut record = record.clone();
        record.updated_at_ms = now_ms();
        state.queue.push(Change { ticket, record, message: message.cloned() });
        loop {
            if let Some(outcome) = state.done.remove(&ticket) {
                drop(state);
                return outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            }
            if state.committing {
                state = self.group.committed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // No commit under way and this change not yet done: it is still queued, and this
            // caller commits everything queued.
            let changes = std::mem::take(&mut state.queue);
            if changes.is_empty() {
                return Err(StoreError::Corrupt("a state change was lost by its group commit".into()));
            }
            state.committing = true;
            drop(state);
            let outcomes = self.commit_changes(changes);
            state = lock();
            state.done.extend(outcomes);
            state.committing = false;
            self.group.committed.notify_all();
        }
    }

    /// Several callers' changes in one transaction; when it fails or panics, each alone, so
    /// that one bad change fails (or panics) only its own caller. Never panics itself.
    fn commit_changes(&self, changes: Vec<Change>) -> Vec<(u64, Outcome)> {
        let attempt =
            |changes: &[Change]| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_changes(changes)));
        if changes.len() > 1 {
            if let Ok(Ok(seqs)) = attempt(&changes) {
                return changes.iter().map(|c| c.ticket).zip(seqs.into_iter().map(|seq| Ok(Ok(seq)))).collect();
            }
        }
        changes
            .iter()
            .map(|c| {
                let outcome = attempt(std::slice::from_ref(c)).map(|r| r.map(|mut seqs| seqs.pop().flatten()));
                (c.ticket, outcome)
            })
            .collect()
    }

    fn write_changes(&self, changes: &[Change]) -> Result<Vec<Option<u64>>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut seqs = Vec::with_capacity(changes.len());
        for change in changes {
            Self::put_scan(&txn, &change.record)?;
            seqs.push(match &change.message {
                Some(m) => Some(Self::push(&txn, m)?),
                None => None,
            });
        }
        txn.commit()?;
        Ok(seqs)
    }

    /// The daemon takes the scan's pixels in hand: count the attempt, durably, before it
    /// works on them in its own process.
    pub fn take_in_hand(&self, scan_id: ScanId) -> Result<Option<ScanRecord>, StoreError> {
        let key = scan_id.to_string();
        let txn = self.db.begin_write()?;
        let record = {
            let mut scans = txn.open_table(SCANS)?;
            let record = scans.get(key.as_str())?.map(|v| decode::<ScanRecord>(v.value())).transpose()?;
            match record {
                Some(mut record) => {
                    record.attempts = record.attempts.saturating_add(1);
                    record.updated_at_ms = now_ms();
                    scans.insert(key.as_str(), encode(&record)?.as_slice())?;
                    Some(record)
                }
                None => None,
            }
        };
        txn.commit()?;
        Ok(record)
    }

    /// A message that belongs to no scan transition (alarms).
    pub fn enqueue(&self, message: &OutboxMessage) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let seq = Self::push(&txn, message)?;
        txn.commit()?;
        Ok(seq)
    }

    fn push(txn: &redb::WriteTransaction, message: &OutboxMessage) -> Result<u64, StoreError> {
        let mut counters = txn.open_table(COUNTERS)?;
        let seq = counters.get(NEXT_OUTBOX_SEQ)?.map(|v| v.value()).unwrap_or(1);
        counters.insert(NEXT_OUTBOX_SEQ, seq + 1)?;
        txn.open_table(OUTBOX)?.insert(seq, encode(message)?.as_slice())?;
        txn.open_table(OUTBOX_TIMES)?.insert(seq, now_ms())?;
        Ok(seq)
    }

    /// Up to `limit` messages after `after`, oldest first.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, OutboxMessage)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in table.range(after + 1..)?.take(limit) {
            let (k, v) = entry?;
            out.push((k.value(), decode(v.value())?));
        }
        Ok(out)
    }

    /// The broker has the message: drop it and complete its scan, in one transaction.
    pub fn acknowledge(&self, seq: u64) -> Result<(), StoreError> {
        self.acknowledge_all(&[seq])
    }

    /// PUBACKs received together, recorded in one durable transaction (group commit: a
    /// burst of results costs one fsync per batch of acknowledgements, not one each).
    pub fn acknowledge_all(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        for &seq in seqs {
            let removed = {
                let mut outbox = txn.open_table(OUTBOX)?;
                let removed = outbox.remove(seq)?.map(|v| decode::<OutboxMessage>(v.value())).transpose()?;
                removed
            };
            txn.open_table(OUTBOX_TIMES)?.remove(seq)?;
            if let Some(OutboxMessage { completes_scan: Some(scan_id), .. }) = removed {
                let key = scan_id.to_string();
                let record = {
                    let scans = txn.open_table(SCANS)?;
                    let record = scans.get(key.as_str())?.map(|v| decode::<ScanRecord>(v.value())).transpose()?;
                    record
                };
                if let Some(mut record) = record {
                    record.state = ScanState::Published;
                    record.updated_at_ms = now_ms();
                    Self::put_scan(&txn, &record)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Scans a crash interrupted before their result was committed.
    pub fn unfinished(&self) -> Result<Vec<ScanRecord>, StoreError> {
        self.scans_where(|r| matches!(r.state, ScanState::Received | ScanState::Deidentified))
    }

    pub fn scans_where(&self, keep: impl Fn(&ScanRecord) -> bool) -> Result<Vec<ScanRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SCANS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            let record: ScanRecord = decode(v.value())?;
            if keep(&record) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// A cheap proof of life: a read transaction and the outbox's length.
    pub fn probe(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Proof that the store can still commit: a tiny durable write (a full disk or a
    /// read-only remount fails here, where a read would still succeed).
    pub fn probe_write(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let beats = {
            let mut counters = txn.open_table(COUNTERS)?;
            let beats = counters.get(PROBE_COUNTER)?.map(|v| v.value()).unwrap_or(0) + 1;
            counters.insert(PROBE_COUNTER, beats)?;
            beats
        };
        txn.commit()?;
        Ok(beats)
    }

    /// Scans by state and the outbox's size and age, from counters kept with every change:
    /// cheap enough for every `/status` and `/metrics` request.
    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        let mut counts = StoreCounts::default();
        let txn = self.db.begin_read()?;
        let counters = txn.open_table(COUNTERS)?;
        for state in ScanState::ALL {
            let n = counters.get(format!("scans_{}", state.as_str()).as_str())?.map(|v| v.value()).unwrap_or(0);
            if n > 0 {
                counts.by_state.insert(state.as_str().to_string(), n);
            }
        }
        counts.outbox = txn.open_table(OUTBOX)?.len()?;
        counts.outbox_oldest_ms = txn.open_table(OUTBOX_TIMES)?.first()?.map(|(_, at)| at.value());
        Ok(counts)
    }

    /// Forget published scans older than `cutoff_ms` and linkage older than
    /// `linkage_cutoff_ms`. Returns the artefact file names to delete.
    pub fn prune(&self, cutoff_ms: u64, linkage_cutoff_ms: u64) -> Result<Vec<String>, StoreError> {
        self.prune_holding(cutoff_ms, linkage_cutoff_ms, 0).map(|(artefacts, _)| artefacts)
    }

    /// As [`Store::prune`]; a scan whose verdict waits for the trainer is kept too, unless it
    /// was last changed before `hold_cutoff_ms` (the bound on that extension). Returns the
    /// artefacts to remove, and how many scans went although a verdict of theirs still waited.
    pub fn prune_holding(
        &self,
        cutoff_ms: u64,
        linkage_cutoff_ms: u64,
        hold_cutoff_ms: u64,
    ) -> Result<(Vec<String>, usize), StoreError> {
        let mut old = self.scans_where(|r| r.state == ScanState::Published && r.updated_at_ms < cutoff_ms)?;
        let txn = self.db.begin_write()?;
        // A verdict extends its scan's retention until the trainer has it, up to the bound.
        let waiting = Self::scans_awaiting_upload(&txn)?;
        let mut forced = 0;
        old.retain(|r| match waiting.contains(&r.scan_id) {
            false => true,
            true if r.updated_at_ms < hold_cutoff_ms => {
                forced += 1;
                true
            }
            true => false,
        });
        let mut artefacts = Vec::new();
        {
            let mut removed = 0u64;
            {
                let mut scans = txn.open_table(SCANS)?;
                for record in &old {
                    if scans.remove(record.scan_id.to_string().as_str())?.is_some() {
                        removed += 1;
                    }
                    artefacts.extend(record.artifact.clone());
                }
            }
            for _ in 0..removed {
                Self::bump(&txn, Some(ScanState::Published), None)?;
            }
            let mut linkage = txn.open_table(LINKAGE)?;
            for record in &old {
                linkage.remove(record.scan_id.to_string().as_str())?;
            }
            // Linkage of scans still kept has its own, usually longer, retention.
            let mut expired = Vec::new();
            for entry in linkage.iter()? {
                let (k, _) = entry?;
                if let Some(id) = ScanId::parse(k.value()) {
                    if id.0.get_timestamp().map(|t| t.to_unix().0 * 1000).unwrap_or(u64::MAX) < linkage_cutoff_ms {
                        expired.push(k.value().to_string());
                    }
                }
            }
            for k in expired {
                linkage.remove(k.as_str())?;
            }
            // Comments may name a patient: they go with the linkage's retention.
            let labels = txn.open_table(LABELS)?;
            let mut comments = txn.open_table(LABEL_COMMENTS)?;
            let mut old_comments = Vec::new();
            for entry in comments.iter()? {
                let (seq, _) = entry?;
                let received = match labels.get(seq.value())? {
                    Some(v) => decode::<LabelRecord>(v.value())?.received_at_ms,
                    None => 0,
                };
                if received < linkage_cutoff_ms {
                    old_comments.push(seq.value());
                }
            }
            for seq in old_comments {
                comments.remove(seq)?;
            }
        }
        txn.commit()?;
        Ok((artefacts, forced))
    }

    /// The persisted model state, or `None` before the first install.
    pub fn model_state<T: for<'de> Deserialize<'de>>(&self) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SETTINGS)?;
        let value = table.get(MODEL_STATE)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Save the model state (when given), record the event and queue its messages, in one
    /// transaction: a crash leaves either all of them or none.
    pub fn commit_model_change<S: Serialize, E: Serialize>(
        &self,
        state: Option<&S>,
        event: Option<&E>,
        messages: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        if let Some(state) = state {
            txn.open_table(SETTINGS)?.insert(MODEL_STATE, encode(state)?.as_slice())?;
        }
        if let Some(event) = event {
            let mut events = txn.open_table(MODEL_EVENTS)?;
            let next = events.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            events.insert(next, encode(event)?.as_slice())?;
        }
        for message in messages {
            Self::push(&txn, message)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Store a verdict as the scan's next revision, with the messages it causes, in one
    /// transaction. `record.seq` and `record.revision` are assigned here. A verdict whose
    /// `verdict_id` was stored before is not stored again: the earlier record comes back as
    /// `Stored::Duplicate`.
    pub fn record_label(
        &self,
        mut record: LabelRecord,
        verdict_id: Option<&str>,
        comment: Option<&str>,
        upload: bool,
        messages: impl FnOnce(&LabelRecord) -> Vec<OutboxMessage>,
    ) -> Result<Stored, StoreError> {
        let sealed_comment = comment.map(|c| self.seal_bytes(c.as_bytes())).transpose()?;
        let key = record.scan_id.to_string();
        let txn = self.db.begin_write()?;
        {
            let mut labels = txn.open_table(LABELS)?;
            if let Some(id) = verdict_id {
                let mut ids = txn.open_table(LABEL_IDS)?;
                if let Some(seq) = ids.get(id)?.map(|v| v.value()) {
                    let earlier = labels.get(seq)?.map(|v| decode::<LabelRecord>(v.value())).transpose()?;
                    if let Some(earlier) = earlier {
                        return Ok(Stored::Duplicate(earlier));
                    }
                }
                let counters = txn.open_table(COUNTERS)?;
                let seq = counters.get(NEXT_LABEL_SEQ)?.map(|v| v.value()).unwrap_or(1);
                ids.insert(id, seq)?;
            }
            let mut latest = txn.open_table(LABEL_LATEST)?;
            let mut latest_seqs = txn.open_table(LABEL_LATEST_SEQS)?;
            let previous_seq = latest.get(key.as_str())?.map(|v| v.value());
            let previous = match previous_seq {
                Some(seq) => labels.get(seq)?.map(|v| decode::<LabelRecord>(v.value())).transpose()?,
                None => None,
            };
            if record.undo {
                // Decided inside the transaction: two undos at once undo two revisions, in order.
                match &previous {
                    // An undo is not undone in turn (a retried undo must not redo the verdict).
                    Some(p) if p.undo => {
                        return Ok(Stored::NothingToUndo {
                            code: "no_verdict",
                            detail: "the scan's latest revision is already an undo: give the right class instead",
                        })
                    }
                    Some(p) if !p.withdrawn && p.reviewer == record.reviewer => {
                        record.withdrawn = p.replaced.is_none();
                        record.label = p.replaced.clone().unwrap_or_default();
                    }
                    Some(p) if !p.withdrawn => {
                        return Ok(Stored::NothingToUndo {
                            code: "not_yours",
                            detail: "the scan's latest verdict is another reviewer's: correct it instead",
                        })
                    }
                    _ => {
                        return Ok(Stored::NothingToUndo {
                            code: "no_verdict",
                            detail: "the scan has no verdict to undo",
                        })
                    }
                }
            }
            record.replaced = previous.as_ref().filter(|p| !p.withdrawn).map(|p| p.label.clone());
            record.revision = previous.map(|p| p.revision.saturating_add(1)).unwrap_or(1);
            let mut counters = txn.open_table(COUNTERS)?;
            record.seq = counters.get(NEXT_LABEL_SEQ)?.map(|v| v.value()).unwrap_or(1);
            counters.insert(NEXT_LABEL_SEQ, record.seq + 1)?;
            drop(counters);
            record.has_comment = sealed_comment.is_some();
            labels.insert(record.seq, encode(&record)?.as_slice())?;
            latest.insert(key.as_str(), record.seq)?;
            if let Some(seq) = previous_seq {
                latest_seqs.remove(seq)?;
            }
            latest_seqs.insert(record.seq, ())?;
            if let Some(sealed) = &sealed_comment {
                txn.open_table(LABEL_COMMENTS)?.insert(record.seq, sealed.as_slice())?;
            }
            if upload {
                txn.open_table(UPLINK)?.insert(record.seq, encode(&UplinkState::default())?.as_slice())?;
            }
        }
        for message in messages(&record) {
            Self::push(&txn, &message)?;
        }
        txn.commit()?;
        Ok(Stored::New(record))
    }

    /// The latest revision of the most recent `window` scans with a verdict, newest first
    /// (a withdrawn verdict is none: those scans are passed over).
    pub fn recent_labels(&self, window: usize) -> Result<Vec<LabelRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let labels = txn.open_table(LABELS)?;
        let latest_seqs = txn.open_table(LABEL_LATEST_SEQS)?;
        let mut out = Vec::new();
        for entry in latest_seqs.iter()?.rev() {
            if out.len() >= window {
                break;
            }
            let (seq, _) = entry?;
            if let Some(value) = labels.get(seq.value())? {
                let label: LabelRecord = decode(value.value())?;
                if !label.withdrawn {
                    out.push(label);
                }
            }
        }
        Ok(out)
    }

    /// The most recently claimed scans, newest first (scan ids are UUIDv7: key order is
    /// claim order).
    pub fn recent_scans(&self, limit: usize) -> Result<Vec<ScanRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let scans = txn.open_table(SCANS)?;
        let mut out = Vec::new();
        for entry in scans.iter()?.rev().take(limit) {
            out.push(decode(entry?.1.value())?);
        }
        Ok(out)
    }

    /// The revision of a scan's verdict that counts, if any.
    pub fn latest_label(&self, scan_id: ScanId) -> Result<Option<LabelRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let latest = txn.open_table(LABEL_LATEST)?;
        let Some(seq) = latest.get(scan_id.to_string().as_str())?.map(|v| v.value()) else { return Ok(None) };
        let labels = txn.open_table(LABELS)?;
        labels.get(seq)?.map(|v| decode(v.value())).transpose()
    }

    /// The reviewer's comment on one revision, opened.
    pub fn label_comment(&self, seq: u64) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let comments = txn.open_table(LABEL_COMMENTS)?;
        let Some(sealed) = comments.get(seq)? else { return Ok(None) };
        Ok(Some(String::from_utf8_lossy(&self.open_sealed(sealed.value(), "comment")?).into_owned()))
    }

    /// The oldest verdict still to deliver, with its record and its delivery state.
    pub fn uplink_head(&self) -> Result<Option<(LabelRecord, UplinkState)>, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(UPLINK)?;
        let Some((seq, state)) = queue.first()? else { return Ok(None) };
        let state: UplinkState = decode(state.value())?;
        let labels = txn.open_table(LABELS)?;
        let record = labels
            .get(seq.value())?
            .map(|v| decode::<LabelRecord>(v.value()))
            .transpose()?
            .ok_or_else(|| StoreError::Corrupt(format!("uplink entry {} without its label", seq.value())))?;
        Ok(Some((record, state)))
    }

    /// Verdicts still to deliver.
    pub fn uplink_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(UPLINK)?.len()?)
    }

    /// The trainer has it: off the queue.
    pub fn uplink_delivered(&self, seq: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(UPLINK)?.remove(seq)?;
        txn.commit()?;
        Ok(())
    }

    /// Not delivered this time: when to try again, and why.
    pub fn uplink_retry(&self, seq: u64, state: &UplinkState) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(UPLINK)?.insert(seq, encode(state)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Refused by the trainer for good: off the queue, kept with the reason, its alarm queued.
    pub fn uplink_refused(&self, seq: u64, reason: &str, message: &OutboxMessage) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(UPLINK)?.remove(seq)?;
        txn.open_table(UPLINK_REFUSED)?.insert(seq, reason.as_bytes())?;
        Self::push(&txn, message)?;
        txn.commit()?;
        Ok(())
    }

    /// Scans whose verdicts wait for delivery: their artefacts must stay.
    fn scans_awaiting_upload(txn: &redb::WriteTransaction) -> Result<std::collections::HashSet<ScanId>, StoreError> {
        let queue = txn.open_table(UPLINK)?;
        let labels = txn.open_table(LABELS)?;
        let mut out = std::collections::HashSet::new();
        for entry in queue.iter()? {
            let (seq, _) = entry?;
            if let Some(v) = labels.get(seq.value())? {
                out.insert(decode::<LabelRecord>(v.value())?.scan_id);
            }
        }
        Ok(out)
    }

    /// Whether the live-accuracy alarm is raised.
    pub fn accuracy_alarm(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(SETTINGS)?.get(ACCURACY_ALARM)?.is_some_and(|v| v.value() == b"1"))
    }

    /// Raise or clear the live-accuracy alarm together with its message.
    pub fn set_accuracy_alarm(&self, raised: bool, message: &OutboxMessage) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(SETTINGS)?.insert(ACCURACY_ALARM, if raised { &b"1"[..] } else { &b"0"[..] })?;
        Self::push(&txn, message)?;
        txn.commit()?;
        Ok(())
    }

    /// Every recorded model event, oldest first.
    pub fn model_events<E: for<'de> Deserialize<'de>>(&self) -> Result<Vec<E>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MODEL_EVENTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            out.push(decode(entry?.1.value())?);
        }
        Ok(out)
    }

    /// A scan's identity is about to be shown to `reviewer`: recorded first, durably, so no
    /// reveal goes unrecorded. Returns the record's sequence number.
    pub fn record_reveal(&self, scan_id: ScanId, reviewer: &str, at_ms: u64) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let seq = {
            let mut reveals = txn.open_table(REVEALS)?;
            let next = reveals.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            let entry =
                serde_json::json!({"scan_id": scan_id, "reviewer": reviewer, "at": crate::scan::rfc3339_ms(at_ms)});
            reveals.insert(next, encode(&entry)?.as_slice())?;
            next
        };
        txn.commit()?;
        Ok(seq)
    }

    /// The reveal records, oldest first (`scan_id`, `reviewer`, `at`).
    pub fn reveals(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in txn.open_table(REVEALS)?.iter()? {
            out.push(decode(entry?.1.value())?);
        }
        Ok(out)
    }

    /// Every value of every table except the sealed linkage, for PHI audits.
    pub fn dump_unsealed(&self) -> Result<Vec<u8>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in txn.open_table(SCANS)?.iter()? {
            let (k, v) = entry?;
            out.extend_from_slice(k.value().as_bytes());
            out.extend_from_slice(v.value());
        }
        for entry in txn.open_table(OUTBOX)?.iter()? {
            let (_, v) = entry?;
            out.extend_from_slice(v.value());
        }
        for entry in txn.open_table(SETTINGS)?.iter()? {
            let (k, v) = entry?;
            out.extend_from_slice(k.value().as_bytes());
            out.extend_from_slice(v.value());
        }
        for entry in txn.open_table(MODEL_EVENTS)?.iter()? {
            let (_, v) = entry?;
            out.extend_from_slice(v.value());
        }
        for entry in txn.open_table(LABELS)?.iter()? {
            let (_, v) = entry?;
            out.extend_from_slice(v.value());
        }
        for entry in txn.open_table(REVEALS)?.iter()? {
            let (_, v) = entry?;
            out.extend_from_slice(v.value());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        Store::open(&dir.join(STORE_FILE), &DeviceSecret::from_bytes([7; 32])).unwrap()
    }

    fn message(n: u32, scan: Option<ScanId>) -> OutboxMessage {
        OutboxMessage { topic: format!("t/{n}"), payload: "{}".into(), retain: false, completes_scan: scan }
    }

    #[test]
    fn result_and_outbox_commit_together_and_ack_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = ScanId::new();
        let mut rec = ScanRecord::received(id);
        store.record_claim(&rec, &Linkage { original_name: "DOE^JOHN.jpg".into(), ..Default::default() }).unwrap();
        rec.state = ScanState::Classified;
        let seq = store.transition(&rec, Some(&message(1, Some(id)))).unwrap().unwrap();
        assert_eq!(store.get(id).unwrap().unwrap().state, ScanState::Classified);
        assert_eq!(store.outbox_after(0, 10).unwrap().len(), 1);
        store.acknowledge(seq).unwrap();
        assert_eq!(store.get(id).unwrap().unwrap().state, ScanState::Published);
        assert!(store.outbox_after(0, 10).unwrap().is_empty());
    }

    #[test]
    fn changes_from_many_threads_at_once_are_each_durable_with_their_own_message() {
        let dir = tempfile::tempdir().unwrap();
        let (threads, each) = (8, 25);
        let mut seqs = Vec::new();
        {
            let store = std::sync::Arc::new(open(dir.path()));
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        let mut mine = Vec::new();
                        for n in 0..each {
                            let mut rec = ScanRecord::received(ScanId::new());
                            store.record_claim(&rec, &Linkage::default()).unwrap();
                            rec.state = ScanState::Deidentified;
                            assert_eq!(store.transition(&rec, None).unwrap(), None);
                            rec.state = ScanState::Classified;
                            let seq = store.transition(&rec, Some(&message(t * 100 + n, Some(rec.scan_id)))).unwrap();
                            mine.push((rec.scan_id, seq.expect("a sequence number")));
                        }
                        mine
                    })
                })
                .collect();
            for h in handles {
                seqs.extend(h.join().unwrap());
            }
        }
        // Reopened: every change is there, each message under the number its caller got.
        let store = open(dir.path());
        let total = (threads * each) as usize;
        let outbox: BTreeMap<u64, OutboxMessage> = store.outbox_after(0, total + 1).unwrap().into_iter().collect();
        assert_eq!(outbox.len(), total);
        for (id, seq) in &seqs {
            assert_eq!(store.get(*id).unwrap().unwrap().state, ScanState::Classified);
            assert_eq!(outbox[seq].completes_scan, Some(*id), "seq {seq}");
        }
        assert_eq!(store.counts().unwrap().by_state.get("classified"), Some(&(total as u64)));
        assert_eq!(store.counts().unwrap().by_state.get("deidentified").copied().unwrap_or(0), 0);
    }

    #[test]
    fn outbox_is_ordered_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for n in 0..5 {
                store.enqueue(&message(n, None)).unwrap();
            }
            store.acknowledge(1).unwrap();
        }
        let store = open(dir.path());
        let left: Vec<_> = store.outbox_after(0, 10).unwrap().into_iter().map(|(_, m)| m.topic).collect();
        assert_eq!(left, vec!["t/1", "t/2", "t/3", "t/4"]);
        // sequence numbers keep growing after a reopen
        assert_eq!(store.enqueue(&message(9, None)).unwrap(), 6);
        assert_eq!(store.outbox_after(4, 10).unwrap().len(), 2);
    }

    #[test]
    fn counts_by_state_and_outbox_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut classified = Vec::new();
        for _ in 0..2 {
            let mut rec = ScanRecord::received(ScanId::new());
            store.record_claim(&rec, &Linkage::default()).unwrap();
            rec.state = ScanState::Classified;
            store.transition(&rec, Some(&message(0, Some(rec.scan_id)))).unwrap();
            classified.push(store.get(rec.scan_id).unwrap().unwrap().updated_at_ms);
        }
        store.record_claim(&ScanRecord::received(ScanId::new()), &Linkage::default()).unwrap();
        let counts = store.counts().unwrap();
        assert_eq!(counts.by_state.get("classified"), Some(&2));
        assert_eq!(counts.by_state.get("received"), Some(&1));
        assert_eq!(counts.outbox, 2);
        let oldest = counts.outbox_oldest_ms.expect("the outbox has an age");
        assert!(oldest >= classified[0] && oldest <= classified[1], "{oldest} vs {classified:?}");

        // Kept with every change, and the same as counting the table.
        let (seq, _) = store.outbox_after(0, 1).unwrap()[0].clone();
        store.acknowledge(seq).unwrap();
        let counts = store.counts().unwrap();
        assert_eq!(counts.by_state.get("classified"), Some(&1));
        assert_eq!(counts.by_state.get("published"), Some(&1));
        assert_eq!(counts.outbox, 1);
        store.prune(now_ms() + 1, 0).unwrap();
        drop(store);
        let store = open(dir.path());
        let counts = store.counts().unwrap();
        assert_eq!(counts.by_state.get("published"), None, "pruned");
        let mut counted = BTreeMap::<String, u64>::new();
        for r in store.scans_where(|_| true).unwrap() {
            *counted.entry(r.state.as_str().to_string()).or_default() += 1;
        }
        assert_eq!(counts.by_state, counted);
    }

    #[test]
    fn sequence_numbers_are_never_reused_after_the_outbox_drains() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let first = store.enqueue(&message(1, None)).unwrap();
        store.acknowledge(first).unwrap();
        let second = store.enqueue(&message(2, None)).unwrap();
        assert!(second > first, "a drained outbox must not hand out {first} again");
        assert_eq!(store.outbox_after(first, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_verdict_waiting_for_the_trainer_holds_its_scan_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = ScanId::new();
        let mut rec = ScanRecord::received(id);
        store.record_claim(&rec, &Linkage::default()).unwrap();
        rec.state = ScanState::Published;
        rec.artifact = Some(format!("{id}.png"));
        store.transition(&rec, None).unwrap();
        let label = LabelRecord {
            seq: 0,
            scan_id: id,
            revision: 0,
            label: "CNV".into(),
            predicted: "CNV".into(),
            model_version: "0.2.0".into(),
            reviewer: "rv-1".into(),
            reviewed_at: String::new(),
            received_at_ms: now_ms(),
            source: "cli".into(),
            has_comment: false,
            undo: false,
            withdrawn: false,
            replaced: None,
        };
        store.record_label(label, None, None, true, |_| Vec::new()).unwrap();
        let future = now_ms() + 60_000;
        // Past retention, within the hold: kept.
        assert_eq!(store.prune_holding(future, 0, 0).unwrap(), (Vec::new(), 0));
        assert!(store.get(id).unwrap().is_some());
        // Past the hold as well: pruned, and counted for the alarm.
        let (removed, forced) = store.prune_holding(future, 0, future).unwrap();
        assert_eq!((removed, forced), (vec![format!("{id}.png")], 1));
    }

    #[test]
    fn retention_prunes_published_scans_and_old_linkage_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let published = ScanId::new();
        let quarantined = ScanId::new();
        for (id, state) in [(published, ScanState::Published), (quarantined, ScanState::Quarantined)] {
            let mut rec = ScanRecord::received(id);
            store.record_claim(&rec, &Linkage::default()).unwrap();
            rec.state = state;
            rec.artifact = Some(format!("{id}.png"));
            store.transition(&rec, None).unwrap();
        }
        // Nothing is old enough yet.
        assert!(store.prune(0, 0).unwrap().is_empty());
        let future = now_ms() + 60_000;
        let removed = store.prune(future, 0).unwrap();
        assert_eq!(removed, vec![format!("{published}.png")]);
        assert!(store.get(published).unwrap().is_none());
        assert!(store.get(quarantined).unwrap().is_some(), "quarantine waits for a person");
        assert!(store.linkage(quarantined).unwrap().is_some());
        store.prune(future, future).unwrap();
        assert!(store.linkage(quarantined).unwrap().is_none(), "linkage has its own retention");
        assert!(store.get(quarantined).unwrap().is_some());
    }

    #[test]
    fn an_undo_restores_the_label_before_the_reviewers_last_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = ScanId::new();
        store.record_claim(&ScanRecord::received(id), &Linkage::default()).unwrap();
        let verdict = |label: &str, reviewer: &str, undo: bool| LabelRecord {
            seq: 0,
            scan_id: id,
            revision: 0,
            label: label.into(),
            predicted: "CNV".into(),
            model_version: "0.2.0".into(),
            reviewer: reviewer.into(),
            reviewed_at: "2026-12-07T00:00:00Z".into(),
            received_at_ms: 1,
            source: "http".into(),
            has_comment: false,
            undo,
            withdrawn: false,
            replaced: None,
        };
        let put = |v: LabelRecord| store.record_label(v, None, None, true, |_| Vec::new()).unwrap();
        let new = |s: Stored| match s {
            Stored::New(r) => r,
            other => panic!("{other:?}"),
        };
        // A first verdict undone: no verdict any more, and nothing left to undo.
        assert_eq!(new(put(verdict("CNV", "dr-a", false))).revision, 1);
        let undone = new(put(verdict("", "dr-a", true)));
        assert!(undone.withdrawn && undone.label.is_empty() && undone.revision == 2);
        assert!(matches!(put(verdict("", "dr-a", true)), Stored::NothingToUndo { code: "no_verdict", .. }));
        // Another reviewer's correction is not mine to undo; its own reviewer's undo restores.
        assert_eq!(new(put(verdict("DME", "dr-a", false))).replaced, None);
        let corrected = new(put(verdict("DRUSEN", "dr-b", false)));
        assert_eq!(corrected.replaced.as_deref(), Some("DME"));
        assert!(matches!(put(verdict("", "dr-a", true)), Stored::NothingToUndo { code: "not_yours", .. }));
        let restored = new(put(verdict("", "dr-b", true)));
        assert_eq!((restored.label.as_str(), restored.withdrawn, restored.revision), ("DME", false, 5));
        assert_eq!(store.latest_label(id).unwrap().unwrap().label, "DME");
        // An undo sent again (or an undo of the undo) does not bring the correction back.
        assert!(matches!(put(verdict("", "dr-b", true)), Stored::NothingToUndo { code: "no_verdict", .. }));
        assert_eq!(store.latest_label(id).unwrap().unwrap().label, "DME");
    }

    #[test]
    fn identity_reveals_are_recorded_in_order_without_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b) = (ScanId::new(), ScanId::new());
        let linkage = Linkage { original_name: "SMITH_JANE_MRN12345.jpg".into(), ..Default::default() };
        store.record_claim(&ScanRecord::received(a), &linkage).unwrap();
        assert_eq!(store.record_reveal(a, "dr-grey", 1_000).unwrap(), 1);
        assert_eq!(store.record_reveal(b, "dr-blue", 2_000).unwrap(), 2);
        let reveals = store.reveals().unwrap();
        assert_eq!(reveals.len(), 2);
        assert_eq!(reveals[0]["scan_id"], a.to_string());
        assert_eq!(reveals[0]["reviewer"], "dr-grey");
        assert_eq!(reveals[1]["reviewer"], "dr-blue");
        let dump = String::from_utf8_lossy(&store.dump_unsealed().unwrap()).into_owned();
        assert!(dump.contains("dr-blue") && !dump.contains("SMITH"), "recorded, without the identity");
    }

    #[test]
    fn linkage_is_sealed_and_needs_the_device_key() {
        let dir = tempfile::tempdir().unwrap();
        let id = ScanId::new();
        let linkage = Linkage { original_name: "SMITH_JANE_MRN12345.jpg".into(), ..Default::default() };
        {
            let store = open(dir.path());
            store.record_claim(&ScanRecord::received(id), &linkage).unwrap();
            assert_eq!(store.linkage(id).unwrap().unwrap(), linkage);
            assert!(!String::from_utf8_lossy(&store.dump_unsealed().unwrap()).contains("SMITH"));
        }
        let raw = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
        assert!(!raw.windows(5).any(|w| w == b"SMITH"), "identity must not appear in the store file");
        let other = Store::open(&dir.path().join(STORE_FILE), &DeviceSecret::from_bytes([8; 32])).unwrap();
        assert!(matches!(other.linkage(id), Err(StoreError::Corrupt(_))));
    }
}
