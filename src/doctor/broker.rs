//! The MQTT broker accepts a connection with the configured address, credentials and TLS
//! files (under a client id of its own, without a last will, so the daemon is undisturbed).

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet};

use super::{Context, Finding};
use crate::telemetry::broker_target;

pub fn check(ctx: &Context) -> Finding {
    let config = &ctx.config;
    let target = broker_target(config);
    if config.mqtt.url.is_empty() && ctx.daemon.is_none() {
        // The embedded broker lives inside the daemon: its port must be free for it.
        return match std::net::TcpListener::bind(config.mqtt.embedded_listen) {
            Ok(_) => Finding::ok("broker", format!("{target}: the port is free for the daemon's embedded broker")),
            Err(e) => Finding::fail(
                "broker",
                format!("{target}: {e}"),
                "another program holds the port: stop it, or set mqtt.embedded_listen / mqtt.url",
            ),
        };
    }
    let options = match crate::publish::connection_options(config, format!("{}-doctor", config.client_id()), None) {
        Ok(o) => o,
        Err(e) => return Finding::fail("broker", format!("{target}: {e}"), "fix the [mqtt] settings"),
    };
    let attempt = ctx.runtime.block_on(async move {
        let (client, mut eventloop) = AsyncClient::new(options, 4);
        let result = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Ok(code),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(300), eventloop.poll()).await;
        result
    });
    match attempt {
        Ok(Ok(ConnectReturnCode::Success)) => Finding::ok("broker", format!("{target}: connected and accepted")),
        Ok(Ok(code)) => Finding::fail(
            "broker",
            format!("{target}: refused ({code:?})"),
            "check mqtt.username / mqtt.password and the broker's ACL for this device",
        ),
        Ok(Err(e)) => Finding::fail(
            "broker",
            format!("{target}: {e}"),
            "check mqtt.url, that the broker runs and the network/firewall lets this device reach it; for mqtts \
             check mqtt.ca_file (and client_cert/client_key)",
        ),
        Err(_) => Finding::fail("broker", format!("{target}: no answer within 5 s"), "check the address and firewall"),
    }
}
