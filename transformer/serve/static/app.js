// The page: translate as the user types (debounced), show the alternatives, and draw
// where each output word looked. Plain JavaScript, no build step, nothing from a CDN:
// it talks only to this server (POST translate, POST attention, GET info).
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 250;

const state = {
  info: null,
  lines: [],        // the non-empty lines last translated
  attention: null,  // the last /attention response
  seq: 0,           // numbers the requests, so that a slow old answer never replaces a newer one
  timer: null,
};

async function post(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  const data = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function fillSelect(select, values, label = (v) => String(v), selected = undefined) {
  const keep = selected !== undefined ? String(selected) : select.value;
  select.replaceChildren(...values.map((v) => {
    const option = document.createElement("option");
    option.value = String(v);
    option.textContent = label(v);
    return option;
  }));
  if (values.map(String).includes(keep)) select.value = keep;
}

// -- translation --------------------------------------------------------------

function options() {
  return { beam_size: Number($("beam").value), alternatives: Number($("alternatives").value) };
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(translate, DEBOUNCE_MS);
}

async function translate() {
  const lines = $("source").value.split("\n").map((l) => l.trim()).filter((l) => l);
  const seq = ++state.seq;
  if (!lines.length) {
    state.lines = [];
    $("translation").textContent = "";
    $("alternatives-list").replaceChildren();
    $("attention").hidden = true;
    setStatus("");
    return;
  }
  setStatus("translating…");
  let data;
  try {
    data = await post("translate", { q: lines, ...options() });
  } catch (e) {
    if (seq === state.seq) setStatus(e.message, true);
    return;
  }
  if (seq !== state.seq) return;  // the text changed meanwhile: a newer request is on its way
  state.lines = lines;
  $("translation").textContent = data.translatedText.join("\n");
  showAlternatives(data);
  setStatus("");
  const chosen = Number($("sentence").value) || 0;
  fillSelect($("sentence"), lines.map((_, i) => i), (i) => `${i + 1}: ${lines[i].slice(0, 40)}`,
             chosen < lines.length ? chosen : 0);
  await loadAttention(seq);
}

function showAlternatives(data) {
  const list = $("alternatives-list");
  list.replaceChildren();
  if (!data.alternatives) return;
  data.alternatives.forEach((alternatives, i) => {
    alternatives.forEach((text, j) => {
      const item = document.createElement("li");
      if (data.alternatives.length > 1) item.dataset.sentence = String(i + 1);
      const words = document.createElement("span");
      words.className = "text";
      words.textContent = text;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = data.scores[i][j + 1].toFixed(3);
      score.title = "score: log-probability / length penalty (the best has " + data.scores[i][0].toFixed(3) + ")";
      item.append(words, score);
      list.append(item);
    });
  });
}

// -- attention ----------------------------------------------------------------

async function loadAttention(seq) {
  const line = state.lines[Number($("sentence").value) || 0];
  if (line === undefined) return;
  let data;
  try {
    data = await post("attention", { q: line, beam_size: options().beam_size });
  } catch (e) {
    if (seq === state.seq) setStatus(e.message, true);
    return;
  }
  if (seq !== state.seq) return;
  state.attention = data;
  fillSelect($("layer"), [...Array(data.layers).keys()], (i) => `${i + 1}`);
  fillSelect($("head"), ["mean", ...Array(data.heads).keys()], (h) => (h === "mean" ? "mean of all" : `${h + 1}`));
  if ($("head").dataset.initialised !== "yes") {
    $("head").value = "0";
    $("head").dataset.initialised = "yes";
  }
  $("attention").hidden = false;
  drawAttention();
}

// The weights of the chosen kind, layer and head (or the mean of the heads): rows are
// the tokens attending (queries), columns the tokens attended to (keys).
function chosenWeights() {
  const data = state.attention;
  const layer = data[$("kind").value][Number($("layer").value)];
  const head = $("head").value;
  if (head !== "mean") return layer[Number(head)];
  return layer[0].map((row, q) => row.map((_, k) => layer.reduce((sum, h) => sum + h[q][k], 0) / layer.length));
}

const SIDES = {
  encoder_decoder: ["target", "source"],
  encoder: ["source", "source"],
  decoder_self: ["target", "target"],
};

function tokensOf(side) {
  return side === "source" ? state.attention.source_tokens : state.attention.target_tokens;
}

function light(element, weight) {
  element.style.backgroundColor = `rgba(var(--accent), ${weight.toFixed(3)})`;
  element.classList.toggle("lit-strong", weight > 0.55);
  element.dataset.weight = weight.toFixed(4);
}

function clearLights() {
  document.querySelectorAll("#attention .token").forEach((el) => {
    el.style.backgroundColor = "";
    el.classList.remove("lit-strong", "hovered");
    delete el.dataset.weight;
  });
  document.querySelectorAll("#heatmap .hovered").forEach((el) => el.classList.remove("hovered"));
}

function drawAttention() {
  if (!state.attention) return;
  const kind = $("kind").value;
  const [querySide, keySide] = SIDES[kind];
  const weights = chosenWeights();
  const queries = tokensOf(querySide), keys = tokensOf(keySide);
  $("queries-name").textContent = `${querySide} (attending)`;
  $("keys-name").textContent = `${keySide} (attended to)`;

  const makeTokens = (container, tokens, onEnter) => {
    container.replaceChildren(...tokens.map((text, i) => {
      const el = document.createElement("span");
      el.className = "token";
      el.textContent = text;
      el.dataset.index = String(i);
      el.addEventListener("mouseenter", () => onEnter(i, el));
      el.addEventListener("mouseleave", clearLights);
      return el;
    }));
  };
  // A query token lights the keys it attended to (its row); a key token lights the
  // queries that attended to it (its column).
  makeTokens($("queries"), queries, (q, el) => {
    clearLights();
    el.classList.add("hovered");
    $("keys").querySelectorAll(".token").forEach((k, i) => light(k, weights[q][i]));
    $("heatmap").querySelectorAll(`tbody tr:nth-child(${q + 1}) th`).forEach((th) => th.classList.add("hovered"));
  });
  makeTokens($("keys"), keys, (k, el) => {
    clearLights();
    el.classList.add("hovered");
    $("queries").querySelectorAll(".token").forEach((q, i) => light(q, weights[i][k]));
    $("heatmap").querySelectorAll(`thead th:nth-child(${k + 2})`).forEach((th) => th.classList.add("hovered"));
  });
  drawHeatmap(weights, queries, keys);
}

function drawHeatmap(weights, queries, keys) {
  const table = $("heatmap");
  const head = document.createElement("thead");
  const top = document.createElement("tr");
  top.append(document.createElement("th"));
  keys.forEach((k) => {
    const th = document.createElement("th");
    th.textContent = k;
    top.append(th);
  });
  head.append(top);
  const body = document.createElement("tbody");
  weights.forEach((row, q) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = queries[q];
    tr.append(th);
    row.forEach((w, k) => {
      const td = document.createElement("td");
      td.style.backgroundColor = `rgba(var(--accent), ${w.toFixed(3)})`;
      td.title = `${queries[q]} → ${keys[k]}: ${w.toFixed(3)}`;
      tr.append(td);
    });
    body.append(tr);
  });
  table.replaceChildren(head, body);
}

