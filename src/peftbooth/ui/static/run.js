// peftbooth ui, second half: the runs list, one run's page (progress, actions, try it, export, fuse), the poll
// loop that keeps whatever is shown true, and the views by URL hash. Helpers ($, el, api) are in app.js.
"use strict";

// ------------------------------------------------------------------------------------------------------------
// runs list: newest first (the server sorts), each with delete

const BUSY = ["running", "stopping", "queued"]; // training or waiting to: no delete (the server refuses too)

async function deleteRun(name, after) {
  if (!window.confirm(`Delete the run ${name} and everything in its folder (photos, adapters, samples)?`)) return;
  await api("DELETE", `/api/runs/${name}`);
  forgetDraft(name);
  await after();
}

async function showRuns() {
  const { runs } = await api("GET", "/api/runs");
  const body = $("#runs-table tbody");
  body.replaceChildren();
  for (const r of runs) {
    const del = el("button", { type: "button", class: "delete", text: "delete", disabled: BUSY.includes(r.state),
      title: BUSY.includes(r.state) ? "stop it first" : "delete this run" });
    del.addEventListener("click", () => deleteRun(r.name, showRuns).catch((e) => { $("#runs-message").textContent = e.message; }));
    body.append(el("tr", { "data-run": r.name },
      el("td", {}, el("a", { href: `#run/${r.name}`, text: r.name })), el("td", { text: r.model || "" }),
      el("td", { text: r.adapter || "" }), el("td", { text: r.steps ?? "" }),
      el("td", {}, el("span", { class: `state ${r.state}`, text: r.state + (r.queue_position ? ` #${r.queue_position}` : "") })),
      el("td", { text: r.date }), el("td", {}, del)));
  }
  $("#runs-empty").hidden = runs.length > 0;
  return runs.some((r) => BUSY.includes(r.state));
}

// ------------------------------------------------------------------------------------------------------------
// one run: progress, validation, actions, try it, export, fuse

const clock = (s) => { s = Math.round(s); const m = Math.floor(s / 60); return `${m}:${String(s % 60).padStart(2, "0")}`; };

function drawLoss(points) {
  const svg = $("#loss-chart"), NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  svg.dataset.points = String(points.length);
  if (!points.length) return;
  const W = 400, H = 160, P = 28;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const px = (x) => P + (x - x0) / (x1 - x0) * (W - 2 * P), py = (y) => H - P - (y - y0) / (y1 - y0) * (H - 2 * P);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2a6df4"); line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  // a line through one point draws nothing: few points are also drawn as dots
  for (const [x, y] of points.length <= 60 ? points : []) {
    const dot = document.createElementNS(NS, "circle");
    dot.setAttribute("cx", px(x).toFixed(1)); dot.setAttribute("cy", py(y).toFixed(1)); dot.setAttribute("r", "2.5");
    dot.setAttribute("fill", "#2a6df4");
    svg.append(dot);
  }
  for (const [x, y, t] of [[P, 12, y1.toFixed(3)], [P, H - P + 4, y0.toFixed(3)], [P, H - 6, `step ${x0}`], [W - P - 40, H - 6, `step ${x1}`]]) {
    const text = document.createElementNS(NS, "text");
    text.setAttribute("x", x); text.setAttribute("y", y); text.setAttribute("font-size", "10"); text.textContent = t;
    svg.append(text);
  }
}

function phaseText(r) { // what a live run does before (or besides) its training steps, in words
  if (!r.phase || r.phase === "train") return "";
  if (r.phase === "starting") return "starting: loading the model";
  if (r.phase === "class images") return `making class images ${r.phase_step}/${r.phase_total}`;
  return `${r.phase} ${r.phase_step}/${r.phase_total}`;
}

let current = null; // the run shown
let shownRun = null; // its last answer (for Edit)

