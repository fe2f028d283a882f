// Maia console: reads /api/state, redraws, and re-reads on every server-sent `change` event.
// The token (sign-in form or #token=... in the URL) lives in sessionStorage and travels only
// in the Authorization header; the fragment is removed from the address bar at once.
"use strict";

const TOKEN_KEY = "maia-console-token";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// Why the fragment's token was not taken ("" when it was, or there was none).
function tokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (!match) return "";
  history.replaceState(null, "", window.location.pathname + window.location.search);
  try {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  } catch (err) {  // a malformed %-escape: it threw before anything was shown, and the page stayed blank
    // The link meant another token than one stored before: none is used until a sign-in.
    sessionStorage.removeItem(TOKEN_KEY);
    signedOut = true;
    return "the token in the link is malformed; paste it here";
  }
  return "";
}

function authorization(token) {
  return token ? { Authorization: "Bearer " + token } : {};
}

// The token stored now is the one a read or a stream was made with: not signed out since, nor
// another signed in.
function current(token) {
  return !signedOut && !isRefused(token) && token === sessionStorage.getItem(TOKEN_KEY);
}

// A token the controller refused (401): nothing more is sent with it until a sign-in. The page
// went on asking with it, a request a second for as long as the tab stayed open, and spent the
// console's budget of refusal log lines, hiding a real guess among the suppressed.
let refusedToken = null;  // "" for none at all (a controller with authentication asks for one)

function isRefused(token) {
  return refusedToken !== null && (token || "") === refusedToken;
}

// Nothing is asked of the controller until a sign-in: signed out, or the token refused.
function waitsForSignIn(token) {
  return signedOut || isRefused(token);
}

// The controller refused `token` (401): if it is still the viewer's, the sign-in form says why.
function refusedNow(token) {
  if (!current(token)) return;
  refusedToken = token || "";
  signIn(refused());
}

function kw(watts) { return (watts / 1000).toFixed(1) + " kW"; }

// Other tenants, in a tenant's view (state.py: OTHER_TENANT): no tenant id can be it.
const OTHERS = "*";

function tenantText(tenant) { return tenant === OTHERS ? "other tenants" : tenant; }

function drawLegend(state, colours) {
  const legend = $("legend");
  legend.replaceChildren(...state.tenants.map((t) =>
    el("li", { "data-tenant": t.id }, el("span", { class: "swatch", style: { background: t.colour } }), t.id)));
  if (state.viewer_tenant) {
    const swatch = el("span", { class: "swatch", style: { background: colours[OTHERS] } });
    legend.append(el("li", { "data-tenant": OTHERS }, swatch, "other tenants"));
  }
}

function drawAccelerator(acc, colours) {
  const cell = el("div", { class: acc.failed ? "acc failed" : "acc", "data-accelerator": acc.index });
  const parts = acc.holders.map((h) => `${tenantText(h.tenant)} ${h.milli < 1000 ? h.milli + "m" : ""}`.trim());
  cell.title = `accelerator ${acc.index}: ` + (acc.failed ? `failed (${acc.failed})` : parts.length ? parts.join(", ") : "free");
  for (const holder of acc.holders) {
    cell.append(el("span", { style: { width: Math.min(100, holder.milli / 10) + "%", background: colours[holder.tenant] || "#888" } }));
  }
  return cell;
}

function drawMap(state, colours) {
  const zones = state.zones.map((zone) => el("div", { class: "zone", "data-zone": zone.id }, el("h3", {}, "zone " + zone.id),
    ...zone.rows.map((row) => el("div", { class: "row", "data-row": row.id },
      el("div", { class: "row-title" }, `row ${row.id}`),
      el("div", { class: "racks" }, ...row.racks.map((rack) => el("div", { class: "rack", "data-rack": rack.id },
        el("div", { class: "rack-title" }, rack.id),
        el("div", { class: "nodes" }, ...rack.nodes.map((node) => {
          const kept = node.nominated_for ? " nominated" : "";
          const cell = el("div", { class: "node " + node.state + kept, "data-node": node.id },
            ...node.accelerators.map((acc) => drawAccelerator(acc, colours)));
          cell.title = `${node.id} (${node.model}, ${node.state})` +
            (kept ? `: kept for ${tenantText(node.nominated_for)} at the head of the line` : "");
          return cell;
        })))))))));
  $("map").replaceChildren(...zones);
}

