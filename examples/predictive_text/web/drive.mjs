// Drives the predictive-text page in headless Chromium (playwright-core, the system's chromium):
//   node drive.mjs TASK.json   ->   JSON results on stdout
// TASK: {url, chromium?, profile, tokenize?: [str], logits?: [[id]], suggest?: [str],
//        prefill?: str, type?: str, delayMs?: number, stepwise?: bool, tab?: bool, screenshot?: path,
//        timeoutMs?: number}
// prefill is put in the text box at once (the context); type is typed key by key after it, and with
// stepwise each key waits for its own suggestions (the latency of one keystroke, as measure.py times it).
// Used by tests/test_web_predictive.py and for the latency measurement in examples/README.md.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const task = JSON.parse(readFileSync(process.argv[2], "utf8"));
const timeout = task.timeoutMs || 120000;
const ctx = await chromium.launchPersistentContext(task.profile, {
  executablePath: task.chromium || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
  viewport: { width: 760, height: 520 },
});
const out = { console: [], requests: [] };
try {
  const page = ctx.pages()[0] || (await ctx.newPage());
  page.on("console", (m) => out.console.push(`${m.type()}: ${m.text()}`));
  page.on("request", (r) => out.requests.push(r.url()));
  page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`));
  const t0 = Date.now();
  await page.goto(task.url);
  await page.waitForFunction(() => window.slm && (window.slm.ready || window.slm.error), null, { timeout });
  out.error = await page.evaluate(() => window.slm.error);
  out.loadMs = Date.now() - t0;
  if (!out.error) {
    if (task.tokenize) out.tokens = await page.evaluate((xs) => xs.map((s) => window.slm.encode(s)), task.tokenize);
    if (task.logits) out.logits = await page.evaluate(async (xs) => {
      const res = [];
      for (const ids of xs) res.push(await window.slm.logits(ids));
      return res;
    }, task.logits);
    if (task.suggest) out.suggest = await page.evaluate(async (xs) => {
      const res = [];
      for (const s of xs) res.push((await window.slm.suggest(s)).map((x) => x.word));
      return res;
    }, task.suggest);
    if (task.type !== undefined) {
      const shownFor = (text) => page.waitForFunction(
        (t) => window.slm.shown && window.slm.shown.text === t && document.getElementById("text").value === t,
        text, { timeout });
      const prefill = task.prefill || "";
      const full = prefill + task.type;
      if (prefill) {
        await page.evaluate((t) => {
          const area = document.getElementById("text");
          area.value = t;
          area.dispatchEvent(new Event("input"));
        }, prefill);
        await shownFor(prefill);
      }
      await page.evaluate(() => { window.slm.latencies.length = 0; });
      await page.click("#text");
      await page.keyboard.press("Control+End");
      if (task.stepwise) {
        for (let i = 1; i <= task.type.length; i++) {
          await page.keyboard.type(task.type[i - 1]);
          await shownFor(prefill + task.type.slice(0, i));
        }
      } else {
        await page.keyboard.type(task.type, { delay: task.delayMs || 0 });
      }
      await shownFor(full);
      out.typed = await page.evaluate(() => ({
        shown: window.slm.shown,
        buttons: Array.from(document.querySelectorAll("#suggestions button"), (b) => b.textContent),
        latencyText: document.getElementById("latency").textContent,
        latencies: window.slm.latencies.slice(),
      }));
      if (task.screenshot) await page.screenshot({ path: task.screenshot });
      if (task.tab) {
        await page.keyboard.press("Tab");
        const after = full + out.typed.shown.completions[0];
        await shownFor(after);
        out.afterTab = await page.evaluate(() => ({ value: document.getElementById("text").value, shown: window.slm.shown }));
        await page.click("#suggestions button:nth-child(2)");
        const afterClick = after + out.afterTab.shown.completions[1];
        await shownFor(afterClick);
        out.afterClick = await page.evaluate(() => ({ value: document.getElementById("text").value, shown: window.slm.shown }));
      }
    }
  }
} catch (e) {
  out.error = String(e && e.stack ? e.stack : e);
} finally {
  await ctx.close();
}
console.log(JSON.stringify(out));