async function showRun(name) {
  const r = await api("GET", `/api/runs/${name}`);
  if (current !== name) return false; // the user went elsewhere meanwhile
  shownRun = r;
  $("#run-title").textContent = name;
  const state = $("#run-state");
  state.textContent = r.state; state.className = `state ${r.state}`; state.dataset.state = r.state;
  $("#run-progress").max = r.total || 1; $("#run-progress").value = r.step || 0;
  $("#run-step").textContent = r.state === "draft" ? "" : `step ${r.step || 0} / ${r.total ?? "?"}`;
  $("#run-step").dataset.step = r.step || 0;
  $("#run-rate").textContent = r.it_s ? `${r.it_s.toFixed(2)} it/s` : "";
  $("#run-eta").textContent = r.seconds_left != null ? `${clock(r.seconds_left)} left` : "";
  $("#run-phase").textContent = phaseText(r);
  $("#queue-pos").textContent = r.queue_position ? `queued, #${r.queue_position}` : "";
  $("#stop-note").textContent = r.stop_waits ? "Stop noted: it is sent once the first training step is done " +
    "(before that, stopping would leave no checkpoint to resume from)" : "";
  // every state has a way forward: draft -> Edit, ready -> Start, queued/running -> Stop,
  // stopped -> Resume, failed -> Resume (a checkpoint) or Start over (none); all but busy ones -> Delete
  const cps = r.checkpoints.length > 0;
  $("#stop").disabled = !["running", "queued"].includes(r.state);
  $("#resume").disabled = !(["stopped", "failed"].includes(r.state) && cps);
  $("#start-run").hidden = !(r.state === "ready" || (r.state === "failed" && !cps));
  $("#start-run").textContent = r.state === "failed" ? "Start over" : "Start";
  $("#edit").hidden = r.state !== "draft";
  $("#delete").disabled = BUSY.includes(r.state);
  $("#stop").dataset.checkpoints = r.checkpoints.join(",");
  $("#checkpoints").textContent = cps ? r.checkpoints.map((s) => `step ${s}`).join(", ") : "none yet";
  $("#command-row").hidden = !r.command; // a draft has no config.yaml to give to the CLI
  $("#run-command").textContent = (r.command || "") + (cps && r.state !== "finished" ? " --resume latest" : "");
  const report = $("#report-link");
  report.hidden = !r.report; report.href = `/runs/${name}/file/report.html`;
  drawLoss(r.loss);
  $("#validation-warning").textContent = r.validation_warning || "";
  $("#validation-warning").hidden = !r.validation_warning;
  const shown = $("#validation");
  const key = JSON.stringify(r.validation);
  if (shown.dataset.key !== key) {
    shown.dataset.key = key;
    shown.replaceChildren(...r.validation.slice().reverse().map((v) => el("figure", { "data-step": v.step },
      el("figcaption", { text: `step ${v.step}` }),
      ...v.images.map((src, i) => el("span", { class: "val" },
        el("img", { class: "validation-image", src: `/runs/${name}/file/${src}`, alt: v.prompts[i] || `step ${v.step}` }),
        el("small", { class: "val-prompt", text: v.prompts[i] || "" }))))));
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
    showFused(r.fused ? `/runs/${name}/fused.zip` : null);
    await showSamples(name);
  }
  return BUSY.includes(r.state);
}

// "try it" history: every image with the settings it was made with, newest first, also after a reload
function sampleCard(s) {
  const mix = s.mix_run ? ` · mix ${s.mix_run} at ${s.mix_weight}` : "";
  const label = `“${s.prompt}” · strength ${s.strength}${mix} · seed ${s.seed} (${s.index + 1}/${s.count}) · ${s.steps} steps`;
  return el("figure", { class: "sample-card" }, el("img", { class: "sample", src: s.src, alt: s.prompt }),
    el("figcaption", { class: "sample-label", text: label }));
}

async function showSamples(name) {
  const { samples } = await api("GET", `/api/runs/${name}/samples`);
  if (current === name) $("#samples").replaceChildren(...samples.map(sampleCard));
}

function showFused(href) {
  const link = $("#fuse-link");
  link.hidden = !href;
  if (href) { link.href = href; link.setAttribute("download", ""); }
}