function drawPower(state) {
  const rows = [];
  for (const zone of state.zones) {
    for (const row of zone.rows) {
      rows.push(["row", row]);
      for (const rack of row.racks) rows.push(["rack", rack]);
    }
  }
  $("power").tBodies[0].replaceChildren(...rows.map(([kind, d]) => {
    const share = d.power_budget_w ? d.power_used_w / d.power_budget_w : 0;
    const bar = el("div", { class: "bar" + (share > 0.9 ? " hot" : "") }, el("span", { style: { width: Math.min(100, share * 100) + "%" } }));
    return el("tr", { "data-power": d.id }, el("td", {}, kind), el("td", {}, d.id),
      el("td", { class: "num" }, d.power_budget_w ? `${kw(d.power_used_w)} / ${kw(d.power_budget_w)}` : kw(d.power_used_w)),
      el("td", {}, d.power_budget_w ? bar : ""));
  }));
}

function drawDeployments(state) {
  $("deployments").tBodies[0].replaceChildren(...state.deployments.map((d) => el("tr", { "data-deployment": d.name },
    el("td", {}, d.name), el("td", {}, d.tenant), el("td", {}, el("span", { class: "tag " + d.phase }, d.phase)),
    el("td", { class: "num replicas" }, `${d.running_replicas} running / ${d.placed_replicas} placed of ${d.replicas}`),
    el("td", { class: "reason" }, d.reasons.map((r) => `${r.code}: ${r.message}`).join("; ")))));
}

function drawUsage(state) {
  $("usage").tBodies[0].replaceChildren(...state.usage.map((u) => el("tr", { "data-usage": u.tenant },
    el("td", {}, u.tenant), el("td", { class: "num" }, u.accelerator_hours.toFixed(3)),
    el("td", { class: "num" }, u.energy_kwh.toFixed(3)))));
}

// How old the data shown is: said once it is older than the page's reads would leave it (they
// stopped answering: the controller is down or unreachable), so old numbers are not read as live.
// The age counts from when it arrived (the browser's clock, not compared with the controller's).
const shown = { generatedAt: null, receivedAt: 0 };
const STALE_LIVE_S = 25;    // reads every 10 s, and on every change
const STALE_OFFLINE_S = 5;  // reads every 2 s while the live stream reconnects

function clock(at) {
  return [at.getHours(), at.getMinutes(), at.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

function showAge() {
  const age = $("age");
  const ageS = Math.floor((Date.now() - shown.receivedAt) / 1000);
  const stale = shown.generatedAt !== null &&
    ageS > ($("live").classList.contains("on") ? STALE_LIVE_S : STALE_OFFLINE_S);
  age.hidden = !stale;
  document.body.classList.toggle("stale", stale);
  if (stale) age.textContent = `data from ${clock(shown.generatedAt)}, ${ageS} s ago`;
}

function draw(state) {
  const colours = { [OTHERS]: "#6b7280" };
  for (const t of state.tenants) colours[t.id] = t.colour;
  $("viewer").textContent = state.viewer_tenant ? `tenant ${state.viewer_tenant}` : (state.auth ? "operator" : "");
  $("sign-out").hidden = !state.auth;
  drawLegend(state, colours);
  drawMap(state, colours);
  drawPower(state);
  drawDeployments(state);
  drawUsage(state);
  document.body.dataset.generatedAt = state.generated_at;
  Object.assign(shown, { generatedAt: new Date(state.generated_at), receivedAt: Date.now() });
  showAge();
}

// Why the live stream ended a token's session (revoked, expired): every later 401 for that
// token says so, rather than the generic refusal (the page's reads keep meeting it).
const ended = { token: null, reason: "" };

function refused() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return "";
  return token === ended.token ? ended.reason : "that token was not accepted";
}

// The state read under way (a sign-out or a sign-in cancels it).
let reading = null;

async function refresh() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (waitsForSignIn(token)) return false;
  const abort = new AbortController();
  reading = abort;
  let state;
  try {
    const reply = await fetch("/api/state", { headers: authorization(token), cache: "no-store", signal: abort.signal });
    if (reply.status === 401) {
      refusedNow(token);
      return false;
    }
    if (!reply.ok) throw new Error(`state: HTTP ${reply.status}`);
    state = await reply.json();
  } catch (err) {
    if (abort.signal.aborted) return false;
    throw err;
  }
  // Answered after a sign-out, or for the token before a sign-in: not this viewer's to draw (it
  // showed the last viewer's data again, on a screen signed out).
  if (!current(token)) return false;
  $("sign-in").hidden = true;
  $("console").hidden = false;
  draw(state);
  return true;
}

