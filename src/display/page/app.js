// The reading room: a triage worklist from octd's API, kept live over MQTT (WebSockets),
// and a scan view where a reviewer confirms or corrects each result by keyboard.
// Everything shown comes from this device's authenticated API or its broker; nothing is
// fetched from elsewhere. The session token lives in sessionStorage: it ends with the tab.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN = "octd-token";
const PRIORITY_NAME = { urgent: "urgent", follow_up: "follow-up", routine: "routine" };

const state = {
  settings: null,
  scans: new Map(), // scan_id -> the API's view of it
  selected: null,
  frame: 0,
  imageUrl: null,
  mqtt: null,
  poll: null,
  sending: false, // a verdict is on its way: no second one until it is answered
  imageAbort: null,
  imageTimer: null,
  modelVersion: null,
  heatmapUrl: null,
  heatmapFor: null, // the scan whose heatmap is loaded
  lastVerdict: null, // the scan of this reviewer's last verdict here, for undo
  asked: 0, // requests for scan data sent so far (see ask())
  listAsked: 0, // the number of the latest list request
  scanAsked: new Map(), // scan_id -> the number of the latest request for that scan alone
};

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN);
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401 && path !== "/api/v1/session") {
    sessionStorage.removeItem(TOKEN);
    showLogin("Your session has ended: log in again.");
    throw new Unauthorized();
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.message || body.detail || body.code || body.error || response.statusText;
  } catch (_) {
    return response.statusText;
  }
}

// ---- login ----

function showLogin(message) {
  stopLive();
  $("app-view").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = message || "";
  $("login-password").value = "";
  $("login-reviewer").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  const response = await api("/api/v1/session", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ reviewer: $("login-reviewer").value.trim(), password: $("login-password").value }),
  });
  if (response.status !== 201) {
    $("login-error").textContent = await errorText(response);
    $("login-password").value = "";
    return;
  }
  const session = await response.json();
  sessionStorage.setItem(TOKEN, session.token);
  await start();
});

$("logout").addEventListener("click", async () => {
  try {
    await api("/api/v1/session", { method: "DELETE" });
  } catch (_) {}
  sessionStorage.removeItem(TOKEN);
  state.scans.clear();
  state.scanAsked.clear();
  state.selected = null;
  showLogin("Logged out.");
});

// ---- the worklist ----

function byTriage(a, b) {
  const rank = (s) => s.priority_rank || 9;
  return rank(a) - rank(b) || a.received_at.localeCompare(b.received_at) || a.scan_id.localeCompare(b.scan_id);
}

function visibleScans() {
  const unreviewed = $("f-unreviewed").checked;
  const urgent = $("f-urgent").checked;
  const review = $("f-review").checked;
  const model = $("f-model").value;
  return [...state.scans.values()]
    .filter((s) => s.label)
    .filter((s) => !unreviewed || !s.verdict)
    .filter((s) => !urgent || s.priority === "urgent")
    .filter((s) => !review || s.needs_review)
    .filter((s) => !model || (s.model && s.model.version === model))
    .sort(byTriage);
}

function renderWorklist() {
  const list = $("worklist");
  const scans = visibleScans();
  list.replaceChildren(
    ...scans.map((s) => {
      const li = document.createElement("li");
      li.dataset.scanId = s.scan_id;
      li.className = s.priority || "";
      li.setAttribute("role", "option");
      li.setAttribute("aria-selected", String(s.scan_id === state.selected));
      const label = document.createElement("strong");
      label.textContent = s.label;
      const priority = document.createElement("span");
      priority.textContent = PRIORITY_NAME[s.priority] || s.priority || "";
      const flag = document.createElement("span");
      flag.className = s.verdict ? "done" : "muted";
      flag.textContent = s.verdict ? "✓ " + s.verdict.label : s.needs_review ? "needs review" : "";
      const when = document.createElement("span");
      when.className = "when";
      when.textContent = new Date(s.received_at).toLocaleString() + (s.frames > 1 ? " · volume, " + s.frames + " B-scans" : "");
      li.append(label, priority, flag, when);
      li.addEventListener("click", () => select(s.scan_id));
      return li;
    })
  );
  $("worklist-empty").hidden = scans.length > 0;
  const versions = new Set([...state.scans.values()].map((s) => s.model && s.model.version).filter(Boolean));
  const picker = $("f-model");
  const known = new Set([...picker.options].map((o) => o.value));
  for (const v of versions) {
    if (!known.has(v)) picker.append(new Option(v, v));
  }
}

