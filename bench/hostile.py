#!/usr/bin/env python3
"""bench/hostile.py - notesd under hostile clients: the figures of issue 9.

    python3 bench/hostile.py [--notesd PATH] [--quick] [--only NAME,...]

Starts notesd itself through its real CLI (a fresh state dir in a temp dir,
127.0.0.1 port 0, access log off), once per scenario, attacks it from this
process over loopback, prints what it saw against the issue's targets, and
stops everything it started (also on Ctrl-C, SIGTERM or an error). Stdlib
only. The scenarios, in order (--only picks some):

  convoy   N connections (default 4000: more than any cap) held open, then
           closed at once; three kinds: idle (never sent a byte), unfinished
           (a request head without its end), and unfinished ones left for
           their timeouts (--timeout 3) to fire together. /health is probed
           every 0.1 s throughout. Target: every probe answered within 1 s
           once they are held, and after they close. The worst probe while
           they connect is reported apart: it waits in the listen backlog
           behind thousands of connections, each of which gets a thread.
  slow     1,100 slow clients (slowloris: a request head, one byte a second,
           reconnecting whenever the daemon closes them) against a daemon
           run with a 1024 open-file limit, for 20 s. Targets: /health
           probes answered within 1 s, and the daemon not spinning (CPU
           time from /proc/PID/stat under half a core).
  dribble  one request sent one byte a second, its head, then (another)
           its body, to a daemon with --timeout 5. Target: 408 after
           timeout seconds in total (within one second more).
  memory   500 hostile clients with the defaults: 250 send header sections
           as large as the parser lets through and never end them, 250 send
           multipart bodies of max_body (a large file part and a small
           text field). Target: the daemon's peak RSS (VmHWM) under 300 MB.

Exit status: 0 every target met, 1 some missed, 2 the bench itself failed.
This is a benchmark of robustness, not speed: run it on a quiet machine,
and not often (it opens thousands of connections).
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL = dict(convoy=4000, slow=1100, slow_seconds=20, slow_fd_limit=1024,
            memory_heads=250, memory_bodies=250, dribble_timeout=5)
QUICK = dict(convoy=300, slow=120, slow_seconds=4, slow_fd_limit=100,
             memory_heads=10, memory_bodies=10, dribble_timeout=2)

PROBE_EVERY = 0.1          # seconds between /health probes
PROBE_TIMEOUT = 60.0       # seconds a probe waits before it counts as unanswered
ANSWER_WITHIN = 1.0        # the target for /health and new clients
SETTLE_TIMEOUT = 120.0     # seconds to wait for the daemon's threads to drain
MEMORY_TARGET_MB = 300.0
HEAD_START = b"GET / HTTP/1.1\r\nHost: localhost\r\n"
T0 = time.monotonic()


class BenchError(Exception):
    pass


def log(message):
    print("[%6.1fs] %s" % (time.monotonic() - T0, message), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the daemon

class Notesd:
    """One notesd, started with the real CLI in its own state dir."""

    def __init__(self, script, directory, *extra, fd_limit=None):
        self.script, self.dir, self.fd_limit = script, directory, fd_limit
        os.makedirs(directory)
        self.pidfile = os.path.join(directory, "notesd.pid")
        self.logfile = os.path.join(directory, "notesd.log")
        self.args = ["--listen", "127.0.0.1:0", "--state-dir", directory,
                     "--pidfile", self.pidfile, "--log", self.logfile,
                     "--access-log", "no", *extra]
        self.pid = self.port = None

    def cli(self, command, timeout=60):
        limit = self.fd_limit

        def preexec():  # the limit the daemon inherits, as `prlimit --nofile` would set it
            if limit:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        # Output to a file, not a pipe: a daemon holding the pipe would block us.
        with tempfile.TemporaryFile("w+") as out:
            rc = subprocess.run([sys.executable, self.script, *self.args, command],
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=timeout,
                                preexec_fn=preexec).returncode
            out.seek(0)
            return rc, out.read()

    def start(self):
        rc, out = self.cli("start")
        match = re.search(r"running, pid (\d+), http://127\.0\.0\.1:(\d+)/", out)
        if rc != 0 or not match:
            raise BenchError("notesd start exited %d: %s\n%s" % (rc, out.strip(), self.log()))
        self.pid, self.port = int(match.group(1)), int(match.group(2))
        return self

    def stop(self):
        if self.pid is None or not alive(self.pid):
            return
        try:
            self.cli("stop", timeout=SETTLE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        if alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)

    def status_field(self, name):
        """A field of /proc/PID/status, such as Threads or VmHWM (in kB)."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        raise BenchError("no %s in /proc/%d/status" % (name, self.pid))

    def cpu_seconds(self):
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return "(no log)"


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# ---------------------------------------------------------------- clients

