//! Publishing: drain the durable outbox to MQTT in order, QoS 1, and remove a message only
//! when its PUBACK arrives. rumqttc keeps unacknowledged publishes in memory only, so each
//! connection gets a fresh client and everything not yet acknowledged is sent again from
//! the outbox: at-least-once, in order, across broker and daemon restarts.

pub mod broker;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch, Notify};

pub use broker::EmbeddedBroker;

use crate::config::{Config, MqttConfig};
use crate::mqtt::{status_payload, BrokerAddress, Topics};
use crate::scan::ModelStamp;
use crate::store::{OutboxMessage, Store};

/// The active model's stamp, for the retained status (the publisher knows nothing else of
/// models).
pub type ModelStampSource = Arc<dyn Fn() -> Option<ModelStamp> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    #[error("MQTT settings: {0}")]
    Settings(String),
    #[error("embedded broker: {0}")]
    Broker(String),
}

/// Connection settings for the configured broker, or the embedded one.
pub fn mqtt_options(config: &Config, will_payload: String) -> Result<MqttOptions, PublishError> {
    connection_options(config, config.client_id(), Some(will_payload))
}

/// The same broker and credentials under another client id, with or without a last will
/// (a probe such as `octd doctor` must neither take over the daemon's session nor leave an
/// "offline" will behind).
pub fn connection_options(
    config: &Config,
    client_id: String,
    will_payload: Option<String>,
) -> Result<MqttOptions, PublishError> {
    let mqtt: &MqttConfig = &config.mqtt;
    let address = if mqtt.url.is_empty() {
        BrokerAddress { tls: false, host: mqtt.embedded_listen.ip().to_string(), port: mqtt.embedded_listen.port() }
    } else {
        BrokerAddress::parse(&mqtt.url).map_err(PublishError::Settings)?
    };
    let mut options = MqttOptions::new(client_id, address.host, address.port);
    options
        .set_keep_alive(mqtt.keep_alive.max(Duration::from_secs(5)))
        .set_clean_session(true)
        .set_inflight(mqtt.max_inflight)
        .set_request_channel_capacity(usize::from(mqtt.max_inflight) + 8)
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(payload) = will_payload {
        options.set_last_will(LastWill::new(config.topics().status(), payload, QoS::AtLeastOnce, true));
    }
    if let (Some(user), password) = (&mqtt.username, &mqtt.password) {
        options.set_credentials(user.clone(), password.clone().unwrap_or_default());
    }
    if address.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| PublishError::Settings(format!("cannot read {}: {e}", p.display())))
        };
        let ca_path =
            mqtt.ca_file.as_deref().ok_or_else(|| PublishError::Settings("mqtts needs mqtt.ca_file".into()))?;
        let client_auth = match (&mqtt.client_cert, &mqtt.client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        options.set_transport(Transport::Tls(TlsConfiguration::Simple { ca: read(ca_path)?, alpn: None, client_auth }));
    }
    Ok(options)
}

pub struct Publisher {
    store: Arc<Store>,
    config: Config,
    topics: Topics,
    wake: Arc<Notify>,
    model: ModelStampSource,
    /// Model notices from the cloud go to the updater; a full channel means a check is
    /// already due, so extra notices are dropped.
    notices: mpsc::Sender<()>,
    /// True while a connection is up (metrics, readiness).
    connected: Arc<std::sync::atomic::AtomicBool>,
    started: std::time::Instant,
    /// Reviewers' verdicts go to the feedback task (None: `feedback.mqtt_labels` is off), and
    /// those its full queue cannot take are counted for its summary.
    verdicts: Option<(mpsc::Sender<crate::feedback::Incoming>, Arc<crate::feedback::LoadRefusals>)>,
}

/// Publishes of one connection, in the order handed to rumqttc.
struct Session {
    client: AsyncClient,
    /// Handed to the client, pkid not yet known (`None` = the status message).
    queued: VecDeque<Option<u64>>,
    /// Sent, waiting for PUBACK.
    inflight: HashMap<u16, Option<u64>>,
    /// Highest outbox sequence number handed to the client in this session.
    last_queued: u64,
}

