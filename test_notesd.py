"""Tests for notesd.py: real processes, real sockets, real files.

Every test starts the daemon with the real CLI (``python notesd.py ... start``)
in its own temporary directory, on a port the daemon picks itself (listen
127.0.0.1:0; the real URL is read from the ``.url`` file beside the pid file).
Fixtures always stop the daemons they started and SIGKILL whatever is left, so
no test leaks a process. Nothing waits with a bare sleep: ``wait_until`` polls a
predicate against a deadline and fails with the daemon's log.

Sections follow the contract: process lifecycle, config & CLI, HTTP API,
errors, concurrency & durability, security.

Needs only pytest and the standard library; runs on CPython 3.9-3.13, as root
for the privilege, chroot and network-namespace tests (skipped otherwise).
"""

import ast
import collections
import concurrent.futures
import contextlib
import fcntl
import glob
import grp
import http.client
import json
import os
import platform
import pwd
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse


def _run_in_venv():
    """`python3 test_notesd.py` where that python3 has no pytest (Debian's
    /usr/bin/python3, say): make a virtual environment .venv beside this file
    with pytest in it, once, and run this file again with its python."""
    venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv")
    python = os.path.join(venv, "bin", "python3")
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):  # we are that python: no loop
        sys.exit("test_notesd: %s cannot import pytest; remove %s and run this file "
                 "with python3 again" % (python, venv))

    def works(*args):
        return os.path.exists(python) and subprocess.run(
            [python, *args], capture_output=True).returncode == 0

    if not works("-c", "import pytest"):
        print("test_notesd: %s has no pytest; installing it into %s" % (sys.executable, venv),
              file=sys.stderr)
        pip, packages = [python, "-m", "pip"], ["pytest"]
        try:
            if not works("-m", "pip", "--version"):
                made = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True)
                if made.returncode != 0:
                    # Debian's python3 without the python3-venv package has no
                    # ensurepip, so venv cannot put pip in: make the venv
                    # without pip and run pip from its wheel, fetched from PyPI.
                    print("test_notesd: venv could not install pip (no ensurepip?); "
                          "getting pip from PyPI", file=sys.stderr)
                    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip",
                                    venv], check=True)
                    wheel = _pip_wheel(venv)
                    # pip runs from its wheel and installs itself too
                    pip, packages = [python, os.path.join(wheel, "pip")], [wheel, "pytest"]
            subprocess.run(pip + ["install", "-q", "--disable-pip-version-check", *packages],
                           check=True)
        except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
            sys.exit("test_notesd: could not set up pytest in %s (%s); install pytest for this "
                     "python3 (Debian: apt-get install python3-venv, or python3-pytest)"
                     % (venv, e))
    os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])


def _pip_wheel(directory):
    """Download into directory the newest pip wheel from PyPI that this Python
    can run (newer pips drop old Pythons), check its sha256, return its path."""
    import hashlib
    import urllib.request
    index = "https://pypi.org/simple/pip/"
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}  # PEP 691
    with urllib.request.urlopen(urllib.request.Request(index, headers=accept), timeout=60) as r:
        files = json.load(r)["files"]
    wheels = []
    for f in files:
        version = re.match(r"pip-(\d+(?:\.\d+)*)-.*\.whl$", f["filename"])  # no pre-releases
        floor = re.search(r">=\s*(\d+)\.(\d+)", f.get("requires-python") or "")
        if version and not f.get("yanked") and (
                not floor or sys.version_info[:2] >= tuple(map(int, floor.groups()))):
            wheels.append((tuple(map(int, version.group(1).split("."))), f))
    if not wheels:
        raise ValueError("no pip wheel on PyPI for Python %d.%d" % sys.version_info[:2])
    f = max(wheels, key=lambda w: w[0])[1]
    with urllib.request.urlopen(urllib.parse.urljoin(index, f["url"]), timeout=60) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != f["hashes"]["sha256"]:
        raise ValueError("%s does not match its sha256 on PyPI" % f["filename"])
    path = os.path.join(directory, f["filename"])
    with open(path, "wb") as out:
        out.write(data)
    return path


try:
    import pytest
except ImportError:
    if __name__ != "__main__":
        raise
    _run_in_venv()

NOTESD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notesd.py")

#: seconds any CLI invocation may take before the test gives up on it
CLI_TIMEOUT = 30
#: seconds any single HTTP exchange may take
HTTP_TIMEOUT = 10
#: seconds between two polls in wait_until: small, it is not a wait by itself
POLL_STEP = 0.02

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
START_LINE = re.compile(r"^notesd (\S+) running, pid (\d+), (http://\S+/)$", re.M)
STATUS_LINE = re.compile(r"^notesd running, pid (\d+), (http://\S+/), uptime \d+s$", re.M)

IS_ROOT = os.geteuid() == 0


###############################################################################
# Helpers: processes, waiting, HTTP ###########################################
###############################################################################


def wait_until(predicate, timeout=5.0, daemon=None, what=""):
    """Poll predicate() until it is truthy; fail with the daemon's log after timeout.

    Exceptions from the predicate (connection refused while the daemon comes
    up, a file not there yet) count as "not yet".
    """
    done, last = poll_until(predicate, timeout)
    if done:
        return last
    log = daemon.log() if daemon is not None else ""
    raise AssertionError(
        "timed out after %ss waiting for %s (last: %r)\n--- daemon log ---\n%s"
        % (timeout, what or predicate, last, log[-4000:]))


def poll_until(predicate, timeout):
    """(True, value) once predicate() is truthy, or (False, the last value
    or exception) after timeout: for a condition that may rightly not come."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return True, value
            last = value
        except (OSError, http.client.HTTPException, ValueError) as exc:
            last = exc
        if time.monotonic() > deadline:
            return False, last
        time.sleep(POLL_STEP)


def proc_stat(pid):
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()


def alive(pid):
    """True if pid names a process that is neither gone nor a zombie."""
    try:
        return proc_stat(pid)[0] not in ("Z", "X")
    except (OSError, ValueError):
        return False


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_status(pid):
    """/proc/PID/status as a dict of name -> raw value."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            out[name] = value.strip()
    return out


#: The prefix of this run's temp dirs outside pytest's tree (open_tmp): this
#: run's own, so that two suites running at once never kill each other's daemons.
OPEN_TMP_PREFIX = "notesd-test-%d-" % os.getpid()


def notesd_processes(marker):
    """Live processes running notesd.py whose command line mentions marker."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        cmd = cmdline(pid)
        if "notesd" in cmd and marker in cmd and alive(pid):
            found.append(pid)
    return sorted(found)


def dead_pid():
    """A pid that certainly named a process a moment ago and names none now."""
    p = subprocess.Popen(["true"])
    p.wait(timeout=CLI_TIMEOUT)
    return p.pid


class Reply:
    """An HTTP response read whole: status, headers, body bytes."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Reply %s %r %r>" % (self.status, dict(self.headers), self.body[:500])


def request(base, method, path, body=None, headers=None, timeout=HTTP_TIMEOUT):
    """One HTTP exchange with the server at base URL; body may be bytes or JSON-able.

    path may also be an absolute URL (a Location or Link header).
    """
    headers = dict(headers or {})
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode()
    if "://" in path:
        parts = urllib.parse.urlsplit(path)
        path = parts.path + ("?" + parts.query if parts.query else "")
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, r.headers, r.read())
    finally:
        conn.close()