def probe(port, timeout=PROBE_TIMEOUT):
    """One GET /health on a new connection: its status, or why there was none."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return "closed"
                data += chunk
            return int(data.split()[1])
    except socket.timeout:
        return "timeout"
    except (OSError, ValueError, IndexError) as e:
        return type(e).__name__


class Prober(threading.Thread):
    """Probes /health every PROBE_EVERY seconds, one at a time, and keeps
    (started, seconds, status) for each; mark() names where phases start."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.samples, self.marks = port, [], {}
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            started = time.monotonic()
            status = probe(self.port)
            self.samples.append((started, time.monotonic() - started, status))
            self.done.wait(PROBE_EVERY)

    def mark(self, name):
        self.marks[name] = time.monotonic()

    def finish(self):
        self.done.set()
        self.join(PROBE_TIMEOUT + 5)

    def summary(self, since=None, until=None):
        """(worst seconds, probes, probes not answered within 1 s, statuses)"""
        chosen = [(seconds, status) for started, seconds, status in self.samples
                  if (since is None or started >= since) and (until is None or started < until)]
        if not chosen:
            return 0.0, 0, 0, {}
        statuses = {}
        for _, status in chosen:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        late = sum(1 for seconds, status in chosen
                   if seconds > ANSWER_WITHIN or not isinstance(status, int))
        return max(seconds for seconds, _ in chosen), len(chosen), late, statuses


def open_connections(port, count, data=b""):
    """count connections, each having sent data; those that fail are left out."""
    socks = []
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=3)
            if data:
                s.sendall(data)
            socks.append(s)
        except OSError:
            pass
    return socks


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def settled_threads(daemon, timeout=10.0):
    """The daemon's thread count once it has not changed for half a second:
    the accept thread works through its backlog after the clients connect."""
    last, same, t0 = None, 0, time.monotonic()
    while same < 5 and time.monotonic() - t0 < timeout:
        count = daemon.status_field("Threads")
        same = same + 1 if count == last else 0
        last = count
        time.sleep(0.1)
    return last


