// Greedy decoding of an slm-export ONNX bundle with transformers.js (@huggingface/transformers) in Node.
//
//   node transformers_js.mjs NODE_MODULES JOB_JSON
//
// JOB_JSON: {"bundle_dir", "prompt_ids", "n_tokens", "options": {subfolder, model_file_name, dtype}}.
// Prints one JSON line: {"version", "tokens", "decode_tokens_per_s", "load_s", "dtype"}. Offline: local
// files only, remote models off, no file cache (a cache hit could stand in for the bundle's own files).
import { createRequire } from 'node:module';
import { join } from 'node:path';

const [nodeModules, jobJson] = process.argv.slice(2);
const job = JSON.parse(jobJson);
// The package is found in the given node_modules, not beside this script (which lives in the Python package).
const require = createRequire(join(nodeModules, 'noop.js'));
const tjs = require('@huggingface/transformers');
const { env, AutoModelForCausalLM, Tensor, BaseStreamer } = tjs;
const version = env.version;

env.allowRemoteModels = false;
env.allowLocalModels = true;
env.useFSCache = false;
env.useBrowserCache = false;

const t0 = performance.now();
const model = await AutoModelForCausalLM.from_pretrained(job.bundle_dir, {
    local_files_only: true,
    device: 'cpu',
    ...job.options,
});
const loadS = (performance.now() - t0) / 1000;

// The time each generated token came out: put() gets the prompt first, then one token per step.
class Clock extends BaseStreamer {
    constructor() {
        super();
        this.times = [];
        this.calls = 0;
    }
    put() {
        if (this.calls++ > 0) this.times.push(performance.now());
    }
    end() {}
}

const ids = job.prompt_ids.map(BigInt);
const input_ids = new Tensor('int64', BigInt64Array.from(ids), [1, ids.length]);
const attention_mask = new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]);
const clock = new Clock();
const out = await model.generate({
    input_ids,
    attention_mask,
    max_new_tokens: job.n_tokens,
    do_sample: false,
    // Exactly n_tokens of plain argmax, as our runner does: no stop at EOS, no penalties from
    // generation_config.json.
    eos_token_id: null,
    repetition_penalty: 1.0,
    no_repeat_ngram_size: 0,
    streamer: clock,
});
const tokens = out.tolist()[0].slice(ids.length).map(Number);
const t = clock.times;
const decode = t.length > 1 ? (t.length - 1) / ((t[t.length - 1] - t[0]) / 1000) : null;
await model.dispose();
process.stdout.write(JSON.stringify({
    version,
    tokens,
    decode_tokens_per_s: decode,
    load_s: loadS,
    dtype: model.sessions.model?.config?.dtype ?? null,
}) + '\n');
