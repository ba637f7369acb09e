//! The daemon's stop signal, shared by every task: a `watch` channel that turns true once.

use tokio::sync::watch;

/// Resolves once shutdown is requested (at once if it already was). Holds no borrow of the
/// channel across an await, so the futures that select on it stay `Send`.
pub async fn requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
