//! The reading room's local API through the real daemon: reviewer logins (Argon2id) with
//! lock-out, bearer sessions, the scan list and de-identified images, verdicts attributed to
//! the session's reviewer, logout, HTTPS with a certificate, and no clear-text listener off
//! loopback.

mod common;

use std::time::Duration;

use common::{add_reviewer, assert_no_phi, drop_file, events, free_port, results, Rig};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "correct horse battery staple";

struct Client {
    base: String,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Vec<u8>) {
        self.runtime.block_on(async {
            let url = format!("{}{path}", self.base);
            let mut request = match method {
                "GET" => self.http.get(url),
                "POST" => self.http.post(url),
                "DELETE" => self.http.delete(url),
                _ => unreachable!(),
            };
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.header("content-type", "application/json").body(body.to_string());
            }
            let response = request.send().await.expect("the API answers");
            (response.status().as_u16(), response.bytes().await.unwrap_or_default().to_vec())
        })
    }

    fn json(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let (status, bytes) = self.call(method, path, token, body);
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

#[test]
fn reviewers_log_in_read_scans_and_give_verdicts_in_their_own_name() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    let port = rig.octd.display_port;
    rig.octd.enable_display();
    rig.octd.env.push(("OCTD_DISPLAY__MAX_FAILURES".into(), "3".into()));
    add_reviewer(&rig.octd.config, "rv-1", PASSWORD);
    add_reviewer(&rig.octd.config, "rv-2", PASSWORD);
    rig.octd.start();
    rig.octd.wait_ready();
    drop_file(&rig.octd.inbox, "DOE_JOHN_MRN8675309_19450704.jpeg", &rig.image(0));
    drop_file(&rig.octd.inbox, "DOE_JOHN_second.jpeg", &rig.image(9));
    let messages = rig.sub.wait_until(MINUTE, |m| results(m).len() == 2, "two results");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = Client {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
    };

    // Nothing without a session; a login only as JSON (a form from another site's page is
    // not even counted).
    let (status, answer) = api.json("GET", "/api/v1/scans", None, None);
    assert_eq!(status, 401, "{answer}");
    let plain = api.runtime.block_on(async {
        api.http
            .post(format!("{}/api/v1/session", api.base))
            .header("content-type", "text/plain")
            .body(json!({"reviewer": "rv-1", "password": "guess"}).to_string())
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(plain.unwrap(), 415);
    // Three wrong passwords lock the reviewer out, even against the right one afterwards.
    for _ in 0..3 {
        let (status, _) =
            api.json("POST", "/api/v1/session", None, Some(json!({"reviewer": "rv-1", "password": "guess"})));
        assert_eq!(status, 401);
    }
    let (status, answer) =
        api.json("POST", "/api/v1/session", None, Some(json!({"reviewer": "rv-1", "password": PASSWORD})));
    assert_eq!((status, answer["error"].as_str()), (423, Some("locked")), "{answer}");
    // Another reviewer is not affected.
    let (status, session) =
        api.json("POST", "/api/v1/session", None, Some(json!({"reviewer": "rv-2", "password": PASSWORD})));
    assert_eq!(status, 201, "{session}");
    let token = session["token"].as_str().unwrap().to_string();

    // The worklist and a de-identified image; no identity from the inputs anywhere.
    let (status, list) = api.call("GET", "/api/v1/scans", Some(&token), None);
    assert_eq!(status, 200);
    assert_no_phi(&list, "the scan list");
    let list: Value = serde_json::from_slice(&list).unwrap();
    let scans = list["scans"].as_array().unwrap();
    assert_eq!(scans.len(), 2, "{list}");
    let first = scans.iter().find(|s| results(&messages).contains_key(s["scan_id"].as_str().unwrap())).unwrap();
    let id = first["scan_id"].as_str().unwrap().to_string();
    let predicted = first["label"].as_str().unwrap().to_string();
    let (status, png) = api.call("GET", &format!("/api/v1/scans/{id}/image"), Some(&token), None);
    assert_eq!(status, 200);
    assert_no_phi(&png, "the image");
    image::load_from_memory(&png).expect("a PNG the display can show");

    // A verdict in the session's own name; not in another's.
    let (status, answer) = api.json(
        "POST",
        &format!("/api/v1/scans/{id}/label"),
        Some(&token),
        Some(json!({"label": predicted, "reviewer": "rv-1"})),
    );
    assert_eq!((status, answer["error"].as_str()), (403, Some("reviewer_mismatch")), "{answer}");
    let (status, answer) =
        api.json("POST", &format!("/api/v1/scans/{id}/label"), Some(&token), Some(json!({"label": predicted})));
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["revision"], 1);
    let events =
        rig.sub.wait_until(MINUTE, |m| events(m).iter().any(|e| e["kind"] == "label_accepted"), "the verdict's event");
    let accepted = common::events(&events).into_iter().find(|e| e["kind"] == "label_accepted").unwrap();
    assert_eq!(accepted["reviewer"], "rv-2");
    let (status, bad) =
        api.json("POST", &format!("/api/v1/scans/{id}/label"), Some(&token), Some(json!({"label": "GLAUCOMA"})));
    assert_eq!((status, bad["code"].as_str()), (422, Some("unknown_class")), "{bad}");
    let (_, scan) = api.json("GET", &format!("/api/v1/scans/{id}"), Some(&token), None);
    assert_eq!(scan["verdict"]["reviewer"], "rv-2", "{scan}");
    assert_eq!(scan["verdict"]["confirmed"], true);

    // Logout ends the session.
    let (status, _) = api.call("DELETE", "/api/v1/session", Some(&token), None);
    assert_eq!(status, 204);
    let (status, _) = api.call("GET", "/api/v1/scans", Some(&token), None);
    assert_eq!(status, 401);
    // So does a new password, or the reviewer's removal. (Pauses: this client has used its
    // burst of logins.)
    std::thread::sleep(Duration::from_millis(1100));
    let (_, session) =
        api.json("POST", "/api/v1/session", None, Some(json!({"reviewer": "rv-2", "password": PASSWORD})));
    let token = session["token"].as_str().unwrap_or_else(|| panic!("{session}")).to_string();
    assert_eq!(api.call("GET", &format!("/api/v1/scans/{id}"), Some(&token), None).0, 200);
    add_reviewer(&rig.octd.config, "rv-2", "a new long password here");
    let (status, answer) = api.json("GET", &format!("/api/v1/scans/{id}"), Some(&token), None);
    assert_eq!(status, 401, "{answer}");
    std::thread::sleep(Duration::from_millis(300));
    let (_, session) = api.json(
        "POST",
        "/api/v1/session",
        None,
        Some(json!({"reviewer": "rv-2", "password": "a new long password here"})),
    );
    let token = session["token"].as_str().unwrap().to_string();
    let removed = std::process::Command::new(env!("CARGO_BIN_EXE_octd"))
        .arg("--config")
        .arg(&rig.octd.config)
        .args(["reviewer", "remove", "rv-2"])
        .output()
        .unwrap();
    assert!(removed.status.success());
    assert_eq!(api.call("GET", "/api/v1/scans", Some(&token), None).0, 401, "a removed reviewer's session ends");
    assert!(rig.octd.stop().success());
}

#[test]
fn off_loopback_the_api_speaks_https_only() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    let dir = rig.dir.path().to_path_buf();
    // Clear text on the network is a configuration error.
    let config = std::fs::read_to_string(&rig.octd.config).unwrap();
    let loopback = "listen = \"\"".to_string();
    assert!(config.contains(&loopback));
    let plain = config.replace(&loopback, &format!("listen = \"0.0.0.0:{}\"", free_port()));
    std::fs::write(&rig.octd.config, &plain).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_octd"))
        .arg("--config")
        .arg(&rig.octd.config)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(!check.status.success(), "a clear-text listener off loopback is refused");
    assert!(String::from_utf8_lossy(&check.stderr).contains("tls_cert"), "{}", String::from_utf8_lossy(&check.stderr));

    // With a certificate: HTTPS answers, clear text does not.
    let (cert, key) = (dir.join("display.pem"), dir.join("display.key"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=octd-test", "-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    match made {
        Ok(out) if out.status.success() => {}
        _ => {
            eprintln!("SKIPPED: openssl cannot make a test certificate");
            return;
        }
    }
    let port = free_port();
    let with_tls = config.replace(
        &loopback,
        &format!("listen = \"0.0.0.0:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"", cert.display(), key.display()),
    );
    std::fs::write(&rig.octd.config, with_tls).unwrap();
    add_reviewer(&rig.octd.config, "rv-1", PASSWORD);
    rig.octd.start();
    rig.octd.wait_ready();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let https = Client {
        base: format!("https://127.0.0.1:{port}"),
        http: reqwest::Client::builder().add_root_certificate(root).timeout(Duration::from_secs(30)).build().unwrap(),
        runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
    };
    let (status, session) =
        https.json("POST", "/api/v1/session", None, Some(json!({"reviewer": "rv-1", "password": PASSWORD})));
    assert_eq!(status, 201, "{session}");
    let clear = https.runtime.block_on(async {
        reqwest::Client::new().get(format!("http://127.0.0.1:{port}/api/v1/scans")).send().await.map(|r| r.status())
    });
    assert!(clear.is_err(), "no clear-text answer: {clear:?}");
    assert!(rig.octd.stop().success());
}