impl Publisher {
    pub fn new(
        store: Arc<Store>,
        config: Config,
        wake: Arc<Notify>,
        model: ModelStampSource,
        notices: mpsc::Sender<()>,
    ) -> Self {
        let topics = config.topics();
        Publisher {
            store,
            config,
            topics,
            wake,
            model,
            notices,
            connected: Default::default(),
            started: std::time::Instant::now(),
            verdicts: None,
        }
    }

    /// Subscribe to the verdicts topic and hand what arrives to the feedback task.
    pub fn with_verdicts(
        mut self,
        verdicts: mpsc::Sender<crate::feedback::Incoming>,
        refused: Arc<crate::feedback::LoadRefusals>,
    ) -> Self {
        self.verdicts = Some((verdicts, refused));
        self
    }

    /// A verdict arrived on MQTT: to the feedback task, or counted as refused (`busy`, in the
    /// feedback task's summary) when its queue is full. A retained verdict is a replay of an
    /// old one at every subscription, never a new verdict: ignored.
    fn forward_verdict(&self, scan_id: &str, payload: &[u8], retained: bool) {
        let Some((verdicts, refused)) = &self.verdicts else { return };
        if retained {
            tracing::warn!("a retained verdict was ignored: verdicts must be published without retain");
            return;
        }
        let incoming = crate::feedback::Incoming {
            scan_id: scan_id.to_string(),
            // Oversized payloads are refused by the feedback task; only a bounded prefix travels.
            payload: payload[..payload.len().min(self.config.feedback.max_payload_bytes + 1)].to_vec(),
            source: crate::feedback::Source::Mqtt,
        };
        if verdicts.try_send(incoming).is_err() {
            refused.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Report the connection state through `flag`.
    pub fn with_connection_flag(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.connected = flag;
        self
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, std::sync::atomic::Ordering::Relaxed);
    }

    fn status_payload(&self, state: &'static str) -> String {
        status_payload(&self.topics, state, (self.model)().as_ref())
    }

    /// Runs until `shutdown` turns true; then says goodbye on the status topic.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), PublishError> {
        let options = mqtt_options(&self.config, self.status_payload("offline"))?;
        let capacity = usize::from(self.config.mqtt.max_inflight) + 8;
        let mut last_failure = None;
        while !*shutdown.borrow() {
            let (client, eventloop) = AsyncClient::new(options.clone(), capacity);
            let session = Session { client, queued: VecDeque::new(), inflight: HashMap::new(), last_queued: 0 };
            let ended_by_shutdown = self.connection(session, eventloop, &mut shutdown, &mut last_failure).await;
            self.set_connected(false);
            if ended_by_shutdown {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.mqtt.reconnect_delay) => {}
                _ = shutdown.changed() => {}
            }
        }
        Ok(())
    }

    /// One connection's life. Returns true when it ended because of shutdown.
    async fn connection(
        &self,
        mut session: Session,
        mut eventloop: EventLoop,
        shutdown: &mut watch::Receiver<bool>,
        last_failure: &mut Option<String>,
    ) -> bool {
        let mut connected = false;
        // PUBACKs not yet recorded, and the commit recording the previous ones: acks that
        // arrive while it runs go into the next one together (group commit), and the event
        // loop keeps serving the connection meanwhile.
        let mut acked: Vec<u64> = Vec::new();
        let mut recording: Option<tokio::task::JoinHandle<Result<(), crate::store::StoreError>>> = None;
        loop {
            tokio::select! {
                done = async {
                    match recording.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                }, if recording.is_some() => {
                    recording = None;
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "cannot record PUBACKs; those messages will be sent again"),
                        Err(e) => tracing::error!(error = %e, "PUBACK task failed"),
                    }
                    if !acked.is_empty() {
                        let (store, seqs) = (self.store.clone(), std::mem::take(&mut acked));
                        recording = Some(tokio::task::spawn_blocking(move || store.acknowledge_all(&seqs)));
                    }
                    self.fill(&mut session).await;
                }
                _ = shutdown.changed() => {
                    self.record_acks(recording.take(), std::mem::take(&mut acked)).await;
                    if connected {
                        self.goodbye(&session, &mut eventloop).await;
                    }
                    return true;
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        self.set_connected(true);
                        *last_failure = None;
                        tracing::info!("connected to MQTT broker");
                        let status = self.status_payload("online");
                        if session.client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, status).is_ok() {
                            session.queued.push_back(None);
                        }
                        for topic in [self.topics.fleet_model_notice(), self.topics.model_notice()] {
                            let _ = session.client.try_subscribe(topic, QoS::AtLeastOnce);
                        }
                        if self.verdicts.is_some() {
                            let _ = session.client.try_subscribe(self.topics.labels(), QoS::AtLeastOnce);
                        }
                        self.fill(&mut session).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(notice))) => {
                        if notice.topic == self.topics.fleet_model_notice() || notice.topic == self.topics.model_notice() {
                            let _ = self.notices.try_send(());
                        } else if let Some(scan_id) = self.topics.label_scan(&notice.topic) {
                            self.forward_verdict(scan_id, &notice.payload, notice.retain);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(seq) = session.queued.pop_front() {
                            session.inflight.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(Some(seq)) = session.inflight.remove(&ack.pkid) {
                            acked.push(seq);
                            if recording.is_none() {
                                let (store, seqs) = (self.store.clone(), std::mem::take(&mut acked));
                                recording = Some(tokio::task::spawn_blocking(move || store.acknowledge_all(&seqs)));
                            }
                        }
                        self.fill(&mut session).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let failure = e.to_string();
                        if connected {
                            tracing::warn!(error = %failure, "MQTT connection lost; unacknowledged messages stay in the outbox");
                        } else if self.config.mqtt.url.is_empty() && self.started.elapsed() < Duration::from_secs(3) {
                            // The embedded broker's threads are still opening their listener.
                            tracing::debug!(error = %failure, "embedded broker not listening yet");
                            return false;
                        } else if last_failure.as_deref() != Some(failure.as_str()) {
                            // Once per distinct failure: a refused login or a bad certificate
                            // must be visible without a log line every second.
                            tracing::error!(error = %failure, "cannot connect to the MQTT broker (check mqtt.url, credentials and TLS files); retrying");
                        } else {
                            tracing::debug!(error = %failure, "MQTT broker still not reachable");
                        }
                        *last_failure = Some(failure);
                        self.record_acks(recording.take(), std::mem::take(&mut acked)).await;
                        return false;
                    }
                },
                _ = self.wake.notified(), if connected => self.fill(&mut session).await,
            }
        }
    }

    /// Finish recording PUBACKs before the connection ends: what the broker acknowledged is
    /// not sent again.
    async fn record_acks(
        &self,
        recording: Option<tokio::task::JoinHandle<Result<(), crate::store::StoreError>>>,
        acked: Vec<u64>,
    ) {
        if let Some(task) = recording {
            let _ = task.await;
        }
        if acked.is_empty() {
            return;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.acknowledge_all(&acked)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record PUBACKs; those messages will be sent again"),
            Err(e) => tracing::error!(error = %e, "PUBACK task failed"),
        }
    }

    /// Hand the client as many outbox messages as the in-flight window allows.
    async fn fill(&self, session: &mut Session) {
        let window = usize::from(self.config.mqtt.max_inflight);
        let busy = session.queued.len() + session.inflight.len();
        if busy >= window {
            return;
        }
        let store = self.store.clone();
        let after = session.last_queued;
        let room = window - busy;
        let batch = match tokio::task::spawn_blocking(move || store.outbox_after(after, room)).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the outbox");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "outbox task failed");
                return;
            }
        };
        for (seq, OutboxMessage { topic, payload, retain, .. }) in batch {
            if session.client.try_publish(topic, QoS::AtLeastOnce, retain, payload).is_err() {
                break; // request channel full; the next PUBACK or wake-up continues
            }
            session.queued.push_back(Some(seq));
            session.last_queued = seq;
        }
    }

    /// Mark the device offline (retained) before a clean disconnect, which suppresses the
    /// Last Will.
    async fn goodbye(&self, session: &Session, eventloop: &mut EventLoop) {
        let _ =
            session.client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, self.status_payload("offline"));
        let _ = session.client.try_disconnect();
        let drain = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
}