let pending = null;
function refreshSoon() {
  if (pending || signedOut) return;  // signed out: nothing to read until a sign-in (its message kept)
  pending = setTimeout(() => { pending = null; refresh().catch(console.error); }, 200);
}

// The event stream open now: the token it was opened with, and how to end it. A sign-out or a
// sign-in ends it (`reconnect`), and the next one opens with the token then stored: one left
// open with the old token held that token's stream on the server, told the new one about the old
// one's tenant, and blamed the new one for the old one's revocation.
let stream = null;
let wakeListen = () => {};
let signedOut = false;  // by the button: no stream tried until a sign-in

function reconnect() {
  if (stream) stream.abort.abort();
  if (reading) reading.abort();
  wakeListen();
}

// Signed out, or the token refused: the stream waits for a sign-in.
class StopListening extends Error {}

// Server-sent events over fetch (EventSource cannot send an Authorization header).
async function listen() {
  const live = $("live");
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const abort = new AbortController();
    stream = { token, abort };
    try {
      if (waitsForSignIn(token)) throw new StopListening();
      const reply = await fetch("/api/events",
        { headers: authorization(token), cache: "no-store", signal: abort.signal });
      if (reply.status === 401) refusedNow(token);
      if (!reply.ok) throw new Error(`events: HTTP ${reply.status}`);
      live.textContent = "live"; live.className = "live on";
      const reader = reply.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const lines = message.split("\n");
          if (lines.includes("event: change")) refreshSoon();
          if (lines.includes("event: ended")) {  // its token was revoked or expired: say why at once
            const data = lines.find((line) => line.startsWith("data: "));
            let reason = "your session ended";
            try { reason = JSON.parse(data.slice(6)).reason || reason; } catch (err) { /* keep the default */ }
            Object.assign(ended, { token, reason });  // the stream's token, whatever is stored now
            if (token === sessionStorage.getItem(TOKEN_KEY)) signIn(reason);
          }
        }
      }
    } catch (err) {
      if (!abort.signal.aborted && !(err instanceof StopListening)) console.warn(err);
    }
    live.textContent = "offline"; live.className = "live off";
    if (abort.signal.aborted) continue;  // signed out or in: the next stream, with the token now stored
    // Signed out, or the token refused: no stream until a sign-in; else another try in 2 s.
    const waiting = waitsForSignIn(token);
    await new Promise((resolve) => {
      wakeListen = resolve;
      if (!waiting) setTimeout(resolve, 2000);
    });
    wakeListen = () => {};
    refreshSoon();
  }
}

function signIn(message) {
  $("console").hidden = true;
  $("sign-in").hidden = false;
  // Nothing of the last viewer's is left in the page, hidden or not.
  for (const id of ["legend", "map"]) $(id).replaceChildren();
  for (const id of ["power", "deployments", "usage"]) $(id).tBodies[0].replaceChildren();
  $("viewer").textContent = "";
  $("sign-in-error").textContent = message;
  shown.generatedAt = null;  // no data shown: no age to tell
  showAge();
}

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  signedOut = false;
  refusedToken = null;  // tried again when given again
  reconnect();
  refresh().then((ok) => { if (ok) refreshSoon(); }).catch(console.error);
});
$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  signedOut = true;
  reconnect();
  signIn("");
});

const malformed = tokenFromFragment();
if (malformed) signIn(malformed);
else refresh().catch(console.error);
listen();
setInterval(refreshSoon, 10000);  // node and power changes are not on the deployment bus
setInterval(showAge, 1000);
