"""schemathesis hooks for scripts/schemathesis.

Signs the bodies sent to Leaf's alerts webhook (`POST /v1/leaf/alerts`) with the webhook
secret the script gives `credsync dev`, as Leaf does (`X-Leaf-Signature`: standard base64 of
HMAC-SHA256 over the raw body), so that the run reaches the alert handling itself and not
only the 401 for an unsigned body. A case that carries a generated `X-Leaf-Signature` keeps
it: those exercise the 401 for a wrong signature.
"""

import base64
import hashlib
import hmac
import json
import os

import schemathesis

SECRET = os.environ["CREDSYNC_SCHEMATHESIS_WEBHOOK_SECRET"].encode()


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.method.upper() != "POST" or case.path != "/v1/leaf/alerts":
        return
    headers = dict(case.headers or {})
    if any(name.lower() == "x-leaf-signature" for name in headers):
        return
    if type(case.body).__name__ == "NotSet":
        return
    body = case.body
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    # Send exactly the bytes that were signed.
    kwargs["data"] = raw
    digest = hmac.new(SECRET, raw, hashlib.sha256).digest()
    headers["X-Leaf-Signature"] = base64.b64encode(digest).decode()
    case.headers = headers
