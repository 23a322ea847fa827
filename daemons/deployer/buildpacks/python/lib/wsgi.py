"""Paddock's small WSGI server: `python wsgi.py module:app`, on 0.0.0.0:$PORT.

The stdlib's wsgiref with a thread per request; for apps that do not bring a
WSGI server of their own (gunicorn is used instead when it is installed).
"""
import importlib
import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class Handler(WSGIRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))


def main():
    spec = sys.argv[1] if len(sys.argv) > 1 else "app:app"
    module, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, "/app")
    app = getattr(importlib.import_module(module), attr or "application")
    port = int(os.environ.get("PORT", "5000"))
    httpd = make_server("0.0.0.0", port, app, server_class=Server, handler_class=Handler)
    print("serving %s on 0.0.0.0:%d" % (spec, port), flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