def half_closed_exchange(port, data, timeout=5.0):
    """Send raw bytes, close our side (FIN), and return every byte the
    server sends until it closes: what a client cut off mid-request sees."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def raw_exchange(port, data, timeout=5.0, host="127.0.0.1"):
    """Send raw bytes, read until the server closes (or timeout); return (status, headers, body).

    headers is a dict with lower-case names. Used where http.client would
    refuse to send the request or would hide what came back.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may answer and close before reading it all (414, 413)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks)
    head, sep, body = reply.partition(b"\r\n\r\n")
    assert sep, "no complete HTTP response head in %r" % reply[:500]
    lines = head.decode("iso-8859-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        hdrs[name.strip().lower()] = value.strip()
    return status, hdrs, body


###############################################################################
# The Daemon fixture ##########################################################
###############################################################################


class Daemon:
    """One notesd instance in a directory: builds argv, drives the CLI, talks HTTP.

    Methods for tests: cli(), start(), stop(), pid(), log(), get()/post()/...,
    cleanup() (the fixtures call it; it never fails).
    """

    def __init__(self, directory, *extra, config=None, env=None):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.pidfile = os.path.join(self.dir, "notesd.pid")
        self.urlfile = os.path.join(self.dir, "notesd.url")
        self.logfile = os.path.join(self.dir, "notesd.log")
        self.database = os.path.join(self.dir, "notes.db")
        self.args = []
        if config is not None:
            self.args += ["-c", str(config)]
        self.args += ["--state-dir", self.dir, "--listen", "127.0.0.1:0",
                      "--pidfile", self.pidfile, "--log", self.logfile]
        self.args += [str(a) for a in extra]
        self.env = env
        self.url = None
        self.seen_pids = set()
        self.script = NOTESD  # a test may run a copy of notesd.py

    # CLI -------------------------------------------------------------------

    def argv(self, *command):
        return [sys.executable, self.script] + self.args + [str(c) for c in command]

    def cli(self, *command, timeout=CLI_TIMEOUT, env=None, **popen_kw):
        return subprocess.run(self.argv(*command), capture_output=True, text=True,
                              timeout=timeout, env=env or self.env, **popen_kw)

    def start(self, **popen_kw):
        r = self.cli("start", **popen_kw)
        assert r.returncode == 0, "start failed: rc=%s\nstdout=%s\nstderr=%s\nlog=%s" % (
            r.returncode, r.stdout, r.stderr, self.log())
        self.after_start()
        return r

    def after_start(self):
        """Read the URL and pid the daemon published; remember the pid for cleanup."""
        with open(self.urlfile) as f:
            self.url = f.read().strip()
        self.seen_pids.add(self.pid())

    def stop(self, *extra):
        r = self.cli("stop", *extra)
        assert r.returncode == 0, "stop failed: rc=%s\n%s%s\nlog=%s" % (
            r.returncode, r.stdout, r.stderr, self.log())
        return r

    def pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def log(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except OSError:
            return "(no log file %s)" % self.logfile

    def processes(self):
        return notesd_processes(self.pidfile)

    # HTTP ------------------------------------------------------------------

    @property
    def port(self):
        return urllib.parse.urlsplit(self.url).port

    def request(self, method, path, body=None, headers=None, timeout=HTTP_TIMEOUT):
        return request(self.url, method, path, body, headers, timeout)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, text, path="/", **kw):
        return self.request("POST", path, {"text": text}, **kw)

    def note(self, text):
        """POST a note and return it (asserting 201)."""
        r = self.post(text)
        assert r.status == 201, r
        return r.json()

    def assert_serving(self):
        """The daemon still answers and has logged no traceback."""
        r = self.get("/health")
        assert r.status == 200, r
        assert "Traceback" not in self.log()

    # teardown --------------------------------------------------------------

    def cleanup(self):
        """Stop the daemon with the CLI; SIGKILL any notesd process of ours left."""
        try:
            self.cli("stop", "--timeout", "5", timeout=20)
        except (subprocess.SubprocessError, OSError):
            pass
        pids = set(self.processes())
        pid = self.pid()
        if pid is not None:
            pids.add(pid)
        pids |= self.seen_pids
        for pid in pids:
            # never signal a process that is not a notesd (a test may put an
            # unrelated pid into the pid file)
            if pid and alive(pid) and "notesd" in cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def make_daemon(tmp_path):
    """Factory: make_daemon(*extra_args, start=True, config=None, directory=None)."""
    made = []

    def make(*extra, start=True, config=None, directory=None, env=None, **popen_kw):
        d = Daemon(directory or tmp_path / ("d%d" % len(made)), *extra, config=config, env=env)
        made.append(d)
        if start:
            d.start(**popen_kw)
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon for the many API tests that need no fresh one."""
    d = Daemon(tmp_path_factory.mktemp("shared"))
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="session", autouse=True)
def no_leaked_daemons(tmp_path_factory):
    """Safety net: at the end, kill (and report) any notesd started under our temp dirs."""
    base = str(tmp_path_factory.getbasetemp()) + "/"  # not pytest-15 for pytest-153
    yield
    leaked = notesd_processes(base) + notesd_processes(OPEN_TMP_PREFIX)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not leaked, "leaked notesd processes: %r" % leaked


@pytest.fixture
def open_tmp():
    """A temp dir outside pytest's 0700 tree, so an unprivileged daemon can reach it."""
    d = tempfile.mkdtemp(prefix=OPEN_TMP_PREFIX, dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def unique(prefix="t"):
    """A marker no other test's notes contain (for ?q= filters on the shared daemon)."""
    return "%s-%s-%d" % (prefix, os.urandom(4).hex(), time.monotonic_ns())


###############################################################################
# Process lifecycle ###########################################################
###############################################################################


@pytest.fixture(scope="module")
def detached(tmp_path_factory):
    """A daemon started by a starter with an odd PATH and an extra inherited fd.

    Yields (daemon, pid, starter_pid, passed_path).
    """
    d = Daemon(tmp_path_factory.mktemp("detached"))
    passed_path = os.path.join(d.dir, "passed-down.txt")
    fd = os.open(passed_path, os.O_RDWR | os.O_CREAT, 0o600)
    env = dict(os.environ, PATH="/some/odd/dir:/usr/bin:/bin")
    try:
        starter = subprocess.Popen(d.argv("start"), env=env, pass_fds=(fd,),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = starter.communicate(timeout=CLI_TIMEOUT)
        assert starter.returncode == 0, (out, err, d.log())
        d.after_start()
        d.start_output = out
        yield d, d.pid(), starter.pid, passed_path
    finally:
        os.close(fd)
        d.cleanup()


def test_start_prints_version_pid_and_url(detached):
    d, pid, _, _ = detached
    m = START_LINE.search(d.start_output)
    assert m, d.start_output
    assert int(m.group(2)) == pid
    assert m.group(3) == d.url
    assert re.match(r"^http://127\.0\.0\.1:\d+/$", d.url)
    assert d.port != 0


def test_start_returns_only_when_http_answers(daemon):
    # no waiting at all: start has returned, so the daemon must answer now
    r = daemon.get("/health", timeout=5)
    assert r.status == 200, r


def test_pid_file_holds_pid_and_posix_lock(detached):
    d, pid, _, _ = detached
    with open(d.pidfile) as f:
        assert f.read() == "%d\n" % pid
    inode = os.stat(d.pidfile).st_ino
    with open("/proc/locks") as f:
        locks = f.read().splitlines()
    ours = [line for line in locks
            if line.split()[1:2] == ["POSIX"] and "WRITE" in line.split()
            and str(pid) in line.split() and line.split()[5].split(":")[-1] == str(inode)]
    assert ours, "no POSIX WRITE lock by pid %d on inode %d in:\n%s" % (pid, inode, "\n".join(locks))


def test_url_file_beside_pid_file(detached):
    d, _, _, _ = detached
    with open(d.urlfile) as f:
        content = f.read()
    assert re.match(r"^http://127\.0\.0\.1:\d+/\n$", content), content


def test_daemon_is_detached_from_starter(detached):
    _, pid, starter_pid, _ = detached
    ppid = int(proc_stat(pid)[1])
    assert ppid not in (starter_pid, os.getpid()), ppid


def test_daemon_session_and_process_group(detached):
    _, pid, _, _ = detached
    fields = proc_stat(pid)
    pgrp, sid = int(fields[2]), int(fields[3])
    assert sid != pid, "daemon is a session leader (could reacquire a terminal)"
    assert pgrp == sid


def test_std_fds_are_dev_null(detached):
    _, pid, _, _ = detached
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"


def test_inherited_fd_is_closed(detached):
    _, pid, _, passed_path = detached
    targets = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            targets.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    assert passed_path not in targets, targets


def test_cwd_is_root(detached):
    _, pid, _, _ = detached
    assert os.readlink("/proc/%d/cwd" % pid) == "/"


def test_default_umask(detached):
    _, pid, _, _ = detached
    assert proc_status(pid)["Umask"] == "0027"


def test_configured_umask(make_daemon):
    d = make_daemon("--umask", "077")
    assert proc_status(d.pid())["Umask"] == "0077"
    # The database follows the umask; the pid and URL files stay readable by
    # anyone, so monitoring run as another user can use them.
    assert os.stat(d.database).st_mode & 0o777 == 0o600
    for path in (d.pidfile, d.urlfile):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_environment_path_is_fixed(detached):
    _, pid, _, _ = detached
    with open("/proc/%d/environ" % pid, "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert b"PATH" in env, env
    assert b"/some/odd/dir" not in env[b"PATH"], env[b"PATH"]


def test_core_dumps_disabled(detached):
    _, pid, _, _ = detached
    with open("/proc/%d/limits" % pid) as f:
        line = [l for l in f if l.startswith("Max core file size")][0]
    soft = line[len("Max core file size"):].split()[0]
    assert soft == "0", line


def test_second_start_leaves_one_daemon(daemon):
    pid = daemon.pid()
    r = daemon.cli("start")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert daemon.pid() == pid
    wait_until(lambda: daemon.processes() == [pid], 5, daemon, "exactly one daemon")


def test_concurrent_starts_leave_one_daemon(make_daemon):
    d = make_daemon(start=False)
    starters = [subprocess.Popen(d.argv("start"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.communicate(timeout=CLI_TIMEOUT), p.returncode) for p in starters]
    for (out, err), rc in results:
        assert rc == 0, (out, err, d.log())
    d.after_start()
    pid = d.pid()
    wait_until(lambda: d.processes() == [pid], 5, d, "exactly one daemon")
    for (out, _), _ in results:  # every starter reports the one daemon
        assert re.search(r"\bpid %d\b" % pid, out), out
    assert d.get("/health").status == 200


def _have_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback")
def test_listen_ipv6(make_daemon):
    d = make_daemon("--listen", "[::1]:0")
    assert re.match(r"^http://\[::1\]:\d+/$", d.url), d.url
    assert d.get("/health").status == 200
    assert d.cli("status").returncode == 0


def test_stale_pid_file_of_dead_process_is_taken_over(make_daemon):
    d = make_daemon(start=False)
    stale = dead_pid()
    with open(d.pidfile, "w") as f:
        f.write("%d\n" % stale)
    d.start()
    assert d.pid() != stale
    assert alive(d.pid())


def test_pid_file_naming_unrelated_process_is_not_signalled(make_daemon):
    d = make_daemon(start=False)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(d.pidfile, "w") as f:
            f.write("%d\n" % sleeper.pid)
        d.start()
        assert d.pid() != sleeper.pid
        assert d.get("/health").status == 200
        d.stop()
        assert sleeper.poll() is None, "the unrelated process was signalled"
    finally:
        sleeper.kill()
        sleeper.wait(timeout=CLI_TIMEOUT)


def test_start_with_port_taken_fails_with_reason(make_daemon):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        d = make_daemon("--listen", "127.0.0.1:%d" % port, start=False)
        r = d.cli("start")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "in use" in r.stderr.lower(), r.stderr
        assert d.processes() == []


def test_start_with_invalid_config_forks_nothing(make_daemon):
    d = make_daemon("--umask", "999", start=False)
    r = d.cli("start")
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "umask" in r.stderr
    assert d.processes() == []
    assert not os.path.exists(d.pidfile)


def test_stop_removes_pid_and_url_files(daemon):
    pid = daemon.pid()
    daemon.stop()
    assert not alive(pid)
    assert not os.path.exists(daemon.pidfile)
    assert not os.path.exists(daemon.urlfile)


def test_stop_when_not_running_succeeds(make_daemon):
    d = make_daemon(start=False)
    r = d.cli("stop")
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_stop_timeout_and_force(daemon):
    pid = daemon.pid()
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    r = daemon.cli("stop", "--timeout", "1")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert alive(pid)
    r = daemon.cli("stop", "--timeout", "1", "--force")
    assert r.returncode == 0, (r.stdout, r.stderr)
    wait_until(lambda: not alive(pid), 5, daemon, "daemon killed")


@pytest.mark.skipif(not shutil.which("start-stop-daemon"), reason="needs start-stop-daemon")
def test_start_stop_daemon_stops_it(daemon):
    pid = daemon.pid()
    r = subprocess.run(["start-stop-daemon", "--stop", "--pidfile", daemon.pidfile,
                        "--retry", "10"], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr, daemon.log())
    assert not alive(pid)
    assert not os.path.exists(daemon.pidfile)  # removed by the daemon's clean stop
    assert not os.path.exists(daemon.urlfile)
    assert "Traceback" not in daemon.log()


@pytest.mark.skipif(not shutil.which("pkill"), reason="needs pkill")
def test_pkill_with_pid_file_stops_it(daemon):
    pid = daemon.pid()
    r = subprocess.run(["pkill", "-F", daemon.pidfile], capture_output=True, text=True,
                       timeout=CLI_TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr)
    wait_until(lambda: not alive(pid), 10, daemon, "the daemon gone after pkill -F")
    r = daemon.cli("status")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert not os.path.exists(daemon.pidfile)


def test_restart_gives_new_daemon(daemon):
    old = daemon.pid()
    r = daemon.cli("restart")
    assert r.returncode == 0, (r.stdout, r.stderr, daemon.log())
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout  # one stop, one start: nothing else
    assert lines[0] == "notesd stopped, pid %d" % old, r.stdout
    assert START_LINE.match(lines[1]), r.stdout
    daemon.after_start()
    assert START_LINE.match(lines[1]).group(2) == str(daemon.pid())
    assert daemon.pid() != old
    assert not alive(old)
    assert daemon.get("/health").status == 200


def test_status_running(daemon):
    r = daemon.cli("status")
    assert r.returncode == 0, (r.stdout, r.stderr)
    m = STATUS_LINE.search(r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) == daemon.pid()
    assert m.group(2) == daemon.url


def test_status_not_running(make_daemon):
    d = make_daemon(start=False)
    r = d.cli("status")
    assert r.returncode == 3, (r.stdout, r.stderr)


def test_status_after_stop(daemon):
    daemon.stop()
    assert daemon.cli("status").returncode == 3


def test_status_dead_with_pid_file(make_daemon):
    d = make_daemon(start=False)
    with open(d.pidfile, "w") as f:
        f.write("%d\n" % dead_pid())
    r = d.cli("status")
    assert r.returncode == 1, (r.stdout, r.stderr)


def _config(tmp_path, text, name="notesd.conf"):
    path = tmp_path / name
    path.write_text("[notesd]\n" + text)
    return path


def test_reload_applies_valid_file(make_daemon, tmp_path):
    conf = _config(tmp_path, "log_level = info\n")
    d = make_daemon(config=conf)
    pid = d.pid()
    assert d.get("/config").json()["log_level"] == "info"
    conf.write_text("[notesd]\nlog_level = debug\n")
    r = d.cli("reload")
    assert r.returncode == 0, (r.stdout, r.stderr, d.log())
    assert d.get("/config").json()["log_level"] == "debug"
    assert d.pid() == pid


def test_reload_invalid_file_keeps_old_config(make_daemon, tmp_path):
    conf = _config(tmp_path, "log_level = warning\n")
    d = make_daemon(config=conf)
    pid = d.pid()
    conf.write_text("[notesd]\nlog_level = loud\n")
    r = d.cli("reload")
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "log_level" in r.stderr
    assert alive(pid)
    reply = d.get("/config")
    assert reply.status == 200
    assert reply.json()["log_level"] == "warning"


def test_reload_applies_live_keys_and_keeps_restart_only_ones(make_daemon, tmp_path):
    conf = _config(tmp_path, "log_level = info\n")
    d = make_daemon(config=conf)
    url = d.url
    conf.write_text("[notesd]\nlog_level = error\nqueue_size = 5\n")
    r = d.cli("reload")
    assert r.returncode == 0, (r.stdout, r.stderr, d.log())
    cfg = d.get("/config").json()
    assert cfg["log_level"] == "error"
    assert cfg["queue_size"] == 10000  # needs a restart: not applied
    assert d.url == url


def test_reload_not_running(make_daemon):
    d = make_daemon(start=False)
    assert d.cli("reload").returncode == 7


@pytest.mark.parametrize("how", ["blocked", "ignored"])
def test_stop_works_when_starter_blocked_sigterm(make_daemon, how):
    def block():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def ignore():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    d = make_daemon(preexec_fn=block if how == "blocked" else ignore)
    pid = d.pid()
    r = d.cli("stop", "--timeout", "5")
    assert r.returncode == 0, (r.stdout, r.stderr, d.log())
    assert not alive(pid)


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_user_drops_privileges(make_daemon, open_tmp):
    nobody = pwd.getpwnam("nobody")
    state = os.path.join(open_tmp, "state")  # the pid file stays in a root-only directory
    os.mkdir(state)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    d = make_daemon("--user", "nobody", "--state-dir", state, directory=open_tmp)
    st = proc_status(d.pid())
    assert set(st["Uid"].split()) == {str(nobody.pw_uid)}, st["Uid"]
    assert set(st["Gid"].split()) == {str(nobody.pw_gid)}, st["Gid"]
    assert set(st["Groups"].split()) <= {str(nobody.pw_gid)}, st["Groups"]
    assert d.post("as nobody").status == 201
    # Python's files may be unreadable now (pyenv under /root): nothing the
    # daemon does may need a module or codec it did not load before the drop.
    for path in ("/status", "/health", "/config", "/openapi.json", "/?q=nobody"):
        assert d.get(path).status == 200, (path, d.log())
    d.stop()


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_chroot(make_daemon, open_tmp):
    state = os.path.join(open_tmp, "state")
    d = make_daemon("--chroot", open_tmp, directory=state)
    pid = d.pid()
    assert os.readlink("/proc/%d/root" % pid) == open_tmp
    r = d.post("in a chroot")
    assert r.status == 201, (r, d.log())
    assert d.get(r.json()["url"]).json()["text"] == "in a chroot"
    # a tick or two later: the storage checks see the jailed paths right
    wait_until(lambda: d.get("/status").json()["uptime"] > 2.5, 5, d, "two ticks")
    assert d.get("/health").status == 200, d.get("/health").json()
    d.stop()
    assert not alive(pid)


def test_syslog(make_daemon, tmp_path):
    path = str(tmp_path / "log.sock")
    received = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    done = threading.Event()

    def reader():  # keep draining, or a full queue would block the daemon's logging
        while not done.is_set():
            try:
                received.append(sock.recv(65536))
            except socket.timeout:
                pass
            except OSError:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        d = make_daemon("--log", "syslog", "--syslog-address", path, "--log-level", "debug")
        d.post("for syslog")
        wait_until(lambda: any(m.startswith(b"<") and b"notesd" in m for m in received),
                   5, d, "a syslog datagram")
        d.stop()
    finally:
        done.set()
        t.join(timeout=5)
        sock.close()


def test_run_in_foreground_stops_on_sigterm(tmp_path):
    d = Daemon(tmp_path / "fg")
    with open(tmp_path / "fg.out", "w") as out, open(tmp_path / "fg.err", "w") as err:
        proc = subprocess.Popen(d.argv("run"), stdout=out, stderr=err)
    try:
        wait_until(lambda: os.path.exists(d.urlfile) and d.pid() == proc.pid, 10, d,
                   "foreground daemon's url and pid files")
        d.after_start()
        assert d.get("/health").status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not os.path.exists(d.pidfile)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=CLI_TIMEOUT)
        d.cleanup()


def test_run_when_already_running_fails(daemon):
    r = daemon.cli("run", timeout=CLI_TIMEOUT)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "already running" in r.stderr
    assert daemon.get("/health").status == 200


def test_sigusr1_survives_a_log_that_cannot_be_reopened(make_daemon, tmp_path):
    """SIGUSR1 after the log's directory went away: the daemon keeps serving."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    d = make_daemon("--log", str(logdir / "notesd.log"))
    os.rename(str(logdir), str(tmp_path / "logs.gone"))
    os.kill(d.pid(), signal.SIGUSR1)
    for i in range(3):  # each write finds the file moved and fails to reopen it
        assert d.post("after-%d" % i).status == 201
    assert d.get("/health").status == 200
    assert alive(d.pid())


class NotifyListener:
    """Our end of sd_notify(3): an AF_UNIX datagram socket, read by a thread.

    `messages` collects each datagram as a dict of its KEY=VALUE lines, in
    order of arrival; `address` is the NOTIFY_SOCKET value to pass down.
    """

    def __init__(self, address):
        self.address = address
        self.messages, self.raw = [], []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.done.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.raw.append(data)
            lines = [l for l in data.decode().split("\n") if l]
            self.messages.append(dict(l.split("=", 1) for l in lines if "=" in l))

    def since(self, start, key, value=None):
        """Indexes of messages from `start` on that carry key (=value)."""
        return [i for i, m in enumerate(self.messages) if i >= start and key in m
                and (value is None or m[key] == value)]

    def close(self):
        self.done.set()
        self.thread.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def _run_notified(tmp_path, address, **environment):
    """`notesd run` started as systemd starts a Type=notify service, with
    NOTIFY_SOCKET=address (and `environment`): (its Daemon, its Popen, the
    NotifyListener). Kills it if it is still running, then cleans up."""
    listener = NotifyListener(address)
    d = Daemon(tmp_path / "fg")
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "LISTEN_FDS")}
    env.update(NOTIFY_SOCKET=address, **environment)
    proc = None
    try:
        with open(str(tmp_path / "fg.err"), "w") as err:
            proc = subprocess.Popen(d.argv("run"), env=env, stdout=err, stderr=err)
        yield d, proc, listener
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=CLI_TIMEOUT)
        listener.close()
        d.cleanup()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_run_speaks_sd_notify(tmp_path, kind):
    if kind == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = "@notesd-test-notify-%s" % os.urandom(6).hex()
    with _run_notified(tmp_path, address, WATCHDOG_USEC="400000") as (d, proc, listener):
        got = listener.messages
        wait_until(lambda: listener.since(0, "READY", "1"), 10, d, "READY=1")
        first = got[0]
        assert first.get("READY") == "1", got
        assert first.get("STATUS"), got
        assert first.get("MAINPID") == str(proc.pid), (got, proc.pid)
        d.after_start()
        assert d.get("/health").status == 200

        # WATCHDOG_USEC=400000: a WATCHDOG=1 at least every 0.2 s from the main loop
        wait_until(lambda: len(listener.since(1, "WATCHDOG", "1")) >= 2, 2, d,
                   "two WATCHDOG=1")

        mark = len(got)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = wait_until(lambda: listener.since(mark, "RELOADING", "1"), 5, d,
                               "RELOADING=1")[0]
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        usec = got[reloading].get("MONOTONIC_USEC", "")
        assert usec.isdigit(), got[reloading]
        assert before <= int(usec) <= after, (before, usec, after)
        wait_until(lambda: listener.since(reloading + 1, "READY", "1"), 5, d,
                   "READY=1 after the reload")

        mark = len(got)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, d.log()
        wait_until(lambda: listener.since(mark, "STOPPING", "1"), 5, d, "STOPPING=1")
        assert not os.path.exists(d.pidfile)
        line = rb"[A-Z_]+=[^\n]*"
        for raw in listener.raw:  # newline-separated KEY=VALUE lines
            assert re.fullmatch(rb"%s(\n%s)*\n?" % (line, line), raw), listener.raw


###############################################################################
# Config & CLI ################################################################
###############################################################################


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is 3.10+")
def test_imports_only_stdlib():
    with open(NOTESD) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names - set(sys.stdlib_module_names) - {"__future__"} == set()


def test_version_and_help(tmp_path):
    d = Daemon(tmp_path)
    r = d.cli("--version")
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d+\.\d+", r.stdout + r.stderr)
    r = d.cli("-h")
    assert r.returncode == 0, r.stderr
    for command in ("start", "stop", "status", "reload", "check", "configtest"):
        assert command in r.stdout


def test_usage_error(tmp_path):
    r = Daemon(tmp_path).cli("frobnicate")
    assert r.returncode == 2, (r.stdout, r.stderr)


def test_configtest_valid_prints_effective_values(tmp_path):
    r = Daemon(tmp_path, "--umask", "077").cli("configtest")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "listen" in r.stdout and "127.0.0.1:0" in r.stdout
    assert "umask" in r.stdout and "077" in r.stdout


@pytest.mark.parametrize("key,value", [("umask", "999"), ("listen", "nonsense"),
                                       ("log_level", "loud"), ("max_body", "lots")])
@pytest.mark.parametrize("where", ["before", "after"])
def test_configtest_bad_value(tmp_path, key, value, where):
    option = ["--" + key.replace("_", "-"), value]
    d = Daemon(tmp_path)
    if where == "before":
        d.args += option
        r = d.cli("configtest")
    else:
        r = d.cli("configtest", *option)
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert key in r.stderr and value in r.stderr, r.stderr


@pytest.mark.parametrize("extra", [
    ("--pidfile", "{dir}/notesd.url"),          # the url file would be the pid file
    ("--database", "{dir}/notesd.pid"),
    ("--chroot", "{dir}/jail", "--log", "{dir}/outside.log"),
], ids=["pidfile-is-url-file", "database-is-pidfile", "log-outside-chroot"])
def test_configtest_refuses_paths_that_collide(tmp_path, extra):
    (tmp_path / "jail").mkdir()
    d = Daemon(tmp_path)
    r = d.cli("configtest", *[part.format(dir=tmp_path) for part in extra])
    assert r.returncode == 6, (r.stdout, r.stderr)


def test_config_file_bad_value_names_file_key_value(tmp_path):
    conf = _config(tmp_path, "max_body = lots\n")
    r = Daemon(tmp_path, config=conf).cli("configtest")
    assert r.returncode == 6, (r.stdout, r.stderr)
    for part in (str(conf), "max_body", "lots"):
        assert part in r.stderr, r.stderr


def test_config_file_unknown_key(tmp_path):
    conf = _config(tmp_path, "colour = blue\n")
    r = Daemon(tmp_path, config=conf).cli("configtest")
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "colour" in r.stderr


def test_config_from_environment(tmp_path):
    conf = _config(tmp_path, "umask = 999\n")
    env = dict(os.environ, NOTESD_CONFIG=str(conf))
    r = Daemon(tmp_path).cli("configtest", env=env)
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "umask" in r.stderr and str(conf) in r.stderr
    conf.write_text("[notesd]\numask = 077\n")
    r = Daemon(tmp_path).cli("configtest", env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "077" in r.stdout


def test_command_line_wins_over_file(make_daemon, tmp_path):
    conf = _config(tmp_path, "log_level = error\n")
    d = make_daemon("--log-level", "warning", config=conf)
    assert d.get("/config").json()["log_level"] == "warning"


def test_check_ok_while_running(daemon):
    r = daemon.cli("check")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.startswith("NOTESD OK - "), r.stdout


def test_check_critical_when_not_running(make_daemon):
    d = make_daemon(start=False)
    r = d.cli("check")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout.startswith("NOTESD CRITICAL - "), r.stdout


def test_check_unknown_with_bad_config(tmp_path):
    r = Daemon(tmp_path, config=_config(tmp_path, "[other]\n")).cli("check")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout.startswith("NOTESD UNKNOWN - "), r.stdout


#: A monitoring plugin's first output line (monitoring-plugins guidelines, 2.3).
CHECK_LINE = re.compile(r"^NOTESD (OK|WARNING|CRITICAL|UNKNOWN) - (\S.*?)(?: \| (.*))?$")
#: One performance data item: 'label'=value[UOM];[warn];[crit];[min];[max]
PERFDATA = re.compile(r"'([^'=]+)'=(-?\d+(?:\.\d+)?)(us|ms|s|%|B|KB|MB|TB|c)?"
                      r"((?:;[-\d.:~@]*){0,4})")


def _check_output(r):
    """The state and the perfdata ({label: (value, uom, [warn, crit, min, max])})."""
    first = r.stdout.split("\n", 1)[0]
    m = CHECK_LINE.match(first)
    assert m, (r.returncode, r.stdout, r.stderr)
    perf = {}
    for item in (m.group(3) or "").split():
        p = PERFDATA.fullmatch(item)
        assert p, (item, first)
        thresholds = (p.group(4)[1:].split(";") if p.group(4) else []) + [""] * 4
        perf[p.group(1)] = (float(p.group(2)), p.group(3) or "", thresholds[:4])
    return m.group(1), perf


@pytest.mark.parametrize("options,state,code,warn,crit", [
    ((), "OK", 0, 500, 2000),
    (("--warn-lag", "0"), "WARNING", 1, 0, 2000),  # the lag is never below 0
    (("--crit-lag", "0"), "CRITICAL", 2, 500, 0),
    (("--warn-lag", "0", "--crit-lag", "0"), "CRITICAL", 2, 0, 0),
])
def test_check_states_and_perfdata(shared, options, state, code, warn, crit):
    r = shared.cli("check", *options)
    got, perf = _check_output(r)
    assert (got, r.returncode) == (state, code), (r.stdout, r.stderr)
    assert set(perf) == {"lag", "requests", "notes", "rss"}, r.stdout
    lag, uom, thresholds = perf["lag"]
    assert lag >= 0 and uom == "ms", r.stdout
    assert [float(t) for t in thresholds[:3]] == [warn, crit, 0], r.stdout
    assert perf["requests"][0] >= 0 and perf["requests"][1] == "c", r.stdout
    assert perf["rss"][0] > 0 and perf["rss"][1] == "B", r.stdout
    assert perf["notes"][0] >= 0, r.stdout


def test_check_not_running_and_bad_config_lines(make_daemon, tmp_path):
    r = make_daemon(start=False).cli("check")
    assert (_check_output(r)[0], r.returncode) == ("CRITICAL", 2), (r.stdout, r.stderr)
    r = Daemon(tmp_path, "--chroot", str(tmp_path / "missing")).cli("check")
    assert (_check_output(r)[0], r.returncode) == ("UNKNOWN", 3), (r.stdout, r.stderr)


README = os.path.join(os.path.dirname(NOTESD), "README.md")
EXAMPLE_CONFIG = os.path.join(os.path.dirname(NOTESD), "notesd.conf.example")


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def _readme_table(heading):
    """The first cell of each row of the first table under a '## heading', as
    lists of the `names` in it."""
    section = _readme().split("\n## " + heading + "\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no table under ## %s in README.md" % heading
    return [re.findall(r"`([^`]+)`", row.split("|")[1]) for row in rows]


def test_configtest_example_is_the_shipped_example(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NOTESD_CONFIG"}
    r = subprocess.run([sys.executable, NOTESD, "configtest", "--example"], capture_output=True,
                       text=True, timeout=CLI_TIMEOUT, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout, r.stderr)
    with open(EXAMPLE_CONFIG, encoding="utf-8") as f:
        shipped = f.read()
    assert r.stdout == shipped, "notesd.conf.example is stale: regenerate it with " \
                                "python3 notesd.py configtest --example"
    assert len(re.findall(r"^#(\w+) = ", shipped, re.M)) >= 10, shipped
    # a valid config file as it is, and with every default shown uncommented
    for name, text in [("as-is.conf", shipped),
                       ("defaults.conf", re.sub(r"^#(\w+ = \S.*)$", r"\1", shipped, flags=re.M))]:
        (tmp_path / name).write_text(text)
        r = Daemon(tmp_path, config=tmp_path / name).cli("configtest")
        assert r.returncode == 0, (name, r.stdout, r.stderr)


def test_readme_config_table_lists_every_key():
    with open(EXAMPLE_CONFIG, encoding="utf-8") as f:
        example_keys = set(re.findall(r"^#(\w+) = ", f.read(), re.M))
    documented = {name for names in _readme_table("Configuration") for name in names}
    assert example_keys - documented == set(), "keys missing from README.md's table"
    assert documented - example_keys == set(), "README.md documents keys notesd lacks"


def _readme_exit_codes():
    """README.md's command table: command -> its 'exit codes' cell ('as `start`'
    spelled out)."""
    section = _readme().split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    cells = {}
    for row in section.splitlines():
        if row.startswith("| `"):
            parts = [p.strip() for p in row.strip("|").split("|")]
            for name in re.findall(r"`([^`]+)`", parts[0]):
                cells[name] = parts[-1]
    for name, cell in cells.items():
        cells[name] = cell.replace("as `start`", cells.get("start", "?"))
    return cells


def test_every_readme_command_runs(tmp_path):
    """Each command of README.md's table, run for real in a lifecycle (first
    with no daemon, then with one), with the exit code the table documents
    for that case and the output it prints."""
    cells = _readme_exit_codes()
    d = Daemon(tmp_path / "cmds")

    def run_in_foreground():
        proc = subprocess.Popen(d.argv("run"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_until(lambda: os.path.exists(d.urlfile) and request(
                open(d.urlfile).read().strip(), "GET", "/health").status == 200, 10, d, "run")
        finally:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    start = START_LINE.pattern.strip("^$")
    # (command, exit code, its meaning in the README's cell, the whole stdout)
    steps = [
        ("status", 3, "not running", r"notesd is not running"),
        ("check", 2, "CRITICAL", r"NOTESD CRITICAL - [^\n]*"),
        ("reload", 7, "not running", r""),
        ("stop", 0, "stopped (also if it was not running)", r"notesd is not running"),
        ("backup", 1, "failed (no database", r""),
        ("configtest", 0, "valid", r"listen = 127\.0\.0\.1:0\n.*"),
        ("start", 0, "running", start),
        ("start", 0, "running (also if it already was)", r"notesd[^\n]* running, pid \d+[^\n]*"),
        ("status", 0, "running", STATUS_LINE.pattern.strip("^$")),
        ("check", 0, "OK", r"NOTESD OK - [^\n]*"),
        ("reload", 0, "applied", r"notesd reloaded, pid \d+"),
        ("backup", 0, "written", r"notesd backup /\S+/copy\.db: 0 notes"),
        ("restart", 0, "running", r"notesd stopped, pid \d+\n" + start),
        ("stop", 0, "stopped", r"notesd stopped, pid \d+"),
        ("run", 0, "after a clean stop", r""),
        ("--version", 0, "", r"notesd \d+(\.\d+)+"),
        ("-h", 0, "", r"usage: notesd\.py .*"),
    ]
    assert set(cells) == {step[0] for step in steps}, "README commands: %s" % sorted(cells)
    try:
        for command, code, meaning, stdout in steps:
            documented = r"(?:^|, )%d\b" % code + (" " + re.escape(meaning) if meaning else "")
            assert re.search(documented, cells[command]), (command, code, meaning, cells[command])
            argv = (command, str(tmp_path / "copy.db")) if command == "backup" else (command,)
            r = run_in_foreground() if command == "run" else d.cli(*argv)
            assert r.returncode == code, (command, r.returncode, r.stdout, r.stderr, d.log())
            assert re.fullmatch(stdout, r.stdout.rstrip("\n"), re.S), (command, r.stdout)
            if command in ("start", "restart"):
                d.after_start()
    finally:
        d.cleanup()


###############################################################################
# HTTP API ####################################################################
###############################################################################


def _ids(notes):
    return [n["id"] for n in notes]


def test_post_json_creates_note(shared):
    before = time.time()
    r = shared.post("hello, notes")
    assert r.status == 201, r
    note = r.json()
    assert isinstance(note["id"], int)
    assert note["text"] == "hello, notes"
    assert note["url"] == "%s%d/" % (shared.url, note["id"])
    assert r.header("Location") == note["url"]
    for key in ("created", "updated"):
        assert RFC3339_UTC.match(note[key]), note[key]
    assert note["created"][:4] == time.strftime("%Y", time.gmtime(before))


def test_post_unicode_round_trips(shared):
    text = "h\u00e9llo \u2713 \U0001f600 \"quoted\" \\ back"
    note = shared.note(text)
    assert shared.get("/%d/" % note["id"]).json()["text"] == text


def test_post_form_urlencoded(shared):
    r = shared.request("POST", "/", body=urllib.parse.urlencode({"text": "from a form & more"}),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 201, r
    assert r.json()["text"] == "from a form & more"


def _curl(*args):
    r = subprocess.run(["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}"] + list(args),
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.parametrize("flag", ["-d", "-F"])
def test_post_with_curl(shared, flag):
    text = unique("curl")
    code, body = _curl(flag, "text=" + text, shared.url)
    assert code == 201, body
    note = json.loads(body)
    assert note["text"] == text
    assert shared.get("/%d/" % note["id"]).json()["text"] == text


def test_list_oldest_first_and_filter(shared):
    marker = unique("list")
    made = [shared.note("%s %d" % (marker, i)) for i in range(3)]
    r = shared.get("/?q=" + urllib.parse.quote(marker))
    assert r.status == 200, r
    assert r.header("Content-Type").startswith("application/json")
    notes = r.json()
    assert _ids(notes) == _ids(made)
    assert [n["text"] for n in notes] == [n["text"] for n in made]
    everything = shared.get("/?limit=1000").json()
    ids = _ids(everything)
    assert ids == sorted(ids)
    assert set(_ids(made)) <= set(ids)


def test_list_pagination_with_link(shared):
    marker = unique("page")
    made = [shared.note("%s %d" % (marker, i)) for i in range(5)]
    path = "/?limit=2&q=" + urllib.parse.quote(marker)
    pages = []
    while path is not None:
        r = shared.get(path)
        assert r.status == 200, r
        pages.append(_ids(r.json()))
        link = r.header("Link")
        path = None
        if link:
            m = re.match(r'^<([^>]+)>;\s*rel="next"$', link)
            assert m, link
            path = urllib.parse.urljoin(shared.url, m.group(1))
        assert len(pages) <= 5, pages
    assert pages == [_ids(made[0:2]), _ids(made[2:4]), _ids(made[4:5])]


def test_list_after(shared):
    marker = unique("after")
    made = [shared.note("%s %d" % (marker, i)) for i in range(4)]
    r = shared.get("/?after=%d&q=%s" % (made[1]["id"], marker))
    assert r.status == 200, r
    assert _ids(r.json()) == _ids(made[2:])


def test_list_limit(shared):
    for _ in range(3):
        shared.note(unique("limit"))
    assert len(shared.get("/?limit=1").json()) == 1
    r = shared.get("/?limit=2")
    assert len(r.json()) == 2
    assert 'rel="next"' in r.header("Link", "")


def test_get_note_with_and_without_slash(shared):
    note = shared.note("fetch me")
    for path in ("/%d/" % note["id"], "/%d" % note["id"]):
        r = shared.get(path)
        assert r.status == 200, r
        assert r.json() == note
        assert r.header("ETag")


@pytest.mark.parametrize("path", ["/987654321/", "/987654321", "/99999999999999999999999/"])
def test_get_missing_note_is_404(shared, path):
    r = shared.get(path)
    assert r.status == 404, r
    assert r.header("Content-Type").startswith("application/json")
    assert isinstance(r.json()["message"], str)


def test_put_replaces_note(shared):
    note = shared.note("before")
    r = shared.request("PUT", "/%d/" % note["id"], {"text": "after"})
    assert r.status == 200, r
    new = r.json()
    assert new["id"] == note["id"] and new["text"] == "after"
    assert new["created"] == note["created"]
    assert new["updated"] >= note["updated"]
    assert shared.get("/%d/" % note["id"]).json()["text"] == "after"


def test_put_creates_note_at_id(shared):
    nid = 500000000 + int.from_bytes(os.urandom(3), "big")
    r = shared.request("PUT", "/%d/" % nid, {"text": "made by PUT"})
    assert r.status == 201, r
    assert r.json()["id"] == nid
    got = shared.get("/%d/" % nid)
    assert got.status == 200 and got.json()["text"] == "made by PUT"


def test_options_lists_allowed_methods(shared):
    for path, methods in (("/", {"GET", "HEAD", "POST"}), ("/1/", {"GET", "PUT", "DELETE"}),
                          ("/config", {"GET", "PATCH"}), ("/health", {"GET", "HEAD"})):
        r = shared.request("OPTIONS", path)
        assert r.status in (200, 204), (path, r)
        allow = {m.strip().upper() for m in r.header("Allow", "").split(",")}
        assert methods <= allow, (path, allow)


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_put_with_curl_form(shared):
    note = shared.note("curl put before")
    code, body = _curl("-X", "PUT", "-d", "text=curl put after", note["url"])
    assert code == 200, body
    assert shared.get(note["url"]).json()["text"] == "curl put after"


def test_delete_is_idempotent(shared):
    note = shared.note("delete me")
    path = "/%d/" % note["id"]
    r = shared.request("DELETE", path)
    assert r.status == 204 and r.body == b"", r
    assert shared.get(path).status == 404
    assert shared.request("DELETE", path).status == 204


def test_if_match(daemon):
    shared = daemon  # a fresh daemon: a failed precondition must not break others' writes
    note = shared.note("guarded")
    path = "/%d/" % note["id"]
    etag = shared.get(path).header("ETag")
    r = shared.request("PUT", path, {"text": "nope"}, headers={"If-Match": '"not-the-etag"'})
    assert r.status == 412, r
    assert r.header("Content-Type").startswith("application/json")
    assert shared.get(path).json()["text"] == "guarded"
    r = shared.request("PUT", path, {"text": "changed"}, headers={"If-Match": etag})
    assert r.status == 200, r
    new_etag = shared.get(path).header("ETag")
    assert new_etag != etag
    assert shared.request("DELETE", path, headers={"If-Match": etag}).status == 412
    assert shared.get(path).status == 200
    assert shared.request("DELETE", path, headers={"If-Match": new_etag}).status == 204
    assert shared.get(path).status == 404


def _raw_get(d, method, path, headers=""):
    data = ("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sConnection: close\r\n\r\n"
            % (method, path, headers)).encode()
    return raw_exchange(d.port, data, timeout=3)


def test_head_like_get_without_body(shared):
    note = shared.note("head")
    for path in ("/", "/%d/" % note["id"], "/%d" % note["id"], "/health", "/status",
                 "/config", "/openapi.json"):
        gs, gh, gbody = _raw_get(shared, "GET", path)
        hs, hh, hbody = _raw_get(shared, "HEAD", path)
        assert gs == hs == 200, (path, gs, hs)
        assert hbody == b"", (path, hbody[:200])
        assert hh.get("content-type") == gh.get("content-type"), path
        if path not in ("/health", "/status"):  # those change between two requests
            assert hh.get("content-length") == gh.get("content-length"), path
            assert hh.get("etag") == gh.get("etag"), path


def test_health(shared):
    r = shared.get("/health")
    assert r.status == 200, r
    assert r.json()["status"] == "ok"


def test_health_503_while_main_loop_is_stuck(daemon):
    wait_until(lambda: os.path.exists(daemon.database), 5, daemon, "the database file")
    blocker = sqlite3.connect(daemon.database, timeout=5, isolation_level=None)
    result = {}

    def post():
        try:
            result["reply"] = daemon.post("while stuck", timeout=60)
        except Exception as exc:  # reported by the assertion below
            result["reply"] = exc

    writer = threading.Thread(target=post)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        writer.start()
        r = wait_until(lambda: (lambda r: r if r.status == 503 else None)(
            daemon.get("/health", timeout=3)), 10, daemon, "/health to say 503")
        assert isinstance(r.json()["message"], str) and r.json()["message"]
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        if writer.ident is not None:
            writer.join(timeout=60)
    reply = result["reply"]
    assert isinstance(reply, Reply) and reply.status == 201, (reply, daemon.log()[-3000:])
    wait_until(lambda: daemon.get("/health", timeout=3).status == 200, 10, daemon, "health 200")


def test_status_document(shared):
    shared.get("/health")
    r = shared.get("/status")
    assert r.status == 200, r
    st = r.json()
    for key in ("pid", "version", "python", "started_at", "uptime", "listen", "pidfile",
                "database", "notes", "requests", "queue_depth", "loop_lag_ms", "threads",
                "rss_bytes"):
        assert key in st, key
    assert st["pid"] == shared.pid()
    assert st["pidfile"] == shared.pidfile
    assert platform.python_version() in st["python"]
    assert RFC3339_UTC.match(st["started_at"]), st["started_at"]
    assert isinstance(st["notes"], int) and st["notes"] >= 0
    assert st["requests"].get("2xx", 0) >= 1, st["requests"]
    assert isinstance(st["rss_bytes"], int) and st["rss_bytes"] > 0
    assert isinstance(st["threads"], int) and st["threads"] >= 2
    assert isinstance(st["queue_depth"], int)
    assert isinstance(st["loop_lag_ms"], (int, float))
    assert isinstance(st["uptime"], (int, float)) and st["uptime"] >= 0


def test_status_counts_notes(daemon):
    assert daemon.get("/status").json()["notes"] == 0
    daemon.note("one")
    daemon.note("two")
    assert daemon.get("/status").json()["notes"] == 2


def test_status_version_matches_cli(daemon):
    version = daemon.get("/status").json()["version"]
    assert version in daemon.cli("--version").stdout


def test_get_config(shared):
    r = shared.get("/config")
    assert r.status == 200, r
    cfg = r.json()
    assert cfg["listen"] == "127.0.0.1:0" or cfg["listen"].startswith("127.0.0.1:")
    assert cfg["pidfile"] == shared.pidfile
    assert cfg["max_body"] == 1048576
    for key in ("log_level", "access_log", "timeout", "state_dir", "database"):
        assert key in cfg, key


def test_patch_config_live_keys(daemon):
    r = daemon.request("PATCH", "/config", {"log_level": "warning", "max_body": 100})
    assert r.status == 200, r
    assert r.json()["log_level"] == "warning" and r.json()["max_body"] == 100
    cfg = daemon.get("/config").json()
    assert cfg["log_level"] == "warning" and cfg["max_body"] == 100
    assert daemon.post("x" * 300).status == 413  # the new max_body is really live
    assert daemon.post("short").status == 201


def test_patch_config_restart_only_keys_409(daemon):
    before = daemon.get("/config").json()
    r = daemon.request("PATCH", "/config", {"log_level": "debug", "listen": "127.0.0.1:1",
                                            "pidfile": "/tmp/elsewhere.pid"})
    assert r.status == 409, r
    assert "listen" in r.json()["message"] and "pidfile" in r.json()["message"]
    assert daemon.get("/config").json() == before


@pytest.mark.parametrize("patch", [{"colour": "blue"}, {"log_level": "loud"},
                                   {"max_body": "big"}, {"log_level": "debug", "timeout": -1},
                                   {"log_level": "debug", "colour": "blue"}, [1, 2]])
def test_patch_config_invalid_changes_nothing(daemon, patch):
    before = daemon.get("/config").json()
    r = daemon.request("PATCH", "/config", patch)
    assert r.status == 400, r
    assert isinstance(r.json()["message"], str)
    assert daemon.get("/config").json() == before


def test_patch_log_level_debug_is_live(daemon):
    assert daemon.request("PATCH", "/config", {"log_level": "warning"}).status == 200
    for _ in range(3):
        daemon.note("quiet")
    assert "DEBUG" not in daemon.log()
    r = daemon.request("PATCH", "/config", {"log_level": "debug"})
    assert r.status == 200, r
    for _ in range(3):  # ordinary traffic, and some refused requests
        daemon.note("loud")
    daemon.get("/nope")
    daemon.request("POST", "/", body=b"{bad", headers={"Content-Type": "application/json"})
    wait_until(lambda: "DEBUG" in daemon.log(), 5, daemon, "a DEBUG line in the log")


def test_openapi_document(shared):
    r = shared.get("/openapi.json")
    assert r.status == 200, r
    doc = r.json()
    assert str(doc["openapi"]).startswith("3.1"), doc.get("openapi")
    assert "title" in doc["info"] and "version" in doc["info"]
    paths = set(doc["paths"])
    expected = {"/", "/{id}/", "/{id}", "/health", "/status", "/config", "/openapi.json"}
    assert expected <= paths, expected - paths
    assert {"get", "post"} <= set(doc["paths"]["/"])
    assert {"get", "put", "delete"} <= set(doc["paths"]["/{id}/"])
    assert {"get", "patch"} <= set(doc["paths"]["/config"])
    # every field /status gives is declared (storage, search and commands were not)
    declared = set(doc["components"]["schemas"]["Status"]["properties"])
    assert set(shared.get("/status").json()) <= declared, set(shared.get("/status").json()) - declared


def test_html_pages(shared):
    note = shared.note("visible in html")
    for path in ("/", "/%d/" % note["id"], "/health", "/status", "/config"):
        r = shared.get(path, headers={"Accept": "text/html"})
        assert r.status == 200, (path, r)
        assert r.header("Content-Type").startswith("text/html"), (path, r.header("Content-Type"))
        assert b"<html" in r.body.lower(), path


def test_html_escapes_note_text(shared):
    evil = "<script>alert(1)</script> " + unique("xss")
    note = shared.note(evil)
    for path in ("/%d/" % note["id"], "/?q=" + urllib.parse.quote(evil[-20:])):
        body = shared.get(path, headers={"Accept": "text/html"}).body.decode()
        assert "&lt;script&gt;" in body, (path, body[:2000])
        assert "<script>alert(1)</script>" not in body, path


def _readme_curl_lines():
    """The curl lines of README.md's ```sh blocks, in order (continuations joined)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", _readme(), re.M | re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("curl "):
                lines.append(line.strip())
    return lines


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_readme_curl_examples_work(daemon):
    lines = _readme_curl_lines()
    assert len(lines) >= 5, lines
    base = daemon.url.rstrip("/")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    for line in lines:
        assert "http://127.0.0.1:5000/" in line, line
        command, _, comment = line.partition("  #")  # the README's comment ...
        expected = re.search(r"\b([1-5]\d\d)\b", comment)  # ... names the status
        assert expected, "README curl example without its status in the comment: " + line
        command = command.replace("http://127.0.0.1:5000", base).replace(
            "curl ", "curl --max-time 10 -o /dev/null -w '%{http_code}' ", 1)
        r = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                           timeout=CLI_TIMEOUT, env=env)
        assert r.returncode == 0, (line, r.returncode, r.stdout, r.stderr[-2000:])
        assert r.stdout.strip() == expected.group(1), (line, r.stdout)
    daemon.assert_serving()


###############################################################################
# Errors ######################################################################
###############################################################################


def assert_json_error(status, headers, body, expected):
    """An error reply: the expected status, a JSON object with a message."""
    assert status == expected, (status, headers, body[:500])
    assert headers.get("content-type", "").startswith("application/json"), headers
    message = json.loads(body.decode("utf-8"))["message"]
    assert isinstance(message, str) and message


def assert_error(reply, expected):
    assert_json_error(reply.status, {k.lower(): v for k, v in reply.headers.items()},
                      reply.body, expected)


@pytest.mark.parametrize("body", [b"{not json", b'{"text": "unterminated', b"[1, 2]", b"{}",
                                  b'{"text": 5}', b'{"text": null}', b'{"txt": "typo"}',
                                  b'{"text": "\xff\xfe bad utf-8"}', b"\xff\xfe"])
def test_bad_post_body_is_400(shared, body):
    r = shared.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    shared.assert_serving()


def test_bad_put_body_is_400(shared):
    note = shared.note("keep me")
    r = shared.request("PUT", "/%d/" % note["id"], body=b'{"text": 7}',
                       headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    assert shared.get("/%d/" % note["id"]).json()["text"] == "keep me"


def test_bad_form_utf8_is_400(shared):
    r = shared.request("POST", "/", body=b"text=%FF%FE",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(r, 400)
    shared.assert_serving()


@pytest.mark.parametrize("query", ["limit=abc", "limit=0", "limit=5000", "limit=-1",
                                   "after=abc"])
def test_bad_query_is_400(shared, query):
    assert_error(shared.get("/?" + query), 400)
    shared.assert_serving()


@pytest.mark.parametrize("path", ["/nope", "/nope/deeper", "/abc/", "/1/2/", "/-1/",
                                  "/99999999999999999999999"])
def test_unknown_path_is_404(shared, path):
    assert_error(shared.get(path), 404)
    shared.assert_serving()


@pytest.mark.parametrize("method,path", [("PATCH", "/"), ("POST", "/health"),
                                         ("POST", "/status"), ("DELETE", "/openapi.json"),
                                         ("POST", "/1/")])
def test_wrong_method_is_405_with_allow(shared, method, path):
    r = shared.request(method, path, body=b"{}", headers={"Content-Type": "application/json"})
    assert_error(r, 405)
    allow = {m.strip().upper() for m in r.header("Allow", "").split(",")}
    assert "GET" in allow and method not in allow, r.header("Allow")
    shared.assert_serving()


def test_post_without_content_length_is_411(shared):
    data = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\n\r\n")
    assert_json_error(*raw_exchange(shared.port, data), 411)
    shared.assert_serving()


def test_body_over_max_body_is_413_from_headers(shared):
    # announce 10 MB and send none of it: the refusal must come from the headers
    data = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\nConnection: close\r\n\r\n")
    assert_json_error(*raw_exchange(shared.port, data, timeout=5), 413)
    shared.assert_serving()


def test_unsupported_content_type_is_415(shared):
    r = shared.request("POST", "/", body=b"text=hi", headers={"Content-Type": "text/plain"})
    assert_error(r, 415)
    shared.assert_serving()


def test_garbage_request_line_is_400(shared):
    assert_json_error(*raw_exchange(shared.port, b"this is not http\r\n\r\n"), 400)
    shared.assert_serving()


def test_over_long_url_is_414(shared):
    data = b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_json_error(*raw_exchange(shared.port, data), 414)
    shared.assert_serving()


@pytest.mark.parametrize("headers", ["".join("X-H%d: v\r\n" % i for i in range(200)),
                                     "X-Long: " + "v" * (70 * 1024) + "\r\n"])
def test_too_many_or_long_headers_is_431(shared, headers):
    data = ("GET / HTTP/1.1\r\nHost: x\r\n%s\r\n" % headers).encode()
    assert_json_error(*raw_exchange(shared.port, data), 431)
    shared.assert_serving()


def test_stalled_body_gets_408(make_daemon):
    d = make_daemon("--timeout", "0.5")
    data = (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"text\": ")
    t0 = time.monotonic()
    assert_json_error(*raw_exchange(d.port, data, timeout=5), 408)
    assert time.monotonic() - t0 < 4
    d.assert_serving()


def test_stalled_connections_do_not_delay_others(shared):
    stalled = []
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", shared.port), timeout=5)
            stalled.append(s)
            s.sendall(b"GET /hea")
        t0 = time.monotonic()
        r = shared.get("/health", timeout=5)
        elapsed = time.monotonic() - t0
        assert r.status == 200, r
        assert elapsed < 1.5, "a new client waited %.2fs behind stalled connections" % elapsed
    finally:
        for s in stalled:
            s.close()
    shared.assert_serving()


def test_no_traceback_in_shared_log(shared):
    assert "Traceback" not in shared.log()


###############################################################################
# Request parsing #############################################################
###############################################################################
# notesd reads the request line and header section itself (RFC 9112 3, 5);
# these tests speak raw bytes on one connection and look at what comes back
# and whether the connection stays open.


def read_reply(f):
    """Read one response from a socket file: (status, headers by lower-case name, body)."""
    status_line = f.readline(65537)
    assert status_line.startswith(b"HTTP/1."), status_line
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = f.readline(65537)
        assert line, "connection closed inside the response head"
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("iso-8859-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", 0)))
    return status, headers, body


def closed_by_server(sock, timeout=5.0):
    """True if the server closes the connection (EOF) within timeout."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def exchange(port, data, timeout=5.0, closes=False):
    """Send data, read one response; return (status, headers, body, closed).

    With closes=True, closed says whether the server then closed the
    connection (waiting up to timeout for it); else it is None.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may answer and close before reading it all (431)
        with s.makefile("rb") as f:
            reply = read_reply(f)
        return reply + (closed_by_server(s, timeout) if closes else None,)


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n",  # obs-fold (RFC 9112 5.2)
    b"GET /health HTTP/1.1\r\nHost: x\r\n X-A: a\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n",         # whitespace in a name
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A : x\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n: no name\r\n",
    b"GET /health\r\n",                                            # two words
    b"GET /health HTTP/1.1 extra\r\nHost: x\r\n",                 # four words
    b"GET /health HTTX/1.1\r\nHost: x\r\n",
], ids=["obs-fold", "obs-fold-first", "space-in-name", "space-before-colon", "no-colon",
        "no-name", "two-words", "four-words", "not-http"])