def wait_threads(daemon, at_most, timeout=SETTLE_TIMEOUT):
    """Seconds until the daemon runs at most `at_most` threads (None: never)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if daemon.status_field("Threads") <= at_most:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------- scenarios

def convoy(cfg, new_daemon, results):
    """Connections held, then closed at once (or left to time out together)."""
    for kind, data, extra in (("idle", b"", ()), ("unfinished", HEAD_START, ()),
                              ("timeouts fire", HEAD_START, ("--timeout", "3"))):
        daemon = new_daemon("convoy-" + kind.split()[0], *extra)
        base = daemon.status_field("Threads")
        prober = Prober(daemon.port)
        prober.start()
        log("convoy/%s: opening %d connections" % (kind, cfg["convoy"]))
        socks = open_connections(daemon.port, cfg["convoy"], data)
        held = settled_threads(daemon) - base
        prober.mark("held")
        hold_until = time.monotonic() + 2
        while time.monotonic() < hold_until:
            time.sleep(0.05)
        prober.mark("close")
        if kind != "timeouts fire":
            close_all(socks)
        drained = wait_threads(daemon, base)
        time.sleep(1)  # a few more probes once it is all over
        prober.finish()
        close_all(socks)
        # The target is the issue's: connections held, then closed at once.
        # While thousands connect, a probe waits behind them in the listen
        # backlog (a thread to start for each, before and after): reported apart.
        flood = prober.summary(None, prober.marks["held"])
        worst, probes, late, statuses = prober.summary(prober.marks["held"])
        holding = prober.summary(prober.marks["held"], prober.marks["close"])
        closing = prober.summary(prober.marks["close"])
        results.add("convoy, %s" % kind,
                    "%d connections opened, %d held (threads); /health worst %.2f s while "
                    "held, %.2f s once closed: %d of %d probes late, statuses %s; threads "
                    "drained in %s. While they connected: worst %.2f s, %d of %d late" % (
                        len(socks), held, holding[0], closing[0], late, probes,
                        json.dumps(statuses, sort_keys=True),
                        "%.1f s" % drained if drained is not None else "never",
                        flood[0], flood[2], flood[1]),
                    "/health within 1 s, held and closed", late == 0)
        daemon.stop()


class SlowClients(threading.Thread):
    """count slowloris clients: a request head, then one byte a second of a
    header that never ends; any connection the daemon closes is opened again."""

    def __init__(self, port, count):
        super().__init__(daemon=True)
        self.port, self.count = port, count
        self.socks, self.reconnects, self.replies = [], 0, {}
        self.done = threading.Event()

    def connect(self):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        return [s, 0]  # socket, bytes of HEAD_START sent

    def run(self):
        self.socks = [self.connect() for _ in range(self.count)]
        while not self.done.is_set():
            for entry in self.socks:
                self.tick(entry)
            self.done.wait(1.0)
        for s, _ in self.socks:
            s.close()

    def tick(self, entry):
        s, sent = entry
        try:
            data = s.recv(4096)
            closed = True
            if data[:9].startswith(b"HTTP/1.1 "):
                status = data[9:12].decode()
                self.replies[status] = self.replies.get(status, 0) + 1
        except BlockingIOError:  # nothing to read (or still connecting)
            closed = False
        except OSError:  # refused or reset
            closed = True
        if closed:
            s.close()
            entry[:] = self.connect()
            self.reconnects += 1
            return
        try:
            if sent < len(HEAD_START):
                entry[1] += s.send(HEAD_START[sent:])
            else:
                at = (sent - len(HEAD_START)) % 8
                s.send(b"X-a: b\r\n"[at:at + 1])
                entry[1] += 1
        except (BlockingIOError, OSError):
            pass


def slow(cfg, new_daemon, results):
    daemon = new_daemon("slow", fd_limit=cfg["slow_fd_limit"])
    clients = SlowClients(daemon.port, cfg["slow"])
    log("slow: %d slow clients, open-file limit %d, %d s"
        % (cfg["slow"], cfg["slow_fd_limit"], cfg["slow_seconds"]))
    clients.start()
    time.sleep(2)  # let them all connect
    prober = Prober(daemon.port)
    cpu, t0 = daemon.cpu_seconds(), time.monotonic()
    prober.start()
    while time.monotonic() - t0 < cfg["slow_seconds"]:
        time.sleep(0.1)
    used, wall = daemon.cpu_seconds() - cpu, time.monotonic() - t0
    prober.finish()
    clients.done.set()
    clients.join(10)
    worst, probes, late, statuses = prober.summary()
    share = used / wall
    results.add("slow clients",
                "%d clients, limit %d files: /health worst %.2f s, %d of %d probes late, "
                "statuses %s; daemon CPU %.0f%% of a core; the clients reconnected %d "
                "times, replies %s" % (cfg["slow"], cfg["slow_fd_limit"], worst, late, probes,
                                      json.dumps(statuses, sort_keys=True), share * 100,
                                      clients.reconnects,
                                      json.dumps(clients.replies, sort_keys=True)),
                "new client within 1 s; CPU < 50%", late == 0 and share < 0.5)
    daemon.stop()


def dribble(cfg, new_daemon, results):
    timeout = cfg["dribble_timeout"]
    daemon = new_daemon("dribble", "--timeout", str(timeout))
    for part, head, dribbled in (
            ("head", b"", HEAD_START + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"),
            ("body", b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 300\r\n\r\n", b'{"text": "' + b"a" * 300 + b'"}')):
        log("dribble/%s: one byte a second, timeout %g s" % (part, timeout))
        give_up = 4 * timeout
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
            s.sendall(head)
            s.setblocking(False)
            t0, answer = time.monotonic(), None
            for i in range(len(dribbled)):
                try:
                    s.send(dribbled[i:i + 1])
                except OSError:
                    pass
                deadline = time.monotonic() + 1
                while answer is None and time.monotonic() < deadline:
                    try:
                        data = s.recv(4096)
                        answer = data.split()[1].decode() if data else "closed"
                    except BlockingIOError:
                        time.sleep(0.01)
                    except OSError as e:
                        answer = type(e).__name__
                if answer is not None or time.monotonic() - t0 > give_up:
                    break
            elapsed = time.monotonic() - t0
        ok = answer == "408" and elapsed <= timeout + 1
        results.add("dribbling, %s" % part,
                    ("%s after %.1f s" % (answer, elapsed)) if answer else
                    "no answer after %.0f s" % elapsed,
                    "408 after %g s (+1)" % timeout, ok)
    daemon.stop()


def _header_hog(port, done):
    """A header section as large as the parser lets through, never ended."""
    line = b"X-H: " + b"a" * 65000 + b"\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(HEAD_START)
            for _ in range(99):
                s.sendall(line)
            s.settimeout(60)
            while not done.is_set() and s.recv(4096):
                pass
    except OSError:
        pass


def _body_hog(port, done, size):
    """A multipart body of max_body: a large file part, a small text field."""
    boundary = b"hostilebench"
    head_part = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n"
                 b"hog\r\n--" + boundary + b"\r\nContent-Disposition: form-data; name=\"f\"; "
                 b"filename=\"f.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n")
    tail = b"\r\n--" + boundary + b"--\r\n"
    body = head_part + b"a" * (size - len(head_part) - len(tail)) + tail
    head = (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary="
            + boundary + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head + body)
            while not done.is_set() and s.recv(4096):
                pass
    except OSError:
        pass


def memory(cfg, new_daemon, results):
    daemon = new_daemon("memory")
    done = threading.Event()
    threading.stack_size(256 * 1024)
    hogs = [threading.Thread(target=_header_hog, args=(daemon.port, done), daemon=True)
            for _ in range(cfg["memory_heads"])]
    hogs += [threading.Thread(target=_body_hog, args=(daemon.port, done, 1048576), daemon=True)
             for _ in range(cfg["memory_bodies"])]
    log("memory: %d header hogs, %d body hogs, defaults"
        % (cfg["memory_heads"], cfg["memory_bodies"]))
    for hog in hogs:
        hog.start()
    t0 = time.monotonic()
    for hog in hogs:
        hog.join(max(0.1, 90 - (time.monotonic() - t0)))
    done.set()
    peak, now = daemon.status_field("VmHWM") / 1024, daemon.status_field("VmRSS") / 1024
    results.add("memory, %d hostile clients" % len(hogs),
                "peak RSS (VmHWM) %.0f MB, RSS at the end %.0f MB" % (peak, now),
                "peak < %d MB" % MEMORY_TARGET_MB, peak < MEMORY_TARGET_MB)
    daemon.stop()


SCENARIOS = {"convoy": convoy, "slow": slow, "dribble": dribble, "memory": memory}


# ---------------------------------------------------------------- main

class Results:
    def __init__(self):
        self.rows = []

    def add(self, name, seen, target, ok):
        self.rows.append((name, seen, target, ok))
        log("%s: %s [%s: %s]" % (name, seen, target, "pass" if ok else "FAIL"))

    def print(self):
        for name, seen, target, ok in self.rows:
            print("%-28s %s\n%-28s target: %s -> %s" % (name, seen, "", target,
                                                      "pass" if ok else "FAIL"))


def raise_own_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv=None):
    parser = argparse.ArgumentParser(description="notesd under hostile clients (issue 9).")
    parser.add_argument("--notesd", default=os.path.join(ROOT, "notesd.py"), metavar="PATH",
                        help="notesd.py to attack (default: the one in this repository)")
    parser.add_argument("--quick", action="store_true",
                        help="small numbers, to check the script itself")
    parser.add_argument("--only", default=",".join(SCENARIOS), metavar="NAME,...",
                        help="scenarios to run: " + ", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    script = os.path.abspath(args.notesd)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not os.path.exists(script):
        parser.error("unknown scenario %s" % unknown if unknown else "no file %s" % script)
    cfg = QUICK if args.quick else FULL
    raise_own_fd_limit()

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, on_term)
    tmp = tempfile.mkdtemp(prefix="notesd-hostile-")
    daemons, results, error = [], Results(), None

    def new_daemon(name, *extra, fd_limit=None):
        daemon = Notesd(script, os.path.join(tmp, name), *extra, fd_limit=fd_limit)
        daemons.append(daemon)
        return daemon.start()

    print("notesd %s, python %s, %d cpus, load %.2f" % (
        script, sys.version.split()[0], os.cpu_count(), os.getloadavg()[0]))
    try:
        for name in names:
            SCENARIOS[name](cfg, new_daemon, results)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:  # still clean up, and print what we have
        error = "%s: %s" % (type(e).__name__, e)
        if daemons:
            log("notesd log tail:\n" + daemons[-1].log())
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for daemon in daemons:
            try:
                daemon.stop()
            except Exception as e:
                log("cleanup: %s" % e)
        shutil.rmtree(tmp, ignore_errors=True)
    results.print()
    print("load %.2f at the end%s" % (os.getloadavg()[0], "; INCOMPLETE: " + error if error else ""))
    if error:
        return 2
    return 0 if all(ok for *_, ok in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
