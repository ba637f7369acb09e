//! The label store: SQLite on one node, PostgreSQL for a fleet, through sqlx's Any driver
//! so both run the same migrations and the same queries (`$n` placeholders, BIGINT
//! integers, times in milliseconds).

use std::borrow::Cow;
use std::path::Path;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row};

use crate::now_ms;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
}

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "intake", include_str!("../migrations/0001_intake.sql")),
    (2, "jobs", include_str!("../migrations/0002_jobs.sql")),
    (3, "withdrawn", include_str!("../migrations/0003_withdrawn.sql")),
];

fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            Migration::new(*version, Cow::Borrowed(*name), MigrationType::Simple, Cow::Borrowed(*sql), false)
        })
        .collect::<Vec<_>>();
    Migrator { migrations: Cow::Owned(migrations), ignore_missing: false, locking: true, no_tx: false }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Device {
    pub key_id: String,
    pub site: String,
    pub device: String,
    /// Hex of the 32 raw Ed25519 bytes.
    pub public_key: String,
    pub enrolled_at: i64,
    pub revoked_at: Option<i64>,
}

fn device_from(row: &AnyRow) -> Result<Device, sqlx::Error> {
    Ok(Device {
        key_id: row.try_get("key_id")?,
        site: row.try_get("site")?,
        device: row.try_get("device")?,
        public_key: row.try_get("public_key")?,
        enrolled_at: row.try_get("enrolled_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// What the intake knows of a stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub sha256: String,
    pub kind: String,
    pub bytes: i64,
    pub width: i64,
    pub height: i64,
    pub frames: i64,
}

/// One label revision as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LabelRecord {
    pub site: String,
    pub device: String,
    pub scan_id: String,
    pub revision: i64,
    pub label: String,
    pub predicted: String,
    pub probabilities: String,
    pub model_name: String,
    pub model_version: String,
    pub model_sha256: String,
    pub reviewer: String,
    pub reviewed_at: String,
    pub laterality: String,
    pub patient: String,
    pub image_sha256: String,
    /// `png` or `dcm`, from the image it refers to.
    pub image_kind: String,
    pub body_sha256: String,
    pub received_at: i64,
    /// The reviewer took their verdict back at this revision: while it is the highest, the
    /// scan has no label (it is neither trained on nor measured).
    pub withdrawn: bool,
}

/// The outcome of storing a label revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelWrite {
    /// Stored; the patient's split (assigned now if this was its first label).
    Stored { split: String },
    /// The same revision with the same body was stored before (a retried upload).
    Unchanged { split: String },
    /// The same revision was stored before with another body.
    Conflict,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Open (creating a SQLite file and its folder where needed) and migrate.
    pub async fn open(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let url = match url.strip_prefix("sqlite://") {
            Some(path) => {
                let file = path.split('?').next().unwrap_or_default();
                if let Some(parent) = Path::new(file).parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| StoreError::Invalid(format!("{}: {e}", parent.display())))?;
                }
                // WAL: readers do not wait for the writer; create the file on first use.
                let sep = if path.contains('?') { '&' } else { '?' };
                format!("sqlite://{path}{sep}mode=rwc")
            }
            None => url.to_string(),
        };
        let pool = AnyPoolOptions::new().max_connections(max_connections).connect(&url).await?;
        if url.starts_with("sqlite:") {
            sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await?;
        }
        migrator().run(&pool).await?;
        Ok(Store { pool })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A setting shared by every replica: the first writer's value wins, later calls read it.
    pub async fn setting_or_insert(&self, name: &str, value: &str) -> Result<String, StoreError> {
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1").bind(name).fetch_one(&self.pool).await?;
        Ok(row.try_get("value")?)
    }

    // ---- devices

    pub async fn add_device(&self, device: &Device) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO devices (key_id, site, device, public_key, enrolled_at, revoked_at) VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&device.key_id)
        .bind(&device.site)
        .bind(&device.device)
        .bind(&device.public_key)
        .bind(device.enrolled_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn device_by_key(&self, key_id: &str) -> Result<Option<Device>, StoreError> {
        let row =
            sqlx::query("SELECT * FROM devices WHERE key_id = $1").bind(key_id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(device_from).transpose()?)
    }

    pub async fn active_device(&self, site: &str, device: &str) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query("SELECT * FROM devices WHERE site = $1 AND device = $2 AND revoked_at IS NULL")
            .bind(site)
            .bind(device)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(device_from).transpose()?)
    }

    pub async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM devices ORDER BY site, device, enrolled_at").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(device_from).collect::<Result<_, _>>()?)
    }

    /// Revoke the active key of `site/device`, or the key `key_id`. True when one was active.
    pub async fn revoke(&self, key_id_or_device: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let done = match key_id_or_device.split_once('/') {
            Some((site, device)) => {
                sqlx::query("UPDATE devices SET revoked_at = $1 WHERE site = $2 AND device = $3 AND revoked_at IS NULL")
                    .bind(now)
                    .bind(site)
                    .bind(device)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("UPDATE devices SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL")
                    .bind(now)
                    .bind(key_id_or_device)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected() > 0)
    }

    // ---- replay protection

    /// Record a nonce; false when it was seen before (a replay). Nonces older than
    /// `forget_before_ms` are dropped on the way: a request that old fails its time check.
    pub async fn use_nonce(&self, key_id: &str, nonce: &str, forget_before_ms: i64) -> Result<bool, StoreError> {
        sqlx::query("DELETE FROM nonces WHERE seen_at < $1").bind(forget_before_ms).execute(&self.pool).await?;
        let done =
            sqlx::query("INSERT INTO nonces (key_id, nonce, seen_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(key_id)
                .bind(nonce)
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    // ---- images

    pub async fn image(&self, sha256: &str) -> Result<Option<ImageRecord>, StoreError> {
        let row = sqlx::query("SELECT sha256, kind, bytes, width, height, frames FROM images WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(ImageRecord {
                sha256: r.try_get("sha256")?,
                kind: r.try_get("kind")?,
                bytes: r.try_get("bytes")?,
                width: r.try_get("width")?,
                height: r.try_get("height")?,
                frames: r.try_get("frames")?,
            })
        })
        .transpose()
        .map_err(StoreError::Db)
    }

    /// Record an image whose bytes are already in the object store (idempotent).
    pub async fn add_image(&self, image: &ImageRecord, site: &str, device: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO images (sha256, kind, bytes, width, height, frames, site, device, received_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .bind(&image.sha256)
        .bind(&image.kind)
        .bind(image.bytes)
        .bind(image.width)
        .bind(image.height)
        .bind(image.frames)
        .bind(site)
        .bind(device)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- labels

    /// Store one label revision and assign its patient to train or holdout if this is the
    /// patient's first label, in one transaction. `holdout` decides a new patient's split.
    pub async fn put_label(&self, label: &LabelRecord, holdout: bool) -> Result<LabelWrite, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Write first: two identical uploads at once meet at the primary key, not between a
        // read and a write (and SQLite takes its write lock at the first statement).
        let inserted = sqlx::query(
            "INSERT INTO labels (site, device, scan_id, revision, label, predicted, probabilities, model_name, \
             model_version, model_sha256, reviewer, reviewed_at, laterality, patient, image_sha256, body_sha256, \
             received_at, withdrawn) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&label.site)
        .bind(&label.device)
        .bind(&label.scan_id)
        .bind(label.revision)
        .bind(&label.label)
        .bind(&label.predicted)
        .bind(&label.probabilities)
        .bind(&label.model_name)
        .bind(&label.model_version)
        .bind(&label.model_sha256)
        .bind(&label.reviewer)
        .bind(&label.reviewed_at)
        .bind(&label.laterality)
        .bind(&label.patient)
        .bind(&label.image_sha256)
        .bind(&label.body_sha256)
        .bind(label.received_at)
        .bind(i64::from(label.withdrawn))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            let stored: String = sqlx::query(
                "SELECT body_sha256 FROM labels WHERE site = $1 AND device = $2 AND scan_id = $3 AND revision = $4",
            )
            .bind(&label.site)
            .bind(&label.device)
            .bind(&label.scan_id)
            .bind(label.revision)
            .fetch_one(&mut *tx)
            .await?
            .try_get("body_sha256")?;
            if stored != label.body_sha256 {
                return Ok(LabelWrite::Conflict);
            }
        }
        let unchanged = !inserted;
        sqlx::query(
            "INSERT INTO patients (site, device, patient, split, assigned_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&label.site)
        .bind(&label.device)
        .bind(&label.patient)
        .bind(if holdout { "holdout" } else { "train" })
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let split: String = sqlx::query("SELECT split FROM patients WHERE site = $1 AND device = $2 AND patient = $3")
            .bind(&label.site)
            .bind(&label.device)
            .bind(&label.patient)
            .fetch_one(&mut *tx)
            .await?
            .try_get("split")?;
        tx.commit().await?;
        Ok(if unchanged { LabelWrite::Unchanged { split } } else { LabelWrite::Stored { split } })
    }

    /// The label that counts for each scan: its highest revision, unless that one withdrew it.
    pub async fn current_labels(&self) -> Result<Vec<LabelRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT l.*, i.kind AS image_kind FROM labels l JOIN (SELECT site, device, scan_id, MAX(revision) AS revision \
             FROM labels GROUP BY site, device, scan_id) m ON l.site = m.site AND l.device = m.device \
             AND l.scan_id = m.scan_id AND l.revision = m.revision JOIN images i ON i.sha256 = l.image_sha256 \
             WHERE l.withdrawn = 0 ORDER BY l.received_at, l.site, l.device, l.scan_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(label_from).collect::<Result<_, _>>().map_err(StoreError::Db)
    }

    /// The labels that count, with their patient's split (`train` or `holdout`).
    pub async fn current_labels_with_split(&self) -> Result<Vec<(LabelRecord, String)>, StoreError> {
        let labels = self.current_labels().await?;
        let rows = sqlx::query("SELECT site, device, patient, split FROM patients").fetch_all(&self.pool).await?;
        let mut splits = std::collections::HashMap::new();
        for r in &rows {
            let key: (String, String, String) = (r.try_get("site")?, r.try_get("device")?, r.try_get("patient")?);
            splits.insert(key, r.try_get::<String, _>("split")?);
        }
        Ok(labels
            .into_iter()
            .map(|l| {
                let split = splits
                    .get(&(l.site.clone(), l.device.clone(), l.patient.clone()))
                    .cloned()
                    .unwrap_or_else(|| "holdout".into());
                (l, split)
            })
            .collect())
    }

    pub async fn label_revisions(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM labels").fetch_one(&self.pool).await?;
        Ok(row.try_get("n")?)
    }

    /// Patients by split: the holdout's size is fixed by who arrived first.
    pub async fn split_counts(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let rows =
            sqlx::query("SELECT split, COUNT(*) AS n FROM patients GROUP BY split").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("split")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::Db)
    }

    // ---- training jobs

    /// Take the single job slot for `job` and record it as running; None when another job
    /// holds the slot.
    pub async fn start_job(&self, job: &JobRecord) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let taken = sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(JOB_LOCK)
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        if taken.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO jobs (id, state, trigger, labels_at_start, exported, singan, architecture, version, \
             started_at, heartbeat_at, finished_at, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11)",
        )
        .bind(&job.id)
        .bind(&job.state)
        .bind(&job.trigger)
        .bind(job.labels_at_start)
        .bind(job.exported)
        .bind(job.singan)
        .bind(&job.architecture)
        .bind(&job.version)
        .bind(job.started_at)
        .bind(job.heartbeat_at)
        .bind(&job.outcome)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Prove the job alive. False when it is no longer running (another replica judged it
    /// abandoned): its runner must then stop it.
    pub async fn job_heartbeat(&self, id: &str, exported: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE jobs SET heartbeat_at = $1, exported = $2 WHERE id = $3 AND state = 'running'")
            .bind(now_ms())
            .bind(exported)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Record how a running job ended and free its slot, in one transaction; `stale_before_ms`
    /// only if its heartbeat is older. False when it was no longer running (or beat since).
    async fn end_job(&self, id: &str, state: &str, outcome: &str, stale_before_ms: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ended = sqlx::query(
            "UPDATE jobs SET state = $1, outcome = $2, finished_at = $3 WHERE id = $4 AND state = 'running' \
             AND heartbeat_at < $5",
        )
        .bind(state)
        .bind(outcome)
        .bind(now_ms())
        .bind(id)
        .bind(stale_before_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if ended {
            sqlx::query("DELETE FROM settings WHERE name = $1 AND value = $2")
                .bind(JOB_LOCK)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ended)
    }

    /// Record how a job ended and free the slot. False when another replica had already
    /// failed it as abandoned (its verdict stands).
    pub async fn finish_job(&self, id: &str, state: &str, outcome: &str) -> Result<bool, StoreError> {
        self.end_job(id, state, outcome, i64::MAX).await
    }

    /// Jobs still marked running whose heartbeat stopped before `stale_before_ms`: the
    /// process running them died. They fail, with the reason, and free the slot.
    pub async fn fail_abandoned_jobs(&self, stale_before_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id FROM jobs WHERE state = 'running' AND heartbeat_at < $1")
            .bind(stale_before_ms)
            .fetch_all(&self.pool)
            .await?;
        let mut failed = Vec::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            // Judged again in the write: a beat that landed since the read keeps it alive.
            if self.end_job(&id, "failed", "interrupted: the service running it stopped", stale_before_ms).await? {
                failed.push(id);
            }
        }
        Ok(failed)
    }

    /// Every candidate version a job was given, so the next one is above them all.
    pub async fn job_versions(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT version FROM jobs").fetch_all(&self.pool).await?;
        rows.iter().map(|r| r.try_get("version")).collect::<Result<_, _>>().map_err(StoreError::Db)
    }

    pub async fn jobs(&self, limit: i64) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM jobs ORDER BY started_at DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from).collect::<Result<_, _>>().map_err(StoreError::Db)
    }

    /// When the last training started and how many labels counted then.
    pub async fn last_training(&self) -> Result<Option<(i64, u64)>, StoreError> {
        Ok(self.jobs(1).await?.first().map(JobRecord::training_mark))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

const JOB_LOCK: &str = "job_lock";

/// One training job as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRecord {
    pub id: String,
    pub state: String,
    pub trigger: String,
    pub labels_at_start: i64,
    pub exported: i64,
    pub singan: i64,
    pub architecture: String,
    pub version: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: String,
}