def test_malformed_request_is_400_and_closes(shared, head):
    status, headers, body, closed = exchange(shared.port, head + b"\r\n", closes=True)
    assert_json_error(status, headers, body, 400)
    assert headers.get("connection", "").lower() == "close", headers
    assert closed, "the server kept the connection open after a 400"
    shared.assert_serving()


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0"])
def test_unsupported_http_version_is_505(shared, version):
    status, headers, body, closed = exchange(shared.port,
                                             b"GET /health " + version + b"\r\nHost: x\r\n\r\n",
                                             closes=True)
    assert_json_error(status, headers, body, 505)
    assert closed
    shared.assert_serving()


@pytest.mark.parametrize("fields,expected", [(100, 200), (101, 431)])
def test_header_field_count_limit(shared, fields, expected):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(fields - 1))
    status, headers, body, closed = exchange(shared.port, head + b"\r\n",
                                             closes=expected != 200)
    if expected == 200:
        assert status == 200, (status, body)
    else:
        assert_json_error(status, headers, body, 431)
        assert closed


def test_70000_byte_header_line_is_431(shared):
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * 70000 + b"\r\n\r\n"
    status, headers, body, closed = exchange(shared.port, data, closes=True)
    assert_json_error(status, headers, body, 431)
    assert closed
    shared.assert_serving()


def test_repeated_header_fields_are_joined(shared):
    # one field 'text/html, application/json' (RFC 9110 5.3): html ranks as
    # high as json, so a browser's page; either line alone decides nothing else
    data = (b"GET /status HTTP/1.1\r\nHost: localhost\r\nAccept: text/html\r\n"
            b"Accept: application/json\r\n\r\n")
    status, headers, body, _ = exchange(shared.port, data)
    assert status == 200, (status, body[:500])
    assert headers["content-type"].startswith("text/html"), headers
    data = b"GET /status HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    status, headers, body, _ = exchange(shared.port, data)
    assert headers["content-type"].startswith("application/json"), headers


