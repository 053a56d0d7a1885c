// Serin dashboard: polls api/canaries and draws the list, the selected Canary and the
// timeline of each of its rollouts. Every text from the cluster goes in with textContent,
// never as HTML.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
let data = null;
let selected = decodeURIComponent(location.hash.slice(1)) || null; // "namespace/name"
let busy = false;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function key(c) { return c.namespace + "/" + c.name; }

function ago(iso) {
  if (!iso || !data) return "";
  return human((Date.parse(data.now) - Date.parse(iso)) / 1000) + " ago";
}

function human(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60 ? (s % 60) + "s" : "");
  if (s < 86400) return Math.floor(s / 3600) + "h" + (Math.floor(s / 60) % 60 ? (Math.floor(s / 60) % 60) + "m" : "");
  return Math.floor(s / 86400) + "d" + (Math.floor(s / 3600) % 24 ? (Math.floor(s / 3600) % 24) + "h" : "");
}

function inRollout(phase) { return ["Progressing", "Paused", "Promoting"].includes(phase); }

function weightsText(status) {
  const w = Math.min(100, status.canaryWeight || 0);
  return (100 - w) + "/" + w;
}

function stepText(c) {
  const s = c.status;
  if (!inRollout(s.phase)) return "-";
  return Math.min((s.step || 0) + 1, c.steps.length) + "/" + c.steps.length;
}

function lastRollout(c) {
  const h = (c.status.history || [])[0];
  return h ? h.result + " " + ago(h.finishedAt) : "-";
}

async function refresh() {
  try {
    const r = await fetch("api/canaries", { cache: "no-store" });
    if (!r.ok) throw new Error(await r.text());
    data = await r.json();
    document.getElementById("error").hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date(data.now).toLocaleTimeString();
    render();
  } catch (e) {
    const p = document.getElementById("error");
    p.hidden = false;
    p.textContent = "cannot read the Canaries: " + e.message + " (is kubectl serin dashboard still running?)";
  }
}

function render() {
  const select = document.getElementById("namespace");
  const namespaces = [...new Set(data.canaries.map(c => c.namespace))].sort();
  const current = select.value;
  const have = [...select.options].map(o => o.value).slice(1);
  if (have.join("\n") !== namespaces.join("\n")) {
    while (select.options.length > 1) select.remove(1);
    for (const ns of namespaces) select.append(el("option", { value: ns }, ns));
    select.value = namespaces.includes(current) ? current : "";
  }
  const shown = data.canaries.filter(c => !select.value || c.namespace === select.value);
  const body = document.querySelector("#canaries tbody");
  body.replaceChildren(...shown.map(c => {
    const tr = el("tr", { "data-canary": key(c), class: key(c) === selected ? "selected" : "" },
      el("td", {}, c.namespace),
      el("td", {}, c.name),
      el("td", {}, el("span", { class: "phase phase-" + c.status.phase }, c.status.phase)),
      el("td", { class: "weights" }, weightsText(c.status)),
      el("td", {}, stepText(c)),
      el("td", {}, lastRollout(c)));
    tr.addEventListener("click", () => { selected = key(c); location.hash = encodeURIComponent(selected); render(); });
    return tr;
  }));
  document.getElementById("empty").hidden = shown.length > 0;
  const c = data.canaries.find(x => key(x) === selected);
  document.getElementById("detail").hidden = !c;
  if (c) renderDetail(c);
}

function renderDetail(c) {
  const s = c.status;
  document.getElementById("detail-title").textContent = key(c);
  const phase = document.getElementById("detail-phase");
  phase.textContent = s.phase;
  phase.className = "phase phase-" + s.phase;
  const w = Math.min(100, s.canaryWeight || 0);
  document.getElementById("detail-weights").replaceChildren(
    el("div", { class: "bar", title: "primary " + (100 - w) + "% / canary " + w + "%" },
      el("div", { class: "bar-primary" }, ""),
      el("div", { class: "bar-canary" }, "")),
    el("span", { id: "weights-text" }, "primary " + (100 - w) + "% / canary " + w + "%"));
  // Widths through the CSSOM: the page's policy allows no inline style attributes.
  document.querySelector(".bar-primary").style.width = (100 - w) + "%";
  document.querySelector(".bar-canary").style.width = w + "%";
  const parts = [];
  if (s.revision) parts.push("revision " + s.revision);
  if (s.stableRevision) parts.push("stable " + s.stableRevision);
  parts.push("steps " + c.steps.join(" → "));
  if (inRollout(s.phase)) {
    parts.push("step " + stepText(c));
    parts.push("failed checks " + (s.failedChecks || 0) + " of " + c.failureThreshold);
    if (s.rolloutStartedAt) parts.push("started " + ago(s.rolloutStartedAt));
  }
  if (c.paused) parts.push("paused");
  if (c.ready && c.ready.status !== "True") parts.push("not ready: " + c.ready.reason + ": " + c.ready.message);
  document.getElementById("detail-summary").textContent = parts.join(" · ");
  for (const b of document.querySelectorAll("button[data-command]")) {
    const cmd = b.dataset.command;
    const allowed = {
      "promote": inRollout(s.phase), "promote-full": inRollout(s.phase), "abort": inRollout(s.phase),
      "retry": s.phase === "Failed", "pause": inRollout(s.phase) && !c.paused, "resume": c.paused,
    }[cmd];
    b.disabled = busy || !allowed;
  }
  const check = s.lastCheck;
  const none = el("tr", {}, el("td", { class: "muted", colspan: "4" }, "No check counted in this rollout."));
  document.querySelector("#last-check tbody").replaceChildren(...(check ? [] : [none]), ...(check ? check.results : []).map(r =>
    el("tr", {},
      el("td", {}, r.metric),
      el("td", {}, r.value === undefined || r.value === null ? "-" : fmt(r.value)),
      el("td", {}, el("span", { class: "verdict verdict-" + r.verdict }, r.verdict)),
      el("td", {}, r.message || ""))));
  const rollouts = [];
  if (s.timeline && s.rolloutStartedAt && inRollout(s.phase)) {
    rollouts.push(rollout(c, {
      revision: s.revision, startedAt: s.rolloutStartedAt, finishedAt: null,
      result: "InProgress", reachedWeight: null, reason: "at step " + stepText(c), timeline: s.timeline,
    }));
  }
  for (const h of s.history || []) rollouts.push(rollout(c, h));
  if (!rollouts.length) rollouts.push(el("p", { class: "muted" }, "No rollout yet."));
  document.getElementById("rollouts").replaceChildren(...rollouts);
}

