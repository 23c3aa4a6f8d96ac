#!/usr/bin/env python3
"""bench/restart.py - restarts and upgrades under load lose no request (issue 12).

    python3 bench/restart.py [--restarts N] [--interval S] [--notesd PATH]

Starts a copy of notesd.py (in a temp dir, port 0, access log off) and
drives it with `wrk -t1 -c16` keep-alive GETs of one note, plus a writer
that opens a new connection for every POST, while `restart` runs N times
(default 10), one every --interval seconds; then the same again with a new
version of the file (__version__ changed) copied over the copy before each
restart, and the last version expected in /status. Last, the stop time
under the same load. Reports wrk's socket errors and non-2xx replies, the
writer's failed POSTs, whether every acknowledged write is there, the
longest gap between two answers the writer saw, and the stop time.

Exit status: 0 all targets met (0 errors, 0 non-2xx, 0 failed writes, every
write present, the new version answering, stop within 1.5 s), 1 some missed,
2 the benchmark itself failed. Stdlib only, plus wrk; stops all it started.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import parse_wrk, preflight  # noqa: E402  (bench/run.py, beside us)

HTTP_TIMEOUT = 10
STOP_TARGET = 1.5  # seconds


def log(msg):
    print("[restart] " + msg, file=sys.stderr, flush=True)


class Writer(threading.Thread):
    """POSTs a note on a new connection each time until stopped; keeps the
    ids acknowledged, the failures, and the longest gap between answers."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.done = port, threading.Event()
        self.acked, self.failed, self.gap, self.last = [], [], 0.0, None

    def run(self):
        n = 0
        while not self.done.is_set():
            n += 1
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)
            try:
                conn.request("POST", "/", json.dumps({"text": "w%d" % n}),
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                if r.status != 201:
                    self.failed.append("%d %s" % (r.status, body[:100]))
                else:
                    self.acked.append(json.loads(body)["id"])
                    now = time.monotonic()
                    if self.last is not None:
                        self.gap = max(self.gap, now - self.last)
                    self.last = now
            except (OSError, http.client.HTTPException) as e:
                self.failed.append(repr(e))
            finally:
                conn.close()


def cli(script, args, *command):
    return subprocess.run([sys.executable, script, *args, *command], capture_output=True,
                          text=True, timeout=60)


def url_of(state):
    with open(os.path.join(state, "notesd.url")) as f:
        return f.read().strip()


def get_json(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def one_round(script, source, args, state, port, note, restarts, interval, upgrade):
    """wrk and the writer while `restart` runs `restarts` times."""
    writer = Writer(port)
    writer.start()
    duration = int(restarts * interval + 3)
    wrk = subprocess.Popen(["wrk", "-t1", "-c16", "-d%ds" % duration, "--latency",
                            "http://127.0.0.1:%d/%d/" % (port, note)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    problems, version = [], None
    try:
        time.sleep(1)  # wrk's connections up
        for n in range(restarts):
            if upgrade:
                version = "1.0.%d" % (100 + n)
                with open(source) as f:
                    text = f.read()
                text = re.sub(r'^__version__ = ".*"$', '__version__ = "%s"' % version, text,
                              count=1, flags=re.M)
                with open(script + ".new", "w") as f:
                    f.write(text)
                os.replace(script + ".new", script)
            r = cli(script, args, "restart")
            if r.returncode != 0:
                problems.append("restart %d: rc %d %s" % (n, r.returncode, r.stderr.strip()))
            time.sleep(interval)
        out, _ = wrk.communicate(timeout=duration + 30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
        writer.done.set()
        writer.join(timeout=30)
    res = parse_wrk(out)
    present, after = set(), 0
    while True:  # every note, page by page
        status, page = get_json(port, "/?limit=1000&after=%d" % after)
        if status != 200 or not page:
            break
        present.update(n["id"] for n in page)
        after = page[-1]["id"]
    missing = [i for i in writer.acked if i not in present]
    status, doc = get_json(port, "/status")
    return {"requests": res["requests"], "socket_errors": sum(res["socket_errors"].values()),
            "errors_by_kind": res["socket_errors"], "non2xx": res["non2xx"],
            "writes": len(writer.acked), "failed_writes": len(writer.failed),
            "failures": writer.failed[:5], "missing": len(missing),
            "gap_s": round(writer.gap, 3), "version": doc.get("version"),
            "expected_version": version, "problems": problems}


def stop_under_load(script, args, port, note):
    wrk = subprocess.Popen(["wrk", "-t1", "-c16", "-d4s",
                            "http://127.0.0.1:%d/%d/" % (port, note)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        started = time.monotonic()
        r = cli(script, args, "stop")
        return round(time.monotonic() - started, 3), r.returncode
    finally:
        wrk.wait(timeout=30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--interval", type=float, default=1.0, metavar="S")
    ap.add_argument("--notesd", default=os.path.join(os.path.dirname(HERE), "notesd.py"))
    a = ap.parse_args(argv)
    source = preflight("restart.py", a.notesd)
    if source is None:
        return 2
    tmp = tempfile.mkdtemp(prefix="notesd-restart-")
    script = os.path.join(tmp, "notesd.py")
    shutil.copy(source, script)
    state = os.path.join(tmp, "state")
    args = ["--state-dir", state, "--listen", "127.0.0.1:0", "--access-log", "no",
            "--pidfile", os.path.join(state, "notesd.pid"),
            "--log", os.path.join(state, "notesd.log")]
    results = {}
    try:
        r = cli(script, args, "start")
        if r.returncode != 0:
            log("start failed: " + r.stderr)
            return 2
        port = int(url_of(state).rsplit(":", 1)[1].strip("/"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
        conn.request("POST", "/", json.dumps({"text": "read me"}),
                     {"Content-Type": "application/json"})
        note = json.loads(conn.getresponse().read())["id"]
        conn.close()
        for name, upgrade in (("restart", False), ("upgrade", True)):
            log("%d x %s under wrk -t1 -c16 and a new-connection writer" % (a.restarts, name))
            results[name] = one_round(script, source, args, state, port, note,
                                      a.restarts, a.interval, upgrade)
        results["stop_s"], results["stop_rc"] = stop_under_load(script, args, port, note)
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    finally:
        cli(script, args, "stop")
        shutil.rmtree(tmp, ignore_errors=True)
    ok = True
    for name in ("restart", "upgrade"):
        r = results[name]
        good = (r["socket_errors"] == 0 and r["non2xx"] == 0 and r["failed_writes"] == 0
                and r["missing"] == 0 and not r["problems"] and
                (r["expected_version"] is None or r["version"] == r["expected_version"]))
        ok &= good
        print("%-8s %3d restarts: %7d GETs, socket errors %d %s, non-2xx %d; %d writes, "
              "%d failed, %d missing; longest writer gap %.3f s; version %s%s  %s"
              % (name, a.restarts, r["requests"], r["socket_errors"], r["errors_by_kind"],
                 r["non2xx"], r["writes"], r["failed_writes"], r["missing"], r["gap_s"],
                 r["version"], " (expected %s)" % r["expected_version"]
                 if r["expected_version"] else "", "pass" if good else "FAIL"))
        for line in r["problems"] + r["failures"]:
            print("         " + line)
    good = results["stop_rc"] == 0 and results["stop_s"] <= STOP_TARGET
    ok &= good
    print("stop under wrk -c16: %.3f s (target %.1f s)  %s"
          % (results["stop_s"], STOP_TARGET, "pass" if good else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