def test_double_slash_path_is_normalized(shared):
    status, headers, body, _ = exchange(shared.port, b"GET //health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200, (status, body)
    assert json.loads(body)["status"] == "ok"


def test_http_1_0_closes_without_keep_alive(shared):
    status, headers, body, closed = exchange(shared.port, b"GET /health HTTP/1.0\r\n\r\n",
                                             closes=True)
    assert status == 200, (status, body)
    assert headers.get("connection", "").lower() == "close", headers
    assert closed, "an HTTP/1.0 connection without keep-alive stayed open"


def test_http_1_0_keep_alive_serves_a_second_request(shared):
    request = b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
        with s.makefile("rb") as f:
            s.sendall(request)
            status, headers, body = read_reply(f)
            assert status == 200, (status, body)
            assert "close" not in headers.get("connection", "").lower(), headers
            s.sendall(request)
            status, headers, body = read_reply(f)
            assert status == 200, (status, body)


def test_http_1_1_keeps_the_connection_open(shared):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
        with s.makefile("rb") as f:
            for _ in range(3):
                s.sendall(request)
                status, headers, body = read_reply(f)
                assert status == 200, (status, body)
                assert "connection" not in headers, headers
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_reply(f)[0] == 200
        assert closed_by_server(s)


def test_header_names_are_case_insensitive(shared):
    text = unique("case")
    body = json.dumps({"text": text}).encode()
    data = (b"POST / HTTP/1.1\r\nhOST: localhost\r\ncontent-TYPE: application/json\r\n"
            b"CONTENT-LENGTH: %d\r\n\r\n" % len(body)) + body
    status, headers, reply, _ = exchange(shared.port, data)
    assert status == 201, (status, reply)
    assert json.loads(reply)["text"] == text


###############################################################################
# Concurrency & durability ####################################################
###############################################################################


def test_unread_body_is_not_taken_for_a_request(shared):
    """A refused request's body must not run as the next request (smuggling)."""
    hidden = (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 20\r\n\r\n" + b'{"text": "smuggled"}')
    before = shared.get("/status").json()["notes"]
    for head in (b"POST /status HTTP/1.1\r\n", b"PUT /99999999999999999999/ HTTP/1.1\r\n",
                 b"GET /health HTTP/1.1\r\n"):
        request = head + b"Host: localhost\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden
        status, headers, body, closed = exchange(shared.port, request, closes=True)
        assert status in (200, 400, 405), (head, status, body)
        assert closed, "the connection stayed open after an unread body: %r" % head
    assert shared.get("/status").json()["notes"] == before
    r = shared.get("/?q=smuggled")
    assert r.json() == [], r


@pytest.mark.parametrize("cut", [b"", b"If-Match: \"stale", b"If-Match: \"stale\"\r\n"],
                         ids=["before-if-match", "mid-line", "before-empty-line"])
def test_header_section_cut_by_fin_is_never_executed(shared, cut):
    """A DELETE whose connection closes before its header section ends (here
    before or inside its If-Match) must not run as if it had no If-Match."""
    note = shared.note(unique("fin"))
    reply = half_closed_exchange(shared.port,
                                 b"DELETE /%d/ HTTP/1.1\r\nHost: x\r\n" % note["id"] + cut)
    assert not reply.startswith(b"HTTP/1.1 204"), reply
    assert shared.get("/%d/" % note["id"]).status == 200, "an incomplete DELETE ran"


HUGE = b"9" * 5000  # past CPython's int() digit limit (4300 since 3.11)


@pytest.mark.parametrize("request_bytes, expected", [
    (b"GET /" + HUGE + b"/ HTTP/1.1\r\nHost: localhost\r\n\r\n", 404),
    (b"DELETE /" + HUGE + b"/ HTTP/1.1\r\nHost: localhost\r\n\r\n", 204),
    (b"PUT /" + HUGE + b"/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"GET /?limit=" + HUGE + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    (b"GET /?after=" + HUGE + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: " + HUGE + b"\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: " + HUGE
     + b"\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: localhost\r\nOrigin: http://[\r\nContent-Length: 2\r\n\r\n{}", 403),
], ids=["get-id", "delete-id", "put-id", "limit", "after", "content-length", "expect", "origin"])
def test_huge_numbers_and_bad_origins_get_a_clear_error(shared, request_bytes, expected):
    """Every number a client sends goes through one parser: never a 500."""
    status, headers, body, _ = exchange(shared.port, request_bytes)
    if expected == 204:
        assert status == 204, (status, body)
    else:
        assert_json_error(status, headers, body, expected)
    assert "Traceback" not in shared.log()


def test_http_1_1_without_host_is_400(shared):
    status, headers, body, closed = exchange(shared.port, b"GET /health HTTP/1.1\r\n\r\n",
                                             closes=True)
    assert_json_error(status, headers, body, 400)
    assert b"Host" in body and closed


@pytest.mark.parametrize("request_bytes", [
    b"GET /?limit=%C2%B2 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: \xb2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: \xb2\r\n\r\n",
], ids=["limit", "content-length", "expect"])
def test_unicode_digits_are_not_numbers(shared, request_bytes):
    """str.isdigit() takes '\u00b2'; int() does not: a 400, never a 500."""
    status, headers, body, _ = exchange(shared.port, request_bytes)
    assert_json_error(status, headers, body, 400)
    shared.assert_serving()


def test_deeply_nested_json_is_400(shared):
    r = shared.request("POST", "/", b"[" * 200000, {"Content-Type": "application/json"})
    assert_error(r, 400)
    shared.assert_serving()


def test_put_note_zero_is_400(shared):
    assert_error(request(shared.url, "PUT", "/0/", {"text": "zero"}), 400)
    assert shared.get("/0/").status == 404


def test_cross_origin_write_is_refused(shared):
    """A web page's form POST carries Origin; only the daemon's own origin may write."""
    evil = request(shared.url, "POST", "/", "text=csrf",
                   {"Content-Type": "application/x-www-form-urlencoded",
                    "Origin": "http://evil.example"})
    assert_error(evil, 403)
    host = urllib.parse.urlsplit(shared.url).netloc
    own = request(shared.url, "POST", "/", "text=same-origin",
                  {"Content-Type": "application/x-www-form-urlencoded",
                   "Origin": "http://" + host})
    assert own.status == 201, own
    assert shared.get("/?q=csrf").json() == []


def test_concurrent_writers(daemon):
    threads, per_thread = 16, 25
    acked, errors, lock = {}, [], threading.Lock()

    def writer(k):
        for i in range(per_thread):
            text = "w%d-%d" % (k, i)
            try:
                r = daemon.post(text, timeout=30)
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                if r.status == 201:  # duplicate ids are collected, checked below
                    acked.setdefault(r.json()["id"], []).append(text)
                else:
                    errors.append(r)

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors[:5]
    dupes = {nid: texts for nid, texts in acked.items() if len(texts) > 1}
    assert not dupes, dupes
    assert len(acked) == threads * per_thread
    for nid, (text,) in acked.items():
        r = daemon.get("/%d/" % nid)
        assert r.status == 200 and r.json()["text"] == text, (nid, text, r)
    assert daemon.get("/status").json()["notes"] == threads * per_thread


def _write_until_stopped(d, stop, acked, lock, n_threads=8):
    """Start writer threads that POST until stop is set or the daemon goes away."""

    def writer(k):
        i = 0
        while not stop.is_set():
            text = "dur-%d-%d-%s" % (k, i, os.urandom(3).hex())
            i += 1
            try:
                r = d.post(text, timeout=10)
            except (OSError, http.client.HTTPException):
                return
            if r.status == 201:
                with lock:
                    acked[r.json()["id"]] = text

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    for w in workers:
        w.start()
    return workers


def _assert_all_present(d, acked):
    for nid, text in acked.items():
        r = d.get("/%d/" % nid)
        assert r.status == 200 and r.json()["text"] == text, (nid, text, r)


def test_kill_9_during_writes_loses_no_acknowledged_note(daemon):
    stop, acked, lock = threading.Event(), {}, threading.Lock()
    workers = _write_until_stopped(daemon, stop, acked, lock)
    try:
        wait_until(lambda: len(acked) >= 60, 20, daemon, "60 acknowledged notes")
        pid = daemon.pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5, daemon, "the killed daemon gone")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    daemon.start()
    assert len(acked) >= 60
    _assert_all_present(daemon, acked)


def test_graceful_stop_during_writes_loses_no_acknowledged_note(daemon):
    stop, acked, lock = threading.Event(), {}, threading.Lock()
    workers = _write_until_stopped(daemon, stop, acked, lock)
    try:
        wait_until(lambda: len(acked) >= 60, 20, daemon, "60 acknowledged notes")
        daemon.stop()
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    daemon.start()
    _assert_all_present(daemon, acked)


def _access_log_daemon(make_daemon, value):
    d = make_daemon("--access-log", value, "--log-level", "info")
    marker = unique("access")
    assert d.get("/?q=" + marker).status == 200
    assert d.get("/status").status == 200
    d.stop()  # flushes the log; afterwards it is final
    return d, marker


def test_access_log_yes(make_daemon):
    d, marker = _access_log_daemon(make_daemon, "yes")
    lines = [l for l in d.log().splitlines() if marker in l]
    assert lines and "GET" in lines[0], d.log()[-3000:]
    assert "200" in lines[0]


def test_access_log_no(make_daemon):
    d, marker = _access_log_daemon(make_daemon, "no")
    assert marker not in d.log()
    assert "GET /status" not in d.log()


def _post_lines(path):
    try:
        with open(path, errors="replace") as f:
            return sum('"POST / HTTP/1.1" 201' in line for line in f)
    except FileNotFoundError:
        return 0


def test_log_survives_logrotate_while_serving(make_daemon):
    """logrotate's create mode: the file is renamed away under a daemon that is
    writing to it, then postrotate sends SIGUSR1 (as the README's example does
    with pkill -USR1 -F). No access line may be lost or land in a dead file."""
    d = make_daemon("--access-log", "yes", "--log-level", "info")
    pid, rotated = d.pid(), d.logfile + ".1"
    total, created, failures = 300, [], []

    def client():
        for i in range(total):
            try:
                r = d.post("rotate %d" % i, timeout=10)
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                continue
            (created if r.status == 201 else failures).append(r)

    worker = threading.Thread(target=client)
    worker.start()
    try:
        wait_until(lambda: len(created) >= 50, 20, d, "50 notes before the rotation")
        os.rename(d.logfile, rotated)
        wait_until(lambda: len(created) >= 150, 20, d, "150 notes before SIGUSR1")
        r = subprocess.run(["pkill", "-USR1", "-F", d.pidfile], capture_output=True,
                           text=True, timeout=CLI_TIMEOUT)
        assert r.returncode == 0, (r.stdout, r.stderr)
        wait_until(lambda: "log files reopened" in d.log(), 10, d, "the reopen logged")
    finally:
        worker.join(timeout=120)
    assert not worker.is_alive()
    assert not failures, failures[:5]
    assert len(created) == total
    # the daemon holds no descriptor of the rotated file any more
    fds = os.listdir("/proc/%d/fd" % pid)
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    assert rotated not in targets and d.logfile in targets, targets
    d.stop()  # every line written and the files closed
    old, new = _post_lines(rotated), _post_lines(d.logfile)
    assert old >= 1 and new >= 1, (old, new)
    assert old + new == len(created), (old, new, len(created))
    assert "Traceback" not in d.log()


###############################################################################
# Security ####################################################################
###############################################################################


def test_token_required(make_daemon):
    token = "s3cret-" + os.urandom(4).hex()
    d = make_daemon("--token", token, "--log-level", "debug", "--access-log", "yes")
    for path in ("/", "/status", "/config", "/openapi.json", "/1/"):
        r = d.get(path)
        assert_error(r, 401)
        assert r.header("WWW-Authenticate"), r
        assert d.get(path, headers={"Authorization": "Bearer wrong"}).status == 401
    r = d.post("no auth")
    assert r.status == 401, r
    assert d.get("/health").status == 200
    auth = {"Authorization": "Bearer " + token}
    r = d.request("POST", "/", {"text": "with auth"}, headers=auth)
    assert r.status == 201, r
    cfg = d.get("/config", headers=auth)
    assert cfg.status == 200 and cfg.json()["token"] == "***"
    assert token not in d.get("/status", headers=auth).body.decode()
    assert token not in cfg.body.decode()
    # the CLI still manages a token-protected daemon
    assert d.cli("status").returncode == 0
    assert d.cli("check").returncode == 0
    r = d.cli("configtest")
    assert r.returncode == 0 and "***" in r.stdout and token not in r.stdout + r.stderr
    d.stop()
    assert token not in d.log()


def test_token_set_live_by_patch(daemon):
    r = daemon.request("PATCH", "/config", {"token": "live-token"})
    assert r.status == 200, r
    assert r.json()["token"] == "***"
    assert daemon.get("/").status == 401
    assert daemon.get("/", headers={"Authorization": "Bearer live-token"}).status == 200
    assert daemon.get("/health").status == 200


NETNS_SCRIPT = r'''
import http.client, json, subprocess, sys, urllib.parse
argv, urlfile, token = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
# a dummy interface carries the non-loopback address; where the kernel has no
# dummy driver (some containers), lo carries it: the source is non-loopback either way
if subprocess.run(["ip", "link", "add", "d0", "type", "dummy"], timeout=10).returncode == 0:
    subprocess.run(["ip", "addr", "add", "10.253.0.1/32", "dev", "d0"], check=True, timeout=10)
    subprocess.run(["ip", "link", "set", "d0", "up"], check=True, timeout=10)
else:
    subprocess.run(["ip", "addr", "add", "10.253.0.1/32", "dev", "lo"], check=True, timeout=10)
out = {}
r = subprocess.run(argv + ["start"], capture_output=True, text=True, timeout=30)
out["start"] = [r.returncode, r.stdout, r.stderr]
if r.returncode == 0:
    port = urllib.parse.urlsplit(open(urlfile).read().strip()).port
    for host in ("10.253.0.1", "127.0.0.1"):
        for auth in (None, token):
            conn = http.client.HTTPConnection(host, port, timeout=5)
            headers = {"Authorization": "Bearer " + auth} if auth else {}
            try:
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                out["%s %s" % (host, bool(auth))] = [resp.status, resp.read().decode(errors="replace")]
            except Exception as exc:
                out["%s %s" % (host, bool(auth))] = [None, repr(exc)]
            finally:
                conn.close()
    r = subprocess.run(argv + ["stop"], capture_output=True, text=True, timeout=30)
    out["stop"] = [r.returncode, r.stdout, r.stderr]
print(json.dumps(out))
'''


def _in_netns(make_daemon, tmp_path, *extra, token=""):
    """Run a 0.0.0.0 daemon and clients inside a fresh network namespace; return results."""
    if not IS_ROOT or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("needs root, ip and unshare")
    d = make_daemon("--listen", "0.0.0.0:0", *extra, start=False)
    script = tmp_path / "netns.py"
    script.write_text(NETNS_SCRIPT)
    r = subprocess.run(["unshare", "--net", sys.executable, str(script),
                        json.dumps([d.argv(), d.urlfile, token])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert out["start"][0] == 0, (out, d.log())
    assert out["stop"][0] == 0, out
    return out


def test_protected_mode_refuses_remote_clients_without_token(make_daemon, tmp_path):
    out = _in_netns(make_daemon, tmp_path)
    status, body = out["10.253.0.1 False"]
    assert status == 403, out
    assert "token" in json.loads(body)["message"].lower()
    assert out["127.0.0.1 False"][0] == 200, out


def test_remote_clients_with_token(make_daemon, tmp_path):
    out = _in_netns(make_daemon, tmp_path, "--token", "netns-token", token="netns-token")
    assert out["10.253.0.1 False"][0] == 401, out
    assert out["10.253.0.1 True"][0] == 200, out
    assert out["127.0.0.1 True"][0] == 200, out


###############################################################################
# Operators and hostile local users ###########################################
###############################################################################
# A local user who does not wish us well, and the paths operators really walk.


def _ofd_lock(path):
    """Lock `path` as any user could: an open file description lock, which
    F_GETLK reports as pid -1. Returns the fd; closing it drops the lock."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))
    return fd


def _in_pid_namespace(argv):
    """Run argv in a new pid namespace beside a sleeping victim process; the
    output, and whether the victim survived. kill(-1) in there can only
    reach the namespace, so a CLI that signals everyone is caught safely."""
    script = ('sleep 60 & victim=$!; "$@"; echo "rc=$?"; '
              'if kill -0 $victim 2>/dev/null; then echo victim=alive; kill $victim; '
              'else echo victim=dead; fi')
    r = subprocess.run(["unshare", "--pid", "--fork", "sh", "-c", script, "sh", *argv],
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    return r.stdout + r.stderr


needs_unshare = pytest.mark.skipif(not IS_ROOT or not shutil.which("unshare"),
                                   reason="needs root and unshare")


@needs_unshare
def test_ofd_lock_on_stale_pid_file_signals_nobody(make_daemon):
    d = make_daemon()
    os.kill(d.pid(), signal.SIGKILL)
    # what any user may do to a 0644 file, once the dead daemon's lock is gone
    fd = wait_until(lambda: _ofd_lock(d.pidfile), 5, d, "the dead daemon's lock to go")
    try:  # a read lock, as any reader may take: never a daemon's
        r = d.cli("status")
        assert r.returncode == 1 and "not running" in r.stdout, (r.stdout, r.stderr)
        assert "pid -1" not in r.stdout, r.stdout
        r = d.cli("check")
        assert r.returncode == 2 and "not running" in r.stdout, r.stdout
        for command in (["reload"], ["stop", "--force", "--timeout", "1"], ["stop"]):
            out = _in_pid_namespace(d.argv(*command))
            assert "victim=alive" in out, (command, out)
            assert "pid -1" not in out, (command, out)
    finally:
        os.close(fd)


def _hold_lock(path):
    """An unrelated process that takes a POSIX lock on `path` and keeps it."""
    code = ("import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, path, "\x1b[2J"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_pid_file_locked_by_unrelated_process(make_daemon):
    d = make_daemon(start=False)
    with open(d.pidfile, "w") as f:
        f.write("%d\n" % 999999)  # a stale pid: the holder did not write it
    holder = _hold_lock(d.pidfile)
    try:
        r = d.cli("start")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert str(holder.pid) in r.stderr, r.stderr
        assert "\x1b" not in r.stderr, "the holder's command line reached the terminal raw"
        assert d.cli("status").returncode == 4
        r = d.cli("stop", "--force", "--timeout", "1")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert holder.poll() is None, "stop signalled a process that is not notesd"
        r = d.cli("check")
        assert r.returncode == 3, r.stdout
    finally:
        holder.kill()
        holder.wait(timeout=CLI_TIMEOUT)


def test_fifo_at_pid_file_path(make_daemon):
    d = make_daemon(start=False)
    os.mkfifo(d.pidfile)
    try:
        for command, code in (("status", 4), ("check", 3), ("stop", 1), ("start", 1)):
            r = d.cli(command, timeout=10)  # the old CLI blocked for ever in open()
            assert r.returncode == code, (command, r.stdout, r.stderr)
            assert d.pidfile in r.stdout + r.stderr, (command, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr
        assert stat.S_ISFIFO(os.lstat(d.pidfile).st_mode)
    finally:
        os.unlink(d.pidfile)  # the fixture's cleanup reads the pid file


needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def _victim(directory):
    """A root-only file that an attacker would like root to chown or write."""
    path = os.path.join(directory, "victim")
    with open(path, "w") as f:
        f.write("root's secret\n")
    os.chmod(path, 0o600)
    return path


def _untouched(path):
    st = os.stat(path)
    with open(path) as f:
        return (st.st_uid, stat.S_IMODE(st.st_mode), f.read()) == (0, 0o600, "root's secret\n")


def _plant_symlink(target, path):
    """What the user nobody can do in a directory he may write."""
    nobody = pwd.getpwnam("nobody")
    os.symlink(target, path)
    os.lchown(path, nobody.pw_uid, nobody.pw_gid)


def _assert_start_refused(d, path, victim=None):
    """start exits 1 with a message naming `path`, and `victim` is as it was."""
    r = d.cli("start")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert path in r.stderr, r.stderr
    assert victim is None or _untouched(victim)
    return r


def _directory(parent, name, mode):
    path = os.path.join(parent, name)
    os.mkdir(path)
    os.chmod(path, mode)
    return path


@needs_root
@pytest.mark.parametrize("name", ["notesd.log", "notes.db", "notes.db-wal", "notes.db-shm"])
def test_symlink_planted_in_users_state_dir_is_refused(make_daemon, open_tmp, name):
    """The daemon's user owns state_dir; what he plants there must not make
    root chown or write a file of root's at the next start."""
    state = os.path.join(open_tmp, "state")
    d = make_daemon("--user", "nobody", "--state-dir", state,
                    "--log", os.path.join(state, "notesd.log"), directory=open_tmp)
    d.post("before")
    d.stop()
    victim = _victim(open_tmp)
    planted = os.path.join(state, name)
    if os.path.exists(planted):
        os.unlink(planted)
    _plant_symlink(victim, planted)
    _assert_start_refused(d, planted, victim)


@needs_root
def test_pid_file_in_a_directory_others_can_write(make_daemon, open_tmp):
    shared = _directory(open_tmp, "shared", 0o777)
    d = make_daemon("--pidfile", os.path.join(shared, "notesd.pid"), start=False)
    r = _assert_start_refused(d, shared)
    assert "others" in r.stderr, r.stderr


@needs_root
@pytest.mark.parametrize("name", ["notesd.pid", "notesd.url"])
def test_symlink_at_pid_or_url_file_in_sticky_directory(make_daemon, open_tmp, name):
    """/tmp-like: sticky and world-writable. A user plants a symlink where the
    pid or URL file goes; root must not truncate and rewrite its target."""
    sticky = _directory(open_tmp, "sticky", 0o1777)
    victim = _victim(open_tmp)
    _plant_symlink(victim, os.path.join(sticky, name))
    d = make_daemon("--pidfile", os.path.join(sticky, "notesd.pid"), start=False)
    _assert_start_refused(d, os.path.join(sticky, name), victim)


@needs_root
def test_pid_file_in_sticky_directory_is_fine_when_ours(make_daemon, open_tmp):
    sticky = _directory(open_tmp, "sticky", 0o1777)
    d = make_daemon("--pidfile", os.path.join(sticky, "notesd.pid"), start=False)
    d.urlfile = os.path.join(sticky, "notesd.url")
    d.start()
    assert d.cli("status").returncode == 0
    d.stop()


@needs_root
def test_state_dir_of_another_user_is_not_handed_over(make_daemon, open_tmp):
    state = _directory(open_tmp, "alices", 0o700)
    os.chown(state, 12345, 12345)
    d = make_daemon("--user", "nobody", "--state-dir", state, start=False)
    _assert_start_refused(d, state)
    assert os.stat(state).st_uid == 12345


@needs_root
def test_state_dir_owned_by_root_is_handed_to_the_user(make_daemon, open_tmp):
    nobody = pwd.getpwnam("nobody")
    state = os.path.join(open_tmp, "state")
    os.mkdir(state, 0o700)
    d = make_daemon("--user", "nobody", "--state-dir", state,
                    "--log", os.path.join(state, "notesd.log"), directory=open_tmp)
    for name in ("", "notes.db", "notes.db-wal", "notesd.log"):
        assert os.stat(os.path.join(state, name)).st_uid == nobody.pw_uid, name
    assert d.post("as nobody").status == 201
    d.stop()


#: A python3 that another user may run (pyenv's live under root's 0700 home).
SYSTEM_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                      if os.access(p, os.X_OK)), None)
needs_other_user = pytest.mark.skipif(not IS_ROOT or SYSTEM_PYTHON is None,
                                      reason="needs root and a system python3")


def _as_nobody(open_tmp, *args, env=None):
    """Run a copy of notesd.py as nobody, with the system python3."""
    copy = os.path.join(open_tmp, "notesd.py")
    if not os.path.exists(copy):
        shutil.copy(NOTESD, copy)
        os.chmod(copy, 0o644)
    nobody = pwd.getpwnam("nobody")
    return subprocess.run([SYSTEM_PYTHON, copy, *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, cwd="/", user=nobody.pw_uid,
                          group=nobody.pw_gid, extra_groups=[],
                          env=env or {"PATH": "/usr/bin:/bin", "HOME": "/"})


@needs_other_user
def test_cli_as_a_user_who_cannot_read_the_pid_file(make_daemon, open_tmp):
    d = make_daemon()  # in pytest's 0700 tree: nobody cannot even look
    for command, code in (("check", 3), ("status", 4), ("stop", 4), ("reload", 4)):
        r = _as_nobody(open_tmp, *d.args, command)
        assert r.returncode == code, (command, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert d.get("/health").status == 200


@needs_other_user
def test_default_paths_follow_the_passwd_entry_not_home(open_tmp):
    r = _as_nobody(open_tmp, "configtest", env={"PATH": "/usr/bin:/bin", "HOME": "/"})
    assert r.returncode == 0, r.stderr
    home = pwd.getpwnam("nobody").pw_dir
    assert "state_dir = %s/.local/state/notesd\n" % home in r.stdout, r.stdout


def test_restart_stops_once_and_the_daemon_says_start(make_daemon):
    d = make_daemon()
    old = d.pid()
    script_dir, script = os.path.split(NOTESD)
    r = subprocess.run([sys.executable, script, *d.args, "restart"], cwd=script_dir,
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.count("notesd stopped, pid %d" % old) == 1, r.stdout
    assert "not running" not in r.stdout, r.stdout
    assert START_LINE.search(r.stdout), r.stdout
    d.after_start()
    new = d.pid()
    assert new != old and not alive(old)
    with open("/proc/%d/cmdline" % new, "rb") as f:
        argv = f.read().split(b"\0")[:-1]
    assert argv[-1] == b"start", argv
    assert NOTESD.encode() in argv and b"restart" not in argv, argv


def test_typo_in_a_live_key_does_not_block_control(make_daemon, tmp_path):
    conf = _config(tmp_path, "log_level = info\n")
    d = make_daemon(config=conf)
    pid = d.pid()
    conf.write_text("[notesd]\nlog_level = loud\n")
    for command, code in (("status", 0), ("check", 0), ("reload", 6), ("configtest", 6),
                          ("restart", 6)):
        r = d.cli(command)
        assert r.returncode == code, (command, r.stdout, r.stderr)
        assert "log_level" in r.stderr, (command, r.stderr)
    assert d.pid() == pid and alive(pid), "restart with a bad file must not stop notesd"
    r = d.cli("stop")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "log_level" in r.stderr
    assert not alive(pid)


def test_invalid_path_key_makes_status_unknown(make_daemon, tmp_path):
    d = make_daemon("--chroot", str(tmp_path / "no-such-dir"), start=False)
    for command, code in (("status", 4), ("stop", 1), ("check", 3)):
        r = d.cli(command)
        assert r.returncode == code, (command, r.stdout, r.stderr)
        assert "chroot" in r.stdout + r.stderr, (command, r.stdout, r.stderr)


def test_run_applies_the_umask(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    d = Daemon(tmp_path / "fg", "--database", str(other / "notes.db"))
    proc = subprocess.Popen(d.argv("run"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.umask(0o022))
    try:
        wait_until(lambda: os.path.exists(d.urlfile) and (other / "notes.db").exists(),
                   10, d, "run to open its database")
        mode = stat.S_IMODE(os.stat(other / "notes.db").st_mode)
        assert mode & 0o027 == 0, oct(mode)  # the default umask, 027
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=CLI_TIMEOUT)


@needs_root
def test_reload_with_user_and_a_root_only_config_file(make_daemon, open_tmp):
    nobody = pwd.getpwnam("nobody")
    conf = os.path.join(open_tmp, "notesd.conf")
    with open(conf, "w") as f:
        f.write("[notesd]\ntoken = first\n")
    os.chmod(conf, 0o600)
    state = os.path.join(open_tmp, "state")
    d = make_daemon("--user", "nobody", "--state-dir", state, "--timeout", "3",
                    config=conf, directory=open_tmp, start=False)
    r = d.start()
    assert "cannot read" in r.stderr, r.stderr  # start warns
    r = d.cli("configtest")
    assert r.returncode == 0 and "cannot read" in r.stderr, r.stderr
    with open(conf, "w") as f:
        f.write("[notesd]\ntoken = second\n")
    r = d.cli("reload")
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "cannot read" in r.stderr, r.stderr
    assert d.get("/status", headers={"Authorization": "Bearer first"}).status == 200
    os.chown(conf, 0, nobody.pw_gid)
    os.chmod(conf, 0o640)
    r = d.cli("reload")
    assert r.returncode == 0, (r.stdout, r.stderr, d.log())
    assert d.get("/status", headers={"Authorization": "Bearer second"}).status == 200


def test_small_cli_texts(make_daemon):
    d = make_daemon()
    r = d.cli("-h")
    text = " ".join(r.stdout.split())
    assert "4 status unknown" in text, text
    assert "stop, reload and check wait" in text, text
    group = text.split("configuration keys", 1)[1].split("--group VALUE", 1)[1]
    group = group.split("--chroot", 1)[0]
    assert group.count("default") == 1, group
    r = d.cli("run")
    assert r.returncode == 1
    assert r.stderr.startswith("notesd: already running, pid %d" % d.pid()), r.stderr


###############################################################################
# Operators and hostile local users: what the second look found #############
###############################################################################


@needs_root
def test_state_dir_symlink_is_never_followed(make_daemon, open_tmp):
    """The user owns state_dir's parent (his home, say) and makes state_dir a
    symbolic link to a directory of root's: root must not chown that."""
    nobody = pwd.getpwnam("nobody")
    home = _directory(open_tmp, "home", 0o755)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    roots = _directory(open_tmp, "roots", 0o755)
    state = os.path.join(home, "state")
    _plant_symlink(roots, state)
    d = make_daemon("--user", "nobody", "--state-dir", state, start=False)
    _assert_start_refused(d, state)
    assert os.stat(roots).st_uid == 0


@needs_root
def test_root_owned_state_dir_with_other_files_is_not_handed_over(make_daemon, open_tmp):
    """state_dir = /var/lib, a typo: root must not give it to the user."""
    lib = _directory(open_tmp, "lib", 0o755)
    victim = _victim(lib)
    d = make_daemon("--user", "nobody", "--state-dir", lib, start=False)
    r = _assert_start_refused(d, lib, victim)
    assert "victim" in r.stderr, r.stderr
    assert os.stat(lib).st_uid == 0


@needs_root
def test_group_alone_trusts_no_group_with_the_database(make_daemon, open_tmp):
    """With `group` and no `user` the daemon stays root: a database directory
    that its group may write could be swapped by any member of that group."""
    nogroup = grp.getgrgid(pwd.getpwnam("nobody").pw_gid)
    shared = _directory(open_tmp, "grp", 0o770)
    os.chown(shared, 0, nogroup.gr_gid)
    d = make_daemon("--group", nogroup.gr_name, "--database",
                    os.path.join(shared, "notes.db"), start=False)
    _assert_start_refused(d, shared)


def _impostor(open_tmp, sticky, lock="LOCK_EX"):
    """What nobody can do in a sticky, world-writable directory before notesd
    ever ran: a pid file holding his own pid, locked, and a URL file pointing
    at a port that he listens on. Returns (process, listening socket)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    url = os.path.join(sticky, "notesd.url")
    with open(url, "w") as f:
        f.write("http://127.0.0.1:%d/\n" % listener.getsockname()[1])
    nobody = pwd.getpwnam("nobody")
    os.chown(url, nobody.pw_uid, nobody.pw_gid)
    code = ("import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT, 0o644); "
            "os.write(fd, b'%d\\n' % os.getpid()); fcntl.lockf(fd, fcntl." + lock + "); "
            "print('locked', flush=True); sys.stdin.read()")
    p = subprocess.Popen([SYSTEM_PYTHON, "-c", code, os.path.join(sticky, "notesd.pid")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/")
    assert p.stdout.readline().strip() == "locked"
    return p, listener


@needs_other_user
def test_pid_and_url_files_planted_in_a_sticky_directory(make_daemon, open_tmp):
    sticky = _directory(open_tmp, "sticky", 0o1777)
    d = make_daemon("--pidfile", os.path.join(sticky, "notesd.pid"), "--token", "s3cret",
                    start=False)
    impostor, listener = _impostor(open_tmp, sticky)
    try:
        for command, code in (("start", 1), ("status", 4), ("check", 3), ("stop", 1)):
            r = d.cli(command)
            assert r.returncode == code, (command, r.stdout, r.stderr)
            assert "not" in r.stdout + r.stderr, (command, r.stdout, r.stderr)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody sent the token to the impostor's port
        assert impostor.poll() is None
    finally:
        impostor.kill()
        impostor.wait(timeout=CLI_TIMEOUT)
        listener.close()


def test_read_lock_by_a_reused_pid_is_not_notesd(make_daemon):
    """After a crash the pid file stays, 0644: anyone may read-lock it, and
    once pid reuse gives him the pid it names, he has the file open too.
    A read lock is never a daemon's: nobody is signalled, and it neither
    blocks `start` nor `stop` (a denial of service otherwise)."""
    d = make_daemon()
    os.kill(d.pid(), signal.SIGKILL)
    wait_until(lambda: not alive(d.pid()), 5, d, "the daemon to die")
    code = ("import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.lockf(fd, fcntl.LOCK_SH); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, d.pidfile], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(d.pidfile, "w") as f:  # what pid reuse amounts to
            f.write("%d\n" % holder.pid)
        r = d.cli("status")
        assert r.returncode == 1 and "not running" in r.stdout, (r.stdout, r.stderr)
        assert d.cli("check").returncode == 2
        r = d.cli("stop", "--force", "--timeout", "1")
        assert r.returncode == 0 and "not running" in r.stdout, (r.stdout, r.stderr)
        assert holder.poll() is None, "stop signalled a process that is not notesd"
        with open(d.pidfile, "w") as f:
            f.write("%d\n" % holder.pid)
        d.start()  # the read lock stays on the old file
        assert d.pid() != holder.pid and d.get("/health").status == 200
    finally:
        holder.kill()
        holder.wait(timeout=CLI_TIMEOUT)


@needs_root
def test_stop_of_a_user_daemon_removes_its_files(make_daemon, open_tmp):
    """The daemon as nobody cannot remove root's pid file; stop must, and it
    must not call the daemon stopped before the lock is released."""
    state = os.path.join(open_tmp, "state")
    d = make_daemon("--user", "nobody", "--state-dir", state, directory=open_tmp,
                    start=False)
    for _ in range(3):
        d.start()
        d.stop()
        assert not os.path.exists(d.pidfile) and not os.path.exists(d.urlfile)


def test_run_says_why_it_cannot_start(tmp_path):
    (tmp_path / "x").write_text("a file, not a directory")
    d = Daemon(tmp_path / "fg", "--pidfile", str(tmp_path / "x" / "notesd.pid"))
    r = d.cli("run", timeout=CLI_TIMEOUT)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "notesd.pid" in r.stderr, r.stderr


def test_url_file_that_is_no_url_is_ignored(make_daemon):
    d = make_daemon()
    with open(d.urlfile, "w") as f:
        f.write("x\x1b[2J\n")
    for command, code in (("status", 0), ("check", 2)):  # check: listen's port is 0
        r = d.cli(command)
        assert r.returncode == code, (command, r.stdout, r.stderr)
        assert "\x1b" not in r.stdout + r.stderr and "Traceback" not in r.stderr



def test_token_given_to_start_never_shows_in_ps(make_daemon):
    d = make_daemon("--token", "argv-secret")
    with open("/proc/%d/cmdline" % d.pid(), "rb") as f:
        assert b"argv-secret" not in f.read()
    with open("/proc/%d/environ" % d.pid(), "rb") as f:
        assert b"argv-secret" in f.read()  # root-only (0400), unlike cmdline
    assert d.get("/status", headers={"Authorization": "Bearer argv-secret"}).status == 200
    assert d.cli("check").returncode == 0


def test_check_with_a_wrong_token_is_unknown(make_daemon):
    d = make_daemon("--token", "right")
    r = subprocess.run([sys.executable, NOTESD, *d.args, "--token", "wrong", "check"],
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 3 and r.stdout.startswith("NOTESD UNKNOWN"), r.stdout
    assert "401" in r.stdout, r.stdout



@needs_root
@pytest.mark.parametrize("user", [None, "nobody"])
def test_state_dir_below_a_directory_a_user_may_write_is_refused(make_daemon, open_tmp, user):
    """Whoever may write a directory above state_dir may swap state_dir for a
    link to a root-only directory between root's checks and its opens by
    path (with `user` too: the user may not own state_dir's parent)."""
    home = _directory(open_tmp, "home", 0o755)
    os.chown(home, pwd.getpwnam("nobody").pw_uid, -1)
    roots = _directory(open_tmp, "roots", 0o700)
    state = _directory(home, "state", 0o700)
    extra = ("--user", user) if user else ()
    d = make_daemon(*extra, "--state-dir", state, "--database", os.path.join(state, "notes.db"),
                    "--log", os.path.join(state, "notesd.log"), start=False)
    _assert_start_refused(d, home)
    assert os.listdir(state) == [] and os.listdir(roots) == []


@needs_root
def test_log_file_planted_in_a_shared_directory_is_refused(make_daemon, open_tmp):
    sticky = _directory(open_tmp, "sticky", 0o1777)
    planted = os.path.join(sticky, "notesd.log")
    nobody = pwd.getpwnam("nobody")
    with open(planted, "w") as f:
        f.write("nobody's\n")
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    os.chmod(planted, 0o666)
    d = make_daemon("--log", planted, start=False)
    _assert_start_refused(d, planted)
    with open(planted) as f:
        assert f.read() == "nobody's\n"
    assert os.stat(planted).st_uid == nobody.pw_uid


@needs_other_user
def test_uid_without_passwd_entry_gets_a_clear_answer(open_tmp):
    copy = os.path.join(open_tmp, "notesd.py")
    shutil.copy(NOTESD, copy)
    os.chmod(copy, 0o644)
    for command, code in (("status", 4), ("check", 3)):
        r = subprocess.run([SYSTEM_PYTHON, copy, command], capture_output=True, text=True,
                           timeout=CLI_TIMEOUT, cwd="/", user=54321, group=54321,
                           extra_groups=[], env={"PATH": "/usr/bin:/bin", "HOME": "/"})
        assert r.returncode == code, (command, r.stdout, r.stderr)
        assert "54321" in r.stdout + r.stderr and "Traceback" not in r.stderr, r.stderr


@needs_root
def test_state_dir_whose_parents_do_not_exist_yet(make_daemon, open_tmp):
    """Like the default ~/.local/state/notesd of a user with no ~/.local."""
    state = os.path.join(open_tmp, "srv", "notesd", "data")
    d = make_daemon("--user", "nobody", "--state-dir", state, directory=open_tmp, start=False)
    d.start()
    assert os.stat(state).st_uid == pwd.getpwnam("nobody").pw_uid
    d.stop()


@needs_root
def test_log_in_a_root_directory_its_group_may_write(make_daemon, open_tmp):
    """Debian and Ubuntu's /var/log is root:syslog 0775."""
    varlog = _directory(open_tmp, "varlog", 0o775)
    os.chown(varlog, 0, grp.getgrnam("adm").gr_gid if _group_exists("adm") else 4)
    d = make_daemon("--log", os.path.join(varlog, "notesd.log"), start=False)
    d.start()
    assert d.get("/health").status == 200
    d.stop()


def _group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


@needs_root
def test_state_dir_through_a_link_into_a_users_directory(make_daemon, open_tmp):
    """Root's own link leads through a directory that a user may write: he
    may point what lies there at a root-only directory."""
    mal = _directory(open_tmp, "mal", 0o755)
    os.chown(mal, pwd.getpwnam("nobody").pw_uid, -1)
    victim = _directory(open_tmp, "victim", 0o755)
    _plant_symlink(victim, os.path.join(mal, "x"))
    link = os.path.join(open_tmp, "link")
    os.symlink(os.path.join(mal, "x"), link)
    d = make_daemon("--user", "nobody", "--state-dir", os.path.join(link, "notesd"),
                    start=False)
    _assert_start_refused(d, mal)
    assert os.listdir(victim) == []


###############################################################################
# Storage that tells the truth ################################################
###############################################################################


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a filesystem that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def _fill(path):
    """Write zeros to `path` until the disk is full. Unbuffered: a buffered
    file kept what the disk refused and raised ENOSPC again on close."""
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)


def _health(d):
    r = d.get("/health")
    return r.status, r.json().get("message", "")


@needs_root
def test_full_disk_shows_in_health_and_check_and_recovers(make_daemon, small_disk):
    d = make_daemon("--database", small_disk / "notes.db")
    assert d.post("before").status == 201
    _fill(small_disk / "filler")
    r = d.post("x" * 2000)
    assert r.status == 503, r
    status, message = _health(d)
    assert status == 503 and "full" in message, (status, message)
    r = d.cli("check")
    assert r.returncode == 2 and "full" in r.stdout, r.stdout
    storage = d.get("/status").json()["storage"]
    assert not storage["ok"] and "full" in storage["last_error"]["message"], storage
    os.unlink(small_disk / "filler")
    wait_until(lambda: _health(d)[0] == 200, 5, d, "/health to recover by itself")
    assert d.post("after").status == 201
    assert d.cli("check").returncode == 0
    storage = d.get("/status").json()["storage"]
    assert storage["ok"] and storage["last_error"], storage  # the last error stays on view


@pytest.mark.parametrize("name", ["notes.db", "notes.db-wal"])
def test_removed_database_files_are_noticed(make_daemon, name):
    d = make_daemon()
    assert d.post("before").status == 201
    os.unlink(os.path.join(d.dir, name))
    wait_until(lambda: _health(d)[0] == 503, 5, d, "/health to notice")
    assert name in _health(d)[1]
    r = d.post("after the removal")
    assert r.status == 503 and name in r.json()["message"], r
    assert d.cli("check").returncode == 2
    assert name in d.log()
    rescued = glob.glob(d.database + ".rescued-*")
    assert len(rescued) == 1 and rescued[0] in d.log(), (rescued, d.log())
    assert stat.S_IMODE(os.stat(rescued[0]).st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(rescued[0])) as db:
        assert [r[0] for r in db.execute("SELECT text FROM notes")] == ["before"]


def test_replaced_database_is_noticed(make_daemon, tmp_path):
    d = make_daemon()
    other = tmp_path / "other.db"
    shutil.copy(d.database, other)
    os.rename(other, d.database)
    wait_until(lambda: _health(d)[0] == 503, 5, d, "/health to notice")
    assert "replaced" in _health(d)[1]


@needs_root
def test_failed_commit_tells_only_writes_they_were_rolled_back(make_daemon, small_disk):
    """status and PATCH /config share a batch with failing writes: their
    effect stands, so they must not be told "rolled back"."""
    d = make_daemon("--database", small_disk / "notes.db")
    _fill(small_disk / "filler")
    wrong = []

    def one_round(i):
        level = ("info", "debug")[i % 2]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            post = pool.submit(d.post, "y" * 3000)
            patch = pool.submit(d.request, "PATCH", "/config", {"log_level": level})
            status = pool.submit(d.get, "/status")
            replies = post.result(), patch.result(), status.result()
        if replies[1].status != 200 or replies[2].status != 200:
            wrong.append((i, [(r.status, r.body[:80]) for r in replies]))
    for i in range(30):
        one_round(i)
    assert not wrong, wrong


def test_no_id_past_the_limit_is_handed_out(make_daemon):
    d = make_daemon()
    top = 2**53 - 1
    assert d.request("PUT", "/%d/" % top, {"text": "the last id"}).status == 201
    r = d.post("one too many")
    assert r.status == 507, r
    assert str(top) in r.json()["message"]
    assert d.get("/%d/" % top).status == 200
    assert [n["id"] for n in d.get("/").json()] == [top]



def test_recovery_from_a_removed_database_as_the_readme_says(make_daemon):
    d = make_daemon()
    ids = [d.note("note %d" % i)["id"] for i in range(5)]
    os.unlink(d.database)
    wait_until(lambda: glob.glob(d.database + ".rescued-*"), 5, d, "the rescue copy")
    d.stop()
    os.rename(glob.glob(d.database + ".rescued-*")[0], d.database)
    for leftover in (d.database + "-wal", d.database + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    d.start()
    assert [n["id"] for n in d.get("/").json()] == ids
    assert d.post("after recovery").status == 201



###############################################################################
# Search and the main loop's time budget ######################################
###############################################################################


def _search(d, q, **params):
    r = d.get("/?" + urllib.parse.urlencode({"q": q, **params}))
    assert r.status == 200, r
    return [n["id"] for n in r.json()]


def _without_fts5(d, tmp_path):
    """d runs a notesd that finds no FTS5 trigram tokenizer (SQLite < 3.34)."""
    d.script = _hooked_copy(tmp_path, 'db.execute("CREATE VIRTUAL TABLE temp.probe',
                            "return False")


def _walk(d, path):
    """The ids of every page from `path` on, following Link: rel="next"."""
    seen = []
    while path:
        r = d.get(path)
        assert r.status == 200, r
        seen += [n["id"] for n in r.json()]
        link = r.header("Link")
        path = link and link.split(">")[0].lstrip("<")
    return seen


@pytest.mark.parametrize("mode", ["index", "scan"])
def test_search_finds_exactly_the_substring(make_daemon, tmp_path, mode):
    """The same answers with the index and without (scan mode), long notes
    (scanned by Python in both) among them, both ways of paging."""
    d = make_daemon(start=False)
    if mode == "scan":
        _without_fts5(d, tmp_path)
    d.start()
    assert d.get("/status").json()["search"]["mode"] == mode
    texts = ["The quick brown fox", "Apple pie", "apple tart", "unicode: 日本語のテキスト",
             'quote " and OR NEAR( * ^ -x', "ab", "x y z", "Quick brownies",
             "long " + "é" * 5000 + " apple tart at the end", "Apple " + "€" * 3000]
    notes = {d.note(t)["id"]: t for t in texts}

    def expected(q):
        return [i for i, t in sorted(notes.items()) if q in t]
    for q in ("uick br", "Apple", "apple", "本語の", '" and OR', "NEAR(", "* ^ -", "y z",
              "nothing-here", "ab", "b", "日本", "Quick", "éé a", "€€"):
        assert _search(d, q) == expected(q), q
        assert _walk(d, "/?" + urllib.parse.urlencode({"q": q, "limit": 1})) == expected(q), q
    first = min(notes)
    assert d.request("PUT", "/%d/" % first, {"text": "now a slow red fox"}).status == 200
    notes[first] = "now a slow red fox"
    assert d.request("DELETE", "/%d/" % max(notes)).status == 204
    del notes[max(notes)]
    for q in ("uick br", "slow red", "Quick", "fox"):
        assert _search(d, q) == expected(q), q


def test_search_pages_follow_link(make_daemon):
    d = make_daemon()
    ids = [d.note("hay %d needle %d" % (i, i))["id"] for i in range(7)]
    d.note("only hay")
    assert _walk(d, "/?" + urllib.parse.urlencode({"q": "needle", "limit": 3})) == ids


def _old_database(path, texts):
    """A database as the first schema left it (user_version 1, no index)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "text TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL)")
        db.executemany("INSERT INTO notes (text, created, updated) VALUES (?, ?, ?)",
                       ((t, "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z") for t in texts))
        db.execute("PRAGMA user_version = 1")
        db.commit()


def test_existing_database_gets_the_search_index(make_daemon, tmp_path):
    d = make_daemon(start=False)
    _old_database(d.database, ["old note %d" % i for i in range(100)] + ["a unique word"])
    d.start()
    assert _search(d, "unique wor") == [101]
    assert _search(d, "note 5") == [6] + list(range(51, 61))
    status = d.get("/status").json()
    assert status["search"]["mode"] == "index", status
    d.stop()
    with contextlib.closing(sqlite3.connect(d.database)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert db.execute("SELECT count(*) FROM notes_search WHERE notes_search MATCH "
                          "'\"unique\"'").fetchone()[0] == 1
        # FTS5 merges only when index_some says (migration 4): its automerge
        # held the loop up to 236 ms now and then (bench, README)
        assert db.execute("SELECT v FROM notes_search_config"
                          " WHERE k = 'automerge'").fetchone() == (0,)


def _notesd_constant(name):
    """A constant of notesd.py, read from its source without importing it."""
    with open(NOTESD) as f:
        tree = ast.parse(f.read())
    return next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name)


def test_a_database_indexed_by_migration_2_keeps_its_long_notes_right(make_daemon):
    """Migration 3 keeps notes over INDEX_NOTE_BYTES (8,192) out of the
    index; a database from before it may hold such notes in the index (a
    PUT or DELETE of one of 1 MB then held the loop 4.3 s, attack review),
    or queued for it. The index is rebuilt without them."""
    d = make_daemon(start=False)
    long_texts = ["indexed long " + "a" * 20000, "queued long " + "b" * 20000]
    _old_database(d.database, ["short"] + long_texts)
    with contextlib.closing(sqlite3.connect(d.database, isolation_level=None)) as db:
        for statement in _notesd_constant("SEARCH_INDEX"):  # migration 2, as it ran
            db.execute(statement)
        db.execute("INSERT INTO notes_search (rowid, text) SELECT id, text FROM notes"
                   " WHERE id <= 2")  # what its index_some did
        db.execute("DELETE FROM notes_unindexed WHERE id <= 2")
        db.execute("PRAGMA user_version = 2")
    d.start()
    wait_until(lambda: d.get("/status").json()["search"]["unindexed"] == 0, 10, d,
               "the queue to be emptied")
    assert d.get("/status").json()["search"]["scanned"] == 2
    assert _search(d, "indexed long") == [2]
    assert _search(d, "queued long") == [3]
    assert d.request("PUT", "/2/", {"text": "was long"}).status == 200
    assert d.request("DELETE", "/3/").status == 204
    assert _search(d, "long") == [2]
    assert _search(d, "aaa") == _search(d, "bbb") == []
    d.stop()
    with contextlib.closing(sqlite3.connect(d.database)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        # FTS5's own check of its index's structure
        db.execute("INSERT INTO notes_search (notes_search) VALUES ('integrity-check')")
        indexed = "SELECT rowid FROM notes_search WHERE notes_search MATCH ?"
        assert db.execute(indexed, ('"short"',)).fetchall() == [(1,)]
        assert db.execute(indexed, ('"aaaaaa"',)).fetchall() == []  # put aside


def test_a_slow_search_is_aborted_and_the_loop_keeps_turning(make_daemon):
    d = make_daemon("--command-budget", "1", start=False)
    _old_database(d.database, ("filler text number %d, nothing to find" % i
                               for i in range(30000)))
    d.start()
    note = d.note("findable")
    wait_until(lambda: d.get("/status").json()["search"]["unindexed"] == 0, 60, d,
               "the search index to catch up")
    r = d.get("/?q=zq")  # two characters: the index cannot serve it, so it scans
    assert r.status == 503, r
    message = r.json()["message"]
    assert "command_budget" in message and "longer" in message, message
    assert d.get("/health").status == 200
    assert d.get("/%d/" % note["id"]).status == 200
    commands = d.get("/status").json()["commands"]
    assert commands["budget_aborts"] >= 1, commands
    assert commands["slowest_last_minute"]["ms"] >= 1, commands  # the aborted search, or slower
    # the key is live; with a budget a loaded machine can keep, the index serves it
    assert d.request("PATCH", "/config", {"command_budget": 50}).status == 200
    assert _search(d, "findable") == [note["id"]]



def test_big_notes_are_indexed_a_few_at_a_time(make_daemon):
    """FTS5 indexes a chunk whole, and random text costs it more than linearly:
    50 migrated notes of 300,000 random characters in one chunk held the loop
    75 s (attack review), and six of 150,000 here about 6 s. A chunk stopped
    at 16,000 characters (72b5c79); now notes this long are not indexed at
    all, and a chunk stops at INDEX_CHUNK_BYTES."""
    d = make_daemon(start=False)
    rng = random.Random(13)
    letters = string.ascii_letters + string.digits
    _old_database(d.database, ["short"] + ["".join(rng.choices(letters, k=150000))
                                           for _ in range(6)])
    d.start()
    health = []
    with _asking(d, "/health", health):  # the HTTP thread answers it, loop or not
        wait_until(lambda: d.get("/status").json()["search"]["unindexed"] == 0, 60, d,
                   "the big notes to be indexed")
    assert set(health) == {200}, collections.Counter(health)  # 503: main loop stuck
    assert _search(d, "short") == [1]


@contextlib.contextmanager
def _asking(d, path, answered, keep=lambda status, body: status):
    """A client that asks GET `path` again as soon as it has its reply, on
    one connection, until the block ends: keep(status, body) of each reply
    into `answered`. Yields its thread."""
    stop = threading.Event()

    def ask():
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", d.port,
                                                           timeout=HTTP_TIMEOUT)) as c:
            while not stop.is_set():
                c.request("GET", path, headers={"Accept": "application/json"})
                r = c.getresponse()
                answered.append(keep(r.status, r.read()))
    thread = threading.Thread(target=ask)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(HTTP_TIMEOUT)


def _heartbeats(status, body):
    """/health's status and heartbeat_age (seconds since the loop last turned)."""
    return status, json.loads(body)["heartbeat_age"]


def test_a_huge_note_is_scanned_not_indexed(make_daemon):
    """FTS5 indexes a note in one step no budget can interrupt, and random
    text costs it more than linearly: a note of 1,000,000 random characters
    (under max_body) held the loop 5.6 s, and so did a PUT or DELETE of it
    once indexed (FTS5 reads the old text to take it out). A note over
    INDEX_NOTE_BYTES stays out of the index; searches scan it."""
    d = make_daemon()
    rng = random.Random(14)
    letters = string.ascii_letters + string.digits
    huge = ["".join(rng.choices(letters, k=1_000_000)) for _ in range(2)]
    small = d.note("a small note, indexed")["id"]
    indexed = lambda: d.get("/status").json()["search"]["unindexed"] == 0  # noqa: E731
    health = []
    with _asking(d, "/health", health, _heartbeats):
        put, deleted = (d.note(text)["id"] for text in huge)
        wait_until(indexed, 30, d, "the huge notes to be put aside")
        assert d.get("/status").json()["search"]["scanned"] == 2
        assert _search(d, huge[0][500_000:500_010]) == [put]
        assert _search(d, huge[1][-10:]) == [deleted]
        assert d.request("PUT", "/%d/" % put, {"text": "small now"}).status == 200
        assert d.request("DELETE", "/%d/" % deleted).status == 204
        wait_until(indexed, 30, d, "the note put small to be indexed")
    assert d.get("/status").json()["search"]["scanned"] == 0
    # An idle loop turns at least once a second (notesd.TICK)
    assert max(age for _, age in health) < 2, max(health, key=lambda h: h[1])
    assert {status for status, _ in health} == {200}
    assert _search(d, "small now") == [put]
    assert _search(d, huge[0][:10]) == _search(d, huge[1][:10]) == []
    assert _search(d, "small note") == [small]


@pytest.mark.parametrize("mode", ["index", "scan"])
def test_a_search_of_long_notes_keeps_to_its_budget(make_daemon, tmp_path, mode):
    """SQLite's instr() costs a note's length times the text's, in one step
    the budget cannot interrupt: ?q= of 19,999 'a' and a 'b' over 20 notes
    of 1 MB of 'a' held the loop 7 s, and was answered 200 (attack review);
    without FTS5 (scan mode), 'a' * 999 + 'b' over 200 such notes, 4.2 s.
    Long notes are matched in Python, one at a time, and ?q= is bounded."""
    d = make_daemon(start=False)
    if mode == "scan":
        _without_fts5(d, tmp_path)
    d.start()
    assert d.get("/status").json()["search"]["mode"] == mode
    for _ in range(20):
        d.note("a" * 1_000_000)
    r = d.get("/?q=" + "a" * 1000 + "b")
    assert r.status == 400 and "longer than 1000" in r.json()["message"], r
    health = []
    with _asking(d, "/health", health, _heartbeats):
        for q in ("a" * 999 + "b", "a" * 5 + "b" * 5):
            r = d.get("/?" + urllib.parse.urlencode({"q": q}))
            assert r.status == 503 and "command_budget" in r.json()["message"] or \
                r.status == 200 and r.json() == [], r
    assert max(age for _, age in health) < 2, max(health, key=lambda h: h[1])
    slowest = d.get("/status").json()["commands"]["slowest_last_minute"]
    assert slowest["ms"] < 150, slowest  # the budget is 50 ms: 294 ms in scan mode, unmended
    assert _search(d, "a" * 999, limit=2) == [1, 2]
    # A query too short for the index scanned them with instr() too, and the
    # progress handler looks at the clock every 1000 steps: 150 rows of 1 MB
    # and more. ?q=zz over 150 of them took 293 ms, unaborted (attack review).
    assert d.request("PATCH", "/config", {"command_budget": 1}).status == 200
    r = d.get("/?q=zz")
    assert r.status == 503 and "command_budget" in r.json()["message"], r


def test_a_word_in_every_note_is_found_a_page_at_a_time(make_daemon):
    """The index gives a page of a word in most notes without building the
    whole set of them first: `id IN (index UNION ALL queue)` did, 242 ms for
    such a word in 300,000 notes (bench/search.py's common words), over the
    default budget. Here 10 ms: the set of 30,000 took longer."""
    d = make_daemon(start=False)
    _old_database(d.database, ("common word %d" % i for i in range(30000)))
    d.start()
    wait_until(lambda: d.get("/status").json()["search"]["unindexed"] == 0, 60, d,
               "the search index to catch up")
    assert d.request("PATCH", "/config", {"command_budget": 10}).status == 200
    assert _search(d, "common word", limit=100) == list(range(1, 101))
    assert _search(d, "word 2999", limit=3) == [3000, 29991, 29992]
    assert d.get("/status").json()["commands"]["budget_aborts"] == 0


def test_the_index_catches_up_while_a_client_keeps_the_loop_busy(make_daemon):
    """A client that sends its next request as soon as it has its reply never
    leaves the loop idle: the index got half a slice a tick (100 notes a
    second here), and 100,000 migrated notes were not indexed after 300 s.
    Past INDEX_BACKLOG (10,000) waiting, the index takes a quarter of the loop."""
    d = make_daemon(start=False)
    filler = "a longer note, as notes go, with words enough to index: "
    _old_database(d.database, (filler + "number %d" % i for i in range(30000)))
    d.start()
    answered = []
    with _asking(d, "/1/", answered) as client:
        wait_until(lambda: len(answered) > 100, 10, d, "the client to be busy")
        backlog = d.get("/status").json()["search"]["unindexed"]
        wait_until(lambda: d.get("/status").json()["search"]["unindexed"] < backlog - 3000,
                   10, d, "the index to catch up under a busy client")
        assert client.is_alive(), answered[-3:]  # it kept the loop busy all along
    assert set(answered) == {200}, collections.Counter(answered)
    assert _search(d, "number 29999") == [30000]


def _slow_searches(make_daemon, tmp_path):
    """A daemon from a copy of notesd.py in which a search for slow-T-NAME
    holds the main loop T tenths of a second, saying in the log when it
    begins; its budget, 10 s, lets it."""
    d = make_daemon("--command-budget", "10000", start=False)
    d.script = _hooked_copy(tmp_path, "rows = self._page(after, limit, text, backwards)",
                            "if text and text.startswith('slow-'): "
                            "log.warning('search %s runs', text); "
                            "time.sleep(int(text.split('-')[1]) / 10)")
    d.start()
    return d


def _search_later(d, q, answered):
    """A thread that searches d for q and notes when it was answered."""
    def search():
        assert d.get("/?q=" + q).status == 200
        answered[q] = time.monotonic()
    thread = threading.Thread(target=search)
    thread.start()
    return thread


def test_quick_requests_are_answered_before_the_searches_of_their_batch(make_daemon, tmp_path):
    """A GET /ID/ queued with searches is answered before they run, not after:
    it waited out a whole budget of searches (bench/search.py's storm: GET /ID/
    p50 107 ms)."""
    d = _slow_searches(make_daemon, tmp_path)
    note = d.note("quick")
    answered = {}
    searches = [_search_later(d, "slow-20-first", answered)]
    wait_until(lambda: "search slow-20-first runs" in d.log(), 10, d, "the first search")
    searches.append(_search_later(d, "slow-20-second", answered))  # queued with the GET
    assert d.get("/%d/" % note["id"]).status == 200
    answered["get"] = time.monotonic()
    for thread in searches:
        thread.join(10)
    assert "search slow-20-second runs" in d.log()
    assert answered["slow-20-second"] - answered["get"] > 1, answered


def test_searches_past_a_slice_wait_for_the_quick_requests_queued_meanwhile(make_daemon,
                                                                             tmp_path):
    """A batch runs pages for PAGES_SLICE (10 ms), not a whole budget: the
    rest wait for the next turn, where a GET /ID/ queued meanwhile goes
    first (with 50 ms a batch, it waited 52 ms at the median among 100
    searchers)."""
    d = _slow_searches(make_daemon, tmp_path)
    note = d.note("quick")
    answered = {}
    searches = [_search_later(d, "slow-10-first", answered)]
    wait_until(lambda: "search slow-10-first runs" in d.log(), 10, d, "the first search")
    searches += [_search_later(d, q, answered) for q in ("slow-5-a", "slow-5-b")]  # one batch
    wait_until(lambda: "search slow-5-" in d.log(), 10, d, "the next batch's first search")
    assert d.get("/%d/" % note["id"]).status == 200
    answered["get"] = time.monotonic()
    for thread in searches:
        thread.join(10)
    last = max(answered["slow-5-a"], answered["slow-5-b"])
    assert last - answered["get"] > 0.25, answered

###############################################################################
# Host names and reply sizes (issue 9: items 12 and 4) ########################
###############################################################################
# A DNS-rebinding page reaches a loopback notesd under its own name; the
# allowed_hosts key says which names notesd answers to and which origins may
# write. And no reply grows with what a client asks for: text holds no control
# characters, and a page of GET / stops at PAGE_BYTES of JSON.

#: notesd.PAGE_BYTES: the most JSON a page of GET / holds (but one note).
PAGE_BYTES = 4 << 20


def _addressed(d, method, path, host, origin=None, body=None):
    """A request to d carrying this Host (and Origin); body is a form."""
    headers = {"Host": host}
    if origin is not None:
        headers["Origin"] = origin
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        body = urllib.parse.urlencode({"text": body})
    return d.request(method, path, body, headers)


def test_dns_rebinding_page_can_neither_read_nor_write(shared):
    """attacker.example now resolves to 127.0.0.1: its page's requests carry
    its own name in Host and Origin, and get 421 naming allowed_hosts."""
    secret = shared.note(unique("secret"))
    planted = unique("planted")
    evil = "attacker.example:%d" % shared.port
    for method, path, body in [("GET", "/", None), ("GET", "/%d/" % secret["id"], None),
                               ("GET", "/status", None), ("POST", "/", planted),
                               ("PUT", "/%d/" % secret["id"], planted),
                               ("DELETE", "/%d/" % secret["id"], None)]:
        r = _addressed(shared, method, path, evil, "http://" + evil, body)
        assert_error(r, 421)
        assert "allowed_hosts" in r.json()["message"], r
        assert secret["text"].encode() not in r.body
    r = shared.get("/", headers={"Host": evil, "Accept": "text/html"})
    assert r.status == 421 and secret["text"].encode() not in r.body, r
    assert shared.get("/%d/" % secret["id"]).json()["text"] == secret["text"]
    assert shared.get("/?q=" + planted).json() == []


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_loopback_clients_by_name_or_address(shared):
    for url in ("http://127.0.0.1:%d/" % shared.port, "http://localhost:%d/" % shared.port):
        code, body = _curl("-4", url + "health")
        assert code == 200, (url, body)
        code, body = _curl("-4", url)
        assert code == 200, (url, body)
        origin = url.rstrip("/")
        code, body = _curl("-4", "-H", "Origin: " + origin, "-d", "text=" + unique("loop"), url)
        assert code == 201, (url, body)


@pytest.mark.skipif(not _have_ipv6_loopback() or not shutil.which("curl"),
                    reason="needs IPv6 loopback and curl")
def test_ipv6_loopback_clients(make_daemon):
    d = make_daemon("--listen", "[::1]:0")
    url = "http://[::1]:%d/" % d.port
    assert _curl("-g", url)[0] == 200
    code, body = _curl("-g", "-H", "Origin: " + url.rstrip("/"), "-d", "text=six", url)
    assert code == 201, body
    code, body = _curl("-g", "-H", "Host: attacker.example:%d" % d.port, url)
    assert code == 421, body


def test_writes_from_other_local_origins_are_refused(shared):
    """An Origin is checked against allowed_hosts, not against the request's
    own Host: localhost:PORT and 127.0.0.1:PORT are one notesd, while a page
    on another port of this machine is another site."""
    own = "127.0.0.1:%d" % shared.port
    for origin in ("http://localhost:%d" % shared.port, "http://[::1]:%d" % shared.port,
                   "http://" + own):
        r = _addressed(shared, "POST", "/", own, origin, unique("own"))
        assert r.status == 201, (origin, r)
    for origin in ("http://localhost:%d" % (shared.port ^ 1), "http://127.0.0.1",
                   "https://127.0.0.1", "http://evil.example", "null", "http://["):
        r = _addressed(shared, "POST", "/", own, origin, unique("other"))
        assert_error(r, 403)
        assert "allowed_hosts" in r.json()["message"], r


def test_health_answers_any_name(shared):
    """Monitoring may use the machine's name or an address: /health tells
    nothing a rebinding page could use."""
    r = _addressed(shared, "GET", "/health", "monitor.example")
    assert r.status == 200, r
    assert _addressed(shared, "GET", "/", "10.1.2.3:%d" % shared.port).status == 200


def test_reverse_proxy_names(make_daemon, tmp_path):
    conf = _config(tmp_path, "allowed_hosts = notes.example.com\n")
    d = make_daemon(config=conf)
    # a proxy that passes the client's Host on (nginx: proxy_set_header Host $host)
    assert _addressed(d, "GET", "/", "notes.example.com").status == 200
    r = _addressed(d, "POST", "/", "notes.example.com", "https://notes.example.com", "proxied")
    assert r.status == 201, r
    # one that sends its own (nginx's default, the proxy_pass address)
    r = _addressed(d, "POST", "/", "127.0.0.1:%d" % d.port, "https://notes.example.com", "own")
    assert r.status == 201, r
    assert_error(_addressed(d, "GET", "/", "localhost:%d" % d.port), 421)
    r = _addressed(d, "POST", "/", "notes.example.com", "https://evil.example", "csrf")
    assert_error(r, 403)


def test_allowed_hosts_is_live_and_shown(make_daemon, tmp_path):
    conf = _config(tmp_path, "log_level = info\n")
    d = make_daemon(config=conf)
    default = "localhost:0, 127.0.0.1:0, [::1]:0"  # port 0: the port notesd listens on
    assert d.get("/config").json()["allowed_hosts"] == default
    assert "\nallowed_hosts = %s\n" % default in d.cli("configtest").stdout
    assert_error(_addressed(d, "GET", "/", "notes.example.com"), 421)
    r = d.request("PATCH", "/config", {"allowed_hosts": "notes.example.com:8443 localhost:80"})
    assert r.status == 200, r
    assert r.json()["allowed_hosts"] == "notes.example.com:8443, localhost:80"
    assert _addressed(d, "GET", "/", "notes.example.com").status == 200
    # a port-less Origin is port 80 (http) or 443 (https), RFC 6454 4
    for origin, status in [("http://localhost", 201), ("http://localhost:%d" % d.port, 403),
                           ("https://notes.example.com:8443", 201),
                           ("https://notes.example.com", 403)]:
        r = _addressed(d, "POST", "/", "localhost", origin, "port")
        assert r.status == status, (origin, r)
    conf.write_text("[notesd]\nallowed_hosts = other.example\n")
    r = d.cli("reload")
    assert r.returncode == 0, (r.stdout, r.stderr, d.log())
    assert_error(_addressed(d, "GET", "/", "notes.example.com"), 421)
    assert _addressed(d, "GET", "/", "other.example:1").status == 200
    for bad in ("notes.example.com:99999", "[::1", "bad_name!", "http://x"):
        r = d.request("PATCH", "/config", {"allowed_hosts": bad})
        assert_error(r, 400)
        assert "allowed_hosts" in r.json()["message"], r
    assert d.request("PATCH", "/config", {"allowed_hosts": ""}).json()["allowed_hosts"] == default


@pytest.mark.parametrize("listen,expected", [
    ("127.0.0.1:5000", "localhost:5000, 127.0.0.1:5000, [::1]:5000"),
    ("localhost:80", "localhost:80, 127.0.0.1:80, [::1]:80"),
    ("127.0.0.2:5000", "localhost:5000, 127.0.0.1:5000, [::1]:5000, 127.0.0.2:5000"),
    ("[::1]:5000", "localhost:5000, 127.0.0.1:5000, [::1]:5000"),
    ("0.0.0.0:5000", "*"), ("[::]:5000", "*"), ("192.0.2.7:5000", "*"), (":5000", "*")])
def test_allowed_hosts_default_follows_listen(tmp_path, listen, expected):
    r = Daemon(tmp_path).cli("configtest", "--listen", listen)
    assert r.returncode == 0, r.stderr
    assert "\nallowed_hosts = %s\n" % expected in r.stdout, r.stdout


def test_star_allows_any_name_and_same_origin_writes(make_daemon):
    d = make_daemon("--allowed-hosts", "*")
    name = "anything.example:%d" % d.port
    assert _addressed(d, "GET", "/", name).status == 200
    assert _addressed(d, "GET", "/", "notes_app:%d" % d.port).status == 200
    r = _addressed(d, "POST", "/", "notes_app:1", "http://notes_app:1", "container")
    assert r.status == 201, r
    assert _addressed(d, "POST", "/", name, "http://" + name, "same origin").status == 201
    r = _addressed(d, "POST", "/", "127.0.0.1:%d" % d.port, "http://" + name, "cross")
    assert_error(r, 403)


def _has_reply(sock):
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def test_large_pages_asked_at_once_are_bounded_in_memory(make_daemon):
    # 100 clients ask for a 4 MiB page at once and read nothing: every page
    # was built at once, several copies of its text each, and the daemon went
    # to 600 MB (attack review). Past REPLIES_HELD a large page is 503.
    d = make_daemon("--timeout", "30")
    text = "x" * 4000
    for _ in range(1000):
        assert d.post(text).status == 201
    request = b"GET /?limit=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    stuck = []
    try:
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=HTTP_TIMEOUT)
            s.sendall(request)
            stuck.append(s)
        wait_until(lambda: all(_has_reply(s) for s in stuck), 60, d,
                   "every client's reply begun")
        vm_hwm = int(proc_status(d.pid())["VmHWM"].split()[0]) // 1024
        refused = 0
        for s in stuck:
            s.settimeout(HTTP_TIMEOUT)
            refused += s.recv(12) == b"HTTP/1.1 503"
    finally:
        _close_all(stuck)
    assert vm_hwm < 300, "peak RSS %d MB" % vm_hwm
    assert refused, "no page was refused"
    d.assert_serving()


def test_a_host_longer_than_a_host_name_is_not_echoed_into_urls(make_daemon):
    # With *, any Host is served; one longer than a DNS name (253) was put in
    # every note's url, and a page of 1000 notes under a 32 KB Host was 32 MB,
    # eight times PAGE_BYTES (attack review).
    d = make_daemon("--allowed-hosts", "*")
    assert d.post("one").status == 201
    for host in ("a" * 254, "a" * 32000):
        r = _addressed(d, "GET", "/", host)
        assert r.status == 200, r
        url = r.json()[0]["url"]
        assert url == "http://127.0.0.1:%d/1/" % d.port, url[:100]
    assert _addressed(d, "GET", "/1/", "a" * 253).json()["url"] == "http://%s/1/" % ("a" * 253)


def _multipart(text):
    boundary = "notesd-boundary"
    body = ('--%s\r\nContent-Disposition: form-data; name="text"\r\n\r\n%s\r\n--%s--\r\n'
            % (boundary, text, boundary)).encode()
    return body, "multipart/form-data; boundary=" + boundary


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x0b", "\x0c", "\x7f", "\x85",
                                  "\x9b"])
def test_control_characters_in_note_text_are_refused(shared, char):
    """C0 and C1 controls but tab, LF and CR: JSON spells each in six bytes,
    and a terminal acts on them. Refused however the text arrives."""
    note = shared.note("unchanged")
    text = "before " + char + " after"
    multipart, multipart_type = _multipart(text)
    for method, path, body, content_type in [
            ("POST", "/", json.dumps({"text": text}), "application/json"),
            ("POST", "/", urllib.parse.urlencode({"text": text}),
             "application/x-www-form-urlencoded"),
            ("POST", "/", multipart, multipart_type),
            ("PUT", "/%d/" % note["id"], json.dumps({"text": text}), "application/json")]:
        r = shared.request(method, path, body, {"Content-Type": content_type})
        assert_error(r, 400)
        assert "U+%04X" % ord(char) in r.json()["message"], r
    assert shared.get("/%d/" % note["id"]).json()["text"] == "unchanged"


def test_tab_lf_cr_and_other_text_are_kept(shared):
    text = "tab\there\r\nnew line\n\u00e9\u00a0\u2028\U0001f600 " + unique("kept")
    multipart, multipart_type = _multipart(text)
    r = shared.request("POST", "/", multipart, {"Content-Type": multipart_type})
    assert r.status == 201, r
    assert shared.get("/%d/" % r.json()["id"]).json()["text"] == text


def _follow(d, path, **kw):
    """Every page from path on, following Link: rel="next"; [(reply, ids)]."""
    pages = []
    while path is not None:
        r = d.get(path, **kw)
        assert r.status == 200, r
        pages.append(r)
        link = r.header("Link")
        path = None
        if link:
            m = re.fullmatch(r'<([^>]+)>; rel="next"', link)
            assert m, link
            path = m.group(1)
        assert len(pages) <= 50, "Link loops"
    return pages


def test_page_of_notes_is_bounded_by_bytes(make_daemon):
    """Texts that json.dumps makes three times longer (quotes, backslashes,
    non-ASCII under ensure_ascii): ?limit=1000 stops at PAGE_BYTES of JSON
    plus one note, Link gives the rest, and every note comes once."""
    d = make_daemon("--max-body", str(8 << 20))
    made = [d.note("%d " % i + '"\\\u00e9' * 100000) for i in range(14)]
    largest = max(len(json.dumps(note)) for note in made)
    assert 14 * largest > 3 * PAGE_BYTES  # so at least three pages
    pages = _follow(d, "/?limit=1000")
    assert len(pages) >= 3, [len(r.body) for r in pages]
    for r in pages:
        assert len(r.body) <= PAGE_BYTES + largest, len(r.body)
    seen = [note["id"] for r in pages for note in r.json()]
    assert seen == _ids(made)
    html = d.get("/?limit=1000", headers={"Accept": "text/html"})
    assert html.status == 200 and html.header("Link") == pages[0].header("Link"), html


###############################################################################
# Backups and restore (issue 10, items 5-7) ###################################
###############################################################################
# `backup DEST` copies the database with sqlite's online backup API; the
# README's restore recipe puts a copy back, and `start` refuses a damaged
# database. Copies are read here with sqlite3, as an operator would.

BACKUP_LINE = re.compile(r"notesd backup (/\S+): (\d+) notes")


def _backups(tmp_path):
    """A directory for copies, root's alone like /var/backups/notesd."""
    path = tmp_path / "backups"
    path.mkdir(mode=0o700, exist_ok=True)
    return str(path)


def _backup(d, dest, *extra, **popen_kw):
    """`backup DEST` that must succeed: the notes its line counts."""
    r = d.cli("backup", dest, *extra, **popen_kw)
    assert r.returncode == 0, (r.stdout, r.stderr, d.log()[-2000:])
    match = BACKUP_LINE.fullmatch(r.stdout.rstrip("\n"))
    assert match and match.group(1) == os.path.abspath(dest), r.stdout
    return int(match.group(2))


def _notes_in(path):
    """{id: text} of a copy, read as one lone file: read-only, with no -wal or
    -shm beside it, so it must need none; it passes quick_check."""
    directory, name = os.path.split(path)
    with open(path, "rb") as f:
        header = f.read(100)
    assert header[:16] == b"SQLite format 3\0", header[:16]
    assert header[18:20] == b"\x01\x01", "the copy is in WAL mode: %r" % header[18:20]
    db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path), uri=True)
    try:
        assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        notes = dict(db.execute("SELECT id, text FROM notes"))
    finally:
        db.close()
    assert [n for n in os.listdir(directory) if n.startswith(name + "-")] == []
    return notes


def _only(directory, *names):
    """The directory holds these names and nothing else (no temporary file)."""
    assert sorted(os.listdir(directory)) == sorted(names), os.listdir(directory)


def test_backup_while_8_writers_write(daemon, tmp_path):
    stop, acked, lock = threading.Event(), {}, threading.Lock()
    dest = os.path.join(_backups(tmp_path), "copy.db")
    workers = _write_until_stopped(daemon, stop, acked, lock)
    try:
        wait_until(lambda: len(acked) >= 100, 20, daemon, "100 acknowledged notes")
        with lock:
            before = dict(acked)
        counted = _backup(daemon, dest)
        wait_until(lambda: len(acked) >= len(before) + 50, 20, daemon, "writes after it")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    notes = _notes_in(dest)
    assert counted == len(notes)
    missing = {nid: text for nid, text in before.items() if notes.get(nid) != text}
    assert not missing, "acknowledged before the backup, not in it: %r" % missing
    assert set(notes) <= set(acked), "in the copy, never acknowledged"
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    _only(os.path.dirname(dest), "copy.db")
    daemon.assert_serving()


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_backup_with_the_daemon_stopped(daemon, tmp_path, how):
    texts = {daemon.note("stopped %d" % i)["id"]: "stopped %d" % i for i in range(10)}
    if how == "stop":
        daemon.stop()
    else:  # the notes are in notes.db-wal alone
        pid = daemon.pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5, daemon, "the killed daemon gone")
        assert os.path.getsize(daemon.database + "-wal") > 0
    files = sorted(os.listdir(daemon.dir))
    dest = os.path.join(_backups(tmp_path), "copy.db")
    assert _backup(daemon, dest) == 10
    assert _notes_in(dest) == texts
    if how == "stop":  # as it found it: no -wal or -shm left behind
        assert sorted(os.listdir(daemon.dir)) == files
    daemon.start()
    assert daemon.get("/status").json()["notes"] == 10


