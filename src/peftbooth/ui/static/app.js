// peftbooth ui: one page over the JSON API. Everything shown is read back from the run folders, so a reload
// (or a restarted server) shows the same thing. Text from the server is only ever set as textContent.
// This file: helpers, the connection state, the new-run form; run.js: the runs, one run, polling, views.
"use strict";

const $ = (sel) => document.querySelector(sel);
let SCHEMA = null;
let draft = null; // name of the run folder being prepared under "New run"

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

// The server can go away under an open page (a restart, a crash): every call that cannot reach it marks the
// page offline (a banner, every control disabled) instead of leaving it frozen on what it last showed; the
// poll loop (run.js) keeps trying with backoff, and the first answer refreshes everything.
let offline = false;
const unreachable = () => Object.assign(new Error("the server is unreachable; reconnecting…"), { offline: true });

async function api(method, url, body, raw) {
  const opts = { method, headers: {} };
  if (raw !== undefined) { opts.body = raw; opts.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  let r, data;
  try { r = await fetch(url, opts); } catch (e) { setOffline(true); throw unreachable(); }
  // not JSON: not this server answering (a proxy's error page, a server half up); try again like a refusal
  try { data = await r.json(); } catch (e) { setOffline(true); throw unreachable(); }
  setOffline(false);
  if (!r.ok) throw Object.assign(new Error(data.error || r.statusText), { status: r.status, data });
  return data;
}

function setOffline(on) {
  if (on === offline) return;
  offline = on;
  document.body.dataset.offline = on ? "1" : "";
  $("#conn").hidden = !on;
  $("#app").disabled = on; // a disabled fieldset: every button and input of the page at once, restored as it was
  if (!on) reconnected(); // run.js: refresh everything (state, queue position, step, it/s, samples)
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
    el("label", { for: fieldId(f.key) }, f.label + " ", el("code", { class: "flag", text: f.flag })), input,
    el("small", { class: "help", text: f.help }), el("div", { class: "error", "data-error-for": f.key }));
  input.addEventListener("input", () => { // an edited field's old problem goes; the next check says if it stays
    row.classList.remove("has-error"); row.querySelector("[data-error-for]").textContent = "";
    edited.add(f.key); // the user's value: the model's defaults never replace it
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
  $("#preset").replaceChildren(); // each preset is named for what it does; none: the base model's defaults
  for (const [name, label] of Object.entries(SCHEMA.preset_labels)) $("#preset").append(el("option", { value: name, text: label }));
  // the defaults follow the model (and the adapter type, prior preservation and masks): asked again on change
  for (const k of ["model.model", "unet_adapter.adapter", "data.with_prior_preservation"])
    $("#" + fieldId(k)).addEventListener("change", refreshDefaults);
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

// Which fields the user set: typed into (edited) or chosen by the preset and the low-memory switch. The server
// fills the others with the base model's defaults (peftbooth.model_defaults), as `peftbooth train` fills what no
// flag gives; the page shows those values in the inputs, so what is shown is what trains.
const edited = new Set();
let fromModel = new Set(); // fields the model's defaults set last time
const presetValues = () => ({ ...(SCHEMA.presets[$("#preset").value] || {}), ...($("#low-memory").checked ? SCHEMA.low_memory : {}) });
const givenKeys = () => [...new Set([...edited, ...Object.keys(presetValues())])];
const fieldDefault = (k) => (SCHEMA.fields.find((f) => f.key === k) || {}).default;

function applyPreset() {
  const touched = new Set([...Object.values(SCHEMA.presets).flatMap(Object.keys), ...Object.keys(SCHEMA.low_memory)]);
  for (const k of touched) if (!edited.has(k)) setValue(k, fieldDefault(k));
  const values = presetValues();
  for (const [k, v] of Object.entries(values)) if (!edited.has(k)) setValue(k, v);
  $("#preset-help").textContent = Object.entries(values).map(([k, v]) => `${k.split(".")[1]}=${v}`).join(", ");
  stepsHint();
  refreshDefaults();
}

async function refreshDefaults() {
  let r;
  try { r = await api("POST", "/api/defaults", { name: draft || "", values: formValues(), given: givenKeys() }); }
  catch (e) { return; } // unreachable or unparsable: the next check says why
  const given = new Set(givenKeys());
  for (const k of fromModel) if (!given.has(k) && !(k in r.values)) setValue(k, fieldDefault(k)); // another model
  for (const [k, v] of Object.entries(r.values)) if (!given.has(k)) setValue(k, v);
  fromModel = new Set(Object.keys(r.values));
  $("#model-defaults").textContent = r.line;
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

function nameError(text) { $("#run-name-error").textContent = text; }

async function ensureDraft() {
  if (!draft) {
    try { draft = (await api("POST", "/api/runs", { name: $("#run-name").value || "run" })).name; }
    catch (e) { if (e.status === 400) nameError(e.message); throw e; } // a taken name: said, never renamed
  }
  $("#run-name").value = draft;
  $("#run-name").disabled = true;
  return draft;
}

function openDraft(name, form) { // "Edit" on a draft's page: its photos and its last checked settings
  draft = name; $("#run-name").value = name; $("#run-name").disabled = true; nameError("");
  for (const [k, v] of Object.entries(form || {})) {
    setValue(k, v);
    // a value other than the dataclass's was set by the user (or the model's defaults, which it then keeps)
    if (JSON.stringify(v) !== JSON.stringify(fieldDefault(k)) && !(Array.isArray(v) && !v.length)) edited.add(k);
  }
  location.hash = "#new";
  showPhotos();
}

function forgetDraft(name) {
  if (draft !== name) return;
  draft = null; $("#run-name").disabled = false; $("#photos").replaceChildren();
}

async function upload(fileList) {
  let name;
  try { name = await ensureDraft(); } catch (e) { return; }
  const problems = [];
  // photos first: NAME.mask.png and NAME.txt are refused until their photo NAME.* is there
  const after = (f) => /\.(mask\.png|txt)$/i.test(f.name);
  const ordered = [...fileList].sort((a, b) => after(a) - after(b));
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
  refreshDefaults(); // photos that all have masks turn on the world's masked loss
}

async function check(start) {
  // no draft yet (no photo given): checked under the typed name, and nothing is created on the server
  const url = draft ? `/api/runs/${draft}/${start ? "start" : "check"}` : `/api/new/${start ? "start" : "check"}`;
  $("#check-result").textContent = start ? "checking…" : "";
  let r;
  try { r = await api("POST", url, { name: $("#run-name").value || "run", values: formValues(), given: givenKeys() }); }
  catch (e) { if (e.status === 400 && !draft) nameError(e.message); throw e; }
  showErrors(r.errors);
  $("#check-result").textContent = r.ok ? (start ? "started" : "all settings are valid") + (r.note ? `; note: ${r.note}` : "")
    : "see the problems above";
  if (r.ok && start) { draft = null; $("#run-name").disabled = false; location.hash = `#run/${r.name}`; }
}

function initNew() {
  $("#photo-rule").textContent = SCHEMA.limits.photo_rule;
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files); });
  // emptied after each choice, so choosing the same file again (after a refused name) still uploads it
  $("#photo-input").addEventListener("change", (e) => { const chosen = [...e.target.files]; e.target.value = ""; upload(chosen); });
  $("#run-name").addEventListener("input", () => nameError(""));
  $("#photo-folder").addEventListener("input", () => { $("#photo-errors").textContent = ""; }); // about the old text
  $("#use-folder").addEventListener("click", async () => {
    try {
      const name = await ensureDraft();
      await api("POST", `/api/runs/${name}/folder`, { path: $("#photo-folder").value });
      $("#photo-errors").textContent = "";
    } catch (e) { if (!$("#run-name-error").textContent) $("#photo-errors").textContent = e.message; }
    await showPhotos();
  });
  $("#check").addEventListener("click", () => check(false).catch((e) => { $("#general-errors").textContent = e.message; }));
  $("#start").addEventListener("click", () => check(true).catch((e) => { $("#general-errors").textContent = e.message; }));
}
