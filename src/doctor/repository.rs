//! The model channel answers and its metadata verifies against the trusted root and has
//! not expired (checked with a scratch datastore: the device's own is not touched).

use super::{Context, Finding};

pub fn check(ctx: &Context) -> Finding {
    let update = &ctx.config.update;
    if ctx.config.model.dir.is_some() {
        return Finding::skip("repository", "model.dir pins a folder: the channel is not used");
    }
    let channel = match octd_bundle::Channel::parse(&update.repository) {
        Ok(c) => c,
        Err(e) => return Finding::fail("repository", e, "fix update.repository"),
    };
    let root =
        match std::fs::read(&update.trusted_root) {
            Ok(r) => r,
            Err(e) => return Finding::fail(
                "repository",
                format!("trusted root {}: {e}", update.trusted_root.display()),
                "install the channel's root.json (octd provision --trusted-root) and point update.trusted_root at it",
            ),
        };
    let scratch = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return Finding::fail("repository", format!("temporary folder: {e}"), "check /tmp"),
    };
    let loaded = ctx.runtime.block_on(octd_bundle::client::load(&root, &channel, scratch.path()));
    match loaded {
        Ok(repo) => {
            let expires = repo.expires();
            let now = octd_bundle::repo::Timestamp::now();
            let left = expires.duration_since(now);
            let newest = repo.models().last().map(|m| m.version.to_string()).unwrap_or_else(|| "none".into());
            let summary = format!(
                "{}: root v{}, newest model {newest}, metadata valid until {expires}",
                update.repository,
                repo.root_version()
            );
            if left.as_secs() < 24 * 3600 {
                Finding::warn(
                    "repository",
                    summary,
                    "the channel's timestamp expires within a day: the publisher must re-sign it (octd bundle publish)",
                )
            } else {
                Finding::ok("repository", summary)
            }
        }
        Err(refusal) => {
            let hint = match refusal.code() {
                "metadata_expired" => {
                    "the channel's metadata has expired (or this clock is wrong): re-sign the \
                                       channel (octd bundle publish) and check the clock"
                }
                "signature_invalid" | "signature_threshold" => {
                    "the channel is not signed by keys this device trusts: check update.trusted_root is this \
                     channel's root.json"
                }
                _ => "check update.repository is reachable from this device (proxy, firewall, DNS)",
            };
            Finding::fail("repository", format!("{}: {} ({})", update.repository, refusal, refusal.code()), hint)
        }
    }
}
