// Next-word suggestions in the browser: the ONNX bundle run by onnxruntime-web with its KV cache,
// and the same whole-word best-first search as examples/predictive_text/suggest.py (same parameters,
// same scoring), so the page and the terminal app suggest the same words for the same text.
//
// Token bytes are kept as "binary strings" (one char per byte, 0-255): prefix tests, sorting and
// map keys then behave like Python's bytes.

const WORD_ASCII = new Set(Array.from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'", (c) => c.charCodeAt(0)));
const WORD_CHAR = /^[\p{L}\p{N}'’]$/u;
const PARTIAL = /[\p{L}\p{N}\p{M}_'’]*$/u;
const OPENERS = "\n\"'(“‘[-";
const APOS_BYTES = "'";
const RSQUO_BYTES = "\u00e2\u0080\u0099"; // ’ in UTF-8
const strict = new TextDecoder("utf-8", { fatal: true });
const lenient = new TextDecoder("utf-8");

const toBytes = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
const utf8Binary = (text) => String.fromCharCode(...new TextEncoder().encode(text));

// The same whole-word check as suggest.py's Lexicon / acceptable(); the word set is the server's
// /bundle/words.json (built by suggest.Lexicon from the vocabulary and shipped text).
const CONTRACTION = /^([a-z]+?)(n't|'s|'ll|'re|'ve|'d|'m)$/;
const CONTRACTION_BASES = new Set(["ca", "wo", "sha", "ai"]);
const ALNUM_START = /^[\p{L}\p{N}]/u;

export function normalise(word) { return word.replace(/’/g, "'").toLowerCase(); }

export function inLexicon(word, words) {
  const w = normalise(word);
  if (words.has(w)) return true;
  const m = CONTRACTION.exec(w);
  return !!m && (words.has(m[1]) || CONTRACTION_BASES.has(m[1]));
}

/** A suggestion worth a slot: starts with a letter or digit, a known word, not the word already typed. */
export function acceptable(word, typed, words) {
  return !!word && ALNUM_START.test(word) && normalise(word) !== normalise(typed) && inLexicon(word, words);
}

function decodeStrict(bin) {
  try { return strict.decode(toBytes(bin)); } catch { return null; }
}

/** True if every byte belongs to a word (letters, digits, apostrophes; a cut UTF-8 char counts). */
export function wordBytes(bin) {
  const text = decodeStrict(bin);
  if (text !== null) return Array.from(text).every((c) => WORD_CHAR.test(c));
  for (let i = 0; i < bin.length; i++) {
    const b = bin.charCodeAt(i);
    if (!(WORD_ASCII.has(b) || b >= 0x80)) return false;
  }
  return true;
}

/** True if the first character is a word character. */
export function startsWord(bin) {
  const b0 = bin.charCodeAt(0);
  if (b0 < 0x80) return WORD_ASCII.has(b0);
  for (const n of [2, 3, 4]) {
    const text = decodeStrict(bin.slice(0, n));
    if (text !== null) return Array.from(text).every((c) => WORD_CHAR.test(c));
  }
  return true;
}

/** (context, required): text before the word being typed, and the bytes the next word must start with. */
export function splitTyped(text) {
  const partial = text.match(PARTIAL)[0];
  const before = text.slice(0, text.length - partial.length);
  const context = before.replace(/ +$/, "");
  return [context, before.slice(context.length) + partial];
}

class VocabIndex {
  constructor(tokenBytes) {
    const n = tokenBytes.length;
    this.bytes = tokenBytes;
    this.pureWord = new Uint8Array(n);
    this.wordStart = new Uint8Array(n);
    this.boundary = new Uint8Array(n);
    tokenBytes.forEach((b, i) => {
      if (!b) { this.boundary[i] = 1; return; }
      if (!startsWord(b)) this.boundary[i] = 1;
      const stripped = b.replace(/^ +/, "");
      if (stripped && wordBytes(stripped)) {
        if (stripped.length === b.length) this.pureWord[i] = 1;
        else this.wordStart[i] = 1;
      }
    });
    const pairs = [];
    tokenBytes.forEach((b, i) => { if (b) pairs.push([b, i]); });
    pairs.sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : x[1] - y[1]));
    this.sortedBytes = pairs.map((p) => p[0]);
    this.sortedIds = pairs.map((p) => p[1]);
    this.byBytes = new Map();
    for (const [b, i] of pairs) {
      if (!this.byBytes.has(b)) this.byBytes.set(b, []);
      this.byBytes.get(b).push(i);
    }
  }

  bisectLeft(x) {
    let lo = 0;
    let hi = this.sortedBytes.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.sortedBytes[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  /** Tokens consistent with still-needed bytes `need`: a prefix of it, or it followed by word bytes. */
  matching(need) {
    const out = [];
    for (let k = 1; k < need.length; k++) out.push(...(this.byBytes.get(need.slice(0, k)) || []));
    const lo = this.bisectLeft(need);
    const hi = this.bisectLeft(need + "\xff\xff\xff\xff");
    for (let j = lo; j < hi; j++) {
      const rest = this.sortedBytes[j].slice(need.length);
      if (!rest || wordBytes(rest)) out.push(this.sortedIds[j]);
    }
    return out;
  }
}

function logSoftmax(x) {
  let m = -Infinity;
  for (let i = 0; i < x.length; i++) if (x[i] > m) m = x[i];
  let s = 0;
  for (let i = 0; i < x.length; i++) s += Math.exp(x[i] - m);
  const z = m + Math.log(s);
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = x[i] - z;
  return out;
}

function logSumExpWhere(lp, mask) {
  let m = -Infinity;
  for (let i = 0; i < lp.length; i++) if (mask[i] && lp[i] > m) m = lp[i];
  if (m === -Infinity) return -Infinity;
  let s = 0;
  for (let i = 0; i < lp.length; i++) if (mask[i]) s += Math.exp(lp[i] - m);
  return m + Math.log(s);
}

const compareTuple = (a, b) => {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
};

/** The ONNX model with its KV cache: feed(tokens) -> logits after them, reusing the cached prefix. */
export class OnnxLM {
  constructor(ort, session, spec) {
    this.ort = ort;
    this.session = session;
    this.spec = spec;
    this.layers = spec.num_layers;
    this.heads = spec.num_kv_heads;
    this.headDim = spec.head_dim;
    this.tokens = [];
    this.lastLogits = null;
    this.calls = 0;
    this.reset();
  }

  static async open(ort, modelUrl, spec) {
    const session = await ort.InferenceSession.create(modelUrl, {
      executionProviders: ["wasm"], graphOptimizationLevel: "all",
    });
    return new OnnxLM(ort, session, spec);
  }

  reset() {
    const empty = new this.ort.Tensor("float32", new Float32Array(0), [1, this.heads, 0, this.headDim]);
    this.past = new Array(2 * this.layers).fill(empty);
    this.position = 0;
    this.tokens = [];
    this.lastLogits = null;
  }

  /** Keep the first n cached positions (the cache is (batch, heads, seq, head_dim): copy per head). */
  rewind(n) {
    if (n === this.position) return;
    const d = this.headDim;
    this.past = this.past.map((t) => {
      const seq = t.dims[2];
      const src = t.data;
      const dst = new Float32Array(this.heads * n * d);
      for (let h = 0; h < this.heads; h++) dst.set(src.subarray(h * seq * d, (h * seq + n) * d), h * n * d);
      return new this.ort.Tensor("float32", dst, [1, this.heads, n, d]);
    });
    this.position = n;
  }

  /** Run `ids` after the cache; the logits of every new position (n, vocab) as one Float32Array. */
  async forward(ids) {
    const n = ids.length;
    const total = this.position + n;
    const T = this.ort.Tensor;
    const feeds = {
      input_ids: new T("int64", BigInt64Array.from(ids, BigInt), [1, n]),
      attention_mask: new T("int64", new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new T("int64", BigInt64Array.from({ length: n }, (_, i) => BigInt(this.position + i)), [1, n]),
    };
    for (let i = 0; i < this.layers; i++) {
      feeds[`past_key_values.${i}.key`] = this.past[2 * i];
      feeds[`past_key_values.${i}.value`] = this.past[2 * i + 1];
    }
    const out = await this.session.run(feeds);
    this.past = [];
    for (let i = 0; i < this.layers; i++) this.past.push(out[`present.${i}.key`], out[`present.${i}.value`]);
    this.position = total;
    this.calls++;
    return out.logits.data;
  }

  /** Logits (vocab) of the next token after `tokens`, feeding only what the cache lacks. */
  async feed(tokens) {
    if (this.lastLogits && tokens.length === this.tokens.length && tokens.every((t, i) => t === this.tokens[i])) {
      return this.lastLogits;
    }
    let keep = 0;
    while (keep < this.tokens.length && keep < tokens.length && this.tokens[keep] === tokens[keep]) keep++;
    keep = Math.min(keep, tokens.length - 1);
    this.rewind(keep);
    const logits = await this.forward(tokens.slice(keep));
    const vocab = logits.length / (tokens.length - keep);
    this.lastLogits = logits.slice(logits.length - vocab);
    this.tokens = tokens.slice();
    return this.lastLogits;
  }
}

/** The next k whole words for typed text (a port of suggest.py's Predictor). */
export class Predictor {
  constructor(lm, tokenizer, words, { k = 3, maxCalls = 8, branch = 4, contextTokens = 96 } = {}) {
    Object.assign(this, { lm, tokenizer, k, maxCalls, branch, contextTokens, words });
    this.vocab = new VocabIndex(tokenizer.tokenBytes());
    const start = tokenizer.vocab.get("<|endoftext|>");
    this.startIds = [start !== undefined ? start : lm.spec.bos_token_id ?? (lm.spec.eos_token_ids || [])[0]];
    this.windowStart = 0;
    this.cache = new Map();
    this.cacheCtx = "";
    this.lastCalls = 0;
  }

  contextIds(context) {
    if (this.windowStart > context.length) this.windowStart = 0;
    let ids = this.tokenizer.encode(context.slice(this.windowStart));
    if (ids.length > this.contextTokens) { // jump so that about half the window remains (cache-friendly)
      const tail = context.slice(this.windowStart);
      const cut = Math.floor(tail.length / 2);
      const space = tail.indexOf(" ", cut);
      this.windowStart += space > 0 ? space : cut;
      ids = this.tokenizer.encode(context.slice(this.windowStart)).slice(-this.contextTokens);
    }
    return ids.length ? ids : this.startIds;
  }

  /** [{word, completion, logprob}] best first. */
  async suggest(text) {
    const [context, required] = splitTyped(text);
    const ctx = this.contextIds(context);
    const ctxKey = ctx.join(",");
    if (ctxKey !== this.cacheCtx) { this.cache = new Map(); this.cacheCtx = ctxKey; }
    const req = utf8Binary(required);
    const typed = required.replace(/^ +/, "");
    const atStart = !context || OPENERS.includes(context[context.length - 1]);
    const vocab = this.vocab;
    const heap = [{ neg: 0, toks: [], s: "" }];
    const done = new Map();
    let calls = 0;
    while (heap.length && calls < this.maxCalls) {
      let bi = 0; // pop the smallest (neg, toks): what Python's heapq does on these tuples
      for (let i = 1; i < heap.length; i++) {
        const a = heap[i]; const b = heap[bi];
        if (a.neg < b.neg || (a.neg === b.neg && compareTuple(a.toks, b.toks) < 0)) bi = i;
      }
      const { neg, toks, s } = heap.splice(bi, 1)[0];
      const best = [...done.values()].map((v) => v.score).sort((x, y) => y - x);
      if (best.length >= this.k && best[this.k - 1] >= -neg) break;
      const key = toks.join(",");
      let lp = this.cache.get(key);
      if (!lp) {
        lp = logSoftmax(await this.lm.feed(ctx.concat(toks)));
        this.cache.set(key, lp);
        calls++;
      }
      this.finish(done, s, req, typed, -neg, lp);
      for (const t of this.children(lp, s, req, atStart)) heap.push({ neg: neg - lp[t], toks: toks.concat([t]), s: s + vocab.bytes[t] });
    }
    this.lastCalls = calls;
    const ranked = [...done.values()].sort((a, b) => b.score - a.score).slice(0, this.k);
    return ranked.map(({ word: w, score }) => (
      { word: w, completion: w.startsWith(typed) ? w.slice(typed.length) + " " : w + " ", logprob: score }));
  }

  /** Record partial word `s` as a finished suggestion (one slot per normalised word). */
  finish(done, s, req, typed, logprob, lp) {
    const raw = s.replace(/^ +/, "");
    if (s.length < req.length || !raw || !startsWord(raw) || raw.endsWith(APOS_BYTES) || raw.endsWith(RSQUO_BYTES)) return;
    const word = decodeStrict(raw);
    if (word === null || !acceptable(word, typed, this.words)) return;
    const score = logprob + logSumExpWhere(lp, this.vocab.boundary);
    const key = normalise(word);
    if (!done.has(key) || done.get(key).score < score) done.set(key, { score, word });
  }

  /** The `branch` most likely tokens extending partial word `s` consistently with `req`. */
  children(lp, s, req, atStart) {
    const vocab = this.vocab;
    if (s.length < req.length) { // still inside what the user typed
      const cand = [...new Set(vocab.matching(req.slice(s.length)))].sort((a, b) => a - b);
      return cand.sort((a, b) => lp[b] - lp[a]).slice(0, this.branch);
    }
    const top = [];
    for (let t = 0; t < lp.length; t++) {
      const ok = s ? vocab.pureWord[t] : (vocab.wordStart[t] || (atStart && vocab.pureWord[t]));
      if (!ok || !Number.isFinite(lp[t])) continue;
      if (top.length < this.branch || lp[t] > lp[top[top.length - 1]]) {
        top.push(t);
        top.sort((a, b) => lp[b] - lp[a] || a - b);
        if (top.length > this.branch) top.pop();
      }
    }
    return top;
  }
}
