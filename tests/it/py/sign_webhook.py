"""Signs a webhook the way its sender does, with the sender's own library.

Usage: sign_webhook.py PROVIDER SECRET URL [TIMESTAMP] < body
Prints {"headers": {...}, "url": "..."}: what to send (the URL may gain
a query, as Twilio's does for JSON bodies).

- slack: slack_sdk.signature.SignatureVerifier.generate_signature
- twilio: twilio.request_validator.RequestValidator (compute_signature;
  for JSON bodies compute_hash gives bodySHA256, added to the URL)
- svix: svix.webhooks.Webhook.sign
- standard-webhooks: standardwebhooks.Webhook.sign
- shopify: Shopify publishes no signing library; the HMAC-SHA256 in
  base64 it documents, with Python's hmac.
"""
import base64
import datetime
import hashlib
import hmac
import json
import sys
import time
import urllib.parse

provider, secret, url = sys.argv[1], sys.argv[2], sys.argv[3]
ts = int(sys.argv[4]) if len(sys.argv) > 4 else int(time.time())
body = sys.stdin.buffer.read()
headers = {}

if provider == "slack":
    from slack_sdk.signature import SignatureVerifier

    sig = SignatureVerifier(signing_secret=secret).generate_signature(timestamp=str(ts), body=body.decode())
    headers = {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sig, "Content-Type": "application/json"}
elif provider == "twilio":
    from twilio.request_validator import RequestValidator

    v = RequestValidator(secret)
    if body.startswith(b"{"):
        url = url + "?" + urllib.parse.urlencode({"bodySHA256": v.compute_hash(body.decode())})
        sig = v.compute_signature(url, {})
        headers = {"Content-Type": "application/json"}
    else:
        params = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        sig = v.compute_signature(url, params)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    headers["X-Twilio-Signature"] = sig
    headers["I-Twilio-Idempotency-Token"] = "tw-" + str(ts)
elif provider in ("svix", "standard-webhooks"):
    if provider == "svix":
        from svix.webhooks import Webhook
    else:
        from standardwebhooks import Webhook
    when = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    sig = Webhook(secret).sign("msg_" + str(ts), when, body.decode())
    p = "svix" if provider == "svix" else "webhook"
    headers = {f"{p}-id": "msg_" + str(ts), f"{p}-timestamp": str(ts), f"{p}-signature": sig}
    headers["Content-Type"] = "application/json"
elif provider == "shopify":
    sig = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    headers = {"X-Shopify-Hmac-SHA256": sig, "X-Shopify-Webhook-Id": "shop-" + str(ts), "Content-Type": "application/json"}
else:
    sys.exit(f"unknown provider {provider}")

print(json.dumps({"headers": headers, "url": url}))
