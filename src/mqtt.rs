//! What the publisher and the updater share about MQTT: the broker address, the topic names
//! of this device and the builders of the messages they queue. Holds no I/O, so neither of
//! them depends on the other (docs/mqtt.md is the contract).

use serde::Serialize;

use crate::scan::{now_ms, rfc3339_ms, EventMessage, ModelStamp, ScanId, STATUS_SCHEMA};
use crate::store::OutboxMessage;

/// `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerAddress {
    pub fn parse(url: &str) -> Result<BrokerAddress, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("bad port in {url:?}"))?)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(format!("no host in {url:?}"));
        }
        Ok(BrokerAddress { tls, host: host.to_string(), port })
    }
}

/// Topic names of one device, and who it is; see docs/mqtt.md.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    site: String,
    device: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, device: &str) -> Self {
        Topics { prefix: prefix.into(), site: site.into(), device: device.into() }
    }

    fn base(&self) -> String {
        format!("{}/{}/{}", self.prefix, self.site, self.device)
    }

    pub fn result(&self, scan_id: ScanId) -> String {
        format!("{}/results/{scan_id}", self.base())
    }

    /// Every result of this device (a subscription filter).
    pub fn results(&self) -> String {
        format!("{}/results/+", self.base())
    }

    pub fn events(&self) -> String {
        format!("{}/events", self.base())
    }

    pub fn status(&self) -> String {
        format!("{}/status", self.base())
    }

    /// Where reviewers' verdicts arrive: `{base}/labels/{scan_id}`.
    pub fn labels(&self) -> String {
        format!("{}/labels/+", self.base())
    }

    /// The scan id of a verdict's topic, if it is one.
    pub fn label_scan<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.base().as_str())?.strip_prefix("/labels/").filter(|id| !id.contains('/'))
    }

    /// The retained live-accuracy report (`octd.quality/1`).
    pub fn quality(&self) -> String {
        format!("{}/quality", self.base())
    }

    /// Where the cloud says "this device has a new model waiting".
    pub fn model_notice(&self) -> String {
        format!("{}/model", self.base())
    }

    /// Where the cloud says "the fleet has a new model waiting".
    pub fn fleet_model_notice(&self) -> String {
        format!("{}/fleet/models", self.prefix)
    }

    /// An event of this device, now; scan and model fields unset.
    pub fn event(&self, kind: crate::scan::EventKind, code: &str, detail: &str) -> EventMessage {
        EventMessage::new(&self.site, &self.device, kind, code, detail)
    }
}

#[derive(Debug, Clone, Serialize)]
struct StatusMessage<'a> {
    schema: &'static str,
    state: &'static str,
    site: &'a str,
    device: &'a str,
    octd_version: &'static str,
    model: Option<&'a ModelStamp>,
    at: String,
}

/// The retained status payload: `online` (naming the model) or `offline`.
pub fn status_payload(topics: &Topics, state: &'static str, model: Option<&ModelStamp>) -> String {
    let message = StatusMessage {
        schema: STATUS_SCHEMA,
        state,
        site: &topics.site,
        device: &topics.device,
        octd_version: env!("CARGO_PKG_VERSION"),
        model: if state == "online" { model } else { None },
        at: rfc3339_ms(now_ms()),
    };
    serde_json::to_string(&message).unwrap_or_default()
}

/// An event as an outbox message on the device's events topic.
pub fn event_outbox(topics: &Topics, event: &EventMessage) -> OutboxMessage {
    OutboxMessage {
        topic: topics.events(),
        payload: serde_json::to_string(event).unwrap_or_default(),
        retain: false,
        completes_scan: None,
    }
}

/// The retained live-accuracy report as an outbox message.
pub fn quality_message(topics: &Topics, payload: String) -> OutboxMessage {
    OutboxMessage { topic: topics.quality(), payload, retain: true, completes_scan: None }
}

/// The retained "online" status naming `model`, as an outbox message (queued when the
/// active model changes, so the status follows it durably and in order).
pub fn status_message(topics: &Topics, model: Option<&ModelStamp>) -> OutboxMessage {
    OutboxMessage {
        topic: topics.status(),
        payload: status_payload(topics, "online", model),
        retain: true,
        completes_scan: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerAddress::parse("mqtt://broker.local").unwrap(),
            BrokerAddress { tls: false, host: "broker.local".into(), port: 1883 }
        );
        assert_eq!(BrokerAddress::parse("mqtts://10.0.0.2:9999/").unwrap().port, 9999);
        assert_eq!(BrokerAddress::parse("mqtts://h").unwrap().port, 8883);
        assert_eq!(BrokerAddress::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(BrokerAddress::parse("http://h").is_err());
        assert!(BrokerAddress::parse("mqtt://h:notaport").is_err());
        assert!(BrokerAddress::parse("mqtt://").is_err());
    }

    #[test]
    fn topics_of_a_device() {
        let t = Topics::new("oct", "site-a", "dev-1");
        assert_eq!(t.events(), "oct/site-a/dev-1/events");
        assert_eq!(t.fleet_model_notice(), "oct/fleet/models");
        assert_eq!(t.model_notice(), "oct/site-a/dev-1/model");
    }
}
