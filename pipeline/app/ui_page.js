// deeper ui's page script, served as /ui.js.
//
// Everything shown comes from records anyone with write access to a topic can forge, so no
// string from the server is ever parsed as markup: every element is made with
// document.createElement, text goes in with text nodes, attributes with setAttribute (a
// data-* attribute or a class, never an event handler or a style). No markup is ever parsed.
"use strict";

const $ = (id) => document.getElementById(id);
const pct = (x) => (x == null ? "–" : (100 * x).toFixed(0) + "%");
const level = (c) => (c < 0.5 ? "low" : c < 0.8 ? "mid" : "high");
const chosen = {};  // image id -> label picked in this page, until the server's state has it
let classes = [];
const lastRender = {};

// el("td", {class: "n"}, "text", child, ...): an element from a tag, attributes and children;
// strings become text nodes (never markup), null/undefined children are skipped.
function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value != null) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child == null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const text = (value) => (value == null ? "" : String(value));

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const payload = await response.json();
  if (!response.ok && response.status !== 409) throw new Error(payload.error || response.statusText);
  return payload;
}

function thumb(p) {
  const img = el("img", {class: "thumb", alt: text(p.name), src: "/api/thumb/" + encodeURIComponent(p.image_id) + ".jpg"});
  img.addEventListener("load", () => { img.dataset.loaded = "1"; });
  img.addEventListener("error", () => { img.replaceWith(el("div", {class: "nothumb"}, "no preview yet")); });
  return img;
}

function card(p, review) {
  const c = p.confidence;
  const node = el("div", {class: "photo", "data-image-id": p.image_id},
    thumb(p),
    el("div", {class: "name", title: text(p.source)}, text(p.name)),
    el("div", null, el("span", {class: "label"}, text(p.label)), " ", el("span", {class: "conf " + level(c)}, pct(c))),
    el("div", {class: "name"}, "model ", text(p.version)));
  if (review) {
    node.append(chosen[p.image_id]
      ? el("div", {class: "done"}, "corrected: ", text(chosen[p.image_id]))
      : el("div", {class: "choices"}, classes.map((k) => el("button", {"data-fix": p.image_id, "data-label": k}, text(k)))));
  }
  return node;
}

function show(id, data, build) {
  // Only touch the DOM when the data changed, so images don't reload; a section with a missing
  // thumbnail (its Parquet row not written yet) is rebuilt, which asks for it again.
  const key = JSON.stringify(data);
  if (lastRender[id] === key && !$(id).querySelector(".nothumb")) return;
  $(id).replaceChildren(...build());
  lastRender[id] = key;
}

function row(name, value) {
  return el("tr", null, el("th", null, name), el("td", null, value));
}

function render(s) {
  const m = s.model;
  classes = Array.isArray(m.classes) ? m.classes.map(text) : [];
  $("model-version").textContent = text(m.version || "none");
  show("model", m, () => m.version
    ? [el("table", null,
        row("version", text(m.version)),
        row("classes", classes.join(", ")),
        row("features", text(m.backbone) + " / " + text(m.layer)),
        row("classifier", text(m.classifier)),
        el("tr", null, el("th", null, "CV accuracy"), el("td", {id: "cv-accuracy"},
          m.cv_accuracy == null ? "–" : pct(m.cv_accuracy) + " (" + text(m.cv_method) + ")")),
        row("trained on", text(m.n_train) + " photos, " + text(m.created_at)))]
    : [el("span", {class: "err"}, text(m.error))]);
  $("throughput").textContent = Number(s.throughput_per_s).toFixed(2);
  for (const name of ["featurizer", "scorer"]) {
    const l = s.lag[name] || {};
    $("lag-" + name).textContent = l.error ? "?" : (l.lag == null ? "–" : text(l.lag));
    $("lag-" + name).title = l.error ? text(l.error) : "group " + text(l.group) + " on " + text(l.topic);
  }
  $("dead-total").textContent = text(s.dead_letters.total);
  $("corrections-count").textContent = text(s.corrections.count);
  $("corrections-path").textContent = text(s.corrections.path);
  $("topics").textContent = text(s.topics.labels) + " · " + text(s.topics.dead_letters);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  $("stream-error").textContent = text(s.stream_error);
  $("retained").textContent = "(last " + text(s.retained) + " photos)";
  const counts = Object.entries(s.class_counts);
  const most = Math.max(1, ...counts.map(([, n]) => Number(n)));
  show("class-counts", counts, () => counts.length
    ? counts.map(([k, n]) => {
        const bar = el("div", {class: "bar"});
        bar.style.width = (100 * Number(n) / most).toFixed(0) + "%";  // CSSOM, not a style attribute
        return el("tr", {class: "class-count", "data-class": k}, el("td", null, text(k)), el("td", {class: "n"}, text(n)),
                  el("td", {class: "share"}, bar));
      })
    : [el("tr", null, el("td", {class: "muted"}, "no labels yet"))]);
  const reasons = Object.entries(s.dead_letters.by_reason);
  show("dead-reasons", reasons, () => reasons.length
    ? reasons.map(([k, n]) => el("tr", {class: "dead-reason"}, el("td", null, text(k)), el("td", null, text(n))))
    : [el("tr", null, el("td", {class: "muted"}, "none"))]);
  const recent = s.dead_letters.recent.slice(0, 3);
  show("dead-recent", recent, () => recent.map((d) => el("div", null,
    text(d.stage) + ": " + text(d.reason) + " (" + text(d["source-topic"]) + "/" + text(d["source-partition"]) + "@" +
    text(d["source-offset"]) + ") " + text(d.detail))));
  for (const id of Object.keys(chosen)) {
    if (!s.review.some((p) => p.image_id === id)) delete chosen[id];
  }
  show("review", [s.review, chosen, classes], () => s.review.length
    ? s.review.map((p) => card(p, true)) : [el("span", {class: "muted"}, "nothing to review")]);
  show("latest", s.latest, () => s.latest.length
    ? s.latest.map((p) => card(p, false)) : [el("span", {class: "muted"}, "no labelled photos yet")]);
  renderRetrain(s.retrain);
}

function renderRetrain(r) {
  const said = {
    idle: "",
    running: "running: " + text(r.step) + "…",
    done: "done: " + text(r.version) + " is current (CV accuracy " + pct(r.cv_accuracy) + ", " + text(r.n_train) +
          " photos); the scorer switches by itself" + (r.left_out_line ? "; " + text(r.left_out_line) : ""),
    failed: "failed: " + text(r.error),
  }[r.state];
  $("retrain-status").textContent = text(said);
  $("retrain-status").className = r.state === "failed" ? "err" : "muted";
  $("retrain-status").dataset.state = text(r.state);
  $("retrain").disabled = r.state === "running";
}

async function refresh() {
  try { render(await api("/api/state")); }
  catch (e) { $("stream-error").textContent = "cannot reach deeper ui: " + e.message; }
}

document.addEventListener("click", async (event) => {
  const b = event.target.closest("button");
  if (!b) return;
  try {
    if (b.dataset.fix) {
      b.disabled = true;
      await api("/api/corrections", {image_id: b.dataset.fix, label: b.dataset.label});
      chosen[b.dataset.fix] = b.dataset.label;
      lastRender.review = null;
    } else if (b.id === "retrain") {
      renderRetrain(await api("/api/retrain", {}));
    }
  } catch (e) { $("stream-error").textContent = e.message; b.disabled = false; }
  refresh();
});

refresh();
setInterval(refresh, 2000);
