// ThingSpace callback -> Slack incoming-webhook message.
// [destinations.slack.transform] script = "file:deploy/transforms/thingspace-to-slack.js"
function transform(req) {
  const cb = req.body;
  if (cb === null) return null; // not JSON: nothing for Slack
  const devices = (cb.deviceIds || []).map((d) => `${d.kind} ${d.id}`).join(", ");
  const failed = cb.status === "Failed" || cb.faultResponse;
  const why = cb.faultResponse ? `: ${cb.faultResponse.faultstring}` : "";
  return {
    body: {
      text: `${failed ? ":red_circle:" : ":large_green_circle:"} ThingSpace request ${cb.requestId} ${cb.status || ""}${why}`,
      blocks: [
        { type: "section", text: { type: "mrkdwn", text: `*${cb.status || "callback"}* for ${devices || "no device"}${why}` } },
        { type: "context", elements: [{ type: "mrkdwn", text: `received ${req.received_at} on ${req.route} (${req.id})` }] },
      ],
    },
  };
}
