//! systemd's notify protocol. Every call is a no-op outside systemd (no NOTIFY_SOCKET), so
//! the daemon behaves the same in a terminal.
//!
//! Messages go through one small thread with a bounded queue: a notify socket that is not
//! drained must never block the async runtime (which would wedge the very pipeline the
//! watchdog guards); when the queue is full the message is dropped.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;
use std::time::Duration;

use sd_notify::NotifyState;

enum Message {
    Status(String),
    Ready(String),
    Stopping,
    Watchdog,
}

fn sender() -> Option<&'static SyncSender<Message>> {
    static SENDER: OnceLock<Option<SyncSender<Message>>> = OnceLock::new();
    SENDER
        .get_or_init(|| {
            std::env::var_os("NOTIFY_SOCKET")?;
            let (tx, rx) = sync_channel::<Message>(16);
            let spawned = std::thread::Builder::new().name("octd-sd-notify".into()).spawn(move || {
                for message in rx {
                    let result = match &message {
                        Message::Status(line) => sd_notify::notify(&[NotifyState::Status(line)]),
                        Message::Ready(line) => sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(line)]),
                        Message::Stopping => {
                            sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")])
                        }
                        Message::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "sd_notify failed");
                    }
                }
            });
            spawned.ok().map(|_| tx)
        })
        .as_ref()
}

fn send(message: Message) {
    if let Some(tx) = sender() {
        let _ = tx.try_send(message);
    }
}

/// A STATUS= line, shown by `systemctl status octd`.
pub fn status(line: &str) {
    send(Message::Status(line.to_string()));
}

pub fn ready(line: &str) {
    send(Message::Ready(line.to_string()));
}

pub fn stopping() {
    send(Message::Stopping);
}

pub fn watchdog_ping() {
    send(Message::Watchdog);
}

/// WatchdogSec of the unit, when systemd supervises this process with a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Running under systemd with stderr connected to the journal.
pub fn journal_attached() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty())
}
