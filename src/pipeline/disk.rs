//! The free-space guard of intake: no claim unless the state folder has room for the file
//! about to be claimed plus `ingest.min_free_bytes`. It fails closed: a filesystem that cannot
//! be measured takes no new scans. Crossing the floor raises an alarm once, and clears it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::ingest::DiskGuard;
use crate::mqtt::Topics;
use crate::scan::EventKind;
use crate::store::Store;

pub struct Disk {
    pub dir: PathBuf,
    pub min_free: u64,
    pub low: AtomicBool,
    pub store: Arc<Store>,
    pub topics: Topics,
    pub wake: Arc<Notify>,
}

impl DiskGuard for Disk {
    fn intake_allowed(&self, incoming: u64) -> bool {
        let measured = fs4::available_space(&self.dir);
        let (low, detail) = match &measured {
            // Room for the file twice: the spooled original and its de-identified artefact.
            Ok(free) => {
                let needed = self.min_free.saturating_add(incoming.saturating_mul(2));
                (*free < needed, format!("{free} bytes free, below {needed}; intake stopped"))
            }
            Err(e) => (true, format!("free space cannot be measured ({}); intake stopped", e.kind())),
        };
        if low != self.low.swap(low, Ordering::Relaxed) {
            let (kind, detail) = if low {
                tracing::error!(detail = %detail, "disk almost full: intake stopped");
                (EventKind::Alarm, detail)
            } else {
                tracing::info!("disk space back: intake resumed");
                (EventKind::AlarmCleared, "free space is back above the floor; intake resumed".to_string())
            };
            let message = super::event_message(&self.topics, kind, None, "disk_low", &detail);
            if let Err(e) = self.store.enqueue(&message) {
                tracing::error!(error = %e, "cannot record the disk alarm");
            }
            self.wake.notify_one();
        }
        !low
    }
}