for (const id of ["f-unreviewed", "f-urgent", "f-review", "f-model"]) {
  $(id).addEventListener("change", renderWorklist);
}

// Answers can arrive out of order: a list asked for before a verdict can come back after the
// scan's own refresh that the verdict's event caused, and would put the reviewed scan back on
// the worklist. Every request is numbered when it is sent, and a scan takes data only from the
// latest request sent about it; a request sent after an event is answered with data at least
// as new as that event, so the last answer applied is never older than the last event.
function ask() {
  state.asked += 1;
  return state.asked;
}

function latestAbout(id, asked) {
  return asked >= Math.max(state.listAsked, state.scanAsked.get(id) || 0);
}

async function loadScans() {
  const asked = ask();
  state.listAsked = asked;
  const response = await api("/api/v1/scans?limit=500");
  if (!response.ok) return;
  const body = await response.json();
  for (const scan of body.scans) {
    if (latestAbout(scan.scan_id, asked)) state.scans.set(scan.scan_id, scan);
  }
  renderWorklist();
  if (state.selected && state.scans.has(state.selected)) renderScan();
}

async function refreshScan(id) {
  const asked = ask();
  state.scanAsked.set(id, asked);
  const response = await api("/api/v1/scans/" + encodeURIComponent(id));
  if (!response.ok) return;
  const scan = await response.json();
  if (!latestAbout(scan.scan_id, asked)) return;
  state.scans.set(scan.scan_id, scan);
  renderWorklist();
  if (state.selected === scan.scan_id) renderScan();
}

function move(step) {
  const scans = visibleScans();
  if (!scans.length) return;
  const at = scans.findIndex((s) => s.scan_id === state.selected);
  const next = at < 0 ? 0 : Math.min(scans.length - 1, Math.max(0, at + step));
  select(scans[next].scan_id);
}

// ---- the scan view ----

function select(id) {
  if (state.selected !== id) {
    state.selected = id;
    const scan = state.scans.get(id);
    state.frame = (scan && scan.most_suspicious_frame) || 0;
    $("comment").value = "";
    $("verdict-state").textContent = "";
    $("identity").hidden = true;
    $("identity").replaceChildren();
    loadImage();
    loadHeatmap();
  }
  renderWorklist();
  renderScan();
  const li = document.querySelector(`#worklist li[data-scan-id="${CSS.escape(id)}"]`);
  if (li) li.scrollIntoView({ block: "nearest" });
}

// Debounced while scrubbing; a newer choice cancels the older request.
function loadImage() {
  clearTimeout(state.imageTimer);
  state.imageTimer = setTimeout(fetchImage, 60);
}

async function fetchImage(attempt = 0) {
  const id = state.selected;
  const frame = state.frame;
  if (!id) return;
  if (state.imageAbort) state.imageAbort.abort();
  const abort = new AbortController();
  state.imageAbort = abort;
  const current = () => id === state.selected && frame === state.frame;
  let blob;
  try {
    const response = await api(`/api/v1/scans/${encodeURIComponent(id)}/frame?n=${frame}`, { signal: abort.signal });
    if (!current()) return;
    if (response.status === 503 && attempt < 5) {
      setTimeout(() => current() && fetchImage(attempt + 1), 300 * (attempt + 1));
      return;
    }
    if (!response.ok) {
      $("scan-image").removeAttribute("src");
      $("scan-image").alt = await errorText(response);
      return;
    }
    blob = await response.blob();
  } catch (_) {
    return; // aborted for a newer choice, or the session ended
  }
  if (!current()) return;
  const url = URL.createObjectURL(blob);
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = url;
  $("scan-image").src = url;
  $("scan-image").alt = `de-identified B-scan ${frame + 1}`;
  $("scan-image").dataset.frame = String(frame);
}

