#!/usr/bin/env python3
"""bare.py - the ceiling of notesd's architecture, for bench/run.py.

A bare http.server.ThreadingHTTPServer (HTTP/1.1 keep-alive, TCP_NODELAY,
listen backlog 1024, daemon threads) that answers every GET with one fixed
JSON note: status line, headers and body in a single write, with
Content-Length. No queue, no database, no routing: whatever notesd does on
top of this costs requests/s.

    python3 bench/bare.py [--host 127.0.0.1] [--port 0] [--body-file FILE] [--queue]

Prints "bare listening http://HOST:PORT/" on stdout once it accepts
connections, then serves until SIGTERM/SIGINT. --body-file is the exact
body to send (run.py passes a note fetched from notesd, so both bodies have
the same size); without it a built-in note is used. Stdlib only.

--queue adds notesd's architecture and nothing else: each GET puts a
command on a queue.Queue and waits on a lock that the main thread, draining
the queue in batches, releases with the body. The gap between the two modes
is the cost of the thread handoff itself, the floor under notesd's own code.
"""
import argparse
import queue
import threading
import http.server
import json
import signal
import socket
import sys

DEFAULT_BODY = json.dumps({
    "id": 1,
    "url": "http://127.0.0.1:5000/1/",
    "text": "benchmark note: the quick brown fox jumps over the lazy dog",
    "created": "2024-01-01T00:00:00Z",
    "updated": "2024-01-01T00:00:00Z",
}).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive
    body = DEFAULT_BODY             # replaced from --body-file in main()

    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    commands = None                 # a queue.Queue in --queue mode

    def do_GET(self):
        body = self.body
        if self.commands is not None:
            done = threading.Lock()
            done.acquire()
            self.commands.put_nowait(done)
            done.acquire(timeout=30)
        head = ("HTTP/1.1 200 OK\r\n"
                "Server: %s\r\n"
                "Date: %s\r\n"
                "Content-Type: application/json\r\n"
                "Content-Length: %d\r\n"
                "\r\n" % (self.version_string(), self.date_time_string(),
                          len(body))).encode("latin-1")
        self.wfile.write(head + body)   # one write (wbufsize is 0: unbuffered)

    def log_message(self, format, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024           # listen() backlog


def main_loop(commands):
    """notesd's main loop, minus notesd: take what is queued, release each."""
    while True:
        batch = [commands.get()]
        while True:
            try:
                batch.append(commands.get_nowait())
            except queue.Empty:
                break
        for done in batch:
            done.release()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--body-file", help="exact JSON body to answer with")
    ap.add_argument("--queue", action="store_true",
                    help="route every GET through a queue.Queue to the main thread")
    args = ap.parse_args(argv)
    if args.body_file:
        with open(args.body_file, "rb") as f:
            Handler.body = f.read()
    srv = Server((args.host, args.port), Handler)

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    host, port = srv.server_address[:2]
    print("bare listening http://%s:%d/" % (host, port), flush=True)
    try:
        if args.queue:
            Handler.commands = queue.Queue(10000)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            main_loop(Handler.commands)
        else:
            srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