// -- start --------------------------------------------------------------------

async function start() {
  try {
    const response = await fetch("info");
    state.info = await response.json();
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`, true);
    return;
  }
  const info = state.info;
  const names = { de: "German", en: "English" };
  $("model").textContent = `${info.source} → ${info.target}` +
    (info.task === "copy" ? " (the copy task: type symbols such as 1 2 3)" : "") +
    ` · ${info.model.layers} + ${info.model.layers} layers, d_model ${info.model.d_model}, ` +
    `${info.model.heads} heads, ${info.model.parameters.toLocaleString("en")} parameters · ` +
    `${info.checkpoint.path.split("/").pop()}`;
  $("source-label").textContent = names[info.source] || info.source;
  $("target-label").textContent = names[info.target] || info.target;
  const beams = [...Array(Math.min(info.limits.max_beam_size, 8)).keys()].map((i) => i + 1);
  if (!beams.includes(info.decoding.beam_size)) beams.push(info.decoding.beam_size);
  fillSelect($("beam"), beams, (b) => (b === 1 ? "1 (greedy)" : String(b)), info.decoding.beam_size);
  updateAlternatives(2);
  $("source").addEventListener("input", schedule);
  $("beam").addEventListener("change", () => { updateAlternatives(); translate(); });
  $("alternatives").addEventListener("change", translate);
  $("sentence").addEventListener("change", () => loadAttention(state.seq));
  for (const id of ["kind", "layer", "head"]) $(id).addEventListener("change", drawAttention);
  if ($("source").value.trim()) translate();
}

// Alternatives come from the beam: at most beam size - 1 of them.
function updateAlternatives(preferred) {
  const beam = Number($("beam").value);
  const current = preferred !== undefined ? preferred : Number($("alternatives").value);
  fillSelect($("alternatives"), [...Array(beam).keys()], String, Math.min(current, beam - 1));
}

start();
