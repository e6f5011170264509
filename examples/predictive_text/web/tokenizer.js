// Byte-level BPE tokenizer (GPT-2 / SmolLM2 style) read from a Hugging Face tokenizer.json.
//
// Supports what slm-export's byte-level bundles use: no normalizer, a ByteLevel pre-tokenizer
// (GPT-2 split regex, add_prefix_space), a BPE model with merges (either "a b" strings or [a, b]
// pairs), a ByteLevel decoder, and added tokens (matched verbatim before pre-tokenizing, as the
// `tokenizers` library does). Anything else is refused with a clear error rather than giving
// silently different ids.

// The GPT-2 split pattern that `tokenizers`' ByteLevel pre-tokenizer uses (use_regex: true).
const SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

/** GPT-2's byte -> printable character map (index = byte value). */
export function bytesToUnicode() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const map = new Array(256);
  for (const b of bs) map[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (map[b] === undefined) map[b] = String.fromCharCode(256 + n++);
  }
  return map;
}

function check(desc) {
  const why = [];
  if (desc.normalizer) why.push(`normalizer ${desc.normalizer.type}`);
  const pre = desc.pre_tokenizer;
  if (!pre || pre.type !== "ByteLevel") why.push(`pre_tokenizer ${pre ? pre.type : "none"}`);
  else if (pre.use_regex === false) why.push("ByteLevel without regex");
  if (!desc.model || desc.model.type !== "BPE") why.push(`model ${desc.model ? desc.model.type : "none"}`);
  else if (desc.model.continuing_subword_prefix || desc.model.end_of_word_suffix || desc.model.byte_fallback)
    why.push("BPE with subword prefix / suffix / byte fallback");
  if (why.length) throw new Error(`unsupported tokenizer.json (${why.join(", ")}): this page handles byte-level BPE only`);
}

export class ByteLevelBPE {
  /** @param {object} desc the parsed tokenizer.json */
  constructor(desc) {
    check(desc);
    this.vocab = new Map(Object.entries(desc.model.vocab));
    this.ranks = new Map();
    desc.model.merges.forEach((m, i) => {
      const [a, b] = typeof m === "string" ? m.split(" ") : m;
      this.ranks.set(a + "\u0000" + b, i);
    });
    this.addPrefixSpace = !!desc.pre_tokenizer.add_prefix_space;
    this.byteChar = bytesToUnicode();
    this.charByte = new Map(this.byteChar.map((c, b) => [c, b]));
    this.added = (desc.added_tokens || []).slice().sort((x, y) => y.content.length - x.content.length);
    this.special = new Set(this.added.filter((t) => t.special).map((t) => t.id));
    for (const t of this.added) this.vocab.set(t.content, t.id);
    this.size = Math.max(...this.vocab.values()) + 1;
    this.idToToken = new Array(this.size).fill(null);
    for (const [tok, id] of this.vocab) this.idToToken[id] = tok;
    this.cache = new Map();
    this.utf8 = new TextEncoder();
  }

  /** Token ids of `text` (no BOS/EOS added: slm-export bundles add none). */
  encode(text) {
    const ids = [];
    for (const [piece, addedId] of this.splitAdded(text)) {
      if (addedId !== null) { ids.push(addedId); continue; }
      const s = this.addPrefixSpace && !piece.startsWith(" ") ? " " + piece : piece;
      for (const m of s.matchAll(SPLIT)) {
        for (const id of this.bpe(m[0])) ids.push(id);
      }
    }
    return ids;
  }

  /** The text split around added tokens: [string, id or null] pairs. */
  splitAdded(text) {
    const out = [];
    let start = 0;
    let i = 0;
    while (i < text.length) {
      const hit = this.added.find((t) => t.content && text.startsWith(t.content, i));
      if (hit) {
        if (i > start) out.push([text.slice(start, i), null]);
        out.push([hit.content, hit.id]);
        i += hit.content.length;
        start = i;
      } else i++;
    }
    if (start < text.length) out.push([text.slice(start), null]);
    return out;
  }

  /** BPE on one pre-token: repeatedly merge the adjacent pair with the lowest merge rank. */
  bpe(word) {
    const cached = this.cache.get(word);
    if (cached) return cached;
    let parts = Array.from(this.utf8.encode(word), (b) => this.byteChar[b]);
    while (parts.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i < parts.length - 1; i++) {
        const r = this.ranks.get(parts[i] + "\u0000" + parts[i + 1]);
        if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
      }
      if (best < 0) break;
      const a = parts[best];
      const b = parts[best + 1];
      const merged = [];
      for (let i = 0; i < parts.length; i++) {
        if (i < parts.length - 1 && parts[i] === a && parts[i + 1] === b) { merged.push(a + b); i++; }
        else merged.push(parts[i]);
      }
      parts = merged;
    }
    const ids = parts.map((p) => {
      const id = this.vocab.get(p);
      if (id === undefined) throw new Error(`token ${JSON.stringify(p)} is not in the vocabulary`);
      return id;
    });
    if (this.cache.size < 50000) this.cache.set(word, ids);
    return ids;
  }

  /** Each token's bytes as a "binary string" (one char per byte, 0-255); null for special tokens. */
  tokenBytes() {
    return this.idToToken.map((tok, id) => {
      if (tok === null || this.special.has(id)) return null;
      let s = "";
      for (const c of tok) {
        const b = this.charByte.get(c);
        if (b === undefined) return unescape(encodeURIComponent(tok)); // added plain-text token: its UTF-8
        s += String.fromCharCode(b);
      }
      return s;
    });
  }

  /** Text of `ids` (ByteLevel decoder; special tokens skipped). */
  decode(ids) {
    const table = this.tokenBytes();
    const bytes = [];
    for (const id of ids) {
      const s = table[id];
      if (s) for (let i = 0; i < s.length; i++) bytes.push(s.charCodeAt(i));
    }
    return new TextDecoder().decode(new Uint8Array(bytes));
  }
}
