// The reading room in a real Chromium, against a real octd and Mosquitto (started by
// tests/reading_room.rs, which passes everything in the environment and checks the store and
// the broker afterwards). Prints one JSON line with what it did; exits non-zero on failure.
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";
import assert from "node:assert/strict";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const URL = env("OCTD_URL");
const REVIEWER = env("OCTD_REVIEWER");
const PASSWORD = env("OCTD_PASSWORD");
const INBOX = env("OCTD_INBOX");
const SCANS = JSON.parse(env("OCTD_SCANS")); // [{path, name}] single B-scans to drop
const VOLUME = env("OCTD_VOLUME"); // a DICOM volume to drop
const SHOTS = process.env.OCTD_SHOTS || "";
const UPLOADS = JSON.parse(env("OCTD_UPLOADS")); // two more B-scans to upload from the page
const SIGNALS = env("OCTD_SIGNALS"); // a folder to ask the test to stop and start the broker
const OUTAGE_SCAN = env("OCTD_OUTAGE_SCAN"); // a B-scan dropped while the broker is down
const HEATMAP = process.env.OCTD_HEATMAP === "1"; // the model gives activation maps
const TIMEOUT = 90_000;

function drop(from, name) {
  const partial = path.join(INBOX, "." + name + ".partial");
  fs.copyFileSync(from, partial);
  fs.renameSync(partial, path.join(INBOX, name));
}

async function login(page, password) {
  await page.goto(URL);
  await page.fill("#login-reviewer", REVIEWER);
  await page.fill("#login-password", password);
  await page.press("#login-password", "Enter");
}

