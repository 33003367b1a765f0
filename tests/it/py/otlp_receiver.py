"""An OTLP/HTTP trace receiver for tests/it/telemetry.rs: decodes each
ExportTraceServiceRequest with the opentelemetry-proto package and prints
one JSON line per span (ids in hex), after a first line with its port.
Answers 503 to the first `--fail-first` exports (a collector in trouble)."""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

fail_first = int(sys.argv[sys.argv.index("--fail-first") + 1]) if "--fail-first" in sys.argv else 0
exports = 0


def value(v):
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global exports
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        exports += 1
        if self.path != "/v1/traces" or exports <= fail_first:
            self.send_response(404 if self.path != "/v1/traces" else 503)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    print(json.dumps({
                        "service": resource.get("service.name"),
                        "scope": ss.scope.name,
                        "api_key": self.headers.get("x-api-key"),
                        "content_type": self.headers.get("content-type"),
                        "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(),
                        "parent_span_id": sp.parent_span_id.hex(),
                        "name": sp.name,
                        "kind": sp.kind,
                        "start": sp.start_time_unix_nano,
                        "end": sp.end_time_unix_nano,
                        "attributes": {kv.key: value(kv.value) for kv in sp.attributes},
                        "status_code": sp.status.code,
                        "status_message": sp.status.message,
                    }), flush=True)
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print(json.dumps({"port": server.server_port}), flush=True)
server.serve_forever()
