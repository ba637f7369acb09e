//! MQTT over TLS with username and password against a real Mosquitto: the configured device
//! gets its results through; a device with the wrong password gets nothing through.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    drop_file, free_port, mosquitto_available, results, shared_oct_images, Mosquitto, Octd, OctdOptions, Subscriber,
};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A throw-away CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certificates(dir: &Path) {
    let p = |name: &str| dir.join(name);
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=octd test CA"])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(p("san.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("san.cnf"))
        .arg("-out")
        .arg(p("server.pem")));
}

#[test]
fn tls_and_credentials_are_used_and_enforced() {
    let Some(images) = shared_oct_images() else { return };
    if !mosquitto_available() {
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIP: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certificates(&certs);
    run(Command::new("mosquitto_passwd").args(["-c", "-b"]).arg(certs.join("passwd")).args(["octd", "s3cret-pass"]));
    let tls_port = free_port();
    let broker = Mosquitto::start_with(
        &dir.path().join("broker"),
        &format!(
            "listener {tls_port} 127.0.0.1\nallow_anonymous false\npassword_file {0}/passwd\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
            certs.display()
        ),
    );
    // The test listens on the plain listener; the devices must use TLS.
    let sub = Subscriber::connect(broker.port, "oct/#");
    let tls = |password: &str| {
        format!("username = \"octd\"\npassword = \"{password}\"\nca_file = \"{}\"\n", certs.join("ca.pem").display())
    };
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let mut good = Octd::new(
        &dir.path().join("good"),
        OctdOptions { broker_url: url.clone(), workers: 1, extra: tls("s3cret-pass"), channel: None },
    );
    let mut intruder = Octd::new(
        &dir.path().join("intruder"),
        OctdOptions { broker_url: url, workers: 1, extra: tls("wrong"), channel: None },
    );
    let config = std::fs::read_to_string(&intruder.config).unwrap();
    std::fs::write(&intruder.config, config.replace("id = \"test-device\"", "id = \"intruder\"")).unwrap();
    good.start();
    intruder.start();
    drop_file(&good.inbox, "scan.jpeg", &std::fs::read(&images[0].0).unwrap());
    drop_file(&intruder.inbox, "scan.jpeg", &std::fs::read(&images[1].0).unwrap());
    let messages = sub.wait_until(Duration::from_secs(60), |m| results(m).len() == 1, "the good device's result");
    std::thread::sleep(Duration::from_secs(3));
    let all = sub.messages();
    assert!(all.iter().all(|m| !m.topic.contains("/intruder/")), "nothing gets through with a wrong password");
    assert!(messages.iter().any(|m| m.topic == "oct/test-site/test-device/status" && m.payload.contains("online")));
    assert!(good.stop().success());
    assert!(intruder.stop().success());
    let log = intruder.log();
    assert_eq!(log.matches("cannot connect to the MQTT broker").count(), 1, "said once, clearly:\n{log}");
}
