// Switchboard's operational events ([notifications]) -> Slack incoming-webhook messages.
// [destinations.ops.transform] script = "file:deploy/transforms/slack.js"
// (Microsoft Teams' incoming webhooks take { "text": ... } as well.)
function transform(req) {
  const ev = req.body;
  if (ev === null || typeof ev.type !== "string") return null; // not an event
  const d = ev.data || {};
  const dest = d.destination ? `*${d.destination}*` : "";
  const lines = {
    "destination.failing": () => `:red_circle: ${dest} is failing (${d.why}, ${d.failed_attempts} attempts): ${d.last_error}`,
    "destination.recovered": () => `:large_green_circle: ${dest} answers again after ${d.failed_attempts} failed attempts`,
    "destination.paused": () => `:double_vertical_bar: ${dest} paused: ${d.reason}`,
    "destination.resumed": () => `:arrow_forward: ${dest} resumed`,
    "message.dead_lettered": () =>
      `:warning: ${d.count} callback(s) dead-lettered for ${dest} (last: ${d.last_reason}); first: ${(d.first_ids || []).slice(0, 3).join(", ")}`,
    "store.refusing": () => `:no_entry: the relay refuses callbacks: ${d.reason}`,
    "store.accepting": () => `:white_check_mark: the relay accepts callbacks again`,
    "config.reload_failed": () => `:x: configuration reload refused: ${d.error}`,
    "notifications.dropped": () => `:warning: ${d.dropped} operational event(s) dropped`,
  };
  const line = (lines[ev.type] || (() => `${ev.type}: ${JSON.stringify(d)}`))();
  return {
    body: {
      text: line,
      blocks: [
        { type: "section", text: { type: "mrkdwn", text: line } },
        { type: "context", elements: [{ type: "mrkdwn", text: `${ev.type} at ${ev.timestamp}` }] },
      ],
    },
  };
}
