// Drives `kubectl serin dashboard` in headless Chromium for crates/serin/tests/dashboard.rs:
// reads what the page shows, presses its buttons, takes a screenshot, and tries the buttons
// from another origin's page. Fails (exit 1) on the first expectation the page does not meet.
//
//   DASHBOARD_URL  the URL the dashboard printed
//   NAMESPACE      the test's namespace, holding Canaries `web` (steered here) and `api`
//                  (promoted by its own checks)
//   SCREENSHOT     where to write the screenshot (PNG)
//   CHROMIUM       the browser (default /usr/bin/chromium)
import http from "node:http";
import { chromium } from "playwright-core";

const url = process.env.DASHBOARD_URL;
const ns = process.env.NAMESPACE;
const shot = process.env.SCREENSHOT;
if (!url || !ns || !shot) throw new Error("set DASHBOARD_URL, NAMESPACE and SCREENSHOT");

function say(...a) { console.log("dashboard.mjs:", ...a); }

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The machine's network is closed: no background connections, no sandbox as root.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  const errors = [];
  page.on("pageerror", e => errors.push(String(e)));
  page.on("console", m => { if (m.type() === "error") errors.push(m.text()); });
  await page.goto(url);

  const row = name => page.locator(`tr[data-canary="${ns}/${name}"]`);
  const expectText = async (locator, text, timeout = 30000) => {
    await locator.filter({ hasText: text }).first().waitFor({ timeout });
    say("shows", JSON.stringify(text));
  };

  // The list: `web` mid-rollout at 80/20, step 1/3; `api` promoted by its own checks.
  await expectText(row("web"), "Progressing");
  await expectText(row("web"), "80/20");
  await expectText(row("web"), "1/3");
  await expectText(row("api"), "Succeeded", 120000);
  await expectText(row("api"), "Promoted");

  // The namespace filter narrows the list to that namespace.
  await page.selectOption("#namespace", ns);
  const others = await page.locator("#canaries tbody tr").evaluateAll(
    (rows, ns) => rows.filter(r => !r.dataset.canary.startsWith(ns + "/")).length, ns);
  if (others !== 0) throw new Error(`the namespace filter left ${others} rows of other namespaces`);
  say("the namespace filter shows only", ns);

  // `web`: the Promote button takes it to the next step, through the controller.
  await row("web").click();
  await expectText(page.locator("#detail-title"), `${ns}/web`);
  await expectText(page.locator(".rollout[data-result=InProgress]"), "in progress");
  await page.click('button[data-command="promote"]');
  await expectText(page.locator("#command-result.ok"), "promote of canary");
  await expectText(row("web"), "50/50");
  await expectText(page.locator("#weights-text"), "primary 50% / canary 50%");

  // Abort rolls it back; its history entry shows the reason and the weight timeline.
  await page.click('button[data-command="abort"]');
  await expectText(page.locator("#command-result.ok"), "abort of canary");
  await expectText(row("web"), "Failed");
  const aborted = page.locator(".rollout[data-result=Aborted]");
  await expectText(aborted, "reached 50%");
  const labels = await aborted.locator("svg.chart text.label").allTextContents();
  if (labels.join(" ") !== "20% 50% 0%") throw new Error(`the aborted rollout's chart labels are ${JSON.stringify(labels)}, not 20% 50% 0%`);
  say("the aborted rollout's chart steps through", labels.join(" → "));
  // Retry is offered now; Promote is not (nothing is rolling out).
  if (!(await page.isEnabled('button[data-command="retry"]'))) throw new Error("retry is disabled on a Failed Canary");
  if (await page.isEnabled('button[data-command="promote"]')) throw new Error("promote is enabled on a Failed Canary");

  // `api`: its promoted rollout shows a passing check at each analysed weight, with values.
  await row("api").click();
  const promoted = page.locator(".rollout[data-result=Promoted]");
  await expectText(promoted, "reached 100%");
  const checks = await promoted.locator("svg.chart circle.check.verdict-Pass").evaluateAll(
    cs => cs.map(c => c.dataset.weight));
  if (checks.join(",") !== "20,50") throw new Error(`passing checks drawn at weights ${JSON.stringify(checks)}, not 20,50`);
  await expectText(promoted.locator(".points"), "errors 0");
  say("the promoted rollout has passing checks at", checks.join("% and ") + "%");
  await expectText(page.locator("#last-check"), "Pass");

  await page.click(`tr[data-canary="${ns}/web"]`);
  await page.screenshot({ path: shot, fullPage: true });
  say("screenshot", shot);
  if (errors.length) throw new Error("the page logged errors: " + errors.join("; "));

  // Another origin's page, even one that knows the token, cannot press the buttons: its
  // simple (no-cors) POST and its JSON POST are both refused.
  const evil = http.createServer((_, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<!doctype html><title>elsewhere</title>");
  });
  await new Promise(r => evil.listen(0, "127.0.0.1", r));
  const evilPage = await browser.newPage();
  await evilPage.goto(`http://localhost:${evil.address().port}/`);
  const target = new URL(`api/canaries/${ns}/web/retry`, url).href;
  const attempts = await evilPage.evaluate(async target => {
    const out = [];
    for (const opts of [
      { method: "POST", mode: "no-cors", headers: { "Content-Type": "text/plain" }, body: "{}" },
      { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" },
    ]) {
      try {
        const r = await fetch(target, opts);
        out.push(`${r.type} ${r.status}`);
      } catch (e) {
        out.push("blocked");
      }
    }
    return out;
  }, target);
  evil.close();
  say("cross-origin attempts:", attempts.join(", "));
  if (attempts.some(a => a.startsWith("basic") || a.startsWith("cors"))) throw new Error("a cross-origin page read a command's answer: " + attempts);
} catch (e) {
  failed = true;
  console.error("dashboard.mjs: FAILED:", e.message);
  try {
    const pages = browser.contexts().flatMap(c => c.pages());
    if (pages[0]) {
      await pages[0].screenshot({ path: shot, fullPage: true });
      console.error("dashboard.mjs: screenshot of the failure:", shot);
      console.error(await pages[0].locator("body").innerText());
    }
  } catch { /* the failure above is the one to report */ }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