async function loadHeatmap() {
  const id = state.selected;
  const scan = state.scans.get(id);
  $("heatmap-image").hidden = true;
  if (state.heatmapUrl) URL.revokeObjectURL(state.heatmapUrl);
  state.heatmapUrl = null;
  state.heatmapFor = null;
  if (!scan || scan.heatmap_frame === null || scan.heatmap_frame === undefined) return;
  let blob;
  try {
    const response = await api(`/api/v1/scans/${encodeURIComponent(id)}/heatmap`);
    if (!response.ok) return;
    blob = await response.blob();
  } catch (_) {
    return;
  }
  if (id !== state.selected) return;
  state.heatmapUrl = URL.createObjectURL(blob);
  state.heatmapFor = id;
  $("heatmap-image").src = state.heatmapUrl;
  renderHeatmap();
}

function renderHeatmap() {
  const scan = state.scans.get(state.selected);
  const has = Boolean(scan && scan.heatmap_frame !== null && scan.heatmap_frame !== undefined);
  $("heatmap-note").hidden = has;
  $("heatmap-note").textContent =
    state.settings && state.settings.heatmap
      ? "No heatmap for this scan (classified by a model without one)."
      : "No heatmap is available for this model.";
  $("heatmap-controls").hidden = !has;
  if (!has) return;
  $("heatmap-class").textContent = scan.label;
  $("heatmap-frame").textContent = String(scan.heatmap_frame + 1);
  const img = $("heatmap-image");
  img.style.opacity = String(Number($("heatmap-opacity").value) / 100);
  img.hidden = !($("heatmap-on").checked && state.heatmapFor === scan.scan_id && state.frame === scan.heatmap_frame);
}

$("heatmap-on").addEventListener("change", renderHeatmap);
$("heatmap-opacity").addEventListener("input", renderHeatmap);

// The classes verdicts may name, in the order of the bars and of the digit keys.
function classList(scan) {
  const loaded = state.settings && state.settings.classes;
  if (loaded && loaded.length) return loaded;
  return Object.keys((scan && scan.probabilities) || {});
}

const REASON_TEXT = {
  low_confidence: "low confidence",
  input_unlike_training: "unlike the training images (a condition or input the model never learned)",
};

