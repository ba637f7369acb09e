//! The embedded broker (rumqttd) for a device with no broker configured: results still
//! reach displays on the clinic LAN, and a fresh machine runs end to end.

use std::net::{SocketAddr, TcpListener};

use super::PublishError;

const CONFIG: &str = r#"
id = 0
[router]
id = 0
max_connections = 256
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "octd-embedded"
listen = "LISTEN"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 100
dynamic_filters = true
"#;

/// Start rumqttd on `listen` in its own threads. Fails at once when the address is taken,
/// rather than leaving the daemon to find out by never connecting.
pub fn start_embedded_broker(listen: SocketAddr) -> Result<(), PublishError> {
    drop(TcpListener::bind(listen).map_err(|e| PublishError::Broker(format!("cannot listen on {listen}: {e}")))?);
    let config: rumqttd::Config = toml::from_str(&CONFIG.replace("LISTEN", &listen.to_string()))
        .map_err(|e| PublishError::Broker(format!("broker settings: {e}")))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("octd-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| PublishError::Broker(e.to_string()))?;
    tracing::info!(%listen, "embedded MQTT broker started");
    Ok(())
}
