//! The embedded broker (rumqttd) for a device with no broker configured: results still
//! reach displays on this host, and a fresh machine runs end to end.
//!
//! It runs in a process of its own (`octd broker`, started and restarted by the daemon),
//! under an address-space limit: rumqttd bounds payloads, connections and per-filter logs,
//! but not the number of topics or retained messages a client may create, so a misbehaving
//! client can at worst exhaust the broker process, never octd's. It listens on loopback
//! only (it has no TLS; `config` refuses anything else) and, when `mqtt.username` and
//! `mqtt.password` are set, accepts that login alone.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::PublishError;

const CONFIG: &str = r#"
id = 0
[router]
id = 0
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 4194304
max_segment_count = 4

[v4.1]
name = "octd-embedded"
listen = "LISTEN"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 10000
max_payload_size = 262144
max_inflight_count = 100
dynamic_filters = true
"#;

/// Exit code of a broker process that could not start (bad settings, taken port).
pub const EXIT_BROKER_SETTINGS: i32 = 3;

/// What the daemon hands the broker process on its standard input (never in its arguments
/// or environment, which other local users can read).
#[derive(Serialize, Deserialize)]
pub struct BrokerSetup {
    pub listen: SocketAddr,
    pub login: Option<(String, String)>,
}

/// How the daemon runs the broker process.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub program: PathBuf,
    pub listen: SocketAddr,
    pub login: Option<(String, String)>,
    pub memory_bytes: u64,
}

impl EmbeddedBroker {
    /// Fails at once when the address is taken, rather than leaving the daemon to find out
    /// by never connecting.
    pub fn check_listen(&self) -> Result<(), PublishError> {
        drop(
            TcpListener::bind(self.listen)
                .map_err(|e| PublishError::Broker(format!("cannot listen on {}: {e}", self.listen)))?,
        );
        Ok(())
    }

    /// Run the broker process until shutdown; returns (for the supervisor to restart it)
    /// when it exits.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
        let mut child = tokio::process::Command::new(&self.program)
            .arg("broker")
            .arg("--memory-bytes")
            .arg(self.memory_bytes.to_string())
            .env_clear()
            // Few malloc arenas: each reserves address space the limit counts.
            .env("MALLOC_ARENA_MAX", "2")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the embedded broker: {e}"))?;
        let setup = serde_json::to_vec(&BrokerSetup { listen: self.listen, login: self.login.clone() })
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&setup).await.map_err(|e| format!("embedded broker setup: {e}"))?;
        }
        tracing::info!(listen = %self.listen, pid = child.id(), memory_bytes = self.memory_bytes, "embedded MQTT broker started");
        tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => {
                let _ = child.kill().await;
                Ok(())
            }
            status = child.wait() => {
                let status = status.map_err(|e| e.to_string())?;
                // Its port stays taken for a moment after a crash.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(format!("embedded MQTT broker exited ({status}); restarting it"))
            }
        }
    }
}

/// `octd broker`: the broker process itself. Reads its setup from standard input, limits
/// its own address space, and serves until killed (or until the daemon that started it dies).
pub fn serve(memory_bytes: u64) -> i32 {
    use rustix::process::{setrlimit, Resource, Rlimit};
    // Dies with its daemon: a broker left behind would hold the port the next start needs.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    if rustix::process::getppid().is_none_or(|p| p.as_raw_nonzero().get() == 1) {
        return EXIT_BROKER_SETTINGS;
    }
    let limit = Rlimit { current: Some(memory_bytes), maximum: Some(memory_bytes) };
    if let Err(e) = setrlimit(Resource::As, limit) {
        eprintln!("octd broker: cannot limit its memory: {e}");
        return EXIT_BROKER_SETTINGS;
    }
    let _ = setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) });
    let mut input = Vec::new();
    if std::io::stdin().take(64 * 1024).read_to_end(&mut input).is_err() {
        return EXIT_BROKER_SETTINGS;
    }
    let Ok(setup) = serde_json::from_slice::<BrokerSetup>(&input) else {
        eprintln!("octd broker: unreadable setup on standard input");
        return EXIT_BROKER_SETTINGS;
    };
    let mut config: rumqttd::Config = match toml::from_str(&CONFIG.replace("LISTEN", &setup.listen.to_string())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("octd broker: settings: {e}");
            return EXIT_BROKER_SETTINGS;
        }
    };
    if let (Some((user, password)), Some(v4)) = (setup.login, config.v4.as_mut()) {
        for server in v4.values_mut() {
            server.connections.auth = Some([(user.clone(), password.clone())].into_iter().collect());
        }
    }
    let mut broker = rumqttd::Broker::new(config);
    match broker.start() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("octd broker: stopped: {e}");
            1
        }
    }
}
