// Signs a webhook the way its sender does, with the sender's own library.
// Usage: node sign_webhook.mjs PROVIDER SECRET [TIMESTAMP] < body
// Prints {"headers": {...}}.
// - github: @octokit/webhooks-methods sign()
// - stripe: stripe.webhooks.generateTestHeaderString()
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [provider, secret, tsArg] = process.argv.slice(2);
const require = createRequire(process.env.SWITCHBOARD_NPM_PREFIX + "/node_modules/");
const body = readFileSync(0, "utf8");
const ts = tsArg ? Number(tsArg) : Math.floor(Date.now() / 1000);
let headers;
if (provider === "github") {
  // ESM only: imported from its package's entry point.
  const entry = process.env.SWITCHBOARD_NPM_PREFIX + "/node_modules/@octokit/webhooks-methods/dist-node/index.js";
  const { sign } = await import(pathToFileURL(entry).href);
  headers = {
    "X-Hub-Signature-256": await sign(secret, body),
    "X-GitHub-Delivery": "gh-" + ts,
    "Content-Type": "application/json",
  };
} else if (provider === "stripe") {
  const Stripe = require("stripe");
  const stripe = new Stripe("sk_test_unused");
  headers = {
    "Stripe-Signature": stripe.webhooks.generateTestHeaderString({ payload: body, secret, timestamp: ts }),
    "Content-Type": "application/json",
  };
} else {
  console.error("unknown provider " + provider);
  process.exit(2);
}
console.log(JSON.stringify({ headers }));
