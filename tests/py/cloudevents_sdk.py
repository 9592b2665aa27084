"""The official CloudEvents Python SDK (PyPI `cloudevents`), as a second opinion for
tests/tests/hostile_api.rs.

    python3 cloudevents_sdk.py make    # prints HTTP requests the SDK makes (binary + structured)
    python3 cloudevents_sdk.py check   # reads requests on stdin, prints what the SDK's parsers say

A request is {"name", "headers": {..}, "body_b64"}. `make` adds "expect": the attributes and
data the host must read back. `check` answers {"name", "v2": verdict, "v1": verdict} where a
verdict is "accepted" or "rejected: <why>": v2 is the SDK's core API
(`cloudevents.core.bindings.http.from_http_event`), v1 its compatibility layer
(`cloudevents.v1.http.from_http`, the API of SDK 1.x).
"""

import base64
import json
import sys
import warnings

warnings.simplefilter("ignore")

from cloudevents.core.bindings import http as v2http  # noqa: E402
from cloudevents.core.formats.json import JSONFormat  # noqa: E402
from cloudevents.core.v1.event import CloudEvent  # noqa: E402
from cloudevents.v1 import http as v1http  # noqa: E402


CORE = {"id", "source", "type", "specversion", "time", "datacontenttype", "dataschema", "subject"}


def b64(data):
    return base64.b64encode(data).decode()


def make():
    out = []
    json_event = CloudEvent(
        attributes={"type": "com.example.order.created", "source": "/py/shop", "id": "py-json-1", "tenant": "acme"},
        data={"order": 7},
    )
    raw_event = CloudEvent(
        attributes={
            "type": "com.example.blob",
            "source": "/py/blobs",
            "id": "py-bytes-1",
            "datacontenttype": "application/octet-stream",
        },
        data=b"\x00\x01binary\xff",
    )
    for ev, data in [(json_event, json.dumps({"order": 7}).encode()), (raw_event, b"\x00\x01binary\xff")]:
        expect = {
            "id": ev.get_id(),
            "source": ev.get_source(),
            "type": ev.get_type(),
            "data_b64": b64(data),
            "extensions": {k: v for k, v in ev.get_attributes().items() if k not in CORE},
        }
        for mode, fn in [("binary", v2http.to_binary), ("structured", v2http.to_structured)]:
            msg = fn(ev, event_format=JSONFormat())
            out.append(
                {"name": f"v2 {mode} {ev.get_id()}", "headers": dict(msg.headers), "body_b64": b64(msg.body),
                 "expect": expect, "json_data": ev.get_id() == "py-json-1"}
            )
    # The 1.x API (`cloudevents.http.to_binary` / `to_structured` then, `cloudevents.v1.http` now).
    old = v1http.CloudEvent({"type": "com.example.legacy", "source": "/py/v1", "id": "py-v1-1"}, {"legacy": True})
    for mode, fn in [("binary", v1http.to_binary), ("structured", v1http.to_structured)]:
        headers, body = fn(old)
        out.append(
            {"name": f"v1 {mode} py-v1-1", "headers": dict(headers), "body_b64": b64(body),
             "expect": {"id": "py-v1-1", "source": "/py/v1", "type": "com.example.legacy",
                        "data_b64": b64(json.dumps({"legacy": True}).encode()), "extensions": {}},
             "json_data": True}
        )
    json.dump(out, sys.stdout)


def verdict(parse):
    try:
        parse()
        return "accepted"
    except Exception as e:  # the SDK raises several exception types; any is a refusal
        return f"rejected: {type(e).__name__}: {e}"


def check():
    out = []
    for req in json.load(sys.stdin):
        headers, body = req["headers"], base64.b64decode(req["body_b64"])
        out.append({
            "name": req["name"],
            "v2": verdict(lambda: v2http.from_http_event(v2http.HTTPMessage(headers=headers, body=body))),
            "v1": verdict(lambda: v1http.from_http(headers, body)),
        })
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]]()