impl JobRecord {
    /// What the policy counts from: when this training started and how many labels counted.
    pub fn training_mark(&self) -> (i64, u64) {
        (self.started_at, self.labels_at_start.max(0) as u64)
    }
}

fn job_from(row: &AnyRow) -> Result<JobRecord, sqlx::Error> {
    Ok(JobRecord {
        id: row.try_get("id")?,
        state: row.try_get("state")?,
        trigger: row.try_get("trigger")?,
        labels_at_start: row.try_get("labels_at_start")?,
        exported: row.try_get("exported")?,
        singan: row.try_get("singan")?,
        architecture: row.try_get("architecture")?,
        version: row.try_get("version")?,
        started_at: row.try_get("started_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        finished_at: row.try_get("finished_at")?,
        outcome: row.try_get("outcome")?,
    })
}

fn label_from(row: &AnyRow) -> Result<LabelRecord, sqlx::Error> {
    Ok(LabelRecord {
        site: row.try_get("site")?,
        device: row.try_get("device")?,
        scan_id: row.try_get("scan_id")?,
        revision: row.try_get("revision")?,
        label: row.try_get("label")?,
        predicted: row.try_get("predicted")?,
        probabilities: row.try_get("probabilities")?,
        model_name: row.try_get("model_name")?,
        model_version: row.try_get("model_version")?,
        model_sha256: row.try_get("model_sha256")?,
        reviewer: row.try_get("reviewer")?,
        reviewed_at: row.try_get("reviewed_at")?,
        laterality: row.try_get("laterality")?,
        patient: row.try_get("patient")?,
        image_sha256: row.try_get("image_sha256")?,
        image_kind: row.try_get("image_kind")?,
        body_sha256: row.try_get("body_sha256")?,
        received_at: row.try_get("received_at")?,
        withdrawn: row.try_get::<i64, _>("withdrawn")? != 0,
    })
}