@needs_root
def test_backup_as_root_of_a_user_daemon_leaves_no_root_file(make_daemon, open_tmp, tmp_path):
    state = os.path.join(open_tmp, "state")
    d = make_daemon("--user", "nobody", "--state-dir", state,
                    "--log", os.path.join(state, "notesd.log"), directory=open_tmp)
    texts = {d.note("user %d" % i)["id"]: "user %d" % i for i in range(20)}

    def root_files():
        return [n for n in os.listdir(state) if os.lstat(os.path.join(state, n)).st_uid == 0]

    backups = _backups(tmp_path)
    assert _backup(d, os.path.join(backups, "running.db")) == 20
    assert root_files() == []
    d.stop()
    files = sorted(os.listdir(state))
    assert _backup(d, os.path.join(backups, "stopped.db")) == 20
    assert root_files() == [] and sorted(os.listdir(state)) == files
    for name in ("running.db", "stopped.db"):
        assert _notes_in(os.path.join(backups, name)) == texts
        assert os.stat(os.path.join(backups, name)).st_uid == 0
    d.start()
    assert d.post("after the backups").status == 201


@needs_root
def test_backup_as_root_follows_no_link_the_user_planted(make_daemon, open_tmp, tmp_path):
    """Root's files stay as they were whatever sqlite makes of links planted
    as -wal and -shm: backup reads as the daemon's user, who may not open
    them (SQLite 3.40 refuses both links by itself, even as root)."""
    state = os.path.join(open_tmp, "state")
    d = make_daemon("--user", "nobody", "--state-dir", state, directory=open_tmp)
    d.note("before")
    d.stop()
    victims = [_victim(_directory(open_tmp, name, 0o755)) for name in ("wal", "shm")]
    for victim, name in zip(victims, ("notes.db-wal", "notes.db-shm")):
        _plant_symlink(victim, os.path.join(state, name))
    backups = _backups(tmp_path)
    r = d.cli("backup", os.path.join(backups, "copy.db"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("notesd: "), r.stderr
    assert all(_untouched(victim) for victim in victims)
    _only(backups)


def test_backup_refuses_an_existing_dest_unless_force(shared, tmp_path):
    texts = {shared.note(t)["id"]: t for t in (unique("force") for _ in range(3))}
    backups = _backups(tmp_path)
    dest = os.path.join(backups, "copy.db")
    with open(dest, "w") as f:
        f.write("yesterday's copy\n")
    r = shared.cli("backup", dest)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert dest in r.stderr and "--force" in r.stderr, r.stderr
    with open(dest) as f:
        assert f.read() == "yesterday's copy\n"
    _only(backups, "copy.db")
    # the mode is 0600 whatever the umask: 0277 would leave 0400, 0 gives cp 0644
    for umask in (0o277, 0o000):
        counted = _backup(shared, dest, "--force", preexec_fn=lambda: os.umask(umask))
        assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600, oct(umask)
        notes = _notes_in(dest)
        assert counted == len(notes) and texts.items() <= notes.items()
        _only(backups, "copy.db")


def test_backup_errors_exit_1_and_leave_no_file(shared, tmp_path):
    backups = _backups(tmp_path)
    dest = os.path.join(backups, "copy.db")
    never = Daemon(tmp_path / "never-started")
    missing = str(tmp_path / "no-state-dir")
    for d, database in ((never, never.database), (Daemon(missing), missing)):
        r = d.cli("backup", dest)
        assert r.returncode == 1 and database in r.stderr, (r.stdout, r.stderr)
        assert "no database" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(never.database)  # backup made none
    os.mkdir(os.path.join(backups, "a-directory"))
    for target, why, extra in ((os.path.join(backups, "a-directory"), "directory", "--force"),
                               (os.path.join(backups, "missing", "copy.db"), "No such file", "")):
        r = shared.cli("backup", target, *filter(None, [extra]))
        assert r.returncode == 1, (target, r.stdout, r.stderr)
        assert target in r.stderr and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == "", (r.stdout, r.stderr)
    _only(backups, "a-directory")
    assert os.listdir(os.path.join(backups, "a-directory")) == []


def test_backup_dest_in_a_directory_others_can_write(shared, tmp_path):
    """sqlite opens the temporary file by name: in a directory others may
    write, one of them could swap it for a link first. Sticky (/tmp) is
    fine: nobody else may rename or remove a file of ours there."""
    directory = os.path.join(_backups(tmp_path), "shared")
    os.mkdir(directory)
    os.chmod(directory, 0o777)
    dest = os.path.join(directory, "copy.db")
    r = shared.cli("backup", dest)
    assert r.returncode == 1 and dest in r.stderr and "others" in r.stderr, r.stderr
    _only(directory)
    os.chmod(directory, 0o1777)
    _backup(shared, dest)
    _only(directory, "copy.db")


@needs_unshare
def test_backup_to_a_full_or_read_only_filesystem(shared, tmp_path):
    """What root cannot write either: a full (one page) or a read-only tmpfs,
    mounted in a mount namespace of the backup's own, gone when it exits.
    On the full one, the temporary file is made before the copy fails."""
    shared.note("a database of more than one page")
    target = os.path.join(_backups(tmp_path), "mnt")
    os.mkdir(target)
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; "$@"; rc=$?; '
              'echo "left: $(ls -A "$0")"; exit $rc')
    argv = shared.argv("backup", os.path.join(target, "copy.db"))
    for mount in ("size=4k", "ro"):
        r = subprocess.run(["unshare", "--mount", "sh", "-c", script, target, mount, target,
                            *argv], capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert r.returncode == 1, (mount, r.returncode, r.stdout, r.stderr)
        assert "copy.db" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stdout.rstrip("\n").endswith("left: "), (mount, r.stdout)
    shared.assert_serving()


def test_backup_usage_errors_exit_2(tmp_path):
    d = Daemon(tmp_path)
    for argv in (("backup",), ("start", "/tmp/x.db"), ("backup", "a.db", "b.db")):
        r = d.cli(*argv)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert "usage:" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert d.pid() is None and not os.path.exists(d.database)


def _damage(path, how):
    """Overwrite part of a page in the middle of a database, as a bad disk would."""
    size = os.path.getsize(path)
    page = 4096 * (size // 4096 // 2)
    assert size >= 8 * 4096, "not a multi-page database: %d bytes" % size
    if how == "truncated":  # page 1 says there is more: sqlite_master cannot be read
        os.truncate(path, page)
        return
    with open(path, "r+b") as f:
        if how == "cells":  # the page's header stays: count(*) still works
            f.seek(page + 2048)
            f.write(os.urandom(1024))
        else:
            f.seek(page)
            f.write(os.urandom(4096))
        os.fsync(f.fileno())


def test_damaged_database_is_refused_at_start(make_daemon, tmp_path):
    """Damage in a note's cells (count(*) does not see it, so notesd used to
    serve from it) and a whole page of garbage; start, run and backup refuse
    both, naming the file and pointing at the README's restore recipe."""
    d = make_daemon()
    d.stop()  # notesd made the database; fill it faster than HTTP would
    db = sqlite3.connect(d.database)
    with db:
        db.executemany("INSERT INTO notes (text, created, updated) VALUES (?, ?, ?)",
                       [("%d %s" % (i, "damage " * 60), "2024-11-28T09:00:00.000000Z",
                         "2024-11-28T09:00:00.000000Z") for i in range(100)])
    db.close()
    healthy = d.database + ".healthy"
    shutil.copy(d.database, healthy)
    backups = _backups(tmp_path)
    for how, commands in (("cells", ("start", "run", "backup")), ("page", ("start",)),
                          ("truncated", ("start",))):
        shutil.copy(healthy, d.database)
        _damage(d.database, how)
        for command in commands:
            argv = (command, os.path.join(backups, "copy.db")) if command == "backup" else \
                (command,)
            r = d.cli(*argv)
            assert r.returncode == 1, (how, command, r.stdout, r.stderr, d.log()[-2000:])
            assert "quick_check" in r.stderr and "README" in r.stderr, (how, r.stderr)
            assert command == "backup" or d.database in r.stderr, (how, r.stderr)
            assert d.pid() is None and not os.path.exists(d.urlfile)
    _only(backups)
    shutil.copy(healthy, d.database)
    d.start()
    assert d.get("/status").json()["notes"] == 100


def _indexed_then_damaged(d):
    """300 notes, indexed by d (not running), whose whole file passed its
    check; then the index's root page overwritten, as a bad disk would."""
    _old_database(d.database, ["note %d %s" % (i, "index me " * 20) for i in range(300)])
    d.start()
    wait_until(lambda: d.get("/status").json()["search"]["unindexed"] == 0, 30, d,
               "the search index to be built")
    assert d.get("/status").json()["storage"]["quick_check"] == "ok"
    d.stop()
    with contextlib.closing(sqlite3.connect(d.database)) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master"
                          " WHERE name = 'notes_search_idx'").fetchone()[0]
    with open(d.database, "r+b") as f:
        os.pwrite(f.fileno(), os.urandom(4096), (root - 1) * 4096)
        os.fsync(f.fileno())


def test_a_damaged_search_index_is_found_after_start_and_stops_writes(make_daemon):
    """The tables of notes are checked before READY; the rest of the file,
    the search index most of all (with 1M notes: 0.2 s of a 0.41-0.88 s
    check), by a thread once the daemon serves. Damage found there stops
    writes, as damage in the notes stops the start."""
    d = make_daemon(start=False)
    _indexed_then_damaged(d)
    d.start()  # its notes are sound: it serves them
    wait_until(lambda: d.get("/status").json()["storage"]["quick_check"] != "running", 10, d,
               "the quick_check of the whole file")
    storage = d.get("/status").json()["storage"]
    assert storage["quick_check"] == "damaged" and not storage["ok"], storage
    status, message = _health(d)
    assert status == 503 and "quick_check" in message and "README" in message, message
    assert d.get("/1/").json()["text"].startswith("note 0 ")
    r = d.post("not now")
    assert r.status == 503 and "damaged" in r.json()["message"], r
    r = d.cli("check")
    assert r.returncode == 2 and "damaged" in r.stdout, r.stdout
    assert "damaged" in d.log()
    # a search that reads the damaged pages: its error does not hide why
    # writes are refused (it did: "storage error in list", attack review)
    assert d.get("/?q=index").status == 503
    status, message = _health(d)
    assert status == 503 and "quick_check" in message, message


def _slow_check(tmp_path, rows):
    """A notesd.py whose quick_check of the whole file first counts `rows`
    rows on the checker connection (10M: 2 s here): a verdict that is late."""
    return _hooked_copy(tmp_path, "problems = damage(self.checker)",
                        'self.checker.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL '
                        'SELECT x + 1 FROM c LIMIT %d) SELECT count(*) FROM c").fetchone()' % rows)


def test_writes_wait_for_the_verdict_of_the_whole_file(make_daemon, tmp_path):
    """A free page that is also a page of notes passes the table checks
    before READY. A write let through before the whole file's verdict was
    given that page and overwrote notes with it (attack review: 14 notes
    lost after a 201). Writes wait for the verdict, and get 503."""
    d = make_daemon(start=False)
    d.script = _slow_check(tmp_path, 10_000_000)
    d.start()
    d.stop()
    with contextlib.closing(sqlite3.connect(d.database)) as db:
        db.executemany("INSERT INTO notes (text, created, updated) VALUES (?, ?, ?)",
                       [("note %d %s" % (i, "x" * 2000), "2026-01-01T00:00:00Z",
                         "2026-01-01T00:00:00Z") for i in range(300)])
        db.commit()
    texts = _free_page_is_the_notes_root(d.database)
    d.start()
    assert d.get("/status").json()["storage"]["quick_check"] == "running"
    r = d.post("y" * 200_000)  # pages from the free list
    assert r.status == 503 and "damaged" in r.json()["message"], r
    assert d.get("/status").json()["storage"]["quick_check"] == "damaged"
    d.stop()
    with contextlib.closing(sqlite3.connect(d.database)) as db:
        assert db.execute("SELECT id, text FROM notes").fetchall() == texts


def _free_page_is_the_notes_root(path):
    """Damage as a bad disk might: the first page the free list gives out is
    the notes table's root. Notes: the ids and texts, as they were."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("DELETE FROM notes WHERE id % 2 = 0")  # free pages
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'notes'").fetchone()[0]
        texts = db.execute("SELECT id, text FROM notes").fetchall()
    with open(path, "r+b") as f:
        trunk = struct.unpack(">I", os.pread(f.fileno(), 4, 32))[0]
        assert trunk and os.pread(f.fileno(), 4, (trunk - 1) * 4096 + 4) != bytes(4)
        os.pwrite(f.fileno(), struct.pack(">I", root), (trunk - 1) * 4096 + 8)
        os.fsync(f.fileno())
    return texts


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_database_to_migrate_is_checked_whole_before_ready(make_daemon):
    """A migration writes before READY: with the free list damaged as above,
    migration 2 built the index's table on the notes' root page, and 148 of
    150 notes were gone (attack review). Such a start checks the whole file
    first, and refuses it."""
    d = make_daemon(start=False)
    _old_database(d.database, ["note %d %s" % (i, "x" * 2000) for i in range(300)])
    texts = _free_page_is_the_notes_root(d.database)
    r = d.cli("start")
    assert r.returncode == 1 and "quick_check" in r.stderr, (r.stderr, d.log()[-2000:])
    with contextlib.closing(sqlite3.connect(d.database)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("SELECT id, text FROM notes").fetchall() == texts


def test_a_write_that_arrives_during_a_stop_gets_no_unchecked_write(make_daemon, tmp_path):
    """A stop wakes the writers waiting for the whole file's verdict: one
    whose body ended after the stop began ran without any verdict, 201
    (attack review). It gets 503."""
    d = make_daemon(start=False)
    d.script = _slow_check(tmp_path, 10**12)
    d.start()  # a new database: migrated, so checked whole before READY
    d.stop()
    d.start()
    body = json.dumps({"text": "after the stop began"}).encode()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stopping = pool.submit(d.stop)
            # the listener closes just before the drain wakes the waiting writers
            wait_until(lambda: _refused(d.port), 5, d, "the stop to close the listener")
            s.sendall(body[5:])
            reply = s.recv(65536)
            stopping.result()
    assert reply.startswith(b"HTTP/1.1 503"), reply
    with contextlib.closing(sqlite3.connect(d.database)) as db:
        assert db.execute("SELECT count(*) FROM notes").fetchone()[0] == 0


def test_no_storage_probe_writes_before_the_verdict(make_daemon, tmp_path):
    """After a storage error, the storage probe writes (user_version, as
    it is) to learn when writes work again: before the whole file's verdict
    it wrote to a damaged file, and said "storage works again" (attack
    review). It waits for the verdict."""
    d = make_daemon(start=False)
    _indexed_then_damaged(d)
    d.script = _slow_check(tmp_path, 10**12)
    d.start()
    assert d.get("/?q=index").status == 503
    recovered, _ = poll_until(lambda: "storage works again" in d.log(), 2.5)  # two ticks
    assert not recovered, d.log()[-2000:]
    assert _health(d)[0] == 503


def test_a_stop_during_the_check_of_the_whole_file_leaves_no_wal(make_daemon, tmp_path):
    """The checker connection closed after the main one: SQLite checkpoints
    and removes the WAL only at the last close, so the -wal stayed, holding
    every write of the run (attack review)."""
    d = make_daemon(start=False)
    d.script = _slow_check(tmp_path, 10**12)
    d.start()  # a new database: migrated, so checked whole before READY
    assert d.get("/status").json()["storage"]["quick_check"] == "ok"
    d.stop()
    d.start()
    assert d.get("/status").json()["storage"]["quick_check"] == "running"
    d.stop()
    assert not os.path.exists(d.database + "-wal")
    assert "quick_check of %s did not finish: interrupted" % d.database in d.log()


def _readme_block(heading, fence):
    """The first ``` block (opened by `fence`) after the `heading` line."""
    text = _readme().split("\n" + heading + "\n", 1)[1]
    return re.search(r"^" + re.escape(fence) + r"\n(.*?)^```", text, re.M | re.S).group(1)


def _readme_sub(text, old, new):
    """text with the README's example value `old` made the test's `new`: once."""
    assert text.count(old) == 1, (old, text)
    return text.replace(old, new)


def test_readme_cron_line_and_restore_recipe(make_daemon, open_tmp, tmp_path):
    """Exactly what README.md says: the cron line takes a backup; notes come
    after it; the daemon is killed (so the old database's -wal is there);
    the restore recipe, run as it stands, brings back the backup's notes."""
    state = os.path.join(open_tmp, "state")
    user = ("--user", "nobody") if IS_ROOT else ()
    d = make_daemon(*user, "--state-dir", state, directory=open_tmp)
    kept = {d.note("kept %d" % i)["id"]: "kept %d" % i for i in range(20)}
    notesd = " ".join(shlex.quote(a) for a in d.argv())
    backups = _backups(tmp_path)

    cron = [line for line in _readme_block("## Backups", "```").splitlines()
            if re.match(r"(\S+ ){5}", line)]
    assert len(cron) == 1, cron
    command = cron[0].split(" ", 5)[5].replace("\\%", "%")  # as cron runs it, with sh
    command = _readme_sub(command, "python3 /opt/notesd/notesd.py -c /etc/notesd.conf", notesd)
    command = _readme_sub(command, "/var/backups/notesd", backups)
    r = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                       timeout=CLI_TIMEOUT)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (command, r.stdout, r.stderr)
    (name,) = os.listdir(backups)
    assert re.fullmatch(r"notes-\d{4}-\d\d-\d\d\.db", name), name

    lost = [d.note("after the backup %d" % i)["id"] for i in range(5)]
    pid = d.pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 5, d, "the killed daemon gone")
    database = os.path.join(state, "notes.db")
    assert os.path.getsize(database + "-wal") > 0

    recipe = _readme_block("### Restore", "```sh")
    recipe = _readme_sub(recipe, '"python3 /opt/notesd/notesd.py -c /etc/notesd.conf"',
                         shlex.quote(notesd))
    recipe = _readme_sub(recipe, "/var/backups/notesd/notes-2024-11-28.db",
                         os.path.join(backups, name))
    recipe = _readme_sub(recipe, "cd /var/lib/notesd ", "cd %s " % shlex.quote(state))
    recipe = _readme_sub(recipe, "chown notesd: ", "chown nobody: " if IS_ROOT else ": ")
    r = subprocess.run(["sh", "-e", "-c", recipe], capture_output=True, text=True,
                       timeout=CLI_TIMEOUT)
    assert r.returncode == 0, (recipe, r.stdout, r.stderr)
    d.after_start()
    assert d.get("/status").json()["notes"] == len(kept)
    for nid, text in kept.items():
        assert d.get("/%d/" % nid).json()["text"] == text
    for nid in lost:
        assert d.get("/%d/" % nid).status == 404
    st = os.stat(database)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == (pwd.getpwnam("nobody").pw_uid if IS_ROOT else os.getuid())
    assert _notes_in(os.path.join(backups, name)) == kept  # the backup stays as it was



