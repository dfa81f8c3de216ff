// peftbooth ui: one page over the JSON API. Everything shown is read back from the run folders, so a reload
// (or a restarted server) shows the same thing. Text from the server is only ever set as textContent.
"use strict";

const $ = (sel) => document.querySelector(sel);
let SCHEMA = null;
let draft = null; // name of the run folder being prepared under "New run"
let timer = null;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k in e && typeof v !== "string") e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

async function api(method, url, body, raw) {
  const opts = { method, headers: {} };
  if (raw !== undefined) { opts.body = raw; opts.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const r = await fetch(url, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

const fieldId = (key) => "f-" + key.replace(/\./g, "-");

// ------------------------------------------------------------------------------------------------------------
// new run: the form is built from the config dataclasses (GET /api/schema)

function fieldInput(f) {
  const id = fieldId(f.key);
  if (f.type === "bool" && !f.optional) return el("input", { type: "checkbox", id, checked: !!f.default });
  if (f.choices.length || (f.type === "bool" && f.optional)) {
    const options = f.type === "bool" ? ["true", "false"] : f.choices;
    const s = el("select", { id });
    if (f.optional) s.append(el("option", { value: "", text: f.inherits ? `(${f.inherits})` : "(default)" }));
    for (const c of options) s.append(el("option", { value: c, text: c }));
    s.value = f.default === null ? "" : String(f.default);
    return s;
  }
  if (f.type === "list") return el("textarea", { id, rows: "2", placeholder: "one per line" });
  const input = el("input", { id, value: f.default === null ? "" : String(f.default) });
  if (f.inherits) input.placeholder = f.inherits;
  if (f.key === "model.model") input.setAttribute("list", "model-choices"); // tiny, world, or any hub id / folder
  return input;
}

function fieldRow(f) {
  const input = fieldInput(f);
  const row = el("div", { class: "field" + (f.type === "bool" && !f.optional ? " bool" : ""), "data-key": f.key },
    el("label", { for: fieldId(f.key), text: f.flag }), input,
    el("small", { class: "help", text: f.help }), el("div", { class: "error", "data-error-for": f.key }));
  input.addEventListener("input", () => { // an edited field's old problem goes; the next check says if it stays
    row.classList.remove("has-error"); row.querySelector("[data-error-for]").textContent = "";
  });
  if (f.key === "model.model") {
    const dl = el("datalist", { id: "model-choices" });
    for (const m of SCHEMA.models) dl.append(el("option", { value: m }));
    row.append(dl);
  }
  return row;
}

function buildForm() {
  const main = $("#main-fields"), adv = $("#advanced-fields");
  const sections = {};
  for (const f of SCHEMA.fields) {
    if (f.main) { main.append(fieldRow(f)); continue; }
    if (!sections[f.section]) {
      sections[f.section] = el("div", { class: "fields" });
      adv.append(el("fieldset", {}, el("legend", { text: f.section }), sections[f.section]));
    }
    sections[f.section].append(fieldRow(f));
  }
  for (const name of Object.keys(SCHEMA.presets)) $("#preset").append(el("option", { value: name, text: name }));
  $("#preset").addEventListener("change", applyPreset);
  $("#low-memory").addEventListener("change", applyPreset);
  // a validation prompt that follows the instance prompt until edited: samples from step 0 on, by default
  const inst = $("#" + fieldId("data.instance_prompt")), val = $("#" + fieldId("train.validation_prompt"));
  inst.addEventListener("input", () => { if (!val.dataset.edited) val.value = inst.value; stepsHint(); });
  val.addEventListener("input", () => { val.dataset.edited = "1"; });
  for (const k of ["train.max_train_steps", "data.train_batch_size", "train.gradient_accumulation_steps"])
    $("#" + fieldId(k)).addEventListener("input", stepsHint);
  stepsHint();
}

function setValue(key, value) {
  const input = $("#" + fieldId(key));
  if (!input) return;
  if (input.type === "checkbox") input.checked = !!value;
  else if (Array.isArray(value)) input.value = value.join("\n");
  else input.value = value === null || value === undefined ? "" : String(value);
}

function applyPreset() {
  const name = $("#preset").value;
  const defaults = Object.fromEntries(SCHEMA.fields.map((f) => [f.key, f.default]));
  const touched = new Set([...Object.values(SCHEMA.presets).flatMap(Object.keys), ...Object.keys(SCHEMA.low_memory)]);
  for (const k of touched) setValue(k, defaults[k]);
  const values = { ...(SCHEMA.presets[name] || {}), ...($("#low-memory").checked ? SCHEMA.low_memory : {}) };
  for (const [k, v] of Object.entries(values)) setValue(k, v);
  $("#preset-help").textContent = Object.entries(values).map(([k, v]) => `${k.split(".")[1]}=${v}`).join(", ");
  stepsHint();
}

function stepsHint() {
  // steps are optimizer steps; each sees batch x accumulation photos. No "repeats": this is the whole story.
  const n = (k) => parseInt($("#" + fieldId(k)).value, 10) || 0;
  const steps = n("train.max_train_steps"), views = steps * n("data.train_batch_size") * n("train.gradient_accumulation_steps");
  const photos = document.querySelectorAll("#photos .photo").length;
  $("#steps-hint").textContent = `${steps} steps = ${views} photo views` +
    (photos ? ` (about ${(views / photos).toFixed(1)} passes over your ${photos} photos)` : "");
}

function formValues() {
  const values = {};
  for (const f of SCHEMA.fields) {
    const input = $("#" + fieldId(f.key));
    values[f.key] = input.type === "checkbox" ? input.checked : f.type === "list" ? input.value.split("\n") : input.value;
  }
  return values;
}

function showErrors(errors) {
  document.querySelectorAll("[data-error-for]").forEach((e) => { e.textContent = ""; });
  document.querySelectorAll(".field.has-error").forEach((e) => e.classList.remove("has-error"));
  $("#general-errors").textContent = "";
  const general = [];
  for (const [key, msgs] of Object.entries(errors || {})) {
    const target = document.querySelector(`[data-error-for="${CSS.escape(key)}"]`);
    if (key === "data.instance_data_dir" || !target) { (key === "data.instance_data_dir" ? photoErrors : general).push(...msgs); continue; }
    target.textContent = msgs.join("\n");
    target.closest(".field").classList.add("has-error");
    if (target.closest("details")) target.closest("details").open = true;
  }
  $("#general-errors").textContent = general.join("\n");
  $("#photo-errors").textContent = photoErrors.join("\n");
  photoErrors = [];
}
let photoErrors = [];

async function ensureDraft() {
  if (!draft) draft = (await api("POST", "/api/runs", { name: $("#run-name").value || "run" })).name;
  $("#run-name").value = draft;
  $("#run-name").disabled = true;
  return draft;
}

async function upload(fileList) {
  const name = await ensureDraft();
  const problems = [];
  // photos before masks: NAME.mask.png is refused until its photo NAME.* is there
  const isMask = (f) => f.name.toLowerCase().endsWith(".mask.png");
  const ordered = [...fileList].sort((a, b) => isMask(a) - isMask(b));
  for (const file of ordered) {
    try {
      await api("POST", `/api/runs/${name}/photos?filename=${encodeURIComponent(file.name)}`, undefined, file);
    } catch (e) { problems.push(e.message); }
  }
  $("#photo-errors").textContent = problems.join("\n");
  await showPhotos();
}

async function showPhotos() {
  if (!draft) return;
  const run = await api("GET", `/api/runs/${draft}`);
  const box = $("#photos");
  box.replaceChildren();
  for (const p of run.photos) {
    const caption = el("textarea", { class: "caption", rows: "2", placeholder: "caption (optional)", "data-photo": p.name });
    caption.value = p.caption;
    caption.addEventListener("change", () => api("PUT", `/api/runs/${draft}/caption`, { photo: p.name, caption: caption.value })
      .catch((e) => { $("#photo-errors").textContent = e.message; }));
    box.append(el("div", { class: "photo" },
      el("img", { src: `/runs/${draft}/photo/${encodeURIComponent(p.name)}`, alt: p.name }), el("span", { text: p.name + (p.mask ? " (mask)" : "") }), caption));
  }
  stepsHint();
}

async function check(start) {
  const name = await ensureDraft();
  $("#check-result").textContent = start ? "checking…" : "";
  const r = await api("POST", `/api/runs/${name}/${start ? "start" : "check"}`, { values: formValues() });
  showErrors(r.errors);
  $("#check-result").textContent = r.ok ? (start ? "started" : "all settings are valid") : "see the problems above";
  if (r.ok && start) { draft = null; location.hash = `#run/${name}`; }
}

function initNew() {
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files); });
  $("#photo-input").addEventListener("change", (e) => upload(e.target.files));
  $("#use-folder").addEventListener("click", async () => {
    const name = await ensureDraft();
    try {
      await api("POST", `/api/runs/${name}/folder`, { path: $("#photo-folder").value });
      $("#photo-errors").textContent = "";
    } catch (e) { $("#photo-errors").textContent = e.message; }
    await showPhotos();
  });
  $("#check").addEventListener("click", () => check(false).catch((e) => { $("#general-errors").textContent = e.message; }));
  $("#start").addEventListener("click", () => check(true).catch((e) => { $("#general-errors").textContent = e.message; }));
}

