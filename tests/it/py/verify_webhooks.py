"""Verifies Standard Webhooks signatures with the reference implementation.

Reads a JSON list of cases on stdin, each {"kind": "v1" | "v1a", "key":
whsec_ secret or whpk_ public key, "headers": {...}, "body_b64": ...}, and
prints one line per case: "ok" or "FAIL <reason>". v1 goes through the
`standardwebhooks` package from PyPI; v1a (Ed25519, which that package does
not verify) through `cryptography`.
"""
import base64
import json
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from standardwebhooks.webhooks import Webhook


def verify_v1a(public_key, headers, body):
    h = {k.lower(): v for k, v in headers.items()}
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key.removeprefix("whpk_")))
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + body
    for part in h["webhook-signature"].split(" "):
        version, sig = part.split(",", 1)
        if version == "v1a":
            try:
                key.verify(base64.b64decode(sig), signed)
                return
            except Exception:
                continue
    raise ValueError("no v1a signature verifies")


for case in json.load(sys.stdin):
    body = base64.b64decode(case["body_b64"])
    try:
        if case["kind"] == "v1":
            Webhook(case["key"]).verify(body, case["headers"], json_parse=False)
        else:
            verify_v1a(case["key"], case["headers"], body)
        print("ok")
    except Exception as e:  # noqa: BLE001 - report every failure as a line
        print(f"FAIL {type(e).__name__}: {e}")