function renderScan() {
  const scan = state.scans.get(state.selected);
  $("scan-none").hidden = Boolean(scan);
  $("scan-detail").hidden = !scan;
  if (!scan) return;
  $("scan-label").textContent = scan.label || "(no result yet)";
  $("scan-priority").textContent = PRIORITY_NAME[scan.priority] || "";
  $("scan-review").hidden = !scan.needs_review;
  const reasons = (scan.review_reasons || []).map((r) => REASON_TEXT[r] || r);
  if (typeof scan.unlike_training_score === "number" && (scan.review_reasons || []).includes("input_unlike_training")) {
    reasons.push(`unlikeness score ${scan.unlike_training_score.toFixed(2)}`);
  }
  $("scan-review").textContent = "needs review: " + reasons.join(", ");
  $("scan-id").textContent = scan.scan_id;
  $("scan-received").textContent = new Date(scan.received_at).toLocaleString();
  $("scan-model").textContent = scan.model ? `${scan.model.name} ${scan.model.version} (${scan.model.backend})` : "";
  const frames = scan.frames || 1;
  $("slices").hidden = frames < 2;
  $("slice").max = String(frames - 1);
  $("slice").value = String(state.frame);
  $("slice-out").textContent = `${state.frame + 1} / ${frames}`;
  $("slice-suspicious").textContent = String((scan.most_suspicious_frame || 0) + 1);
  renderHeatmap();

  const bars = $("bars");
  bars.replaceChildren();
  $("bars-note").hidden = frames < 2;
  const classes = classList(scan);
  for (const c of classes) {
    const p = (scan.probabilities || {})[c] || 0;
    const name = document.createElement("span");
    name.textContent = c;
    const track = document.createElement("div");
    track.className = "bar-track";
    track.setAttribute("role", "meter");
    track.setAttribute("aria-label", c);
    track.setAttribute("aria-valuenow", p.toFixed(3));
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    const value = document.createElement("span");
    value.textContent = (100 * p).toFixed(1) + " %";
    bars.append(name, track, value);
  }

  const buttons = $("class-buttons");
  buttons.replaceChildren(
    ...classes.map((c, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.label = c;
      const key = document.createElement("kbd");
      key.textContent = String(i + 1);
      b.append(key, " " + c);
      b.addEventListener("click", () => verdict(c));
      return b;
    })
  );
  if (scan.verdict) {
    $("verdict-state").textContent =
      `${scan.verdict.confirmed ? "Confirmed" : "Corrected to"} ${scan.verdict.label} by ${scan.verdict.reviewer} (revision ${scan.verdict.revision})`;
  }
}

$("slice").addEventListener("input", () => {
  state.frame = Number($("slice").value);
  renderScan();
  loadImage();
});

function randomId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "web-" + [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function verdict(label) {
  const scan = state.scans.get(state.selected);
  if (!scan || !scan.label || state.sending) return;
  state.sending = true;
  try {
    await sendVerdict(scan, label);
  } finally {
    state.sending = false;
  }
}

async function sendVerdict(scan, label) {
  label = label || scan.label;
  const body = { label, verdict_id: randomId() };
  const comment = $("comment").value.trim();
  if (comment) body.comment = comment;
  $("verdict-state").textContent = "Sending…";
  const response = await api(`/api/v1/scans/${encodeURIComponent(scan.scan_id)}/label`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (response.status !== 201) {
    $("verdict-state").textContent = "Not stored: " + (await errorText(response));
    return;
  }
  const answer = await response.json();
  state.lastVerdict = scan.scan_id;
  $("undo").disabled = false;
  const current = visibleScans();
  const at = current.findIndex((s) => s.scan_id === scan.scan_id);
  await refreshScan(scan.scan_id);
  $("verdict-state").textContent = `${answer.code === "confirmed" ? "Confirmed" : "Corrected to"} ${label} (revision ${answer.revision})`;
  // On to the next scan of the list as it was, unless the reviewer has moved on already.
  if (state.selected !== scan.scan_id) return;
  const after = visibleScans();
  const next = after.find((s, i) => i >= at && s.scan_id !== scan.scan_id) || after[after.length - 1];
  if (next && next.scan_id !== scan.scan_id) select(next.scan_id);
}

$("confirm").addEventListener("click", () => verdict(null));

// Take back this reviewer's last verdict: a new revision restores the label in force before
// it, or none; the scan is opened again.
async function undo() {
  const id = state.lastVerdict;
  if (!id || state.sending) return;
  state.sending = true;
  try {
    const response = await api(`/api/v1/scans/${encodeURIComponent(id)}/label`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ undo: true, verdict_id: randomId() }),
    });
    const answer = await response.json().catch(() => ({}));
    if (response.status !== 201) {
      $("verdict-state").textContent = "Not undone: " + (answer.detail || answer.message || response.statusText);
      return;
    }
    state.lastVerdict = null;
    $("undo").disabled = true;
    await refreshScan(id);
    select(id);
    $("verdict-state").textContent =
      answer.code === "withdrawn" ? `Verdict taken back (revision ${answer.revision}): no verdict now` : `Undone: back to the verdict before (revision ${answer.revision})`;
  } finally {
    state.sending = false;
  }
}

