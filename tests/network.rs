//! The surfaces octd opens on the network are bounded: the embedded broker stays on
//! loopback, takes only octd's login when one is set, and a client flooding it exhausts the
//! broker's own process, not octd's; the telemetry endpoint keeps answering, and the
//! pipeline keeps its pace, under a flood of requests and of idle connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{drop_file, free_port, results, shared_oct_images, Octd, OctdOptions, Subscriber};

fn octd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_octd"))
}

#[test]
fn config_check_refuses_an_embedded_broker_off_loopback_and_prints_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("octd.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nstate_dir = \"{}\"\n[mqtt]\nembedded_listen = \"0.0.0.0:1883\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let out = octd().arg("--config").arg(&config).args(["config", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "a configuration error systemd does not restart on");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mqtt.embedded_listen") && stderr.contains("loopback"), "{stderr}");

    let out = octd()
        .arg("--config")
        .arg(&config)
        .args(["config", "check"])
        .env("OCTD_MQTT__EMBEDDED_LISTEN", "127.0.0.1:1883")
        .env("OCTD_MQTT__USERNAME", "octd")
        .env("OCTD_MQTT__PASSWORD", "correct-horse-battery-staple")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = [out.stdout, out.stderr].concat();
    let text = String::from_utf8_lossy(&all);
    assert!(!text.contains("correct-horse-battery-staple"), "config check printed the password:\n{text}");
    assert!(text.contains("<redacted>"), "{text}");
}

/// Connect and publish `count` retained messages of `size` bytes to distinct topics; how
/// many the broker took before the connection broke.
fn flood_retained(port: u16, login: (&str, &str), count: usize, size: usize) -> usize {
    let mut options = rumqttc::MqttOptions::new(format!("flood-{}", free_port()), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5)).set_credentials(login.0, login.1);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 10);
    let publisher = std::thread::spawn(move || {
        let payload = vec![b'x'; size];
        for i in 0..count {
            if client.publish(format!("flood/{i}"), rumqttc::QoS::AtLeastOnce, true, payload.clone()).is_err() {
                break;
            }
        }
    });
    let mut acked = 0;
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                acked += 1;
                if acked == count {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(connection);
    let _ = publisher.join();
    acked
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_embedded_broker_takes_only_octds_login_and_a_flooding_client_costs_only_its_process() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut octd = Octd::new(
        dir.path(),
        OctdOptions {
            broker_url: String::new(),
            workers: 1,
            extra: format!(
                "embedded_listen = \"127.0.0.1:{port}\"\nusername = \"octd\"\npassword = \"broker-pass\"\n\
                 embedded_memory_bytes = 134217728\n"
            ),
            channel: None,
        },
    );
    octd.start();
    octd.wait_ready();
    let pid = octd.pid().unwrap();

    // No login, or a wrong one: refused.
    for login in [None, Some(("octd", "wrong"))] {
        let mut options = rumqttc::MqttOptions::new(format!("intruder-{}", free_port()), "127.0.0.1", port);
        if let Some((u, p)) = login {
            options.set_credentials(u, p);
        }
        let (_client, mut connection) = rumqttc::Client::new(options, 10);
        let first = connection.iter().find(|e| !matches!(e, Ok(rumqttc::Event::Outgoing(_))));
        let accepted = matches!(
            first,
            Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ref ack))))
                if ack.code == rumqttc::ConnectReturnCode::Success
        );
        assert!(!accepted, "the embedded broker accepted a client without octd's login ({login:?})");
    }

    let sub = Subscriber::connect_with(port, "oct/#", Some(("octd", "broker-pass")));
    drop_file(&octd.inbox, "before.jpeg", &std::fs::read(&images[0].0).unwrap());
    sub.wait_until(Duration::from_secs(60), |m| results(m).len() == 1, "a result before the flood");
    drop(sub);

    // 600 retained messages of 250 kB: 150 MB, more than the broker's 128 MiB.
    let taken = flood_retained(port, ("octd", "broker-pass"), 600, 250_000);
    assert!(taken < 600, "the broker kept all {taken} retained messages: it is not bounded");
    octd.wait_log("the broker process exhausted and restarted", |log| log.contains("embedded MQTT broker exited"));
    assert_eq!(octd.pid(), Some(pid), "octd itself is still running");
    assert!(rss_kib(pid) < 400 * 1024, "octd's own memory grew with the flood: {} KiB", rss_kib(pid));

    // The restarted broker serves results again, with octd's login.
    let sub = Subscriber::connect_with(port, "oct/#", Some(("octd", "broker-pass")));
    drop_file(&octd.inbox, "after.jpeg", &std::fs::read(&images[1].0).unwrap());
    sub.wait_until(Duration::from_secs(60), |m| !results(m).is_empty(), "a result after the flood");
    assert!(octd.stop().success());
}

#[test]
fn the_telemetry_endpoint_answers_and_the_pipeline_keeps_its_pace_under_a_flood() {
    let Some(mut rig) = common::Rig::new(1, "oct/#") else { return };
    rig.octd.start();
    rig.octd.wait_ready();
    let port = rig.octd.telemetry_port;
    // Idle connections that never finish their headers.
    let idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            let _ = s.write_all(b"GET /status HTTP/1.1\r\n");
            Some(s)
        })
        .collect();
    // And a flood of status and metrics requests from 32 clients.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let codes = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let flooders: Vec<_> = (0..32)
        .map(|i| {
            let (stop, codes) = (stop.clone(), codes.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let path = if i % 2 == 0 { "/status" } else { "/metrics" };
                    if let Some((code, _)) = common::http_get(port, path) {
                        *codes.lock().unwrap().entry(code).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        drop_file(&rig.octd.inbox, &format!("scan-{i}.jpeg"), &rig.image(i));
    }
    rig.sub.wait_until(Duration::from_secs(60), |m| results(m).len() == 3, "results during the flood");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let codes = codes.lock().unwrap().clone();
    assert!(codes.get(&200).copied().unwrap_or(0) > 0, "{codes:?}");
    assert!(codes.keys().all(|c| *c == 200 || *c == 503), "only answers or 'busy': {codes:?}");
    // The idle connections were closed by the header timeout or refused by the cap; the
    // endpoint still answers now.
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        if s.read(&mut buf).is_ok() {
            closed += 1;
        }
    }
    assert_eq!(closed, 100, "every idle connection is closed, not held open");
    assert_eq!(rig.octd.http_get("/healthz").map(|(c, _)| c), Some(200));
    assert!(rig.octd.stop().success());
}
