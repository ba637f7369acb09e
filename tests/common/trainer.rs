//! The real `octd-trainer` binary beside octd (built by `cargo test --workspace`), on a free
//! port, with a device identity made the way `octd provision` makes it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use octd_uplink::DeviceKey;
use serde_json::{json, Value};

use super::repo;

/// `octd-trainer`, built beside octd by `cargo test --workspace`.
pub fn trainer_binary() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_BIN_EXE_octd")).with_file_name("octd-trainer");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("OCTD_REQUIRE_MOSQUITTO").is_err(),
        "{} is missing: run the workspace's tests (cargo test --workspace)",
        path.display()
    );
    eprintln!("SKIPPED: {} is missing (cargo test --workspace builds it)", path.display());
    None
}

pub fn venv_python() -> Option<PathBuf> {
    let python = repo().join(".venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    assert!(std::env::var("OCTD_REQUIRE_VENV").is_err(), "no .venv/bin/python, and OCTD_REQUIRE_VENV requires it");
    eprintln!("SKIPPED: no .venv (pip install -r trainer/requirements.txt): the training job cannot run");
    None
}

pub struct Service {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
}

impl Service {
    pub fn cli(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(&self.bin).arg("--config").arg(config).args(args).env("RUST_LOG", "info").output().unwrap()
    }

    pub fn cli_json(&self, config: &Path, args: &[&str]) -> Value {
        let out = self.cli(config, args);
        assert!(out.status.success(), "octd-trainer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("serve.log")).unwrap();
        self.child = Some(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.config)
                .arg("serve")
                .env("RUST_LOG", "info,sqlx=warn")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while super::http_get(self.port, "/healthz").map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "octd-trainer did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A request signed by the device's identity key, as its uplink sends it.
    pub fn signed(&self, key: &DeviceKey, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        use std::io::{Read, Write};
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let nonce = format!("{:032x}", rand_nonce());
        let headers = key.sign(method, path, content_type, body, now, &nonce);
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\ncontent-type: {content_type}\r\n",
            body.len()
        );
        for (k, v) in headers.pairs() {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rand_nonce() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    t ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 64)
}

impl Service {
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The status report (`octd-trainer status`).
    pub fn status(&self) -> Value {
        self.cli_json(&self.config, &["status"])
    }
}

/// A device identity as `octd provision` writes it into `dir`: the key, its public JSON, and
/// the signing key for requests.
pub fn device_identity(dir: &Path, site: &str, device: &str) -> (PathBuf, PathBuf, DeviceKey) {
    std::fs::create_dir_all(dir).unwrap();
    let pk8 = dir.join("device-identity.pk8");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (key_id, public) = runtime.block_on(async {
        let id = octd_bundle::keys::generate(&pk8).await.unwrap();
        (id, octd_bundle::keys::public_key(&pk8).await.unwrap())
    });
    let public_json = dir.join("device-identity.pub.json");
    let text = json!({"keyid": key_id, "key": public, "site": site, "device": device});
    std::fs::write(&public_json, serde_json::to_vec(&text).unwrap()).unwrap();
    let key = DeviceKey::from_pkcs8(&std::fs::read(&pk8).unwrap(), &key_id).unwrap();
    (pk8, public_json, key)
}

/// Every file under `dir`, concatenated (for identity audits).
pub fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(all_bytes(&path));
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.extend(bytes);
            }
        }
    }
    out
}

/// A free-port service on SQLite under `dir` with the given extra configuration.
pub fn sqlite_service(dir: &Path, extra: &str) -> Option<Service> {
    let bin = trainer_binary()?;
    std::fs::create_dir_all(dir).unwrap();
    let port = super::free_port();
    let config = dir.join("octd-trainer.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\ndatabase = \"sqlite://{}\"\nblobs = \"{}\"\n\n\
         [channel]\ndir = \"{}\"\nkeys = \"{}\"\n\n{extra}",
        dir.join("trainer.db").display(),
        dir.join("blobs").display(),
        dir.join("channel").display(),
        dir.join("keys").display(),
    );
    std::fs::write(&config, text).unwrap();
    Some(Service { bin, dir: dir.to_path_buf(), config, port, child: None })
}