function fmt(v) {
  if (typeof v !== "number") return String(v);
  if (v !== 0 && (Math.abs(v) < 0.001 || Math.abs(v) >= 1e6)) return v.toExponential(2);
  return String(Math.round(v * 1000) / 1000);
}

function rollout(c, h) {
  const end = h.finishedAt || data.now;
  const duration = h.startedAt ? (Date.parse(end) - Date.parse(h.startedAt)) / 1000 : null;
  const head = el("div", { class: "rollout-head" },
    el("span", { class: "result result-" + h.result }, h.result === "InProgress" ? "in progress" : h.result),
    el("span", { class: "rev" }, "revision " + h.revision),
    el("span", {}, h.startedAt ? "started " + new Date(h.startedAt).toLocaleString() : ""),
    el("span", {}, duration !== null ? "took " + human(duration) : ""),
    el("span", {}, h.reachedWeight !== null ? "reached " + h.reachedWeight + "%" : ""));
  const box = el("div", { class: "rollout", "data-revision": h.revision, "data-result": h.result }, head,
    el("p", { class: "reason" }, h.reason || ""));
  if (h.timeline && h.timeline.points && h.timeline.points.length) box.append(chart(h, duration));
  else box.append(el("p", { class: "muted" }, "No weight timeline kept for this rollout (older than the status budget, or from before Serin kept timelines)."));
  return box;
}

// A step chart of the canary weight over the rollout, with a marker per step's last check.
function chart(h, duration) {
  const W = 640, H = 150, L = 40, R = 12, T = 10, B = 26;
  const t = h.timeline;
  const last = t.points[t.points.length - 1];
  const span = Math.max(duration || 0, last.at, ...t.points.map(p => p.checkedAt || 0), 1);
  const x = s => L + (W - L - R) * (s / span);
  const y = w => T + (H - T - B) * (1 - w / 100);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  root.append(svg("title", {}, "canary weight over the rollout of " + h.revision));
  for (const w of [0, 50, 100]) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(w), y2: y(w), class: "grid" }));
    root.append(svg("text", { x: L - 6, y: y(w) + 4, class: "axis", "text-anchor": "end" }, w + "%"));
  }
  root.append(svg("text", { x: L, y: H - 6, class: "axis" }, "0s"));
  root.append(svg("text", { x: W - R, y: H - 6, class: "axis", "text-anchor": "end" }, human(span)));
  let d = `M ${x(0)} ${y(0)}`;
  for (const p of t.points) d += ` H ${x(p.at)} V ${y(p.weight)}`;
  d += ` H ${x(span)}`;
  root.append(svg("path", { d, class: "weight" }));
  for (const p of t.points) {
    root.append(svg("text", { x: x(p.at) + 3, y: y(p.weight) - 4, class: "label" }, p.weight + "%"));
    if (p.verdict) {
      const values = (t.metrics || []).map((m, i) => m + " = " + (p.values && p.values[i] !== null && p.values[i] !== undefined ? fmt(p.values[i]) : "no value"));
      const dot = svg("circle", { cx: x(p.checkedAt ?? p.at), cy: y(p.weight), r: 5, class: "check verdict-" + p.verdict, "data-weight": p.weight });
      dot.append(svg("title", {}, `${p.checks} check(s) at ${p.weight}%; last ${p.verdict}: ${values.join(", ")}`));
      root.append(dot);
    }
  }
  const legend = el("ul", { class: "points" }, ...t.points.map(p => el("li", {},
    `${human(p.at)}: ${p.weight}%` + (p.verdict ? ` · ${p.checks} check(s), last ${p.verdict}` +
      ((t.metrics || []).length ? " (" + t.metrics.map((m, i) => m + " " + (p.values && p.values[i] != null ? fmt(p.values[i]) : "-")).join(", ") + ")" : "") : ""))));
  return el("div", { class: "chart-box" }, root, legend);
}

async function command(cmd) {
  const c = data && data.canaries.find(x => key(x) === selected);
  if (!c) return;
  busy = true;
  render();
  const out = document.getElementById("command-result");
  out.hidden = false;
  out.className = "";
  out.textContent = cmd + " of " + key(c) + ": waiting for Serin…";
  try {
    const r = await fetch(`api/canaries/${encodeURIComponent(c.namespace)}/${encodeURIComponent(c.name)}/${cmd}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    const body = await r.json();
    out.textContent = body.message;
    out.className = body.ok ? "ok" : "error";
  } catch (e) {
    out.textContent = "the command could not be sent: " + e.message;
    out.className = "error";
  }
  busy = false;
  await refresh();
}

document.getElementById("namespace").addEventListener("change", render);
for (const b of document.querySelectorAll("button[data-command]")) {
  b.addEventListener("click", () => command(b.dataset.command));
}
refresh();
setInterval(refresh, POLL_MS);
