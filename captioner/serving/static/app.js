// The captioner page: each chosen or dropped photo is sent in its own request to
// /v1/captions (the server batches concurrent requests), so captions appear as they
// arrive. Everything shown is set with textContent: nothing from a file or the server
// is ever parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text) { $("status").textContent = text; }

function boundedNumber(input) {
  const value = Number.parseInt(input.value, 10);
  const low = Number.parseInt(input.min, 10), high = Number.parseInt(input.max, 10);
  if (!Number.isFinite(value)) return low;
  return Math.min(high, Math.max(low, value));
}

async function describeModel() {
  // Waits for /health/ready, then shows what the model is and applies its decode bounds.
  for (;;) {
    try {
      const ready = await fetch("/health/ready");
      if (ready.ok) break;
      const body = await ready.json().catch(() => ({}));
      if (body.status === "failed") { $("model").textContent = body.message || "The model failed to load."; return; }
    } catch (error) { /* the server is starting */ }
    $("model").textContent = "Loading the model\u2026";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  const response = await fetch("/model/metadata");
  if (!response.ok) return;
  const meta = await response.json();
  const backbone = meta.backbone && meta.backbone.backbone ? meta.backbone.backbone : "unknown backbone";
  $("model").textContent = `Model ${meta.id}: ${backbone} features, ${meta.vocab_size} words. Ready.`;
  if (meta.decode) {
    $("beam").max = meta.decode.max_beam_size; $("beam").value = meta.decode.beam_size;
    $("words").max = meta.decode.max_max_words; $("words").value = meta.decode.max_words;
  }
}

function makeCard(file) {
  const card = element("li", "card");
  card.dataset.state = "pending";
  const thumb = element("img");
  thumb.alt = `Thumbnail of ${file.name}`;
  const url = URL.createObjectURL(file);
  thumb.src = url;
  thumb.addEventListener("load", () => URL.revokeObjectURL(url));
  thumb.addEventListener("error", () => {
    URL.revokeObjectURL(url);
    thumb.replaceWith(element("div", "noimg", "no preview"));
  });
  const body = element("div", "body");
  body.append(element("h2", "name", file.name), element("p", "caption", "Captioning\u2026"));
  card.append(thumb, body);
  $("results").append(card);
  return card;
}

function showResult(card, slot) {
  const body = card.querySelector(".body");
  const caption = body.querySelector(".caption");
  if (slot.error) {
    card.dataset.state = "error";
    caption.remove();
    const error = element("p", "error", slot.error.message);
    error.setAttribute("role", "alert");
    body.append(error);
    return;
  }
  card.dataset.state = "done";
  caption.textContent = slot.caption;
  const beams = element("ol", "beams");
  beams.setAttribute("aria-label", `Top ${slot.beams.length} captions of ${slot.file_name}`);
  for (const beam of slot.beams) {
    beams.append(element("li", "beam", `${beam.caption} (p = ${beam.probability.toPrecision(3)})`));
  }
  body.append(beams);
}

async function captionFile(file, beam, words) {
  const card = makeCard(file);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const response = await fetch(`/v1/captions?beam_size=${beam}&max_words=${words}`, { method: "POST", body: form });
    const body = await response.json().catch(() => null);
    if (response.ok && body && body.images && body.images.length === 1) {
      showResult(card, body.images[0]);
    } else {
      const message = body && typeof body.message === "string" ? body.message
        : `the server answered ${response.status} ${response.statusText}`;
      showResult(card, { error: { message: `${file.name}: ${message}` } });
    }
  } catch (error) {
    showResult(card, { error: { message: `${file.name}: the server could not be reached (${error.message})` } });
  }
}

async function captionFiles(files) {
  const list = Array.from(files);
  if (!list.length) return;
  const beam = boundedNumber($("beam")), words = boundedNumber($("words"));
  setStatus(`Captioning ${list.length} photo${list.length === 1 ? "" : "s"}\u2026`);
  await Promise.all(list.map((file) => captionFile(file, beam, words)));
  setStatus(`Done: ${list.length} photo${list.length === 1 ? "" : "s"}.`);
}

function setup() {
  const drop = $("drop"), input = $("files");
  input.addEventListener("change", () => { captionFiles(input.files); input.value = ""; });
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    captionFiles(event.dataTransfer.files);
  });
  $("form").addEventListener("submit", (event) => event.preventDefault());
  describeModel();
}

document.addEventListener("DOMContentLoaded", setup);
