//! Harness: the real `octd-trainer` binary on a free port against real SQLite files (or a
//! real PostgreSQL and S3-compatible server), real signed requests from a device identity
//! made the way `octd provision` makes it, and images de-identified by octd's own code
//! from the shared real scans.
#![allow(dead_code)]

pub mod services;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use octd_uplink::DeviceKey;
use serde_json::{json, Value};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The labelled shared B-scans (path, label), as many as the folder holds.
pub fn shared_oct_images() -> Option<Vec<(PathBuf, String)>> {
    let dir = repo().join("../shared/data/oct");
    if !dir.is_dir() {
        eprintln!("SKIP: ../shared/data/oct is absent; real-image tests need the shared OCT data");
        return None;
    }
    let mut out = Vec::new();
    for label in ["CNV", "DME", "DRUSEN", "NORMAL"] {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(label)).ok()?.flatten().map(|e| e.path()).collect();
        files.sort();
        out.extend(files.into_iter().map(|p| (p, label.to_string())));
    }
    Some(out)
}

/// A real scan de-identified by octd's own code, as its uplink sends it: (bytes, extension).
/// A JPEG kept without its metadata goes up as its pixels in PNG.
pub fn deidentified(input: Vec<u8>) -> (Vec<u8>, &'static str) {
    let limits = octd::deid::InputLimits::from(&octd::config::IngestConfig::default());
    let deid = octd::deid::Deidentifier::new(octd::secret::DeviceSecret::ephemeral(), Vec::new(), limits)
        .with_scope(octd::deid::Scope::AnyObject);
    let out = deid.deidentify_bytes(input).expect("de-identifies");
    match out.extension {
        "jpg" => (octd::deid::png_of_jpeg(&out.artifact).expect("converts"), "png"),
        other => (out.artifact, other),
    }
}

/// A device as `octd provision` makes it: a PKCS#8 identity key and its public JSON.
pub struct DeviceIdentity {
    pub key: DeviceKey,
    pub public_json: PathBuf,
    pub site: String,
    pub device: String,
}

impl DeviceIdentity {
    pub fn new(dir: &Path, site: &str, device: &str) -> DeviceIdentity {
        std::fs::create_dir_all(dir).unwrap();
        let pk8 = dir.join("device-identity.pk8");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (key_id, public) = runtime.block_on(async {
            let id = octd_bundle::keys::generate(&pk8).await.unwrap();
            (id, octd_bundle::keys::public_key(&pk8).await.unwrap())
        });
        let public_json = dir.join("device-identity.pub.json");
        let text = serde_json::to_vec_pretty(&json!({"keyid": key_id, "key": public, "site": site, "device": device}))
            .unwrap();
        std::fs::write(&public_json, text).unwrap();
        let key = DeviceKey::from_pkcs8(&std::fs::read(&pk8).unwrap(), &key_id).unwrap();
        DeviceIdentity { key, public_json, site: site.into(), device: device.into() }
    }
}

pub fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// One HTTP/1.1 exchange on loopback: (status, headers, body as JSON or as text).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Value,
}

pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413, 401) before reading the whole body.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    Reply { status, headers: head.to_ascii_lowercase(), body }
}

/// A signed request from `device`, exactly as the device's uplink sends it.
pub fn signed(port: u16, device: &DeviceIdentity, method: &str, path: &str, content_type: &str, body: &[u8]) -> Reply {
    let h = device.key.sign(method, path, content_type, body, now_s(), &nonce());
    signed_with(port, &h, method, path, content_type, body)
}

pub fn signed_with(
    port: u16,
    h: &octd_uplink::SignedHeaders,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Reply {
    let mut headers: Vec<(&str, String)> = h.pairs().into_iter().collect();
    headers.push(("content-type", content_type.to_string()));
    http(port, method, path, &headers, body)
}

/// The service under test, with its own folder and configuration.
pub struct Trainer {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    /// Extra environment for the service (e.g. S3 credentials).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Trainer {
    /// `extra`: TOML appended to the configuration (sections other than [server]).
    pub fn new(dir: &Path, storage: &str, intake: &str) -> Trainer {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let config = dir.join("octd-trainer.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\n{storage}\n\n[intake]\n{intake}\n\n\
             [channel]\ndir = \"{}\"\nkeys = \"{}\"\n",
            dir.join("channel").display(),
            dir.join("keys").display()
        );
        std::fs::write(&config, text).unwrap();
        Trainer { dir: dir.to_path_buf(), config, port, env: Vec::new(), child: None }
    }

    pub fn sqlite(dir: &Path, intake: &str) -> Trainer {
        let storage = format!(
            "database = \"sqlite://{}\"\nblobs = \"{}\"",
            dir.join("trainer.db").display(),
            dir.join("blobs").display()
        );
        Trainer::new(dir, &storage, intake)
    }

    /// More configuration (other sections: [policy], [jobs]).
    pub fn configure(&self, toml: &str) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push('\n');
        text.push_str(toml);
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_octd-trainer"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap()
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(out.status.success(), "octd-trainer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("serve.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_octd-trainer"))
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("RUST_LOG", "info,octd_trainer::server=debug,sqlx=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut r = String::new();
                let _ = s.read_to_string(&mut r);
                if r.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("octd-trainer exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "octd-trainer did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let status = child.wait().unwrap();
            assert!(status.success(), "octd-trainer did not stop cleanly ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