$("undo").addEventListener("click", undo);

// The clinic's own identifiers, on this screen only: octd records each reveal.
async function reveal() {
  const id = state.selected;
  if (!id) return;
  const response = await api(`/api/v1/scans/${encodeURIComponent(id)}/identity`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: "{}",
  });
  const list = $("identity");
  list.replaceChildren();
  list.hidden = false;
  if (!response.ok) {
    const dt = document.createElement("dt");
    dt.textContent = "not shown";
    const dd = document.createElement("dd");
    dd.textContent = await errorText(response);
    list.append(dt, dd);
    return;
  }
  const body = await response.json();
  if (id !== state.selected) return;
  const rows = [["file name", body.original_name], ...Object.entries(body.identifiers || {})];
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    list.append(dt, dd);
  }
}

$("reveal").addEventListener("click", reveal);

// Uploads: a file picker, or files dropped anywhere on the page.
async function uploadFiles(files) {
  let done = 0;
  const refused = [];
  for (const file of files) {
    $("upload-state").textContent = `uploading ${done + 1} of ${files.length}…`;
    const response = await api("/api/v1/uploads", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: file,
    });
    if (response.status === 202) done += 1;
    else refused.push(await errorText(response));
  }
  $("upload-state").textContent =
    `${done} uploaded; results appear in the worklist` + (refused.length ? ` · ${refused.length} refused: ${refused[0]}` : "");
}

$("upload-input").addEventListener("change", () => {
  const files = [...$("upload-input").files];
  $("upload-input").value = "";
  if (files.length) uploadFiles(files);
});

let dragDepth = 0;
document.addEventListener("dragenter", (e) => {
  if ($("app-view").hidden || !e.dataTransfer || ![...e.dataTransfer.types].includes("Files")) return;
  dragDepth += 1;
  $("drop-overlay").hidden = false;
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) $("drop-overlay").hidden = true;
});
document.addEventListener("dragover", (e) => {
  if (!$("app-view").hidden) e.preventDefault();
});
document.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop-overlay").hidden = true;
  if ($("app-view").hidden || !e.dataTransfer) return;
  const files = [...e.dataTransfer.files];
  if (files.length) uploadFiles(files);
});

document.addEventListener("keydown", (event) => {
  if ($("app-view").hidden || event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  // A focused control keeps its own keys (Space ticks a filter, Enter presses a button).
  const target = event.target;
  const control =
    target instanceof HTMLInputElement || target instanceof HTMLButtonElement || target instanceof HTMLSelectElement ||
    target instanceof HTMLTextAreaElement || (target instanceof HTMLElement && target.isContentEditable);
  if (control) {
    if (event.key === "Escape") target.blur();
    if (event.key === "Enter" && target.id === "comment") {
      event.preventDefault();
      verdict(null);
    }
    return;
  }
  const classes = classList(state.scans.get(state.selected));
  if (event.key === "ArrowDown" || event.key === "j") move(1);
  else if (event.key === "ArrowUp" || event.key === "k") move(-1);
  else if (event.key === "Home") move(-Infinity);
  else if (event.key === "End") move(Infinity);
  else if (event.key === "Enter" || event.key === " ") verdict(null);
  else if (/^[1-9]$/.test(event.key) && Number(event.key) <= classes.length) verdict(classes[Number(event.key) - 1]);
  else if (event.key === "c") $("comment").focus();
  else if (event.key === "i") reveal();
  else if (event.key === "u") undo();
  else if (event.key === "h") {
    $("heatmap-on").checked = !$("heatmap-on").checked;
    renderHeatmap();
  }
  else if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
    const scan = state.scans.get(state.selected);
    if (!scan || (scan.frames || 1) < 2) return;
    state.frame = Math.min(scan.frames - 1, Math.max(0, state.frame + (event.key === "ArrowRight" ? 1 : -1)));
    renderScan();
    loadImage();
  } else return;
  event.preventDefault();
});