def test_stale_url_file_never_gets_the_token(make_daemon):
    """A daemon killed before it removed its URL file leaves the port it
    named to anybody; while the next daemon starts, check must not send
    the token there."""
    d = make_daemon("--token", "stale-secret")
    old_port = d.port
    os.kill(d.pid(), signal.SIGKILL)
    wait_until(lambda: not alive(d.pid()), 5, d, "the daemon to die")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wait_until(lambda: listener.bind(("127.0.0.1", old_port)) or True, 5, d, "the old port")
    listener.listen(5)
    listener.setblocking(False)
    for name in glob.glob(d.database + "*"):
        os.unlink(name)
    _old_database(d.database, ["an older schema"])  # the next start must write
    blocker = sqlite3.connect(d.database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # so it waits on the database, pid file written
    start = subprocess.Popen(d.argv("start"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: d.cli("status").returncode == 0, 10, d, "the new daemon's pid")
        r = d.cli("check")
        assert r.returncode != 0, r.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        start.communicate(timeout=CLI_TIMEOUT)
        listener.close()
    d.after_start()
    assert d.cli("check").returncode == 0


###############################################################################
# Framing, bodies and logs under hostile clients (issue 9) ####################
###############################################################################
# Where a request's body ends decides where the next request starts: when a
# proxy and notesd could read the framing differently, a request can be
# smuggled past the proxy (RFC 9112 6.3, 11.2). These tests send raw bytes:
# every ambiguity is refused and the connection closed; chunked bodies are
# read under max_body; bodies in flight are bounded; no control byte from a
# client reaches the log.


def _head(method, path, *fields, version="HTTP/1.1"):
    """A request head with a Host field and `fields`, ready for a body."""
    return ("%s %s %s\r\nHost: localhost\r\n%s\r\n"
            % (method, path, version, "".join(f + "\r\n" for f in fields))).encode("latin-1")


def chunked(*pieces, trailer=b""):
    """`pieces` as a chunked body (RFC 9112 7.1): a chunk each, the last chunk, `trailer`."""
    return (b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            + b"0\r\n" + trailer + b"\r\n")


def _note_body(text, kind):
    """(Content-Type, body) of a note as JSON, a form or multipart."""
    if kind == "json":
        return "application/json", json.dumps({"text": text}).encode()
    if kind == "form":
        return ("application/x-www-form-urlencoded",
                urllib.parse.urlencode({"text": text}).encode())
    return ("multipart/form-data; boundary=b0undary",
            ('--b0undary\r\nContent-Disposition: form-data; name="text"\r\n\r\n%s\r\n'
             "--b0undary--\r\n" % text).encode())


def _absent(d, marker):
    """No note holds marker: nothing that carried it ran."""
    r = d.get("/?q=" + urllib.parse.quote(marker))
    return r.status == 200 and r.json() == []


def _status_line(sock):
    """The first line of the server's reply, read byte by byte (nothing more
    is consumed: the caller may still read the rest)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        assert byte, "connection closed before a status line: %r" % line
        line += byte
    return line


@pytest.mark.parametrize("target, fields, expected", [
    ("/health", 30, 200),                  # 30 fields of 1000 bytes: within 32 KiB
    ("/health", 40, 431),                  # 40 KB: each line, and the count, were fine before
    ("/health?" + "a" * 20000, 14, 431),   # the request line counts too
    ("/health?" + "a" * 40000, 0, 414),    # a request line alone over the bound
], ids=["30k", "40k", "request-line-counts", "request-line-alone"])
def test_header_section_is_bounded(shared, target, fields, expected):
    """A stalled header section held up to 100 lines of 64 KiB (issue 9 item 6)."""
    head = _head("GET", target, *("X-H%d: %s" % (i, "v" * 990) for i in range(fields)))
    status, headers, body, closed = exchange(shared.port, head, closes=expected != 200)
    if expected == 200:
        assert status == 200, (status, body)
    else:
        assert_json_error(status, headers, body, expected)
        assert closed
    shared.assert_serving()


@pytest.mark.parametrize("data", [
    _head("POST", "/", "Content-Type: application/json", "Transfer-Encoding: identity",
          "Content-Length: 19") + b'{"text": "te+cl-1"}',
    _head("POST", "/", "Content-Type: application/json", "Transfer-Encoding: chunked",
          "Content-Length: 19") + chunked(b'{"text": "te+cl-2"}'),
    _head("GET", "/health", "Content-Length: 0", "Content-Length: 5") + b"hello",
    _head("POST", "/", "Content-Type: application/json", "Transfer-Encoding: chunked",
          version="HTTP/1.0") + chunked(b'{"text": "te-1.0"}'),
    _head("GET", "/health", "X-A: a\rb"),
    _head("GET", "/health", "X-A: a\x00b"),
    _head("GET", "/health", "X-A: a\x1b[31mb"),
    _head("GET", "/health", "X-A\x00: b"),
    b"GET\x0b/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /health\x0cHTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET\xa0/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET\t/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET  /health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /health HTTP/1.1\r\r\nHost: localhost\r\n\r\n",
    b"GET /he\x01alth HTTP/1.1\r\nHost: localhost\r\n\r\n",
], ids=["te-identity+cl", "te-chunked+cl", "differing-cl", "te-in-http-1.0", "cr-in-value",
        "nul-in-value", "esc-in-value", "nul-in-name", "vt-separator", "ff-separator",
        "nbsp-separator", "tab-separator", "two-spaces", "bare-cr-ending", "ctl-in-target"])
def test_ambiguous_framing_and_control_characters_are_400_and_close(shared, data):
    """RFC 9112 3, 5, 6.1, 6.3: what two parsers could read differently is
    refused, and the connection closed (issue 9 item 8)."""
    status, headers, body, closed = exchange(shared.port, data, closes=True)
    assert_json_error(status, headers, body, 400)
    assert headers.get("connection", "").lower() == "close", headers
    assert closed, "the connection stayed open after a 400"
    for marker in ("te+cl-1", "te+cl-2", "te-1.0"):
        assert _absent(shared, marker), marker
    shared.assert_serving()


@pytest.mark.parametrize("kind", ["json", "form", "multipart"])
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_chunked_bodies_are_read(shared, method, kind):
    """Every body-taking request accepts chunked, with extensions and trailer
    fields, and the connection stays in step (issue 9 item 9)."""
    path = "/" if method == "POST" else "/%d/" % shared.note("before")["id"]
    text = unique("chunked")
    content_type, body = _note_body(text, kind)
    a, b, c = body[:5], body[5:-3], body[-3:]
    encoded = (b"%x;name=value\r\n%s\r\n" % (len(a), a)
               + b'%X ; q="a \\" b" ;x\r\n%s\r\n' % (len(b), b)
               + b"%x\r\n%s\r\n" % (len(c), c)
               + b"0\r\nX-Checksum: whatever\r\nX-Other: too\r\n\r\n")
    data = _head(method, path, "Content-Type: " + content_type,
                 "Transfer-Encoding: chunked") + encoded
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
        with s.makefile("rb") as f:
            s.sendall(data)
            status, headers, reply = read_reply(f)
            assert status == (201 if method == "POST" else 200), (status, reply)
            assert json.loads(reply)["text"] == text
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")  # still in step
            assert read_reply(f)[0] == 200


def test_chunked_config_patch(shared):
    data = (_head("PATCH", "/config", "Content-Type: application/json",
                  "Transfer-Encoding: chunked") + chunked(b'{"log_level":', b' "info"}'))
    status, headers, body, _ = exchange(shared.port, data)
    assert status == 200, (status, body)
    assert json.loads(body)["log_level"] == "info"


@pytest.mark.parametrize("coding, expected", [
    ("CHUNKED", 201), ("gzip, chunked", 501), ("gzip", 400), ("identity", 400),
    ("chunked, chunked", 400), ("chunked;x=1", 400)])
def test_transfer_codings(shared, coding, expected):
    """Only chunked (RFC 9112 6.1: 501 for a coding not understood; 6.3: 400
    when chunked is not the final coding, as the length is then unknown)."""
    text = unique("coding")
    data = (_head("POST", "/", "Content-Type: application/json", "Transfer-Encoding: " + coding)
            + chunked(json.dumps({"text": text}).encode()))
    status, headers, body, closed = exchange(shared.port, data, closes=expected != 201)
    if expected == 201:
        assert status == 201, (status, body)
        return
    assert_json_error(status, headers, body, expected)
    assert closed
    assert _absent(shared, text)


def test_chunked_body_over_max_body_is_413_from_the_size_line(shared):
    """max_body holds whatever the framing; a chunk that would pass it is
    refused at its size line, before its data (one huge chunk, or the sum)."""
    limit = 1048576  # the default max_body
    for chunks in (b"%x\r\n" % (limit + 1),
                   b"%x\r\n%s\r\n%x\r\n" % (limit // 2, b" " * (limit // 2), limit // 2 + 1)):
        data = _head("POST", "/", "Content-Type: application/json",
                     "Transfer-Encoding: chunked") + chunks
        status, headers, body, closed = exchange(shared.port, data, closes=True)
        assert_json_error(status, headers, body, 413)
        assert closed


BODY = b'{"text": "malformed-chunks"}'


@pytest.mark.parametrize("chunks", [
    b"g\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"-1c\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"0x1c\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"+1c\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"0000000000000001c\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"1" + b"0" * 16 + b"\r\n" + BODY + b"\r\n0\r\n\r\n",
    b" 1c\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"1c \r\n" + BODY + b"\r\n0\r\n\r\n",
    b"1c\n" + BODY + b"\r\n0\r\n\r\n",
    b"1c\r\n" + BODY + b"XX\r\n0\r\n\r\n",
    b"1c\r\n" + BODY + b"\n0\r\n\r\n",
    b"1c;\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"1c;=v\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"1c;a=\r\n" + BODY + b"\r\n0\r\n\r\n",
    b'1c;a="open\r\n' + BODY + b"\r\n0\r\n\r\n",
    b"1c;a=b c\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"1c;a\x00\r\n" + BODY + b"\r\n0\r\n\r\n",
    b"1c\r\n" + BODY + b"\r\n0\r\nBad Trailer: x\r\n\r\n",
    b"1c\r\n" + BODY + b"\r\n0\r\nX-T: a\x00b\r\n\r\n",
    b"1c\r\n" + BODY + b"\r\n0\r\nX-T: a\r\n folded\r\n\r\n",
    b"1c\r\n" + BODY + b"\r\n0\r\nno colon\r\n\r\n",
], ids=["not-hex", "negative", "0x", "plus", "empty-size", "17-digits", "overflow",
        "space-before", "space-after", "bare-lf-size", "data-too-long", "bare-lf-data",
        "ext-no-name", "ext-empty-name", "ext-empty-value", "ext-open-quote", "ext-space",
        "ext-nul", "trailer-space-in-name", "trailer-nul", "trailer-fold", "trailer-no-colon"])
def test_malformed_chunked_body_is_400_and_closes(shared, chunks):
    data = _head("POST", "/", "Content-Type: application/json",
                 "Transfer-Encoding: chunked") + chunks
    status, headers, body, closed = exchange(shared.port, data, closes=True)
    assert_json_error(status, headers, body, 400)
    assert closed
    assert _absent(shared, "malformed-chunks")
    shared.assert_serving()


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.parametrize("how", ["upload-stdin", "data-binary-chunked", "form-chunked"])
def test_streaming_clients_with_curl(shared, how):
    """curl -T - (and any client that does not know the length) sends chunked."""
    text = unique("stream")
    url, stdin = shared.url, ("text=" + text).encode()
    if how == "upload-stdin":
        url, stdin = url + "%d" % shared.note("to replace")["id"], json.dumps({"text": text})
        args = ["-T", "-"]
    elif how == "data-binary-chunked":
        args = ["-H", "Transfer-Encoding: chunked", "--data-binary", "@-"]
    else:
        stdin = text.encode()
        args = ["-H", "Transfer-Encoding: chunked", "-F", "text=<-"]
    r = subprocess.run(["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", *args, url],
                       input=stdin if isinstance(stdin, bytes) else stdin.encode(),
                       capture_output=True, timeout=CLI_TIMEOUT)
    body, _, code = r.stdout.decode().rpartition("\n")
    assert code in ("200", "201"), (code, body, r.stderr)
    assert json.loads(body)["text"] == text


@pytest.mark.parametrize("cut", [
    b"Content-Length: 40\r\n\r\n" + BODY,
    b"Transfer-Encoding: chunked\r\n\r\n1c\r\n" + BODY[:-1],
    b"Transfer-Encoding: chunked\r\n\r\n1c\r\n" + BODY + b"\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n1c\r\n" + BODY + b"\r\n0\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n1c\r\n" + BODY + b"\r\n0\r\nX-T: v\r\n",
], ids=["content-length", "mid-chunk", "no-last-chunk", "no-empty-line", "mid-trailer"])
def test_body_cut_short_is_never_executed(shared, cut):
    """Issue 9 item 1's rule for bodies: a body shorter than its framing says
    (the client closed its side) never runs, whatever the framing."""
    reply = half_closed_exchange(
        shared.port, b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" + cut)
    assert not reply.startswith(b"HTTP/1.1 2"), reply
    assert _absent(shared, "malformed-chunks")


@pytest.mark.parametrize("method, path, expected", [
    ("GET", "/health", 200), ("HEAD", "/health", 200), ("OPTIONS", "/", 204),
    ("DELETE", "/%d/", 204)])
def test_expect_100_continue_without_a_body_is_served(shared, method, path, expected):
    """A request without content needs no 100 (RFC 9110 10.1.1): it is
    simply served, not refused with 411 (issue 9 item 11)."""
    if "%d" in path:
        path %= shared.note("expect")["id"]
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
        s.sendall(_head(method, path, "Expect: 100-continue"))
        line = _status_line(s)
    assert line.startswith(b"HTTP/1.1 %d " % expected), line


def test_expect_100_continue_with_a_chunked_body(shared):
    text = unique("expect")
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
        s.sendall(_head("POST", "/", "Content-Type: application/json",
                        "Transfer-Encoding: chunked", "Expect: 100-continue"))
        assert _status_line(s).startswith(b"HTTP/1.1 100 "), "no 100 Continue"
        assert _status_line(s) == b"\r\n"
        s.sendall(chunked(json.dumps({"text": text}).encode()))
        with s.makefile("rb") as f:
            status, headers, body = read_reply(f)
    assert status == 201 and json.loads(body)["text"] == text, (status, body)


CONTROLS_IN_LOG = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_control_characters_never_reach_the_log(shared):
    """A client's ESC must not reach a sysadmin's `tail -f` (issue 9 item 10)."""
    marker = unique("esc").encode()
    for target in (b"/%s\x1b[2J\x1b]0;owned\x07" % marker, b"/%s\x9b31m" % marker,
                   b"/%s\x7f" % marker):
        exchange(shared.port, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")

    def logged():
        lines = [line for line in shared.log().split("\n") if marker.decode() in line]
        return lines if len(lines) >= 3 else None

    lines = wait_until(logged, daemon=shared, what="three access log lines")
    assert "\\x1b[2J" in lines[0], lines
    found = CONTROLS_IN_LOG.findall(shared.log())
    assert not found, "control characters in the log: %r" % found


@pytest.mark.parametrize("kind", ["form", "multipart"])
def test_form_with_too_many_fields_is_400(shared, kind):
    """A 1 MiB form of tiny fields cost half a million pairs in memory, or
    seconds of CPU in the MIME parser: at most 100 fields."""
    text = unique("fields")
    if kind == "form":
        content_type, body = "application/x-www-form-urlencoded", ("a=&" * 100 + "text=" + text)
    else:
        part = '--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n'
        content_type = "multipart/form-data; boundary=b"
        body = (part * 100 + '--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n'
                + text + "\r\n--b--\r\n")
    r = shared.request("POST", "/", body, {"Content-Type": content_type})
    assert_error(r, 400)
    assert _absent(shared, text)
    content_type, body = _note_body(text, kind)  # one field is fine
    assert shared.request("POST", "/", body, {"Content-Type": content_type}).status == 201


def _fixed_json(length, marker="budget"):
    """A JSON note body of exactly `length` bytes."""
    body = json.dumps({"text": marker + "x" * (length - 12 - len(marker))}).encode()
    assert len(body) == length
    return body


def test_bodies_in_flight_are_bounded(make_daemon):
    """Request bodies held at once are bounded across connections: above
    the bound, 503 with Retry-After, before the body is read (issue 9 item 5)."""
    d = make_daemon("--max-body", "1000", "--max-body-total", "1500")
    body = _fixed_json(1000)
    head = _head("POST", "/", "Content-Type: application/json", "Content-Length: 1000")
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as holder:
        holder.sendall(head[:-2] + b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        assert _status_line(holder).startswith(b"HTTP/1.1 100 ")  # its 1000 bytes are held
        assert _status_line(holder) == b"\r\n"
        # refused from its headers alone, body not sent: the 503 comes at once
        status, headers, reply, closed = exchange(d.port, head, closes=True)
        assert_json_error(status, headers, reply, 503)
        assert int(headers["retry-after"]) > 0 and closed
        # refused instead of a 100 Continue
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
            s.sendall(head[:-2] + b"Expect: 100-continue\r\n\r\n")
            assert _status_line(s).startswith(b"HTTP/1.1 503 ")
        holder.sendall(body)
        with holder.makefile("rb") as f:
            assert read_reply(f)[0] == 201
        assert closed_by_server(holder)  # the request is over
    assert exchange(d.port, head + body)[0] == 201  # released


def test_bodies_in_flight_are_released_on_every_path(make_daemon):
    """Every way a request can end gives its reservation back: a leak of
    1000 bytes would leave too little of the 1500 for the last POST."""
    d = make_daemon("--max-body", "1000", "--max-body-total", "1500", "--timeout", "0.5")
    body = _fixed_json(1000)

    def head(method="POST", path="/", *fields):
        return _head(method, path, "Content-Type: application/json", "Content-Length: 1000",
                     "Connection: close", *fields)

    endings = {
        "created": head() + body,
        "malformed-json": head() + b"{" * 1000,
        "wrong-type": head("POST", "/", "Content-Type: text/plain") + body,
        "wrong-method": head("POST", "/health", "Expect: 100-continue") + body,
        "unknown-method": head("FROB", "/", "Expect: 100-continue") + body,
        "stalled": head() + body[:10],
        "chunked-413": _head("POST", "/", "Transfer-Encoding: chunked",
                             "Connection: close") + b"3e9\r\n",
        "chunked-400": _head("POST", "/", "Transfer-Encoding: chunked",
                             "Connection: close") + b"zz\r\n",
    }
    for name, data in endings.items():
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
            s.sendall(data)
            with s.makefile("rb") as f:
                status = 100
                while status == 100:  # past a 100 Continue to the final reply
                    status, headers, reply = read_reply(f)
            assert closed_by_server(s), name
        assert status != 503, (name, reply)
        status, headers, reply, closed = exchange(d.port, head() + body, closes=True)
        assert status == 201 and closed, "leaked after %s: %r" % (name, reply)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:  # aborted body
        s.sendall(head() + body[:10])
        s.shutdown(socket.SHUT_WR)
        assert closed_by_server(s)
    assert exchange(d.port, head() + body)[0] == 201, "leaked after an aborted body"


###############################################################################
# Connections, threads and file descriptors ###################################
###############################################################################
# Issue 9, items 2 and 3: a connection cap (max_connections) with a fast 503
# above it, idle and slow-headed connections reclaimed first, the soft
# open-file limit raised at start, no spinning on EMFILE, and one deadline
# for a whole request. Small numbers here; the big ones are bench/hostile.py.

#: the daemon's threads besides the connections': main, http (accept), signals
BASE_THREADS = 3
#: notesd.SLOW_HEAD: after this, a stalled head or body may be closed for room.
SLOW_HEAD = 1.0
#: a request whose head is in and whose body is not: a connection the cap
#: reclaims only once its body has stalled for SLOW_HEAD
BODY_STARTED = (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{")
#: a request head that never ends
HEAD_STARTED = b"GET /health HTTP/1.1\r\nHost: localhost\r\n"


def _connections(port, n, data=b""):
    """n connections to the daemon, each having sent data (maybe nothing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
            socks.append(s)
            if data:
                s.sendall(data)
    except BaseException:
        _close_all(socks)
        raise
    return socks


def _close_all(socks):
    for s in socks:
        s.close()


def _closed_by_daemon(sock):
    """True once the daemon has closed sock; whatever it answered first is
    read and dropped. Never blocks (it leaves sock non-blocking)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _threads(pid):
    return int(proc_status(pid)["Threads"])


def _cpu_seconds(pid):
    """User and system CPU time of a process so far (/proc/PID/stat, proc(5))."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _open_file_limits(pid):
    """(soft, hard) RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line in /proc/%d/limits" % pid)


def _fd_limit(soft, hard):
    """preexec_fn for the starting CLI: the open-file limits its daemon inherits."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_above_max_connections_a_new_connection_gets_503_at_once(make_daemon):
    d = make_daemon("--max-connections", "20", "--timeout", "3")
    held_at = time.monotonic()
    held = _connections(d.port, 20, BODY_STARTED)
    try:
        t0 = time.monotonic()
        status, headers, body, closed = exchange(
            d.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", closes=True)
        elapsed = time.monotonic() - t0
        assert_json_error(status, headers, body, 503)
        assert "max_connections" in json.loads(body)["message"], body
        assert headers.get("connection", "").lower() == "close", headers
        assert headers.get("retry-after"), headers
        assert closed, "the daemon kept a connection open above its cap"
        assert elapsed < 1, "the 503 took %.2fs" % elapsed
        more = _connections(d.port, 10, b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
                                        b"Connection: close\r\n\r\n")
        try:
            wait_until(lambda: all(_closed_by_daemon(s) for s in more), daemon=d,
                       what="the connections above the cap refused and closed")
        finally:
            _close_all(more)
        if time.monotonic() - held_at < SLOW_HEAD:  # later, stalled bodies may go for room
            assert _threads(d.pid()) <= 20 + BASE_THREADS
    finally:
        _close_all(held)
    wait_until(lambda: d.get("/health").status == 200, daemon=d,
               what="/health answering once the held connections are gone")
    d.assert_serving()


def test_a_request_that_has_arrived_is_never_closed_for_room(make_daemon):
    # A connection whose request has arrived is not idle, even in the moment
    # its thread has taken the bytes from the socket and waits for the GIL
    # to say so. CI saw the cap's 503 become a 200 once (an eviction); on
    # the code before the fix about one flood in twenty did it, so sixty
    # floods catch it nearly always.
    d = make_daemon("--max-connections", "20", "--timeout", "3")
    late = 0
    for flood in range(60):
        t0 = time.monotonic()
        held = _connections(d.port, 20, BODY_STARTED)
        try:
            status, _, body, _ = exchange(
                d.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", closes=True)
            if status != 503 and time.monotonic() - t0 >= SLOW_HEAD:
                late += 1  # a loaded machine: a body stalled SLOW_HEAD may go, rightly
            else:
                assert status == 503, (flood, status, body)
        finally:
            _close_all(held)
        wait_until(lambda: _threads(d.pid()) <= BASE_THREADS, daemon=d,
                   what="the held connections' threads ended")
    assert late < 30, "the machine was too slow to hold the connections for the test"
    d.assert_serving()


def test_at_the_cap_a_body_stalled_past_slow_head_is_closed_for_a_new_client(make_daemon):
    # RUDY, slowloris's cousin: a complete head, then a body byte and nothing
    # more. Past its head a request was never closed for room: 520 of them
    # held every slot for `timeout`, /health included (attack review).
    d = make_daemon("--max-connections", "4", "--timeout", "60")
    stalled = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" \
              b"Content-Length: 100\r\n\r\n{"
    held = _connections(d.port, 4, stalled)
    try:
        def probe():
            status, _, _, _ = exchange(
                d.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", closes=True)
            return status == 200
        wait_until(probe, 10, d, "/health served while stalled bodies hold every slot")
        # The one stalled longest goes, by when its thread saw the body begin:
        # not always held[0] on a loaded machine (CI, Debian 3.11).
        readable, _, _ = select.select(held, [], [], HTTP_TIMEOUT)
        assert readable, "no stalled connection was closed for the probe"
        with readable[0].makefile("rb") as f:
            status, _, body = read_reply(f)
        assert status == 408, (status, body)
    finally:
        _close_all(held)
    d.assert_serving()


def test_at_the_cap_the_longest_idle_connection_is_closed_first(make_daemon):
    d = make_daemon("--max-connections", "20")
    kept_alive = _connections(d.port, 10)
    fresh = []
    try:
        for s in kept_alive:  # one request each, then idle on a kept-alive connection
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            with s.makefile("rb") as f:
                assert read_reply(f)[0] == 200
        fresh = _connections(d.port, 10)  # idle from the start, and since later
        r = d.get("/health", timeout=2)
        assert r.status == 200, r
        # nginx's order: a connection idle the longest goes first (RFC 9112 9.5
        # lets a server close an idle connection at any time)
        wait_until(lambda: any(_closed_by_daemon(s) for s in kept_alive), daemon=d,
                   what="a kept-alive idle connection closed to make room")
        assert sum(_closed_by_daemon(s) for s in kept_alive + fresh) == 1
    finally:
        _close_all(kept_alive + fresh)
    d.assert_serving()


def test_at_the_cap_a_request_head_slower_than_a_second_makes_room(make_daemon):
    d = make_daemon("--max-connections", "20", "--timeout", "8")
    slow = _connections(d.port, 20, HEAD_STARTED)
    try:
        wait_until(lambda: d.get("/health", timeout=2).status == 200, daemon=d,
                   what="a new client served once the slow heads are a second old")
        closed = wait_until(lambda: select.select(slow, [], [], 0)[0], daemon=d,
                            what="a slow head closed to make room")
        with closed[0].makefile("rb") as f:
            status, headers, body = read_reply(f)
        assert_json_error(status, headers, body, 408)
    finally:
        _close_all(slow)
    d.assert_serving()


def _dribble(sock, data, stop, every=0.1):
    """Send data one byte every `every` seconds until done, stopped or refused."""
    for i in range(len(data)):
        try:
            sock.send(data[i:i + 1])
        except OSError:
            return
        if stop.wait(every):
            return


@pytest.mark.parametrize("head, dribbled", [
    (b"", HEAD_STARTED + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"),
    (BODY_STARTED[:-1], b'{"text": "' + b"a" * 200 + b'"}'),
], ids=["header-section", "body"])
def test_a_dribbled_request_gets_408_after_timeout_in_total(make_daemon, head, dribbled):
    d = make_daemon("--timeout", "0.5")
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        if head:
            s.sendall(head)
        t0 = time.monotonic()
        dribbler = threading.Thread(target=_dribble, args=(s, dribbled, stop))
        dribbler.start()
        try:
            with s.makefile("rb") as f:
                status, headers, body = read_reply(f)
            elapsed = time.monotonic() - t0
        finally:
            stop.set()
            dribbler.join()
    assert_json_error(status, headers, body, 408)
    assert headers.get("connection", "").lower() == "close", headers
    assert 0.4 < elapsed < 2, "408 after %.2fs, with timeout = 0.5" % elapsed
    d.assert_serving()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(make_daemon):
    d = make_daemon(preexec_fn=_fd_limit(256, 4096))
    assert _open_file_limits(d.pid()) == (4096, 4096)


def test_out_of_file_descriptors_the_daemon_neither_spins_nor_stops_serving(make_daemon):
    # 64 descriptors: the daemon's own dozen leave room for about 50 clients;
    # 80 would make accept() fail with EMFILE (socketserver then retried at
    # once, at 97% CPU, and a new client waited for a timeout to free one).
    d = make_daemon("--timeout", "1", preexec_fn=_fd_limit(64, 64))
    pid = d.pid()
    cpu, t0 = _cpu_seconds(pid), time.monotonic()
    held = _connections(d.port, 80)
    try:
        r = d.get("/health", timeout=1)
        assert r.status == 200, r
        wait_until(lambda: all(_closed_by_daemon(s) for s in held), timeout=10, daemon=d,
                   what="every connection refused or timed out")
        used, wall = _cpu_seconds(pid) - cpu, time.monotonic() - t0
        assert used < 0.5 * wall, "the daemon used %.2fs of CPU in %.2fs" % (used, wall)
    finally:
        _close_all(held)
    d.assert_serving()


###############################################################################
# The web face (issue 11) #####################################################
###############################################################################
# What a browser, the seed's Flask-API clients and an OpenAPI fuzzer
# (schemathesis) found: signing in with the token, framing, forms that work
# without script, an OpenAPI document exact enough for generated clients, and
# the seed's form and URL habits. Browser items are checked in the HTML and
# headers notesd sends.

#: notesd.MAX_ID: the largest note id.
MAX_ID = 2**53 - 1
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def _origin(d):
    return "http://127.0.0.1:%d" % d.port


def _form_post(d, path, fields, headers=None, origin=True):
    """A browser's form post: urlencoded, Accept text/html, Origin of the page."""
    h = dict(HTML, **{"Content-Type": "application/x-www-form-urlencoded"})
    if origin:
        h["Origin"] = _origin(d)
    h.update(headers or {})
    return d.request("POST", path, urllib.parse.urlencode(fields), h)


def _page(d, path, headers=None):
    r = d.get(path, headers=dict(HTML, **(headers or {})))
    assert r.header("Content-Type", "").startswith("text/html"), r
    return r, r.body.decode()


def _basic(password, user="anyone"):
    import base64
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def test_a_browser_signs_in_with_the_token_as_basic_password(make_daemon):
    """Item 1: a browser gets a Basic challenge, so it asks once and then sends
    the token with every load; API clients keep Bearer. The token never
    reaches the log, however it was sent."""
    token = "t0ken-" + os.urandom(6).hex()
    d = make_daemon("--token", token, "--log-level", "debug")
    note = d.request("POST", "/", {"text": "signed"}, {"Authorization": "Bearer " + token}).json()
    r = d.get("/", headers=HTML)
    assert r.status == 401 and r.header("WWW-Authenticate") == 'Basic realm="notesd"', r
    assert r.header("Content-Type").startswith("text/html"), r
    r = d.get("/")
    assert r.status == 401 and r.header("WWW-Authenticate").startswith("Bearer "), r
    for user in ("anyone", "", "notesd"):
        r, page = _page(d, "/%d/" % note["id"], {"Authorization": _basic(token, user)})
        assert r.status == 200 and "signed" in page, (user, r)
    # the page's own fetch() asks for JSON, and the browser sends the same header
    assert d.get("/", headers={"Authorization": _basic(token)}).status == 200
    for wrong in (_basic("wrong"), _basic(token + "x"), "Basic !!!", "Basic " + token,
                  "Digest " + token):
        assert d.get("/", headers=dict(HTML, Authorization=wrong)).status == 401, wrong
    assert d.get("/", headers={"Authorization": "Bearer " + token}).status == 200
    # a browser sends Basic by itself, to any page's request: a write needs the
    # page's own origin (Origin, or else Referer)
    auth = {"Authorization": _basic(token)}
    r = d.request("POST", "/", {"text": "no origin"}, auth)
    assert_error(r, 403)
    r = d.request("POST", "/", {"text": "own page"}, dict(auth, Origin=_origin(d)))
    assert r.status == 201, r
    r = d.request("DELETE", "/%d/" % note["id"], None, dict(auth, Referer=_origin(d) + "/1/"))
    assert r.status == 204, r
    d.stop()
    log = d.log()
    assert token not in log and _basic(token)[6:] not in log


def _csp(r):
    return dict(part.strip().split(None, 1) for part in
                r.header("Content-Security-Policy", "").split(";") if part.strip())


def test_pages_forbid_framing_and_allow_only_their_own_script(shared):
    """Item 2: a page framed by another local port had its Patch button
    clicked. Every HTML page says frame-ancestors 'none' (and X-Frame-Options
    DENY), and its CSP lets only its own inline script and style run."""
    import base64
    import hashlib
    note = shared.note("framed")
    for path in ("/", "/%d/" % note["id"], "/config", "/status", "/nope", "/openapi.json"):
        r, page = _page(shared, path)
        csp = _csp(r)
        assert csp.get("frame-ancestors") == "'none'", (path, csp)
        assert r.header("X-Frame-Options") == "DENY", path
        assert csp.get("default-src") == "'none'" and csp.get("base-uri") == "'none'", csp
        assert csp.get("form-action") == "'self'", csp
        for tag, key in (("script", "script-src"), ("style", "style-src")):
            blocks = re.findall(r"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
            assert len(blocks) == 1, (path, tag)
            digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
            assert csp[key] == "'sha256-%s'" % digest, (path, key, csp[key])
        # nothing inline that such a policy would block
        assert not re.search(r"<[^>]+\s(on\w+|style)=", page), path
        assert "javascript:" not in page


def test_forms_work_without_script(shared):
    """Item 3: every form is a plain POST form; edit, delete and patch say
    their method in _method, which is taken only from a form post whose
    Origin (or else Referer) is notesd's own. A browser's form post is
    answered 303 See Other, so reloading never posts twice."""
    _, page = _page(shared, "/")
    forms = re.findall(r"<form\b[^>]*>", page)
    assert forms and all('method="post"' in f and 'action="/"' in f for f in forms), forms
    text = unique("noscript")
    r = _form_post(shared, "/", {"text": text})
    assert r.status == 303, r
    location = r.header("Location")
    created = shared.get(location).json()
    assert created["text"] == text
    path = "/%d/" % created["id"]
    _, page = _page(shared, path)
    for method in ("PUT", "DELETE"):
        form = re.search(r'<form method="post" action="%s">\s*<input type="hidden" '
                         r'name="_method" value="%s">' % (path, method), page)
        assert form, (method, page[:3000])
    r = _form_post(shared, path, [("_method", "PUT"), ("text", text + " edited")])
    assert r.status == 303 and urllib.parse.urlsplit(r.header("Location")).path == path, r
    assert shared.get(path).json()["text"] == text + " edited"
    # the override needs the page's own origin, as a browser names it
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {},
                    {"Referer": "http://evil.example/"}):
        r = _form_post(shared, path, {"_method": "DELETE"}, headers, origin=False)
        assert r.status == 403 and b"allowed_hosts" in r.body, (headers, r)
    r = _form_post(shared, path, {"_method": "DELETE"}, {"Referer": _origin(shared) + path},
                   origin=False)
    assert r.status == 303 and urllib.parse.urlsplit(r.header("Location")).path == "/", r
    assert shared.get(path).status == 404
    # only a form post, only a method the resource takes
    r = shared.request("POST", "/%d/" % shared.note("json")["id"],
                       {"_method": "DELETE", "text": "x"},
                       {"Origin": _origin(shared)})
    assert_error(r, 405)
    r = _form_post(shared, "/health", {"_method": "DELETE"})
    assert r.status == 405 and "GET" in r.header("Allow"), r
    # an API client's form post still gets its 201 and JSON
    r = shared.request("POST", "/", urllib.parse.urlencode({"text": "curl"}),
                       {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 201 and r.json()["text"] == "curl", r


def test_config_form_patches_without_script(daemon):
    _, page = _page(daemon, "/config")
    assert re.search(r'<form method="post" action="/config">\s*<input type="hidden" '
                     r'name="_method" value="PATCH">', page), page[:3000]
    r = _form_post(daemon, "/config", {"_method": "PATCH", "text": '{"log_level": "error"}'})
    assert r.status == 303, r
    assert daemon.get("/config").json()["log_level"] == "error"
    r, page = _page(daemon, r.header("Location"))
    assert "Configuration changed" in page
    # a failed patch shows its reason, and the form again with what was sent
    r = _form_post(daemon, "/config", {"_method": "PATCH", "text": '{"log_level": "loud"}'})
    assert r.status == 400 and r.header("Content-Type").startswith("text/html"), r
    page = r.body.decode()
    assert "one of debug, info, warning, error" in page
    assert "{&quot;log_level&quot;: &quot;loud&quot;}</textarea>" in page


def test_page_script_needs_no_storage(shared):
    """Item 3: the script read sessionStorage unguarded (it throws where storage
    is blocked) for the token box; signing in is the browser's now."""
    for path in ("/", "/config"):
        _, page = _page(shared, path)
        assert "sessionStorage" not in page and "localStorage" not in page
        assert 'id="token"' not in page  # item 8: no token box, token or not


def test_textarea_keeps_a_leading_newline(shared):
    """Item 4: a browser drops the first newline after <textarea>, so Save
    without edits dropped a note's leading newline."""
    note = shared.note("\n\nstarts with two newlines " + unique("nl"))
    _, page = _page(shared, "/%d/" % note["id"])
    m = re.search(r"<textarea[^>]*>(.*?)</textarea>", page, re.S)
    assert m and m.group(1) == "\n" + note["text"], repr(m and m.group(1))
    for path in ("/", "/config"):
        _, page = _page(shared, path)
        assert re.search(r"<textarea[^>]*>\n", page), path


def test_feedback_where_the_user_looks(shared):
    """Item 5: success is said at the top of the page a form leads to; the
    script shows a failure next to the form's buttons (an <output> right after
    them), not below the window."""
    note = shared.note("feedback")
    for done, said in (("created", "Note created"), ("saved", "Note saved")):
        _, page = _page(shared, "/%d/?done=%s" % (note["id"], done))
        notice = page.index(said)
        assert notice < page.index("<pre"), done
        assert 'role="status"' in page[page.rindex("<", 0, notice) - 40:notice]
    _, page = _page(shared, "/?done=deleted")
    assert page.index("Note deleted") < page.index("<pre")
    _, page = _page(shared, "/?done=bogus")
    assert 'class="notice"' not in page  # only notesd's own words are shown
    for path in ("/", "/%d/" % note["id"], "/config"):
        _, page = _page(shared, path)
        for form in re.findall(r"<form\b.*?</form>", page, re.S):
            assert re.search(r"<button[^>]*>[^<]*</button>\s*<output\b[^>]*></output>\s*</form>",
                             form), form



def test_a_page_whose_query_is_not_utf8_still_renders(shared):
    """The page reads ?done= from a query its resource ignores: a query that
    is not UTF-8 must not take the page (and the connection) down."""
    note = shared.note("odd query")
    for path in ("/%d/?done=%%FF" % note["id"], "/config?done=%FF&x=%C3"):
        r, page = _page(shared, path)
        assert r.status == 200 and 'class="notice"' not in page, (path, r)
    shared.assert_serving()


@pytest.mark.parametrize("second", [
    b"NONSENSE\r\n\r\n",
    b"POST / HTTP/1.1\r\nAccept: text/html\r\nContent-Length: 2\r\n\r\n{}",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\nBad Name: x\r\n\r\n"])
def test_errors_before_a_request_is_parsed_are_answered_to_browsers(shared, second):
    """A browser's request, then on the same connection one that the parser
    refuses (no method, no Host, a bad header): a 400, as a page or JSON,
    never a traceback."""
    first = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
        s.sendall(first + second)
        f = s.makefile("rb")
        assert read_reply(f)[0] == 200
        status = read_reply(f)[0]
    assert status == 400, status
    shared.assert_serving()


def test_pages_name_their_own_icon(shared):
    """Item 6: /favicon.ico was a 404, and a console error, on every load."""
    for path in ("/", "/config", "/nope"):
        r, page = _page(shared, path)
        icon = re.search(r'<link rel="icon" href="(data:[^"]+)">', page)
        assert icon, path
        assert "data:" in _csp(r)["img-src"].split()


def test_list_page_links_pages_and_puts_the_form_first(shared):
    """Item 7: the Link header was text only, so a browser could not reach
    page 2; and the New-note form sat under every note."""
    marker = unique("pages")
    made = [shared.note("%s %d" % (marker, i)) for i in range(5)]
    first = "/?limit=2&q=" + marker
    _, page = _page(shared, first)
    assert page.index("<form") < page.index("<pre"), "the create form comes first"
    assert "previous" not in page.lower()
    pages, path = [], first
    while path:
        r, page = _page(shared, path)
        pages.append([n["id"] for n in shared.get(path).json()])
        nxt = re.search(r'<a rel="next" href="([^"]+)">', page)
        prev = re.search(r'<a rel="prev" href="([^"]+)">', page)
        if len(pages) > 1:
            assert prev, page[:3000]
            back = [n["id"] for n in shared.get(html_unescape(prev.group(1))).json()]
            assert back == pages[-2], (back, pages)
        path = nxt and html_unescape(nxt.group(1))
        assert len(pages) <= 5
    assert pages == [_ids(made[0:2]), _ids(made[2:4]), _ids(made[4:5])]


def html_unescape(text):
    import html
    return html.unescape(text)


def test_smaller_page_fixes(shared):
    """Item 8: labelled fields, touch-sized buttons, long words wrapped, and
    /openapi.json as a short page with a link to the document itself."""
    note = shared.note("x" * 3000)
    for path in ("/", "/%d/" % note["id"], "/config"):
        _, page = _page(shared, path)
        fields = re.findall(r'<textarea id="([^"]+)"', page)
        assert fields, path
        for field in fields:
            assert '<label for="%s">' % field in page, (path, field)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert re.search(r"button\{[^}]*min-height:44px", style), style
    assert re.search(r"pre\{[^}]*overflow-wrap:anywhere", style), style
    r, page = _page(shared, "/openapi.json")
    assert len(page) < 20000, len(page)
    raw = re.search(r'<a href="([^"]*format=json[^"]*)">', page)
    assert raw, page[:2000]
    r = shared.get(html_unescape(raw.group(1)), headers=HTML)
    assert r.status == 200 and r.header("Content-Type") == "application/json", r
    assert r.json()["openapi"].startswith("3.1")


def _doc(d, headers=None):
    r = d.get("/openapi.json", headers=headers)
    assert r.status == 200, r
    return r.json()


def _operations(doc):
    for template, item in doc["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                yield template, method, operation


def test_openapi_declares_the_id_of_every_operation_on_a_note(shared):
    """Items 9 and 11: OPTIONS /{id} and /{id}/ had no id parameter; PUT's
    said 0 and 2**53 were fine. GET and DELETE take any whole number (404,
    or 204 whether or not the note exists); PUT only ids a note may have."""
    doc = _doc(shared)
    for template in ("/{id}", "/{id}/"):
        params = doc["paths"][template]["parameters"]
        assert params == [{"name": "id", "in": "path", "required": True,
                           "schema": {"type": "integer", "minimum": 0}}]
        put = doc["paths"][template]["put"]["parameters"]
        assert put == [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}]
        for method in ("get", "delete", "options", "head"):
            assert "parameters" not in doc["paths"][template][method], method


@pytest.mark.parametrize("method,path,template,status", [
    ("OPTIONS", "/-1/", "/{id}/", 404), ("OPTIONS", "/x", "/{id}", 404),
    ("PUT", "/-1/", "/{id}/", 404), ("DELETE", "/x/", "/{id}/", 404),
    ("PUT", "/0/", "/{id}/", 400), ("GET", "/0", "/{id}", 404), ("POST", "/", "/", 400),
    ("PATCH", "/config", "/config", 400), ("GET", "/?after=-1", "/", 400)])
def test_openapi_documents_every_status(shared, method, path, template, status):
    """Item 10: a missing or malformed id gives 404 on every note operation."""
    body = None if method in ("GET", "OPTIONS") else b"[1]" if method == "PATCH" else b"{}"
    r = shared.request(method, path, body, {"Content-Type": "application/json"})
    assert r.status == status, r
    operation = _doc(shared)["paths"][template][method.lower()]
    assert str(status) in operation["responses"], (template, method, operation["responses"])


def test_openapi_parameter_bounds_are_the_servers(shared):
    """Item 11: PUT's id said 0 and 2**53 were fine; after had no maximum."""
    doc = _doc(shared)
    after = [p for p in doc["paths"]["/"]["get"]["parameters"] if p["name"] == "after"][0]
    assert after["schema"]["maximum"] == 2**63 - 1
    assert shared.get("/?after=%d" % (2**63 - 1)).status == 200
    assert_error(shared.get("/?after=%d" % 2**63), 400)
    for bad in (0, MAX_ID + 1):
        assert_error(shared.request("PUT", "/%d/" % bad, {"text": "x"}), 400)
    q = [p for p in doc["paths"]["/"]["get"]["parameters"] if p["name"] == "q"][0]
    assert re.fullmatch(q["schema"]["pattern"], "plain text\twith tab")
    assert not re.search(q["schema"]["pattern"], "nul\x00")


def test_a_search_for_a_control_character_is_400_not_a_storage_error(shared):
    """schemathesis: ?q= holding NUL broke FTS5's query ("unterminated string"):
    a 503, and /health said storage failed until the next write."""
    for q in ("%00", "a%00b", "%1B[", "x%C2%85"):
        assert_error(shared.get("/?q=" + q), 400)
    assert shared.get("/health").status == 200
    shared.assert_serving()


def test_config_values_have_json_types(daemon):
    """Item 12: {"log_level": null} was schema-valid, {"token": true} set the
    token to "yes". Every key has a type; a value of another type is 400."""
    schema = _doc(daemon)["components"]["schemas"]["Config"]
    cfg = daemon.get("/config").json()
    for key, prop in schema["properties"].items():
        assert "type" in prop or "enum" in prop, key
        assert key in cfg
    assert schema["properties"]["access_log"]["type"] == "boolean"
    assert schema["properties"]["max_body"]["type"] == "integer"
    for patch in ({"log_level": None}, {"token": True}, {"access_log": "no"},
                  {"max_body": "100"}, {"max_body": True}, {"timeout": "5"},
                  {"log_level": "DEBUG"}, {"token": " spaced "}, {"max_body": 1.5}):
        r = daemon.request("PATCH", "/config", patch)
        assert_error(r, 400)
        assert daemon.get("/").status == 200, patch  # no token was set
    assert daemon.get("/config").json() == cfg
    r = daemon.request("PATCH", "/config", {"access_log": False, "max_body": 5000.0,
                                             "timeout": 7, "command_budget": 60})
    assert r.status == 200, r
    assert r.json()["access_log"] is False and r.json()["max_body"] == 5000
    # what GET /config shows may be sent back as it is: *** keeps the token
    back = daemon.request("PATCH", "/config", {**r.json(), "token": "***"})
    assert back.status == 200 and back.json() == r.json(), back
    daemon.request("PATCH", "/config", {"token": "set-now"})
    assert daemon.request("PATCH", "/config", {"token": "***"},
                          {"Authorization": "Bearer set-now"}).status == 200
    assert daemon.get("/", headers={"Authorization": "Bearer set-now"}).status == 200


def test_openapi_security_says_what_the_token_requires(make_daemon):
    """Item 13: with a token, the document said authentication was optional."""
    doc = _doc(make_daemon())
    assert not doc.get("security"), doc.get("security")
    d = make_daemon("--token", "tok")
    doc = _doc(d, {"Authorization": "Bearer tok"})
    assert doc["security"] and {} not in doc["security"], doc["security"]
    assert {"bearer": []} in doc["security"]
    for template, method, operation in _operations(doc):
        if template == "/health":
            assert operation["security"] == [], method
        else:
            assert "security" not in operation, (template, method)
            assert "401" in operation["responses"], (template, method)


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "QUERY", "PROPFIND"])
def test_trace_is_405_with_allow(shared, method):
    """Item 14: TRACE got 501 without Allow; the README promises 405 for a
    method the resource does not take (schemathesis also tries QUERY)."""
    for path in ("/", "/health", "/1/", "/config"):
        status, headers, body = _raw_get(shared, method, path)
        assert status == 405, (method, path, status, body)
        allow = {m.strip() for m in headers.get("allow", "").split(",")}
        assert "GET" in allow and method not in allow, headers
        assert json.loads(body)["message"]
    shared.assert_serving()


def test_a_repeated_form_field_keeps_its_first_value(shared):
    """Item 15: Werkzeug's MultiDict.get, which the seed read text with,
    gives the first of a repeated field; notesd stored the last."""
    first, second = unique("first"), unique("second")
    r = shared.request("POST", "/", "text=%s&text=%s" % (first, second),
                       {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 201 and r.json()["text"] == first, r
    boundary = "b0undary"
    body = "".join('--%s\r\nContent-Disposition: form-data; name="text"\r\n\r\n%s\r\n'
                   % (boundary, t) for t in (first, second)) + "--%s--\r\n" % boundary
    r = shared.request("POST", "/", body,
                       {"Content-Type": "multipart/form-data; boundary=" + boundary})
    assert r.status == 201 and r.json()["text"] == first, r
    r = shared.get("/?limit=1&limit=2&q=" + first)
    assert r.status == 200 and len(r.json()) == 1, r
    if shutil.which("curl"):
        code, out = _curl("-d", "text=" + first, "-d", "text=" + second, shared.url)
        assert code == 201 and json.loads(out)["text"] == first, out


def test_percent_encoded_unreserved_characters_route_as_themselves(shared):
    """Item 16: GET /%31/ was 404; the seed (Werkzeug) answers note 1. RFC 3986
    6.2.2.2: an unreserved character means the same encoded or not."""
    note = shared.note("encoded " + unique("pct"))
    encoded = "".join("%%%02X" % ord(c) for c in str(note["id"]))
    for path in ("/%s/" % encoded, "/%s" % encoded.lower()):
        r = shared.get(path)
        assert r.status == 200 and r.json()["id"] == note["id"], (path, r)
    assert shared.get("/%68ealth").status == 200
    assert shared.get("/%63onfig").json()["log_level"]
    # reserved characters keep their meaning: %2F is no separator
    for path in ("/%2F%31/", "/%31%2F", "/1%3F/"):
        assert_error(shared.get(path), 404)


def test_readme_tells_flask_api_users_what_differs():
    """Item 17: the deliberate differences from the seed's Flask-API app."""
    readme = _readme()
    m = re.search(r"^## Coming from the Flask-API example\n(.*?)(?=^## )", readme, re.M | re.S)
    assert m, "no section 'Coming from the Flask-API example'"
    section = m.group(1)
    for words in ("100", "Link", "400", "empty", "201", "id", "0", "slash", "first"):
        assert words in section, words


if __name__ == "__main__":
    # The README's test command: python3 test_notesd.py [pytest options]
    sys.exit(pytest.main(["-q", os.path.abspath(__file__), *sys.argv[1:]]))


###############################################################################
# Restarts, upgrades and stops that lose no request (issue 12) ################
###############################################################################
#
# `restart` hands the listening socket to a successor started from the
# notesd.py on disk (SIGUSR2); a stop closes idle connections at once and
# answers the requests in flight with Connection: close; `run` serves a socket
# passed as systemd's socket activation passes it.


def _lock_watcher(pidfile, stop, gaps):
    """Until `stop` is set, ask F_GETLK about the pid file as `status` does;
    append to `gaps` every moment nobody held a write lock on it."""
    fmt = "hhqqi4x"
    query = struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    fd = os.open(pidfile, os.O_RDONLY)
    try:
        while not stop.is_set():
            kind = struct.unpack(fmt, fcntl.fcntl(fd, fcntl.F_GETLK, query))[0]
            if kind != fcntl.F_WRLCK:
                gaps.append(time.monotonic())
    finally:
        os.close(fd)


def _partial_post(port, text):
    """A socket with a POST whose head is sent and whose body is half sent
    (a request in flight), and the rest of its body."""
    body = json.dumps({"text": text}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
    s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (port, len(body)) + body[:5])
    return s, body[5:]


def _texts(d):
    return [n["text"] for n in d.get("/?limit=1000").json()]


def _accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT).close()
        return True
    except ConnectionRefusedError:
        return False


def _unread_by_daemon(sock):
    """Bytes that sock sent and the daemon's end has not read yet: the receive
    queue of the daemon's socket for this connection (/proc/net/tcp, proc(5))."""
    here, there = sock.getsockname()[1], sock.getpeername()[1]
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
            if (local, remote) == (there, here):
                return int(fields[4].split(":")[1], 16)
    return 0


def test_a_body_arriving_in_parts_during_a_stop_is_answered(make_daemon):
    # A stop re-arms each reader (armed = None): a body read in a third part
    # after that compared its time left with None, and the request ended in
    # a traceback without a reply.
    d = make_daemon()
    s, rest = _partial_post(d.port, "arrives in three parts")
    try:
        wait_until(lambda: _unread_by_daemon(s) == 0, daemon=d, what="the first part read")
        stop = subprocess.Popen(d.argv("stop"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # The listener closes just before the stop's first last_call.
            wait_until(lambda: not _accepts(d.port), daemon=d, what="the listener closed")
            s.sendall(rest[:3])
            wait_until(lambda: _unread_by_daemon(s) == 0, daemon=d, what="the second part read")
            s.sendall(rest[3:])
            with s.makefile("rb") as f:
                status, headers, body = read_reply(f)
        finally:
            stop.communicate(timeout=CLI_TIMEOUT)
    finally:
        s.close()
    assert status == 201 and headers.get("connection") == "close", (status, headers, body)
    assert "Traceback" not in d.log()


def test_restart_hands_over_with_a_request_in_flight(make_daemon):
    d = make_daemon()
    old = d.pid()
    stop, gaps = threading.Event(), []
    watcher = threading.Thread(target=_lock_watcher, args=(d.pidfile, stop, gaps))
    watcher.start()
    s, rest = _partial_post(d.port, "in flight")
    restart = subprocess.Popen(d.argv("restart"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: d.pid() not in (None, old), 10, d, "the successor's pid")
        d.seen_pids.add(d.pid())
        assert d.post("to the successor").status == 201  # same port, new daemon
        s.sendall(rest)
        try:
            with s.makefile("rb") as f:
                status, headers, body = read_reply(f)
        except OSError as e:  # CI saw a timeout here once, on 3.9: say all we know
            pytest.fail("no reply to the request in flight (%r); old pid %d %s; log:\n%s"
                        % (e, old, "alive" if alive(old) else "gone", d.log()[-4000:]))
        assert status == 201 and headers.get("connection") == "close", (status, headers)
        out, err = restart.communicate(timeout=CLI_TIMEOUT)
    finally:
        stop.set()
        watcher.join()
        s.close()
        if restart.poll() is None:
            restart.kill()
    assert restart.returncode == 0, (out, err, d.log())
    assert out.splitlines()[0] == "notesd stopped, pid %d" % old, out
    assert START_LINE.search(out).group(2) == str(d.pid()), out
    assert not gaps, "the pid file was unlocked %d times during the restart" % len(gaps)
    assert not alive(old)
    assert {"in flight", "to the successor"} <= set(_texts(d))
    assert "Traceback" not in d.log()


def _keep_alive_client(port, stop, counts):
    """GET /health over and over on a kept-alive connection, the next request
    sent as soon as a reply is read, as wrk does; a new connection only after
    a reply that said Connection: close. Counts replies, and connections that
    ended any other way (a reset, or a close with a request unanswered)."""
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as s, \
                    s.makefile("rb") as f:
                while not stop.is_set():
                    s.sendall(request)
                    status, headers, _ = read_reply(f)
                    counts["replies"] += 1
                    counts["not 200"] += status != 200
                    if headers.get("connection") == "close":
                        break
        except (OSError, ValueError, AssertionError):
            counts["broken"] += 1


def test_restart_keeps_every_kept_alive_client_whole(make_daemon):
    # A connection ends on a restart only after a reply that said so: closing
    # one whose reply had not (written just before the stop marked it), while
    # its client sent the next request, reset it (wrk: 5 in 10 restarts).
    d = make_daemon()
    stop, counts = threading.Event(), collections.Counter()
    clients = [threading.Thread(target=_keep_alive_client, args=(d.port, stop, counts))
               for _ in range(8)]
    for client in clients:
        client.start()
    try:
        for _ in range(4):
            old, before = d.pid(), counts["replies"]
            r = d.cli("restart")
            assert r.returncode == 0, (r.stdout, r.stderr, d.log())
            d.seen_pids.add(d.pid())
            assert d.pid() != old
            wait_until(lambda: counts["replies"] > before + 100, 10, d, "replies after a restart")
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=CLI_TIMEOUT)
    assert counts["broken"] == 0, (counts, d.log()[-2000:])
    # The old daemon answers /health for itself while it finishes: it is not
    # a 503 "shutting down" while its successor serves (attack review: ~45
    # per restart, none saying Connection: close, so the client kept asking).
    assert counts["not 200"] == 0, counts


def test_failed_successor_leaves_the_old_daemon_serving(make_daemon, tmp_path):
    script = tmp_path / "notesd.py"
    shutil.copy(NOTESD, str(script))
    d = make_daemon(start=False)
    d.script = str(script)
    d.start()
    old = d.pid()
    with open(str(script), "a") as f:
        f.write("\nthis is not python(\n")
    # The CLI from a sound copy (a CLI run from the broken file fails itself):
    # the daemon starts its successor from its own file, now broken.
    def sound(command):
        return subprocess.run([sys.executable, NOTESD, *d.args, command], capture_output=True,
                              text=True, timeout=CLI_TIMEOUT)
    r = sound("restart")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "SyntaxError" in r.stderr and "keeps serving" in r.stderr, r.stderr
    assert d.pid() == old and alive(old)
    assert sound("status").returncode == 0
    assert d.post("still here").status == 201
    shutil.copy(NOTESD, str(script))  # mended: now it hands over
    r = d.cli("restart")
    assert r.returncode == 0, (r.stdout, r.stderr, d.log())
    d.after_start()
    assert d.pid() != old and "still here" in _texts(d)


def _hooked_copy(tmp_path, anchor, hook):
    """A copy of notesd.py with `hook` (a line of code) put before the first
    line that starts with `anchor`, indented as that line is: a successor
    started from it misbehaves where a real one might."""
    with open(NOTESD) as f:
        lines = f.read().split("\n")
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(anchor))
    indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at, indent + hook)
    script = tmp_path / "notesd.py"
    script.write_text("\n".join(lines))
    return str(script)


def _nothing_left(d):
    """No notesd of d's runs, serves, or is named by its pid file."""
    assert not d.processes(), [cmdline(p) for p in d.processes()]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.port), timeout=2).close()
    assert d.cli("status").returncode == 3


def test_a_stop_during_a_restart_wins(make_daemon, tmp_path):
    # `stop` 50 ms after `restart` said "stopped", yet the successor then took
    # over and served (attack review). Whenever the stop comes, nothing is
    # left serving once it returns 0; the restart says it failed, or succeeded
    # before the stop came.
    d = make_daemon()
    for n, delay in enumerate((0.0, 0.05, 0.15, 0.3, 0.6), 1):
        restart = subprocess.Popen(d.argv("restart"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            # From when the daemon took the restart: a stop before that is
            # simply first, and the restart then starts notesd (CI saw it).
            wait_until(lambda: d.log().count("restart: starting a successor") == n,
                       CLI_TIMEOUT, d, "the daemon to take the restart")
            time.sleep(delay)  # the offset under test, not a wait for a condition
            r = d.cli("stop")
            out, err = restart.communicate(timeout=CLI_TIMEOUT)
        finally:
            if restart.poll() is None:
                restart.kill()
        assert r.returncode == 0, (delay, r.stdout, r.stderr, d.log()[-3000:])
        _nothing_left(d)
        assert "Traceback" not in d.log() and "one is under way" not in d.log()
        d.start()


def test_a_stop_just_after_the_handover_waits_for_the_old_daemon_too(make_daemon):
    # `stop` as soon as the pid file named the successor stopped it and
    # returned 0 while the old daemon still drained a kept-alive client, which
    # then got a 201; and `restart` died with a traceback, the URL file gone
    # (attack review).
    d = make_daemon()
    old = d.pid()
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        restart = subprocess.Popen(d.argv("restart"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: d.pid() not in (None, old), CLI_TIMEOUT, d, "the successor's pid")
            d.seen_pids.add(d.pid())
            r = d.cli("stop")
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert not alive(old), "stop returned 0 while the old daemon still ran"
            out, err = restart.communicate(timeout=CLI_TIMEOUT)
        finally:
            if restart.poll() is None:
                restart.kill()
    finally:
        conn.close()
    assert "Traceback" not in err, err
    _nothing_left(d)


def test_a_stop_before_the_successor_is_ready_ends_it(make_daemon, tmp_path):
    # A successor slow to start, and deaf to SIGTERM until it serves: the stop
    # ends it (SIGKILL after STOP_GRACE) and reaps it before the old daemon exits.
    flag = tmp_path / "slow"
    d = make_daemon(start=False)
    reached = tmp_path / "reached"
    d.script = _hooked_copy(tmp_path, 'readiness.ready(f"notesd',
                            "if os.path.exists(%r): open(%r, 'w').close(); time.sleep(600)"
                            % (str(flag), str(reached)))
    d.start()
    flag.touch()
    old = d.pid()
    restart = subprocess.Popen(d.argv("restart"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(reached.exists, 10, d, "the successor about to say READY")
        r = d.cli("stop")
        out, err = restart.communicate(timeout=CLI_TIMEOUT)
    finally:
        if restart.poll() is None:
            restart.kill()
    assert r.returncode == 0 and r.stdout == "notesd stopped, pid %d\n" % old, (r, d.log())
    assert restart.returncode == 1, (out, err)
    assert "keeps serving" not in err, err
    _nothing_left(d)
    assert "the successor did not stop" in d.log(), d.log()[-2000:]


def test_a_successor_hung_after_ready_is_killed_and_the_old_one_serves_alone(
        make_daemon, tmp_path):
    # It served on the shared socket but never took the pid file: SIGTERM only
    # left it accepting connections it never answered, and the old daemon could
    # not be stopped without --force (attack review).
    flag = tmp_path / "hang"
    d = make_daemon(start=False)
    d.script = _hooked_copy(tmp_path, "channel.settimeout(START_TIMEOUT)",
                            "if os.path.exists(%r): time.sleep(600)" % str(flag))
    d.start()
    flag.touch()
    old = d.pid()
    t0 = time.monotonic()
    r = d.cli("restart")
    assert r.returncode == 1 and "keeps serving" in r.stderr, (r.stdout, r.stderr)
    assert time.monotonic() - t0 < 20, "restart took %.1fs" % (time.monotonic() - t0)
    assert d.processes() == [old], [cmdline(p) for p in d.processes()]
    for _ in range(20):  # every new connection is the old daemon's
        assert d.get("/health", timeout=2).status == 200
    assert d.cli("status").returncode == 0
    d.stop()
    _nothing_left(d)


@pytest.mark.parametrize("misstep", ["time.sleep(600)", "os._exit(1)"])
def test_a_successor_lost_after_writing_its_pid_leaves_the_old_one_named(
        make_daemon, tmp_path, misstep):
    # A successor that wrote its pid into the pid file, then hung or died
    # before it said LOCKED: the old daemon went on serving, holding byte 0
    # only, behind a file that named the lost successor. `status` said not
    # running, and a `start` could start a second daemon (attack review).
    flag = tmp_path / "misstep"
    d = make_daemon(start=False)
    d.script = _hooked_copy(tmp_path, 'channel.sendall(b"LOCKED',
                            "if os.path.exists(%r): %s" % (str(flag), misstep))
    d.start()
    flag.touch()
    old = d.pid()
    r = d.cli("restart")
    assert r.returncode == 1 and "keeps serving" in r.stderr, (r.stdout, r.stderr, d.log())
    assert d.processes() == [old], [cmdline(p) for p in d.processes()]
    assert d.pid() == old and d.cli("status").returncode == 0
    r = d.cli("start")
    assert r.returncode == 0 and "already running, pid %d" % old in r.stdout, r.stdout
    d.assert_serving()
    d.stop()
    _nothing_left(d)


def test_a_successor_that_fails_leaves_the_old_pid_file_alone(make_daemon, tmp_path):
    # The successor failed to open storage after making its PidFile, and at its
    # exit removed the pid file and url file, which were still the old daemon's:
    # `status` said not running while it served.
    config = tmp_path / "notesd.conf"
    config.write_text("[notesd]\n")
    d = make_daemon(config=config)
    old = d.pid()
    config.write_text("[notesd]\ndatabase = %s\n" % (tmp_path / "missing" / "notes.db"))
    r = d.cli("restart")
    assert r.returncode == 1 and "keeps serving" in r.stderr, (r.stdout, r.stderr)
    assert "missing" in r.stderr, r.stderr
    assert d.pid() == old and os.path.exists(d.urlfile)
    assert d.cli("status").returncode == 0
    d.assert_serving()


def test_restart_falls_back_to_stop_and_start_when_listen_changes(make_daemon, tmp_path):
    d = make_daemon()
    old = d.pid()
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    r = subprocess.run(d.argv("restart", "--listen", "127.0.0.1:%d" % free),
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "listen changed" in r.stdout and "stopping and starting" in r.stdout, r.stdout
    assert "notesd stopped, pid %d" % old in r.stdout
    d.after_start()
    assert d.port == free and not alive(old)


def test_stop_under_keep_alive_load_is_prompt_and_runs_nothing_later(make_daemon):
    d = make_daemon()
    note = d.note("read me")
    done, served = threading.Event(), []

    def load():
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=HTTP_TIMEOUT)
        try:
            while not done.is_set():
                conn.request("GET", "/%d/" % note["id"])
                served.append(conn.getresponse().read())
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    idle = socket.create_connection(("127.0.0.1", d.port), timeout=HTTP_TIMEOUT)
    busy, rest = _partial_post(d.port, "in flight")
    try:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with idle.makefile("rb") as f:
            assert read_reply(f)[0] == 200
        wait_until(lambda: len(served) > 100, 10, d, "keep-alive load")
        started = time.monotonic()
        stopping = subprocess.Popen(d.argv("stop"), stdout=subprocess.PIPE, text=True)
        assert closed_by_server(idle, 5.0), "the idle connection stayed open"
        closed_after = time.monotonic() - started
        late = json.dumps({"text": "sent after the stop"}).encode()
        busy.sendall(rest + b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(late) + late)
        with busy.makefile("rb") as f:
            status, headers, _ = read_reply(f)
            assert status == 201 and headers.get("connection") == "close", (status, headers)
            try:
                assert f.read() == b""  # the pipelined request got no answer
            except ConnectionResetError:
                pass
        stopping.wait(timeout=CLI_TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        done.set()
        for t in threads:
            t.join(timeout=CLI_TIMEOUT)
        idle.close()
        busy.close()
    assert stopping.returncode == 0
    # Prompt: well before STOP_GRACE (5 s), which a connection left open
    # would wait out; not a speed bound (1 s failed on a loaded machine).
    assert closed_after < 3.0 and elapsed < 4.0, (closed_after, elapsed)
    d.start()
    texts = _texts(d)
    assert "in flight" in texts and "sent after the stop" not in texts, texts


@contextlib.contextmanager
def _run_on_socket(d, listener, stderr_path):
    """`notesd.py run` as systemd starts it, yielding its pid: the launcher
    forks and execs it with `listener` on fd 3, LISTEN_FDS=1 and LISTEN_PID
    (sd_listen_fds(3)), stderr to `stderr_path`. Afterwards killed if the
    test did not reap it, and d cleaned up."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
    log = os.open(str(stderr_path), os.O_WRONLY | os.O_CREAT, 0o600)
    pid = os.fork()
    if pid == 0:  # the launcher's child: nothing but system calls, then exec
        try:
            os.dup2(listener.fileno(), 3)
            os.dup2(log, 2)
            env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
            os.execve(sys.executable, d.argv("run"), env)
        finally:
            os._exit(127)
    os.close(log)
    try:
        yield pid
    finally:
        with contextlib.suppress(ChildProcessError):  # the test reaped it
            if not os.waitpid(pid, os.WNOHANG)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        d.cleanup()


def _listening_socket():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, listener.getsockname()[1]


def test_run_serves_a_socket_passed_as_systemd_passes_it(tmp_path):
    d = Daemon(tmp_path / "sa")
    listener, port = _listening_socket()
    early = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
    early.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
    with _run_on_socket(d, listener, tmp_path / "sa.err") as pid, early:
        listener.close()  # the daemon's now
        with early.makefile("rb") as f:  # queued before notesd ran: answered
            assert read_reply(f)[0] == 200
        wait_until(lambda: os.path.exists(d.urlfile), 10, d, "the url file")
        d.after_start()
        assert d.port == port and d.pid() == pid
        assert d.post("activated").status == 201
        with open("/proc/%d/environ" % pid, "rb") as f:
            assert b"LISTEN_FDS" in f.read()  # exec-time; the daemon unset its own copy
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 10, d, "exit")


def _asleep_in_accept(pid):
    """Whether a thread of `pid` sleeps in accept(2) (its wchan; "0" where
    the kernel does not say)."""
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/wchan" % (pid, tid)) as f:
                if f.read() == "inet_csk_accept":
                    return True
        except OSError:
            pass
    return False


def test_a_stop_is_not_held_by_a_connection_another_process_accepted(tmp_path):
    # CI: `stop` during a restart waited 10 s for the old daemon, which never
    # exited. Old daemon and successor accept from one socket: the old one's
    # poll() saw a connection the successor then took, its accept() slept
    # until the next one came, and none did; the stop's shutdown() waits for
    # that thread. Here a rival process polls and accepts on the socket, as
    # a successor does; on the code before the fix the daemon slept in
    # accept() after about 4 connections in 10, and TERM then hung.
    d = Daemon(tmp_path / "shared")
    listener, port = _listening_socket()
    with _run_on_socket(d, listener, tmp_path / "shared.err") as pid:
        rival = subprocess.Popen(
            [sys.executable, "-c", "import select, socket, sys\n"
             "s = socket.socket(fileno=int(sys.argv[1]))\n"
             "while True:\n"
             "    select.select([s], [], [])\n"
             "    try:\n"
             "        s.accept()[0].close()\n"
             "    except BlockingIOError:\n"  # the daemon was first, on the fixed code
             "        pass\n", str(listener.fileno())],
            pass_fds=[listener.fileno()])
        listener.close()
        try:
            wait_until(lambda: os.path.exists(d.urlfile), 10, d, "the url file")
            d.after_start()
            asleep = 0
            for _ in range(60):
                socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT).close()
                # Time to lose the race and call accept(); on the fixed code it never sleeps there.
                asleep += poll_until(lambda: _asleep_in_accept(pid), 0.03)[0]
            assert rival.poll() is None  # it competed for every connection
        finally:
            rival.kill()
            rival.wait()
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 8, d, "exit")
        assert asleep == 0


def test_restart_of_a_run_daemon_speaks_sd_notify(tmp_path):
    address = "@notesd-test-notify-%s" % os.urandom(6).hex()
    with _run_notified(tmp_path, address) as (d, proc, listener):
        wait_until(lambda: listener.since(0, "READY", "1"), 10, d, "READY=1")
        d.after_start()
        mark = len(listener.messages)
        r = d.cli("restart")
        assert r.returncode == 0, (r.stdout, r.stderr)
        new = d.pid()
        d.seen_pids.add(new)
        reloading = listener.since(mark, "RELOADING", "1")
        assert reloading, listener.messages
        ready = [i for i in listener.since(reloading[0], "READY", "1")
                 if listener.messages[i].get("MAINPID") == str(new)]
        assert ready, listener.messages
        assert not listener.since(mark, "STOPPING"), listener.messages  # the old one says nothing
        assert proc.wait(timeout=10) == 0
        assert d.get("/health").status == 200