async function ask(what, answer) {
  fs.writeFileSync(path.join(SIGNALS, what), "");
  const deadline = Date.now() + TIMEOUT;
  while (!fs.existsSync(path.join(SIGNALS, answer))) {
    if (Date.now() > deadline) throw new Error(`no ${answer} after ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function until(condition, what) {
  const deadline = Date.now() + TIMEOUT;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function worklistIds(page) {
  return page.$$eval("#worklist li", (items) => items.map((li) => li.dataset.scanId));
}

async function apiScans(page) {
  return page.evaluate(async () => {
    const token = sessionStorage.getItem("octd-token");
    const r = await fetch("/api/v1/scans?limit=500", { headers: { Authorization: "Bearer " + token } });
    return (await r.json()).scans;
  });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const out = {};
try {
  const a = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await a.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  // A Content-Security-Policy violation is only a console error: it must not happen either.
  // (Refused requests and the broker's planned outage below are expected errors.)
  const expectedError = (t) => t.startsWith("Failed to load resource") || t.startsWith("WebSocket connection to");
  page.on("console", (m) => m.type() === "error" && !expectedError(m.text()) && consoleErrors.push(m.text()));

  // A wrong password is refused with the API's reason, and the page stays at the login.
  await login(page, PASSWORD + "x");
  await page.waitForFunction(() => document.querySelector("#login-error").textContent.length > 0);
  out.refused = await page.textContent("#login-error");
  assert.equal(await page.isVisible("#app-view"), false);

  await login(page, PASSWORD);
  await page.waitForSelector("#app-view", { state: "visible" });
  await page.waitForFunction(() => document.querySelector("#live").textContent === "live");

  // Scans dropped now appear without a reload, in triage order (priority, then arrival).
  for (const s of SCANS) drop(s.path, s.name);
  await page.waitForFunction((n) => document.querySelectorAll("#worklist li").length >= n, SCANS.length);
  const shown = await worklistIds(page);
  const scans = await apiScans(page);
  const expected = scans
    .filter((s) => s.label && !s.verdict)
    .sort((x, y) => x.priority_rank - y.priority_rank || x.received_at.localeCompare(y.received_at) || x.scan_id.localeCompare(y.scan_id))
    .map((s) => s.scan_id);
  assert.deepEqual(shown, expected, "worklist in triage order");
  out.priorities = [...new Set(scans.map((s) => s.priority))];
  if (SHOTS) await page.screenshot({ path: path.join(SHOTS, "reading-room-worklist.png") });

  // Readable at a distance: every text on the worklist page meets WCAG AA contrast (4.5:1).
  const contrast = await page.evaluate(() => {
    const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
    const lum = ([r, g, b]) => {
      const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
      for (let e = el; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length >= 3 && (c.length < 4 || c[3] > 0)) return c;
      }
      return [255, 255, 255];
    };
    const worst = { ratio: Infinity, text: "" };
    for (const el of document.querySelectorAll("body *")) {
      const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
      // (Inactive controls are exempt, as WCAG 1.4.3 says.)
      if (!own || el.offsetParent === null || el.closest(":disabled")) continue;
      const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))];
      const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
      if (ratio < worst.ratio) Object.assign(worst, { ratio, text: el.textContent.trim().slice(0, 40) });
    }
    return worst;
  });
  assert.ok(contrast.ratio >= 4.5, `contrast ${contrast.ratio.toFixed(2)} for "${contrast.text}"`);
  out.worst_contrast = Number(contrast.ratio.toFixed(2));

  // A second display, logged in separately, shows the same unreviewed list.
  const b = await browser.newContext();
  const other = await b.newPage();
  other.setDefaultTimeout(TIMEOUT);
  // Its second worklist request (the catch-up once it is live) is answered with what the
  // server said at once, but handed over only when the test lets it go: after the verdicts
  // below and their events. An answer older than an event must not bring a reviewed scan back.
  const held = { lists: 0, fetched: 0, delivered: false, release: null };
  const released = new Promise((resolve) => (held.release = resolve));
  await other.route(
    (url) => url.pathname === "/api/v1/scans",
    async (route) => {
      const n = ++held.lists;
      const response = await route.fetch();
      held.fetched = Math.max(held.fetched, n);
      if (n === 2) await released;
      await route.fulfill({ response });
      if (n === 2) held.delivered = true;
    },
  );
  await login(other, PASSWORD);
  await other.waitForSelector("#app-view", { state: "visible" });
  await other.waitForFunction((n) => document.querySelectorAll("#worklist li").length >= n, SCANS.length);
  await until(() => held.fetched >= 2, "the second display's catch-up request");

  // Keyboard only: the first scan is open; Enter confirms it, the next opens; a digit corrects.
  await page.focus("#worklist");
  await page.keyboard.press("Home");
  const first = shown[0];
  await page.waitForFunction((id) => document.querySelector("#scan-id").textContent === id, first);
  const predicted = await page.textContent("#scan-label");
  await page.keyboard.press("Enter");
  await page.waitForFunction((id) => !document.querySelector(`#worklist li[data-scan-id="${id}"]`), first);
  out.confirmed = { scan_id: first, label: predicted };

  await page.waitForFunction((id) => document.querySelector("#scan-id").textContent !== id, first);
  const second = await page.textContent("#scan-id");
  const secondPredicted = await page.textContent("#scan-label");
  const classes = await page.$$eval("#class-buttons button", (bs) => bs.map((b) => b.dataset.label));
  const other_class = classes.findIndex((c) => c !== secondPredicted);
  await page.keyboard.press(String(other_class + 1));
  await page.waitForFunction((id) => !document.querySelector(`#worklist li[data-scan-id="${id}"]`), second);
  out.corrected = { scan_id: second, label: classes[other_class], predicted: secondPredicted };

  // The other display drops both from its unreviewed list, live.
  for (const id of [first, second]) {
    await other.waitForFunction((id) => !document.querySelector(`#worklist li[data-scan-id="${id}"]`), id);
  }
  // The catch-up asked for before both verdicts arrives now: it must not bring them back.
  held.release();
  await until(() => held.delivered, "the held catch-up's answer");
  await other.waitForTimeout(500);
  const afterStale = await worklistIds(other);
  assert.ok(!afterStale.includes(first) && !afterStale.includes(second), `a stale answer brought reviewed scans back: ${afterStale}`);
  out.stale_answer_ignored = true;

  // Undo: the last verdict (the correction) is taken back; the scan is unreviewed again,
  // here and on the other display; then it is confirmed for good.
  await page.focus("#worklist");
  await page.keyboard.press("u");
  await page.waitForFunction((id) => document.querySelector(`#worklist li[data-scan-id="${id}"]`), second);
  await page.waitForFunction(() => document.querySelector("#verdict-state").textContent.startsWith("Verdict taken back"));
  await other.waitForFunction((id) => document.querySelector(`#worklist li[data-scan-id="${id}"]`), second);
  out.undone = { scan_id: second };
  await page.waitForFunction((id) => document.querySelector("#scan-id").textContent === id, second);
  await page.keyboard.press("Enter");
  await page.waitForFunction((id) => !document.querySelector(`#worklist li[data-scan-id="${id}"]`), second);
  out.reconfirmed = { scan_id: second, label: secondPredicted };

  // A volume opens at its most suspicious B-scan; the scrubber moves through the others.
  drop(VOLUME, "volume.dcm");
  await page.waitForFunction(() => [...document.querySelectorAll("#worklist li")].some((li) => li.textContent.includes("volume")));
  const volume = (await apiScans(page)).find((s) => s.frames > 1);
  assert.ok(volume, "the volume has a result");
  await page.click(`#worklist li[data-scan-id="${volume.scan_id}"]`);
  await page.waitForFunction(
    (n) => document.querySelector("#scan-image").dataset.frame === String(n),
    volume.most_suspicious_frame
  );
  assert.equal(Number(await page.inputValue("#slice")), volume.most_suspicious_frame);
  out.volume = { scan_id: volume.scan_id, opened_at: volume.most_suspicious_frame, frames: volume.frames };
  if (HEATMAP) {
    // Where the model looked, over the B-scan its label comes from, the scan's own size.
    assert.equal(volume.heatmap_frame, volume.most_suspicious_frame);
    await page.waitForSelector("#heatmap-image", { state: "visible" });
    await page.waitForFunction(() => document.querySelector("#heatmap-image").naturalWidth > 0);
    out.heatmap_size = await page.$eval("#heatmap-image", (img) => [img.naturalWidth, img.naturalHeight]);
    await page.fill("#heatmap-opacity", "70");
    if (SHOTS) await page.screenshot({ path: path.join(SHOTS, "reading-room-scan.png") });
    await page.focus("#worklist");
    await page.keyboard.press("h");
    await page.waitForSelector("#heatmap-image", { state: "hidden" });
    await page.keyboard.press("h");
    await page.waitForSelector("#heatmap-image", { state: "visible" });
  } else {
    assert.equal(await page.isVisible("#heatmap-note"), true, "the page says there is no heatmap");
    if (SHOTS) await page.screenshot({ path: path.join(SHOTS, "reading-room-scan.png") });
  }
  const step = volume.most_suspicious_frame > 0 ? "ArrowLeft" : "ArrowRight";
  await page.focus("#worklist");
  await page.keyboard.press(step);
  const moved = volume.most_suspicious_frame + (step === "ArrowLeft" ? -1 : 1);
  await page.waitForFunction((n) => document.querySelector("#scan-image").dataset.frame === String(n), moved);
  const size = await page.$eval("#scan-image", (img) => [img.naturalWidth, img.naturalHeight]);
  out.volume.frame_size = size;
  // The heatmap belongs to its own B-scan only.
  assert.equal(await page.isVisible("#heatmap-image"), false);

  // Identity is revealed on this screen only, from the sealed linkage (octd records it).
  const single = (await apiScans(page)).find((s) => s.frames === 1 && !s.verdict);
  await page.click(`#worklist li[data-scan-id="${single.scan_id}"]`);
  await page.waitForFunction((id) => document.querySelector("#scan-id").textContent === id, single.scan_id);
  await page.focus("#worklist");
  await page.keyboard.press("i");
  await page.waitForFunction(() => document.querySelector("#identity").textContent.includes("MRN4417"));
  out.revealed = { scan_id: single.scan_id, shown: await page.textContent("#identity") };

  // Uploads: one through the file picker, one dropped onto the page, one that is no scan.
  const before = (await apiScans(page)).length;
  await page.setInputFiles("#upload-input", UPLOADS[0]);
  await page.waitForFunction(() => document.querySelector("#upload-state").textContent.startsWith("1 uploaded"));
  const dropped = fs.readFileSync(UPLOADS[1]);
  const transfer = await page.evaluateHandle((bytes) => {
    const dt = new DataTransfer();
    dt.items.add(new File([new Uint8Array(bytes)], "SMITH_ANN_dropped.jpeg", { type: "image/jpeg" }));
    dt.items.add(new File(["not a scan"], "notes.txt", { type: "text/plain" }));
    return dt;
  }, [...dropped]);
  await page.dispatchEvent("body", "dragenter", { dataTransfer: transfer });
  assert.equal(await page.isVisible("#drop-overlay"), true, "the drop zone shows");
  await page.dispatchEvent("body", "drop", { dataTransfer: transfer });
  // (The picker's "1 uploaded" is still there until the drop's two are answered.)
  await page.waitForFunction(() => document.querySelector("#upload-state").textContent.includes("refused"));
  out.upload_refused = await page.textContent("#upload-state");
  await page.waitForFunction(async (n) => {
    const token = sessionStorage.getItem("octd-token");
    const r = await fetch("/api/v1/scans?limit=500", { headers: { Authorization: "Bearer " + token } });
    return (await r.json()).scans.filter((s) => s.label).length >= n;
  }, before + 2);
  await page.waitForFunction((n) => document.querySelectorAll("#worklist li").length >= n, 0);
  out.uploaded = (await apiScans(page)).length - before;

  // The broker goes away: the page says so, and after it is back it shows what it missed.
  await ask("stop-broker", "broker-stopped");
  await page.waitForFunction(() => document.querySelector("#live").textContent.startsWith("live: reconnecting"));
  const known = new Set((await apiScans(page)).map((s) => s.scan_id));
  drop(OUTAGE_SCAN, "DOE_JANE_MRN4417_outage.jpeg");
  // Classified while the page cannot hear about it.
  let missed = null;
  const deadline = Date.now() + TIMEOUT;
  while (!missed) {
    if (Date.now() > deadline) throw new Error("the outage scan was not classified");
    missed = (await apiScans(page)).find((s) => !known.has(s.scan_id) && s.label);
    if (!missed) await new Promise((r) => setTimeout(r, 200));
  }
  assert.equal(await page.$(`#worklist li[data-scan-id="${missed.scan_id}"]`), null, "not shown while offline");
  await ask("start-broker", "broker-started");
  await page.waitForFunction(() => document.querySelector("#live").textContent === "live");
  await page.waitForSelector(`#worklist li[data-scan-id="${missed.scan_id}"]`);
  out.caught_up = missed.scan_id;

  // The device's status and live accuracy arrive retained over MQTT.
  await page.waitForFunction(() => document.querySelector("#device-status").textContent.startsWith("online"));
  await page.waitForFunction(() => /\(\d+ verdicts\)/.test(document.querySelector("#quality").textContent));
  out.status = await page.textContent("#device-status");
  out.quality = await page.textContent("#quality");

  // What the store holds now, as the API reads it.
  out.stored = {};
  for (const s of await apiScans(page)) if (s.verdict) out.stored[s.scan_id] = s.verdict;

  // Logging out ends the session: its token no longer opens the API.
  const token = await page.evaluate(() => sessionStorage.getItem("octd-token"));
  await page.click("#logout");
  await page.waitForSelector("#login-view", { state: "visible" });
  const after = await page.evaluate(async (t) => (await fetch("/api/v1/scans", { headers: { Authorization: "Bearer " + t } })).status, token);
  assert.equal(after, 401);
  assert.deepEqual(consoleErrors, [], "no script errors");
  console.log(JSON.stringify(out));
} finally {
  await browser.close();
}