// ------------------------------------------------------------------------------------------------------------
// runs list

async function showRuns() {
  const { runs } = await api("GET", "/api/runs");
  const body = $("#runs-table tbody");
  body.replaceChildren();
  for (const r of runs) {
    body.append(el("tr", { "data-run": r.name },
      el("td", {}, el("a", { href: `#run/${r.name}`, text: r.name })), el("td", { text: r.model || "" }),
      el("td", { text: r.adapter || "" }), el("td", { text: r.steps ?? "" }),
      el("td", {}, el("span", { class: `state ${r.state}`, text: r.state + (r.queue_position ? ` #${r.queue_position}` : "") })),
      el("td", { text: r.date })));
  }
  $("#runs-empty").hidden = runs.length > 0;
}

// ------------------------------------------------------------------------------------------------------------
// one run: progress, validation, stop / resume, try it, export, fuse

const clock = (s) => { s = Math.round(s); const m = Math.floor(s / 60); return `${m}:${String(s % 60).padStart(2, "0")}`; };

function drawLoss(points) {
  const svg = $("#loss-chart"), NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  if (!points.length) return;
  const W = 400, H = 160, P = 28;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const px = (x) => P + (x - x0) / (x1 - x0) * (W - 2 * P), py = (y) => H - P - (y - y0) / (y1 - y0) * (H - 2 * P);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2a6df4"); line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  for (const [x, y, t] of [[P, 12, y1.toFixed(3)], [P, H - P + 4, y0.toFixed(3)], [P, H - 6, `step ${x0}`], [W - P - 40, H - 6, `step ${x1}`]]) {
    const text = document.createElementNS(NS, "text");
    text.setAttribute("x", x); text.setAttribute("y", y); text.setAttribute("font-size", "10"); text.textContent = t;
    svg.append(text);
  }
  svg.dataset.points = String(points.length);
}

