// A SOAP/XML callback (ThingSpace services registered the old way) -> JSON
// for a modern receiver: the SOAP Body's first element, as an object.
// [destinations.api.transform] script = "file:deploy/transforms/soap-to-json.js"
function transform(req) {
  if (req.text === null || !req.text.trimStart().startsWith("<")) {
    return {}; // already JSON (or not text): unchanged
  }
  const doc = xml(req.text);
  if (doc.error) throw new Error("not XML: " + doc.error);
  const body = doc.Envelope && doc.Envelope.Body;
  if (!body) throw new Error("no SOAP Envelope/Body");
  const [operation] = Object.keys(body);
  return { body: { operation, ...body[operation] } };
}
