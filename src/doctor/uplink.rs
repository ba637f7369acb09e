//! The uplink (where confirmed labels go) answers over HTTP(S) with a valid certificate.

use std::time::Duration;

use super::{Context, Finding};

pub fn check(ctx: &Context) -> Finding {
    let url = &ctx.config.uplink.url;
    if url.is_empty() {
        return Finding::skip("uplink", "no uplink.url configured");
    }
    let result = ctx.runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
        client.head(url).send().await.map(|r| r.status()).map_err(|e| e.to_string())
    });
    match result {
        // Any HTTP answer proves DNS, routing and TLS; the trainer decides what HEAD means.
        Ok(status) if !status.is_server_error() => Finding::ok("uplink", format!("{url} answers ({status})")),
        Ok(status) => {
            Finding::warn("uplink", format!("{url} answers {status}"), "the trainer's intake reports an error")
        }
        Err(e) => Finding::fail(
            "uplink",
            format!("{url}: {e}"),
            "check uplink.url, DNS and the firewall; an https certificate must chain to the system trust store",
        ),
    }
}