function initRun() {
  const act = (what) => async () => {
    try { $("#run-message").textContent = ""; await api("POST", `/api/runs/${current}/${what}`, {}); }
    catch (e) { $("#run-message").textContent = e.message; }
    poll();
  };
  $("#stop").addEventListener("click", act("stop"));
  $("#resume").addEventListener("click", act("resume"));
  $("#start-run").addEventListener("click", act("queue"));
  $("#edit").addEventListener("click", () => openDraft(current, shownRun && shownRun.form));
  $("#delete").addEventListener("click", () => deleteRun(current, async () => { location.hash = "#runs"; })
    .catch((e) => { $("#run-message").textContent = e.message; }));
  $("#generate").addEventListener("click", async () => {
    const status = $("#generate-status");
    status.textContent = "generating…"; $("#generate").disabled = true;
    try {
      const body = { prompt: $("#try-prompt").value, seed: $("#try-seed").value, steps: $("#try-steps").value,
        guidance_scale: $("#try-guidance").value, guidance_cutoff: $("#try-cutoff").value, num_images: $("#try-num").value, strength: $("#try-strength").value,
        mix_run: $("#try-mix-run").value, mix_weight: $("#try-mix-weight").value };
      const r = await api("POST", `/api/runs/${current}/generate`, body);
      $("#samples").prepend(...r.samples.map(sampleCard));
      status.textContent = `${r.images.length} image(s)`;
    } catch (e) { status.textContent = e.message; }
    $("#generate").disabled = false;
  });
  $("#export").addEventListener("click", async () => {
    const status = $("#export-status"), link = $("#export-link");
    status.textContent = "exporting…"; link.hidden = true;
    try {
      const r = await api("POST", `/api/runs/${current}/export`, { format: $("#export-format").value });
      link.href = r.download; link.setAttribute("download", r.filename); link.textContent = `download ${r.filename}`;
      link.hidden = false; status.textContent = "";
    } catch (e) { status.textContent = e.message; }
  });
  $("#fuse").addEventListener("click", async () => {
    const status = $("#fuse-status"), body = { scale: $("#fuse-scale").value };
    status.textContent = "fusing…";
    try {
      let r;
      try { r = await api("POST", `/api/runs/${current}/fuse`, body); }
      catch (e) { // fused before: replaced only if the user says so
        if (e.status !== 409) throw e;
        if (!window.confirm(`${e.message}.\n\nReplace the fused model?`)) { status.textContent = "kept the earlier fused model"; return; }
        r = await api("POST", `/api/runs/${current}/fuse`, { ...body, overwrite: true });
      }
      status.textContent = `written to ${r.path}`;
      showFused(r.download);
    } catch (e) { status.textContent = e.message; }
  });
}

// ------------------------------------------------------------------------------------------------------------
// the poll loop: whatever view is open is read again, fast while something trains; while the server is
// unreachable it keeps trying with backoff (0.5, 1, 2, 4, then every 5 s) and never gives up

let pollTimer = null, failures = 0;

async function refreshView() {
  if (current) return showRun(current);
  if (!$("#view-runs").hidden) return showRuns();
  await api("GET", "/api/runs"); // the new-run form: only to notice the server going and coming back
  return false;
}

async function poll() {
  clearTimeout(pollTimer);
  let fast = false;
  try { fast = await refreshView(); failures = 0; }
  catch (e) {
    if (e.offline) failures += 1;
    else if (current) $("#run-message").textContent = e.message;
  }
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, offline ? Math.min(500 * 2 ** (failures - 1), 5000) : fast ? 1000 : 4000);
}

function reconnected() {
  failures = 0;
  if (!SCHEMA) return; // still starting: init goes on by itself
  setTimeout(() => { poll(); if (current && !$("#finished-panel").hidden) showSamples(current).catch(() => {}); }, 0);
}

// ------------------------------------------------------------------------------------------------------------
// views by URL hash: #new, #runs, #run/NAME

function route() {
  const hash = location.hash || "#new";
  for (const v of ["new", "runs", "run"]) $(`#view-${v}`).hidden = true;
  $("#run-message").textContent = "";
  if (hash.startsWith("#run/")) {
    current = decodeURIComponent(hash.slice(5));
    $("#finished-panel").hidden = true; $("#samples").replaceChildren(); $("#export-link").hidden = true;
    $("#validation").dataset.key = ""; $("#run-photos").dataset.run = ""; $("#fuse-status").textContent = "";
    $("#view-run").hidden = false;
  } else if (hash === "#runs") {
    current = null; $("#view-runs").hidden = false;
  } else {
    current = null; $("#view-new").hidden = false;
  }
  poll();
}

async function init() {
  // the server may be down when the page opens, too: try again with the same backoff
  for (let wait = 500; !SCHEMA; wait = Math.min(wait * 2, 5000)) {
    try { SCHEMA = await api("GET", "/api/schema"); } catch (e) { await new Promise((ok) => setTimeout(ok, wait)); }
  }
  buildForm();
  initNew();
  initRun();
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1";
}

init();