let current = null; // the run shown

async function showRun(name) {
  const r = await api("GET", `/api/runs/${name}`);
  if (current !== name) return; // the user went elsewhere meanwhile
  $("#run-title").textContent = name;
  const state = $("#run-state");
  state.textContent = r.state; state.className = `state ${r.state}`; state.dataset.state = r.state;
  const total = r.total || 1;
  $("#run-progress").max = total; $("#run-progress").value = r.step || 0;
  $("#run-step").textContent = `step ${r.step || 0} / ${r.total ?? "?"}`;
  $("#run-step").dataset.step = r.step || 0;
  $("#run-rate").textContent = r.it_s ? `${r.it_s.toFixed(2)} it/s` : "";
  $("#run-eta").textContent = r.seconds_left != null ? `${clock(r.seconds_left)} left` : "";
  $("#run-phase").textContent = r.phase && r.phase !== "train" ? `${r.phase} ${r.phase_step}/${r.phase_total}` : "";
  $("#queue-pos").textContent = r.queue_position ? `queued, #${r.queue_position}` : "";
  $("#stop").disabled = !["running", "queued"].includes(r.state);
  $("#resume").disabled = !(["stopped", "failed"].includes(r.state) && r.checkpoints.length);
  $("#stop").dataset.checkpoints = r.checkpoints.join(",");
  $("#run-command").textContent = `peftbooth train --config ${r.config}` + (r.checkpoints.length && r.state !== "finished" ? " --resume latest" : "");
  const report = $("#report-link");
  report.hidden = !r.report; report.href = `/runs/${name}/file/report.html`;
  drawLoss(r.loss);
  const shown = $("#validation");
  const key = JSON.stringify(r.validation);
  if (shown.dataset.key !== key) {
    shown.dataset.key = key;
    shown.replaceChildren(...r.validation.slice().reverse().map((v) => el("figure", { "data-step": v.step },
      el("figcaption", { text: `step ${v.step}` }),
      ...v.images.map((src) => el("img", { class: "validation-image", src: `/runs/${name}/file/${src}`, alt: `step ${v.step}` })))));
  }
  const photos = $("#run-photos");
  if (photos.dataset.run !== name) {
    photos.dataset.run = name;
    photos.replaceChildren(...r.photos.map((p) => el("div", { class: "photo" },
      el("img", { src: `/runs/${name}/photo/${encodeURIComponent(p.name)}`, alt: p.name, title: p.caption || p.name }))));
  }
  $("#run-log").textContent = r.log.join("\n");
  const panel = $("#finished-panel");
  const wasHidden = panel.hidden;
  panel.hidden = r.state !== "finished";
  if (!panel.hidden && wasHidden) {
    $("#try-prompt").value = (r.settings && r.settings["data.instance_prompt"]) || "";
    const mix = $("#try-mix-run");
    mix.replaceChildren(el("option", { value: "", text: "(none)" }), ...r.finished_runs.filter((n) => n !== name).map((n) => el("option", { value: n, text: n })));
  }
  clearTimeout(timer);
  timer = setTimeout(() => showRun(name).catch(() => {}), ["running", "stopping", "queued"].includes(r.state) ? 1000 : 4000);
}

