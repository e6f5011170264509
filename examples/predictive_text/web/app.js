// The page: loads onnxruntime-web (served locally, single-threaded WASM: no cross-origin isolation
// needed), the bundle's model / tokenizer / runtime.json, and suggests words as the user types.
// window.slm exposes the pieces for the browser test (tests/test_web_predictive.py).
import * as ort from "./ort/ort.wasm.min.mjs";
import { ByteLevelBPE } from "./tokenizer.js";
import { OnnxLM, Predictor } from "./predictor.js";

ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href; // never a CDN
ort.env.wasm.numThreads = 1;
ort.env.wasm.proxy = false;

const $ = (id) => document.getElementById(id);
const slm = { latencies: [], shown: null, error: null };
window.slm = slm;

function percentile(xs, p) {
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

function render(text, suggestions, t0) {
  const box = $("suggestions");
  box.replaceChildren(...suggestions.map((s, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = s.word;
    b.title = `accept${i === 0 ? " (Tab)" : ""}`;
    b.addEventListener("click", () => accept(s));
    return b;
  }));
  const ms = performance.now() - t0;
  slm.latencies.push(ms);
  slm.shown = { text, words: suggestions.map((s) => s.word), completions: suggestions.map((s) => s.completion), ms };
  const xs = slm.latencies;
  $("latency").textContent = `keystroke → suggestions: ${ms.toFixed(0)} ms (p50 ${percentile(xs, 50).toFixed(0)} / ` +
    `p90 ${percentile(xs, 90).toFixed(0)} ms over ${xs.length}) · model calls ${slm.predictor.lastCalls}`;
}

// One search at a time; keystrokes that arrive meanwhile collapse into the latest text.
let pending = null;
let running = false;
function request(t0) {
  pending = { text: $("text").value, t0 };
  if (!running) run();
}
async function run() {
  running = true;
  try {
    while (pending) {
      const { text, t0 } = pending;
      pending = null;
      const suggestions = await slm.predictor.suggest(text);
      if (!pending) render(text, suggestions, t0); // a stale answer is not shown
    }
  } catch (e) {
    fail(e);
  } finally {
    running = false;
  }
}

function accept(s) {
  const area = $("text");
  area.value += s.completion;
  area.focus();
  request(performance.now());
}

function fail(e) {
  slm.error = String(e && e.message ? e.message : e);
  $("status").textContent = `error: ${slm.error}`;
  $("status").className = "error";
}

async function main() {
  const t0 = performance.now();
  const [spec, tokDesc, words] = await Promise.all(["bundle/runtime.json", "bundle/tokenizer.json", "bundle/words.json"].map(async (u) => {
    const r = await fetch(u);
    if (!r.ok) throw new Error(`${u}: HTTP ${r.status}`);
    return r.json();
  }));
  if (spec.format !== "onnx" || spec.kind !== "causal-lm") throw new Error(`need an onnx causal-lm bundle, got ${spec.format} ${spec.kind}`);
  const tokenizer = new ByteLevelBPE(tokDesc);
  const lm = await OnnxLM.open(ort, "bundle/model.onnx", spec);
  const predictor = new Predictor(lm, tokenizer, new Set(words));
  Object.assign(slm, {
    ort, spec, tokenizer, lm, predictor,
    encode: (text) => tokenizer.encode(text),
    logits: async (ids) => Array.from(await lm.feed(ids)),
    suggest: async (text) => predictor.suggest(text),
  });
  const area = $("text");
  area.addEventListener("input", (e) => request(e.timeStamp || performance.now()));
  area.addEventListener("keydown", (e) => {
    if (e.key === "Tab" && slm.shown && slm.shown.text === area.value && slm.shown.completions.length) {
      e.preventDefault();
      accept({ completion: slm.shown.completions[0] });
    }
  });
  area.disabled = false;
  area.focus();
  $("status").textContent = `model ready in ${((performance.now() - t0) / 1000).toFixed(1)} s · ` +
    `${spec.model_type} ${spec.recipe} · onnxruntime-web ${(ort.env.versions && ort.env.versions.web) || ""} (wasm, 1 thread)`;
  slm.ready = true;
  request(performance.now());
}

main().catch(fail);