// ---- live: MQTT over WebSockets, the API as the catch-up ----

function setPill(id, text, tone) {
  $(id).textContent = text;
  $(id).className = "pill" + (tone ? " " + tone : "");
}

function onMessage(topic, payload) {
  let message;
  try {
    message = JSON.parse(new TextDecoder().decode(payload));
  } catch (_) {
    return;
  }
  const t = state.settings.topics;
  if (topic === t.status) {
    const model = message.model ? `${message.model.version} (${message.model.backend})` : "no model";
    const version = message.model ? message.model.version : null;
    if (state.modelVersion !== null && version !== state.modelVersion) refreshSettings();
    state.modelVersion = version;
    setPill("device-status", `${message.state} · ${model}`, message.state === "online" ? "good" : "bad");
  } else if (topic === t.quality) {
    const o = message.overall || {};
    const text = o.labels ? `accuracy ${(100 * o.accuracy).toFixed(1)} % (${o.labels} verdicts)` : "accuracy: no verdicts yet";
    setPill("quality", message.below_floor ? text + " · below floor" : text, message.below_floor ? "bad" : "");
  } else if (topic === t.events) {
    if (message.scan_id && (message.kind === "label_accepted" || message.kind === "rejected" || message.kind === "quarantined")) {
      refreshScan(message.scan_id).catch(() => {});
    }
  } else if (message.scan_id) {
    refreshScan(message.scan_id).catch(() => {});
  }
}

function startLive() {
  stopLive();
  const url = state.settings.mqtt_websocket;
  if (!url || !window.mqtt) {
    setPill("live", "live: polling", "");
    setPill("device-status", "status: needs the broker", "");
    setPill("quality", "accuracy: needs the broker", "");
    state.poll = setInterval(() => loadScans().catch(() => {}), 5000);
    return;
  }
  const client = window.mqtt.connect(url, {
    clientId: randomId(),
    clean: true,
    reconnectPeriod: 2000,
    connectTimeout: 5000,
    protocolVersion: 4,
    // The default keep-alive timer runs in a blob: Web Worker, which the page's
    // Content-Security-Policy does not allow; without pings the broker drops the page.
    timerVariant: "native",
    username: state.settings.mqtt_username || undefined,
    password: state.settings.mqtt_password || undefined,
  });
  state.mqtt = client;
  client.on("connect", () => {
    setPill("live", "live", "good");
    const t = state.settings.topics;
    // Results published while this page was away are not retained: catch up from the API,
    // once the broker has granted the subscription, so that nothing falls between the two.
    client.subscribe([t.results, t.events, t.status, t.quality], { qos: 1 }, (error) => {
      if (error) setPill("live", "live: " + (error.message || "subscription refused"), "bad");
      loadScans().catch(() => {});
    });
  });
  client.on("close", () => setPill("live", "live: reconnecting…", "bad"));
  client.on("message", onMessage);
  client.on("error", (e) => setPill("live", "live: " + (e && e.message ? e.message : "error"), "bad"));
}

function stopLive() {
  if (state.mqtt) {
    state.mqtt.end(true);
    state.mqtt = null;
  }
  if (state.poll) {
    clearInterval(state.poll);
    state.poll = null;
  }
}

async function refreshSettings() {
  const response = await api("/api/v1/display");
  if (!response.ok) return;
  const settings = await response.json();
  state.settings.classes = settings.classes;
  renderScan();
}

async function start() {
  let response;
  try {
    response = await api("/api/v1/display");
  } catch (e) {
    if (e instanceof Unauthorized) return;
    throw e;
  }
  if (!response.ok) {
    showLogin(await errorText(response));
    return;
  }
  state.settings = await response.json();
  $("whoami").textContent = state.settings.reviewer;
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  await loadScans();
  startLive();
  $("worklist").focus();
  if (!state.selected) move(0);
}

if (sessionStorage.getItem(TOKEN)) start().catch(() => showLogin());
else showLogin();