function initRun() {
  const act = (what) => async () => {
    try { $("#run-message").textContent = ""; await api("POST", `/api/runs/${current}/${what}`, {}); }
    catch (e) { $("#run-message").textContent = e.message; }
    await showRun(current);
  };
  $("#stop").addEventListener("click", act("stop"));
  $("#resume").addEventListener("click", act("resume"));
  $("#generate").addEventListener("click", async () => {
    const status = $("#generate-status");
    status.textContent = "generating…"; $("#generate").disabled = true;
    try {
      const body = { prompt: $("#try-prompt").value, seed: $("#try-seed").value, steps: $("#try-steps").value,
        guidance_scale: $("#try-guidance").value, num_images: $("#try-num").value, strength: $("#try-strength").value,
        mix_run: $("#try-mix-run").value, mix_weight: $("#try-mix-weight").value };
      const r = await api("POST", `/api/runs/${current}/generate`, body);
      $("#samples").prepend(...r.images.map((src) => el("img", { class: "sample", src, alt: body.prompt })));
      status.textContent = `${r.images.length} image(s)`;
    } catch (e) { status.textContent = e.message; }
    $("#generate").disabled = false;
  });
  $("#export").addEventListener("click", async () => {
    const status = $("#export-status"), link = $("#export-link");
    status.textContent = "exporting…"; link.hidden = true;
    try {
      const r = await api("POST", `/api/runs/${current}/export`, { format: $("#export-format").value });
      link.href = r.download; link.setAttribute("download", ""); link.textContent = `download ${r.path.split("/").pop()}`;
      link.hidden = false; status.textContent = "";
    } catch (e) { status.textContent = e.message; }
  });
  $("#fuse").addEventListener("click", async () => {
    $("#fuse-status").textContent = "fusing…";
    try { $("#fuse-status").textContent = `written to ${(await api("POST", `/api/runs/${current}/fuse`, { scale: $("#fuse-scale").value })).path}`; }
    catch (e) { $("#fuse-status").textContent = e.message; }
  });
}

// ------------------------------------------------------------------------------------------------------------
// views by URL hash: #new, #runs, #run/NAME

function route() {
  clearTimeout(timer);
  const hash = location.hash || "#new";
  for (const v of ["new", "runs", "run"]) $(`#view-${v}`).hidden = true;
  if (hash.startsWith("#run/")) {
    current = decodeURIComponent(hash.slice(5));
    $("#finished-panel").hidden = true; $("#samples").replaceChildren(); $("#export-link").hidden = true;
    $("#validation").dataset.key = ""; $("#run-photos").dataset.run = "";
    $("#view-run").hidden = false;
    showRun(current).catch((e) => { $("#run-message").textContent = e.message; });
  } else if (hash === "#runs") {
    current = null; $("#view-runs").hidden = false; showRuns();
  } else {
    current = null; $("#view-new").hidden = false;
  }
}

async function init() {
  SCHEMA = await api("GET", "/api/schema");
  buildForm();
  initNew();
  initRun();
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1";
}

init();
