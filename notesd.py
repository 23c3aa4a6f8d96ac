#!/usr/bin/env python3
"""notesd: a notes REST API daemon in one file, needing nothing but the standard library.

Architecture. The main thread runs the main loop (MainLoop), which alone owns
the state: the sqlite3 database, the live configuration and the counters.
The HTTP API runs in a ThreadingHTTPServer in its own thread; every handler
turns a request that reads or changes state into a Command, puts it on the
main loop's queue.Queue and waits for the reply. Signals reach the main loop
the same way: the C-level handler writes to a wakeup fd, and a small relay
thread turns that into a Command. socketserver's docstring puts the choice
plainly: state shared by threads needs locks or a single owner. notesd picks
the owner, so no lock guards the state; threads share only the queue and
immutable snapshots (a Config object, the heartbeat timestamp) that the main
loop replaces, never mutates.

Usage:
    python3 notesd.py [-c FILE] [--key-name VALUE ...] COMMAND

Commands and exit codes (LSB init-script conventions):
    start       daemonize, return once serving: 0 running (also if it was), 1 failed
    stop        SIGTERM and wait (timeout, --force: SIGKILL): 0 stopped, 1 still running
    restart     hand over to a new daemon from the notesd.py on disk (SIGUSR2), which
                inherits the listening socket; else stop, then start: 0 running, 1 failed
                (the old daemon keeps serving), 6 invalid configuration
    reload      check the file, SIGHUP, wait for the verdict: 0 applied, 6 invalid, 7 not running
    status      0 running, 1 dead but pid file exists, 3 not running, 4 unknown
    run         the daemon in the foreground (systemd, containers, debugging)
    check       health check for cron (Nagios plugin API): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
    configtest  validate the configuration and print it: 0 valid, 6 invalid
    backup DEST a consistent copy of the database to DEST (--force replaces it): 0 written, 1 failed
Exit code 2 is a usage error (also a DEST given to any command but backup); 4 from stop or
reload, not permitted to signal.
The CLI signals only the notesd that owns the pid file (running_pid).

Sections:
    Constants & defaults, Errors, Config, Storage, Main loop, HTTP API,
    Browsable HTML & OpenAPI, Files root touches, Logging, Process control,
    Daemonizer, CLI, main()
"""

__version__ = "1.0.0"

import argparse
import base64
import binascii
import codecs
import collections
import configparser
import contextlib
import datetime
import email.errors
import email.message
import email.parser
import email.utils
import errno
import fcntl
import functools
import grp
import hashlib
import heapq
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import locale
import logging
import logging.handlers
import os
import pwd
import queue
import re
import resource
import select
import signal
import socket
import socketserver
import sqlite3
import stat
import string
import struct
import sys
import threading
import time
import urllib.parse

###############################################################################
# Constants & defaults ########################################################
###############################################################################

#: seconds between runs of the main loop's periodic work (heartbeat, stats).
TICK = 1.0
#: seconds without a heartbeat before /health reports the main loop stuck:
#: three missed ticks, so one slow batch does not page anybody.
HEARTBEAT_STALE = 3.0
#: seconds sqlite waits for a lock held by another process before failing.
#: Long on purpose: a stuck main loop is what /health exists to report.
BUSY_TIMEOUT = 30.0
#: commands the main loop takes from the queue at once; their writes share
#: one transaction and so one fsync (group commit). At most 333: a batch's
#: creates are one INSERT of three variables a note (Store.insert).
MAX_BATCH = 256
#: seconds an HTTP handler waits for the main loop's reply before a 503.
REPLY_TIMEOUT = 30.0
#: seconds `start` waits for the daemon to say it is ready (or why not).
START_TIMEOUT = 30.0
#: seconds between polls when the CLI waits for a process or a file.
POLL = 0.01
#: listen(2) backlog. socketserver's default of 5 drops connections under load.
BACKLOG = 1024
#: seconds between checks of serve_forever() for shutdown(): bounds `stop`.
ACCEPT_POLL = 0.05
#: seconds a stop waits at most for the requests in flight to be answered
#: (the idle connections are closed at once): a client that stalls in its
#: body holds the stop no longer than this.
STOP_GRACE = 5.0
#: seconds between two looks at the connections during a stop (ApiServer.last_call).
STOP_PASS = 0.01
#: seconds an idle connection is given, when a successor serves (restart), to
#: send one more request, answered with Connection: close. Closing a kept-alive
#: connection at once races with the request its client is sending (RFC 9112
#: 9.5): a client that does not retry saw an error on a restart (wrk: 3 in
#: 10 restarts). A stop with no successor closes idle ones at once.
HANDOVER_IDLE = 1.0
#: seconds a restart waits for the successor to lock the pid file once told
#: GO: a few system calls, so only a hung or blocked successor takes this long.
HANDOVER_TIMEOUT = 5.0
#: seconds a successor told to stop (TERM) is given to finish its requests
#: before it is killed (KILL): its own STOP_GRACE, and a second to exit.
SUCCESSOR_GRACE = STOP_GRACE + 1.0
#: the first file descriptor systemd passes (SD_LISTEN_FDS_START, sd_listen_fds(3)).
LISTEN_FDS_START = 3
#: Set by a daemon for the successor it starts on `restart` (SIGUSR2): the
#: descriptor of the socket on which the two agree the handover (Successor).
HANDOVER_ENVIRONMENT = "NOTESD_HANDOVER"
#: where the successor finds that socket.
HANDOVER_FD = 4
#: file descriptors kept back from connections for the daemon's own: a dozen
#: at rest (stdio, pid file, log, the database with its -wal and -shm, the
#: listening socket, the signal socketpair), a few now and then (a reload's
#: config file, /proc for /status, a connection being refused), and room to
#: spare. Never more than half the open-file limit, however low it is; the
#: connections closed to make room (EVICTING_MAX) come out of the rest.
FD_RESERVE = 32
#: seconds a request's head, or its body, may take before, with every
#: connection slot taken, its connection may be closed (408) to make room for
#: a new client. A client on any real network sends a head in a round trip or
#: two; one that takes a second holds a slot on purpose (slowloris) or cannot
#: keep up.
SLOW_HEAD = 1.0
#: connections closed to make room whose threads may still be finishing
#: while new ones take their slots. A closed connection's thread needs the
#: GIL like every other to leave, which under load takes milliseconds: the
#: accept thread, waiting for each in turn, held a new client behind a flood
#: of connections for seconds. Bounds the threads at max_connections + 32.
EVICTING_MAX = 32
#: seconds the accept thread waits for closed connections to give their
#: slots back (when EVICTING_MAX are finishing, or file descriptors are
#: short), before it refuses the new one after all.
EVICT_WAIT = 0.1
#: seconds the accept thread pauses when accept() fails for want of file
#: descriptors (EMFILE): the listening socket stays readable, so retrying at
#: once would spin (nginx disables accept events for 500 ms). Cut short as
#: soon as a connection ends and frees one.
ACCEPT_BACKOFF = 0.1
#: seconds between two warnings in the log that connections are refused.
REFUSALS_LOGGED_EVERY = 60.0
#: notes per page of GET /: the default and the most a client may ask for.
PAGE_DEFAULT, PAGE_MAX = 100, 1000
#: characters of ?q= at most (400 above). SQLite's instr() costs a note's
#: length times the text's in one step no budget can interrupt: a text of
#: 7,000 characters took 116 ms over one note of 1 MB (attack review).
QUERY_MAX = 1000
#: bytes of JSON in a page of GET / at most (a page holds one note even if it
#: is larger). Without it, 1000 notes of max_body bytes would be a reply of
#: gigabytes, built in memory (issue 9); 4 MiB is a page of 1000 notes of 4 KiB.
PAGE_BYTES = 4 << 20
#: A reply larger than this many bytes is counted in REPLIES_HELD while it is
#: written, and written apart from its head (no copy).
REPLY_SMALL = 64 << 10
#: bytes of large replies being built or written at once, all clients
#: together (8 pages of PAGE_BYTES); above it a large reply is 503. A page is
#: several copies of its text while it is built (rows, notes, JSON, bytes),
#: and a client that reads nothing holds its reply for `timeout`: 100
#: clients asking for 4 MiB pages at once took the daemon to 600 MB (attack
#: review).
REPLIES_HELD = 32 << 20
#: Room for a note's JSON other than its text and its url's base (id, dates).
NOTE_JSON_ROOM = 256
#: sqlite virtual-machine steps between two looks at the clock of the key
#: `command_budget` (sqlite's progress handler).
BUDGET_STEPS = 1000
#: seconds of pages (GET /, searches) a batch runs before it carries the
#: rest to the next turn, where the quick commands queued meanwhile go
#: first: with a whole budget (50 ms), a GET /ID/ among 100 searchers
#: waited 52 ms at the median (bench/search.py).
PAGES_SLICE = 0.01
#: largest note id a client may create: ids stay exact in JSON numbers read
#: by JavaScript (RFC 8259 section 6), and AUTOINCREMENT keeps room above.
MAX_ID = 2**53 - 1
#: PATH for the daemon: nothing inherited from whoever started it (daemon(7)).
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: environment variables the daemon keeps; the rest (a caller's PATH,
#: PYTHONPATH, LD_PRELOAD ...) must not steer a long-running daemon.
#: Works as --token does, without showing the token in ps (main() takes it
#: out of the environment at once); how `start` hands a --token to the daemon.
TOKEN_ENVIRONMENT = "NOTESD_TOKEN"
KEEP_ENVIRONMENT = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
                    "NOTESD_CONFIG")
#: codecs looked up before chroot and the drop of root (_enter_jail): text
#: files in the locale's, HTTP in latin-1, bodies in utf-8, IDNA host names.
CODECS = ("ascii", "latin-1", "utf-8", "idna")
#: signals that keep SIG_IGN when the daemonizer resets handlers: CPython
#: itself ignores them at startup and relies on EPIPE/EFBIG instead.
KEEP_IGNORED = {signal.SIGPIPE, signal.SIGXFSZ}
#: what the main loop does with each signal it is sent.
SIGNAL_COMMANDS = {
    signal.SIGTERM: "stop",
    signal.SIGINT: "stop",
    signal.SIGHUP: "reload",
    signal.SIGUSR1: "reopen_logs",
    signal.SIGUSR2: "upgrade",
}

log = logging.getLogger("notesd")

JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"

Option = collections.namedtuple("Option", "default parse live help")

# Each parser carries the JSON Schema of the values PATCH /config takes for
# its keys (`schema`): Config.replace() holds a JSON value to it before the
# parser reads it, and /openapi.json publishes it, so the two cannot
# disagree. Patterns are written in the syntax JSON Schema (ECMA-262) and
# Python share: no \d, \s or \w, whose ranges differ between the two.

#: a port, 0 to 65535, as 1 to 5 digits (leading zeros allowed).
PORT_PATTERN = r"(?:[0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"


def _ipv6_pattern():
    """IPv6address of RFC 3986 3.2.2, its nine forms: what ipaddress takes."""
    h16, octet = "[0-9A-Fa-f]{1,4}", "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
    ls32 = rf"(?:{h16}:{h16}|{octet}(?:\.{octet}){{3}})"
    tails = [rf"(?:{h16}:){{4}}{ls32}", rf"(?:{h16}:){{3}}{ls32}", rf"(?:{h16}:){{2}}{ls32}",
             rf"{h16}:{ls32}", ls32, h16, ""]
    forms = [rf"(?:{h16}:){{6}}{ls32}", rf"::(?:{h16}:){{5}}{ls32}"]
    forms += [rf"(?:(?:{h16}:){{0,{n}}}{h16})?::{tail}" for n, tail in enumerate(tails)]
    return "(?:" + "|".join(forms) + ")"


def _anchored(pattern):
    """A pattern as JSON Schema applies it, to the whole value (_fits)."""
    return f"^(?:{pattern})$"


def _typed(schema):
    """Give a parser the JSON Schema of its values in PATCH /config."""
    def mark(parse):
        parse.schema = schema
        return parse
    return mark


@_typed({"type": "string", "pattern": _anchored(
    rf"\[[0-9A-Fa-f:.]+\]:{PORT_PATTERN}|[A-Za-z0-9.-]*:{PORT_PATTERN}")})
def _parse_listen(text):
    """'host:port' or '[ipv6]:port' -> (host, port); port 0 means any free port."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.\-]*):(\d{1,5})", text)
    if not match:
        raise ValueError("expected HOST:PORT or [IPV6]:PORT, such as 127.0.0.1:5000")
    if int(match.group(2) or match.group(4)) > 65535:
        raise ValueError("the port must be 0 to 65535")
    return text


@_typed({"type": "boolean"})
def _parse_bool(text):
    value = configparser.ConfigParser.BOOLEAN_STATES.get(text.lower())
    if value is None:
        raise ValueError("expected yes or no")
    return value


@_typed({"type": "string", "pattern": _anchored("0?[0-7]{3}")})
def _parse_umask(text):
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError("expected an octal file mode creation mask such as 027")
    return int(text, 8)


@_typed({"type": "string", "enum": ["debug", "info", "warning", "error"]})
def _parse_level(text):
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected debug, info, warning or error")
    return text.lower()


def _parse_positive(kind, low, high):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}")
        return value
    parse.schema = {"type": "integer" if kind is int else "number",
                    "minimum": low, "maximum": high}
    return parse


def _parse_account(lookup, what):
    """A parser for the name of a user or group that must exist here."""
    def parse(text):
        if text:
            try:
                lookup(text)
            except KeyError:
                raise ValueError(f"no such {what} on this system") from None
        return text
    parse.schema = {"type": "string"}
    return parse


#: What GET /config shows for a token, and PATCH takes back for "unchanged".
REDACTED = "***"


@_typed({"type": "string", "pattern": _anchored(r"[A-Za-z0-9._~+/=-]*|\*\*\*")})
def _parse_token(text):
    # The token travels in an HTTP header: visible ASCII only (RFC 6750 b64token).
    if not re.fullmatch(r"[A-Za-z0-9\-._~+/=]*", text):
        raise ValueError("expected letters, digits and -._~+/= only")
    return text


@_typed({"type": "string"})
def _parse_path(text):
    return text


#: host[:port] as a Host header, an Origin or allowed_hosts writes it (RFC 9110
#: 7.2, RFC 3986 3.2.2): a DNS name or IPv4 address, or an IPv6 one in brackets.
HOST_PORT_RE = re.compile(r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?")


def _split_host(text):
    """(name, port) of 'host[:port]': the name in lower case (RFC 3986 3.2.2),
    an IPv6 address in its short form and in brackets, the port an int or
    None; None if `text` is none of these. The one parser for Host headers,
    origins and the entries of allowed_hosts, so that they compare alike."""
    match = HOST_PORT_RE.fullmatch(text)
    if not match:
        return None
    name, port = match.group(1).lower(), match.group(2) and int(match.group(2))
    if name.startswith("["):
        try:
            name = f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            return None
    return None if port is not None and port > 65535 else (name, port)


def _is_address(name):
    """Is a name from _split_host an IP address rather than a DNS name?"""
    if name.startswith("["):
        return True
    try:
        ipaddress.IPv4Address(name)
        return True
    except ValueError:
        return False


#: an entry of allowed_hosts: *, or HOST[:PORT] as _split_host reads it.
HOST_ENTRY = (rf"\*|(?:[A-Za-z0-9.-]+|\[{_ipv6_pattern()}\])(?::{PORT_PATTERN})?")


@_typed({"type": "string", "pattern": _anchored(
    rf"[ ,]*(?:(?:{HOST_ENTRY})(?:[ ,]+(?:{HOST_ENTRY}))*)?[ ,]*")})
def _parse_hosts(text):
    """allowed_hosts: entries HOST or HOST:PORT, or *, separated by commas or
    spaces -> a tuple of (name, port); () asks for the default (_derive_hosts)."""
    entries = []
    for word in re.split(r"[\s,]+", text):
        entry = ("*", None) if word == "*" else _split_host(word) if word else ()
        if entry is None:
            raise ValueError(f"'{word}' is not HOST, HOST:PORT, [IPV6]:PORT or *")
        if entry and entry not in entries:
            entries.append(entry)
    return tuple(entries)


def _show_hosts(entries):
    return ", ".join(name if port is None else f"{name}:{port}" for name, port in entries)


#: The single source of configuration: defaults, validation, live-or-restart,
#: the help text of `-h`, `configtest` and notesd.conf.example. A default of
#: "" for a path means "derived at load time", as its help says.
DEFAULTS = {
    "listen": Option("127.0.0.1:5000", _parse_listen, False,
                     "HOST:PORT or [IPV6]:PORT to serve HTTP on; port 0 picks a free port"),
    "state_dir": Option("", _parse_path, False,
                        "directory of the database and file log; /var/lib/notesd as root, "
                        "else ~/.local/state/notesd"),
    "pidfile": Option("", _parse_path, False,
                      "pid file; /run/notesd.pid as root, else STATE_DIR/notesd.pid"),
    "database": Option("", _parse_path, False, "sqlite3 database; STATE_DIR/notes.db"),
    "log": Option("", _parse_path, False,
                  "syslog, stderr or a file path; syslog when /dev/log exists, "
                  "else STATE_DIR/notesd.log (`run` logs to stderr unless set)"),
    "log_level": Option("info", _parse_level, True, "debug, info, warning or error"),
    "syslog_address": Option("/dev/log", _parse_path, False, "unix socket of the syslog daemon"),
    "access_log": Option("yes", _parse_bool, True, "log one line per HTTP request (yes/no)"),
    "umask": Option("027", _parse_umask, False, "file mode creation mask of the daemon (octal)"),
    "user": Option("", _parse_account(pwd.getpwnam, "user"), False,
                   "drop privileges to this user after binding"),
    "group": Option("", _parse_account(grp.getgrnam, "group"), False,
                    "and to this group (default: the user's)"),
    "chroot": Option("", _parse_path, False, "chroot into this directory after opening files"),
    "token": Option("", _parse_token, True,
                    "if set, every request but /health needs 'Authorization: Bearer TOKEN' "
                    "(a browser signs in with any user name and TOKEN as password)"),
    "allowed_hosts": Option("", _parse_hosts, True,
                            "names clients may call notesd by (Host) and origins that may "
                            "write: HOST or HOST:PORT, comma- or space-separated, * for any "
                            "name; port 0 is the port notesd listens on. Default: with a "
                            "loopback listen, localhost, 127.0.0.1 and [::1] at its port; "
                            "else *"),
    "max_body": Option("1048576", _parse_positive(int, 0, 2**31), True,
                       "largest request body in bytes (413 above)"),
    "max_body_total": Option("16777216", _parse_positive(int, 0, 2**40), True,
                             "bytes of request bodies held at once, all connections "
                             "together (503 with Retry-After above)"),
    "timeout": Option("10", _parse_positive(float, 0.01, 3600.0), True,
                      "seconds a connection may idle or stall, and a request may take from "
                      "its first byte to its last (408); also how long stop, reload and "
                      "check wait"),
    "max_connections": Option("512", _parse_positive(int, 1, 10**6), True,
                              "connections served at once, a thread each (at most the "
                              "open-file limit less 32); above it the longest-idle one is "
                              "closed, else the new one gets 503"),
    "queue_size": Option("10000", _parse_positive(int, 1, 10**6), False,
                         "commands waiting for the main loop before requests get 503"),
    "command_budget": Option("50", _parse_positive(int, 1, 60000), True,
                             "milliseconds a page or search may hold the main loop before "
                             "it is aborted with 503"),
}
LIVE_KEYS = frozenset(k for k, o in DEFAULTS.items() if o.live)
#: the keys that say where a running daemon's pid file is.
LOCATING_KEYS = frozenset({"state_dir", "pidfile"})
#: values of `log` that name no file.
LOG_TARGETS = ("syslog", "stderr")
PATH_KEYS = ("state_dir", "pidfile", "database", "chroot", "syslog_address")
#: the keys whose empty default is worked out at load time (_derive_paths).
DERIVED_KEYS = ("state_dir", "pidfile", "database", "log")

###############################################################################
# Errors ######################################################################
###############################################################################


class NotesdError(Exception):
    """Every error notesd reports. `status` is the HTTP status the API answers
    with, `exit_code` what the CLI exits with; `headers` go with the response.
    Translated in exactly two places: ApiHandler.dispatch and main()."""

    def __init__(self, message, status=500, exit_code=1, headers=()):
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code
        self.headers = tuple(headers)


class ConfigError(NotesdError):
    """An invalid configuration: exit 6 (LSB 'program is not configured'), HTTP 400."""

    def __init__(self, message):
        super().__init__(message, status=400, exit_code=6)


def _http_error(status, message, *headers):
    return NotesdError(message, status=status, headers=headers)


###############################################################################
# Config ######################################################################
###############################################################################


class Config:
    """A validated, immutable configuration.

    Methods for the caller: Config.load(path, overrides), replace(changes),
    public(). Values read as attributes (config.listen). Any thread may read a
    Config; the main loop changes the configuration by publishing a new one.
    """

    def __init__(self, values, path=None, overrides=None):
        self._values = values
        self.__dict__.update(values)  # plain attributes: read on every request
        self.path = path
        self.overrides = dict(overrides or {})
        self.warnings = []  # what a lenient load() passed over

    @classmethod
    def load(cls, path=None, overrides=None, root=None, lenient=False):
        """Read `path` (INI, section [notesd]), then apply `overrides` (from the
        command line, which win). Relative paths in the file are relative to
        the file's directory, on the command line to the current directory.
        `root` picks the default paths (see DEFAULTS); by default, whether we
        run as root now. A reload passes the first load's: privileges may
        have been dropped since.

        `lenient` is for the commands that only find and control a running
        daemon (status, stop, check): a typo in a key they do not need must
        not keep an operator from stopping it. A bad or unknown key then
        takes its default and is listed in `warnings`; only the keys that
        locate the daemon (LOCATING_KEYS) must be valid."""
        raw, warnings = {}, []
        if path:
            path = os.path.abspath(path)
            raw = _read_ini(path)
        for key in list(raw):
            if key not in DEFAULTS:
                if not lenient:
                    raise _unknown_key(key, path)
                warnings.append(str(_unknown_key(key, path)) + "; ignored")
                del raw[key]
        values = {}
        for key, option in DEFAULTS.items():
            source, text = "default", option.default
            if key in raw:
                source, text = path, raw[key]
            if overrides and overrides.get(key) is not None:
                source, text = "the command line", overrides[key]
            try:
                values[key] = _validate(key, text, source)
            except ConfigError as e:
                if not lenient or key in LOCATING_KEYS:
                    raise
                warnings.append(f"{e}; using the default, {option.default or '(derived)'}")
                source, text = "default", option.default
                values[key] = _validate(key, text, source)
            if key in PATH_KEYS or (key == "log" and text not in ("", *LOG_TARGETS)):
                base = os.path.dirname(path) if source == path else os.getcwd()
                values[key] = os.path.join(base, text) if text else ""
        values["_log_explicit"] = bool(raw.get("log") or (overrides or {}).get("log"))
        values["_root"] = os.geteuid() == 0 if root is None else root
        _derive_paths(values)
        _derive_hosts(values)
        config = cls(values, path, overrides)
        config.warnings = warnings
        return config

    def replace(self, changes, source="PATCH /config"):
        """A new Config with `changes` validated and applied: {key: value},
        values of the JSON types GET /config shows (_from_json)."""
        values = dict(self._values)
        for key, value in changes.items():
            if key == "token" and value == REDACTED:  # as public() shows it: unchanged
                continue
            values[key] = _validate(key, _from_json(key, value, source), source)
        _derive_hosts(values)
        return Config(values, self.path, self.overrides)

    def argv(self):
        """Command-line arguments that load this configuration again, but for
        a --token, which `start` hands over in TOKEN_ENVIRONMENT: any local
        user may read a process's argv (ps), for as long as it runs. Paths
        are given absolute: a successor (restart) starts in /, not in the
        directory the first `start` was typed in."""
        args = ["-c", self.path] if self.path else []
        return args + [f"--{key.replace('_', '-')}={self._absolute(key, text)}"
                       for key, text in self.overrides.items()
                       if text is not None and key != "token"]

    def _absolute(self, key, text):
        if text and (key in PATH_KEYS or (key == "log" and text not in LOG_TARGETS)):
            return self._values[key]
        return text

    def changed(self, other):
        """Keys whose values differ between self and other."""
        return sorted(k for k in DEFAULTS if self._values[k] != other._values[k])

    def public(self):
        """The values for GET /config and configtest: JSON types, token redacted."""
        out = {k: self._values[k] for k in DEFAULTS}
        out["umask"] = format(out["umask"], "04o")
        out["allowed_hosts"] = _show_hosts(out["allowed_hosts"])
        if out["token"]:
            out["token"] = REDACTED
        return out

    @property
    def address(self):
        """(host, port, family) of `listen`."""
        host, _, port = self.listen.rpartition(":")
        if host.startswith("["):
            return host[1:-1], int(port), socket.AF_INET6
        return host or "0.0.0.0", int(port), socket.AF_INET


def _read_ini(path):
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise ConfigError(f"{path}: cannot read configuration: {e}") from None
    extra = [s for s in parser.sections() if s != "notesd"]
    if extra or not parser.has_section("notesd"):
        raise ConfigError(f"{path}: expected exactly one section, [notesd]"
                          + (f"; found [{extra[0]}]" if extra else ""))
    return dict(parser.items("notesd"))


def _validate(key, text, source):
    if key not in DEFAULTS:
        raise _unknown_key(key, source)
    try:
        return DEFAULTS[key].parse(text.strip())
    except ValueError as e:
        shown = "***" if key == "token" else text  # a near-miss token is still a secret
        raise ConfigError(f"{source}: key '{key}' = '{shown}': {e}") from None


def _config_schema(key):
    """The JSON Schema of a key's values (see _typed); a string by default."""
    return getattr(DEFAULTS[key].parse, "schema", {"type": "string"})


def _from_json(key, value, source):
    """A JSON value for `key` (PATCH /config, or a reload: the types GET
    /config shows) as the text its parser reads, refused unless it fits the
    key's schema: {"token": true} must not set the token "yes", nor
    {"log_level": null} pass a schema that says nothing of its type."""
    if key not in DEFAULTS:
        raise _unknown_key(key, source)
    schema = _config_schema(key)
    if not _fits(schema, value):
        shown = REDACTED if key == "token" else json.dumps(value)[:100]
        raise ConfigError(f"{source}: key '{key}' = {shown}: expected " + (
            "true or false" if schema["type"] == "boolean" else
            "one of " + ", ".join(schema["enum"]) if "enum" in schema else
            f"a string matching {schema['pattern']}" if "pattern" in schema else
            f"a JSON {schema['type']} from {schema['minimum']} to {schema['maximum']}"
            if "minimum" in schema else f"a JSON {schema['type']}"))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(int(value) if schema["type"] == "integer" else value)


def _fits(schema, value):
    """Does a JSON value fit a key's schema (JSON Schema 2020-12: type, enum,
    a pattern matched against the whole value, minimum and maximum)?"""
    kind = schema["type"]
    if kind == "boolean" or isinstance(value, bool):
        return kind == "boolean" and isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str) and value in schema.get("enum", [value]) and (
            "pattern" not in schema or re.fullmatch(schema["pattern"][1:-1], value) is not None)
    if not isinstance(value, (int, float)):
        return False
    if kind == "integer" and not (isinstance(value, int) or value.is_integer()):
        return False  # JSON Schema's integer: a number without a fraction, 5.0 too
    return schema.get("minimum", value) <= value <= schema.get("maximum", value)


def _unknown_key(key, source):
    return ConfigError(f"{source}: unknown key '{key}'; known keys: " + ", ".join(DEFAULTS))


def _derive_paths(values):
    """Fill the path defaults that depend on who runs notesd (see DEFAULTS)."""
    root = values["_root"]
    if not values["state_dir"]:
        # The passwd entry's home, not $HOME: cron may run us with HOME=/.
        try:
            home = pwd.getpwuid(os.geteuid()).pw_dir
        except KeyError:  # a uid with no entry (containers): say so, no traceback
            raise ConfigError(f"uid {os.geteuid()} has no passwd entry, so state_dir and "
                              "pidfile have no default; set them") from None
        values["state_dir"] = ("/var/lib/notesd" if root else
                               os.path.join(home, ".local/state/notesd"))
    state = values["state_dir"]
    if not values["pidfile"]:
        values["pidfile"] = "/run/notesd.pid" if root else os.path.join(state, "notesd.pid")
    if not values["database"]:
        values["database"] = os.path.join(state, "notes.db")
    if not values["log"]:
        values["log"] = ("syslog" if os.path.exists(values["syslog_address"]) else
                         os.path.join(state, "notesd.log"))
    if values["chroot"] and not os.path.isdir(values["chroot"]):
        raise ConfigError(f"key 'chroot' = '{values['chroot']}': not a directory")
    jail = values["chroot"].rstrip("/") + "/"
    if values["chroot"] and values["log"] not in LOG_TARGETS and \
            not values["log"].startswith(jail):
        raise ConfigError(f"key 'log' = '{values['log']}': must be inside chroot "
                          f"'{values['chroot']}', or the log could not be reopened")
    files = {key: values[key] for key in ("pidfile", "database", "log")}
    files["url file beside the pid file"] = url_file(values["pidfile"])
    seen = {}
    for key, path in files.items():
        if path in seen:
            raise ConfigError(f"key '{key}' and '{seen[path]}' name the same file {path}")
        seen[path] = key


def _derive_hosts(values):
    """The default of allowed_hosts. A loopback `listen` is for this machine's
    own clients, which a DNS-rebinding page is one of: there notesd answers to
    the loopback names only, at its own port (0: whatever port it got), so no
    page from another local port may write either. Any other `listen` keeps
    answering to every name (*), as before allowed_hosts: behind a proxy or on
    a network, only the operator knows the names (nginx's server_name)."""
    if values["allowed_hosts"]:
        return
    host, _, port = values["listen"].rpartition(":")
    host = host.strip("[]").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # another name, or "" for every address
        loopback = False
    if not loopback:
        values["allowed_hosts"] = (("*", None),)
        return
    names = ["localhost", "127.0.0.1", "[::1]"]
    own = _split_host(f"[{host}]" if ":" in host else host)[0]
    values["allowed_hosts"] = tuple((name, int(port)) for name in
                                    names + [own] * (own not in names))


def example_config():
    """The text of notesd.conf.example, generated from DEFAULTS."""
    lines = ["# notesd configuration: every key with its default. Uncomment to change.",
             "# Generated by: python3 notesd.py configtest --example", "", "[notesd]"]
    for key, option in DEFAULTS.items():
        lines += ["", f"# {option.help}" + ("" if option.live else " (needs a restart)"),
                  f"#{key} = {option.default}"]
    return "\n".join(lines) + "\n"


###############################################################################
# Storage #####################################################################
###############################################################################

#: Schema migrations: MIGRATIONS[n] takes a database from user_version n to n+1.
#: The substring index behind ?q= (SQLite 3.34's FTS5 trigram tokenizer),
#: an external-content table: the text is kept once, in notes. Indexing a
#: note costs ten times its INSERT (bench/), so a write only queues its id
#: in notes_unindexed, in its own transaction; the main loop indexes the
#: queue in bulk when idle (and a little every tick), as PostgreSQL's GIN
#: fastupdate does, and a search reads the index and the queue (Store.page).
#: Only the removal of a note already indexed is done at once: FTS5 needs
#: the very text it indexed to take it out. Migration 3 (SCAN_LONG_NOTES)
#: changes the triggers; these are migration 2 as it ran.
SEARCH_INDEX = (
    """CREATE VIRTUAL TABLE notes_search USING fts5(
           text, content='notes', content_rowid='id',
           tokenize='trigram case_sensitive 1')""",
    "CREATE TABLE notes_unindexed (id INTEGER PRIMARY KEY)",
    "INSERT INTO notes_unindexed (id) SELECT id FROM notes",
    """CREATE TRIGGER notes_search_insert AFTER INSERT ON notes BEGIN
           INSERT INTO notes_unindexed (id) VALUES (new.id);
       END""",
    """CREATE TRIGGER notes_search_update AFTER UPDATE OF text ON notes
       WHEN NOT EXISTS (SELECT 1 FROM notes_unindexed WHERE id = old.id) BEGIN
           INSERT INTO notes_search (notes_search, rowid, text)
               VALUES ('delete', old.id, old.text);
           INSERT INTO notes_unindexed (id) VALUES (new.id);
       END""",
    """CREATE TRIGGER notes_search_delete AFTER DELETE ON notes BEGIN
           INSERT INTO notes_search (notes_search, rowid, text)
               SELECT 'delete', old.id, old.text
               WHERE NOT EXISTS (SELECT 1 FROM notes_unindexed WHERE id = old.id);
           DELETE FROM notes_unindexed WHERE id = old.id;
       END""",
)


def _add_search_index(db):
    """Migration 2: the search index, where this SQLite has FTS5's trigram
    tokenizer; elsewhere ?q= scans (Store.indexed says which). Also run at
    a start that finds it missing: a database may move between machines.
    Instant: the notes are only queued; the main loop indexes them."""
    if _has_trigram(db):
        for statement in SEARCH_INDEX:
            db.execute(statement)


#: Migration 3: a note of more than INDEX_NOTE_BYTES is never indexed. FTS5
#: takes a note in one step that no budget can interrupt, and random text
#: costs it more than linearly (1,000,000 characters, under max_body: 5.6 s,
#: and as long again to take it out on a PUT or DELETE; at 300k notes, one of
#: 16 KB took 53 ms, one of 8 KB 2-6 ms). The triggers send such a note to
#: notes_scanned instead of the queue, and a search scans those one by one
#: under the command budget (Store._scanned). Their delete clauses must
#: know them: FTS5 told to take out a note it never indexed damaged the
#: index ("database disk image is malformed" at the next write). A database
#: indexed before this may hold long notes in its index, so the index is
#: emptied and every note queued or put aside again: the main loop rebuilds
#: it in the background, as it built it (1M notes: about two minutes, once).
#: The bound is written into the triggers: changing it needs a migration.
SCAN_LONG_NOTES = (
    "CREATE TABLE notes_scanned (id INTEGER PRIMARY KEY)",
    "INSERT INTO notes_search (notes_search) VALUES ('delete-all')",
    "DELETE FROM notes_unindexed",
    "INSERT INTO notes_unindexed (id) SELECT id FROM notes WHERE {short}",
    "INSERT INTO notes_scanned (id) SELECT id FROM notes WHERE NOT {short}",
    "DROP TRIGGER notes_search_insert",
    "CREATE TRIGGER notes_search_insert AFTER INSERT ON notes BEGIN {file} END",
    "DROP TRIGGER notes_search_update",
    "CREATE TRIGGER notes_search_update AFTER UPDATE OF text ON notes BEGIN {forget} {file} END",
    "DROP TRIGGER notes_search_delete",
    "CREATE TRIGGER notes_search_delete AFTER DELETE ON notes BEGIN {forget} END",
)
#: The triggers' two halves. FILE_NOTE: the new text goes to the queue, or
#: aside if long. FORGET_NOTE: the old text leaves the index (only if it is
#: there: neither queued nor aside), the queue and notes_scanned.
FILE_NOTE = """
           INSERT INTO notes_unindexed (id) SELECT new.id WHERE {new_short};
           INSERT INTO notes_scanned (id) SELECT new.id WHERE NOT {new_short};"""
FORGET_NOTE = """
           INSERT INTO notes_search (notes_search, rowid, text)
               SELECT 'delete', old.id, old.text
               WHERE NOT EXISTS (SELECT 1 FROM notes_unindexed WHERE id = old.id)
                 AND NOT EXISTS (SELECT 1 FROM notes_scanned WHERE id = old.id);
           DELETE FROM notes_unindexed WHERE id = old.id;
           DELETE FROM notes_scanned WHERE id = old.id;"""
#: The largest note indexed, in bytes of UTF-8 (SCAN_LONG_NOTES).
INDEX_NOTE_BYTES = 8192
#: Characters of a long note matched at once between two looks at the
#: budget (Store._contains): 64k x QUERY_MAX is a few ms, even on 3.9.
SCAN_WINDOW = 1 << 16
#: A note's size in bytes of UTF-8, in SQL: CAST AS BLOB relabels the text
#: without copying it (SQLite 3.40 has no octet_length()).
NOTE_BYTES = "length(CAST({} AS BLOB))"


def _scan_long_notes(db):
    """Migration 3 (SCAN_LONG_NOTES), where there is an index to change."""
    if _has_index(db):
        short = f"{NOTE_BYTES.format('{}')} <= {INDEX_NOTE_BYTES}"
        parts = {"short": short.format("text"), "forget": FORGET_NOTE,
                 "file": FILE_NOTE.format(new_short=short.format("new.text"))}
        for statement in SCAN_LONG_NOTES:
            db.execute(statement.format(**parts))


def _merge_in_steps(db):
    """Migration 4: FTS5's automerge off, where there is an index. After each
    write FTS5 merged segments by itself, a level at a time: adding 100,000
    notes to an index of 1M, 1 indexing transaction in 14 held the loop over
    10 ms, and the longest 74-236 ms. index_some merges INDEX_MERGE pages in
    each of its transactions instead: the longest 28 ms, and searches as fast
    (bench figures in the README, Performance)."""
    if _has_index(db):
        db.execute("INSERT INTO notes_search (notes_search, rank) VALUES ('automerge', 0)")


def _has_index(db):
    """Does the database hold the search index (migration 2)?"""
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'notes_search'").fetchone() \
        is not None


def _has_trigram(db):
    try:
        db.execute("CREATE VIRTUAL TABLE temp.probe USING fts5(x, tokenize='trigram')")
    except sqlite3.OperationalError:
        return False
    db.execute("DROP TABLE temp.probe")
    return True


#: The schema, one step per version (PRAGMA user_version): SQL, or a
#: function of the connection. Each runs in its own transaction.
MIGRATIONS = [
    """CREATE TABLE notes (
           id      INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reuse a deleted id
           text    TEXT NOT NULL,
           created TEXT NOT NULL,                      -- RFC 3339, UTC
           updated TEXT NOT NULL)""",
    _add_search_index,
    _scan_long_notes,
    _merge_in_steps,
]
#: the shortest ?q= the trigram index serves; shorter ones scan, under budget.
SEARCH_MIN = 3
#: the first SQLite whose quick_check takes a table name (damage_before_ready).
QUICK_CHECK_TABLE = (3, 33, 0)
#: notes indexed per transaction when the main loop catches up, and seconds
#: it spends on that at once; it does when no command came for INDEX_IDLE
#: seconds (under load, a slice there would hold every request behind it).
INDEX_CHUNK, INDEX_SLICE, INDEX_IDLE = 50, 0.01, 0.005
#: ...and at most this many bytes of text per transaction (a typical chunk
#: holds 6,000): FTS5 takes a chunk whole, and 50 notes of 300,000 random
#: characters held the loop 75 s (attack review). No queued note is larger
#: than INDEX_NOTE_BYTES (SCAN_LONG_NOTES).
INDEX_CHUNK_BYTES = 16_384
#: ...and merges up to INDEX_MERGE pages of the index's segments in each
#: (FTS5's 'merge'; its automerge is off, _merge_in_steps): 25 held the loop
#: less (p99 12 ms against 16) but left searches twice as slow as 50 did.
INDEX_MERGE = 50
#: However busy, the loop gives the index INDEX_SHARE of its time, and
#: INDEX_SHARE_BEHIND once more than INDEX_BACKLOG notes wait: a search
#: scans the queue, about 1.4 us a note (14 ms for 10,000, a third of the
#: default command_budget), so past that the writers pay, as PostgreSQL's
#: gin_pending_list_limit makes them; below it they pay nearly nothing (3%
#: cost POST c=16 7% of its CPU, 0.5% nothing measurable). A back-to-back
#: client never leaves the loop INDEX_IDLE to itself: with half a slice a
#: tick, 100,000 migrated notes were not indexed after 300 s (bench/search.py).
INDEX_SHARE, INDEX_SHARE_BEHIND, INDEX_BACKLOG = 0.005, 0.25, 10_000

Row = collections.namedtuple("Row", "id text created updated")


def utc_now():
    """RFC 3339 timestamp, UTC, microseconds."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def damage(db, table=None):
    """What PRAGMA quick_check finds wrong with the database open as `db`
    (or with `table` alone and its indexes), one line a problem, at most
    three; [] when it passes. Any thread that may use `db`.

    quick_check reads every page and checks SQLite's structure (b-tree
    pages, cells, free list), skipping the cross-checks of indexes against
    tables that integrity_check adds. It cannot see a changed byte inside a
    note's text: SQLite keeps no checksums. A file too damaged to be checked
    at all raises SQLITE_CORRUPT or SQLITE_NOTADB, which CPython turns into
    sqlite3.DatabaseError itself (Modules/_sqlite/util.c); that is damage
    too. OperationalError (locked, I/O error, cannot open, interrupted) is
    not, and propagates."""
    try:
        rows = db.execute(f"PRAGMA quick_check({table or 3})").fetchall()
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as e:
        rows = [(str(e),)]
    lines = [" ".join(line.split()) for row in rows for line in str(row[0]).splitlines()]
    problems = [line for line in lines if line and not line.startswith("*** in database")]
    return [] if problems == ["ok"] else problems[:3]  # one line each: the readiness pipe


def damage_before_ready(db):
    """quick_check of what clients gave notesd: every table but the search
    index's (FTS5's notes_search_* tables), each alone, which SQLite 3.33
    allows. The index is most of the file (1M notes: 557 MB, the notes 186),
    and the check of the whole file took `start` past its 1 s; the daemon
    checks the whole file once it serves (Store.check_whole_file). Damage
    found here is confirmed by the check of the whole file before notesd
    refuses to start: a check of one table skips the pages of the others,
    and an error in how an older SQLite did that would refuse a sound file.
    Before 3.33, the argument would be read as a count: the whole file.
    Store calls it only once writes_at_open has read sqlite_master: an
    unreadable one has had the whole file's check."""
    if sqlite3.sqlite_version_info < QUICK_CHECK_TABLE:
        return damage(db)
    tables = [row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'notes_search%'")]
    for table in ["sqlite_master"] + tables:
        if damage(db, table):
            return damage(db)
    return []


def writes_at_open(db):
    """Will opening the database write to it: a migration due, or the search
    index to add? Those writes take pages from the free list before READY,
    so the whole file is checked first (a free page that was also the notes'
    root page made the index's table of a migration, and 148 of 150 notes
    were gone; attack review). Unreadable: yes, and the check says why."""
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        index = _has_index(db)
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError:
        return True
    return version < len(MIGRATIONS) or (not index and _has_trigram(db))


def damaged(path, problems, consequence):
    """The message for damage quick_check found: what notesd does, and the
    README's way out."""
    return (f"database {path} is damaged; PRAGMA quick_check says: {'; '.join(problems)}. "
            f"{consequence}: restore the latest backup as README.md says (Backups, Restore)")


def etag(row):
    """Strong entity tag of a note (RFC 9110 8.8.3): changes with every write."""
    digest = hashlib.blake2b(f"{row.id}\0{row.updated}\0{row.text}".encode(), digest_size=8)
    return f'"{digest.hexdigest()}"'


class Store:
    """The notes database: one sqlite3 connection, main loop only.

    sqlite3's check_same_thread (on by default) enforces that. WAL with
    synchronous=FULL makes every COMMIT durable before the main loop replies;
    the caller groups writes with begin()/commit() (group commit).

    A database whose notes fail PRAGMA quick_check is refused before
    anything else touches it: serving from it would answer from broken
    pages, and a write could spread the damage. It runs at every start, not
    only after an unclean stop: a restored file, or a disk that went bad
    while notesd was stopped, is what it is for. The tables are checked
    before READY, the search index after (damage_before_ready): with 1M
    notes the whole file's check took 0.41-0.88 s of `start`'s 1 s, the
    notes' 0.2 s. The whole file is checked once the daemon serves, by a
    thread with a connection of its own (check_whole_file), opened here so
    that it needs no path inside a chroot; writes wait for its verdict, and
    damage found there stops them (MainLoop.do_checked). An open that will
    write (writes_at_open: a migration) checks the whole file first.
    """

    def __init__(self, path):
        self.path = path
        self.top = None  # the largest id given so far, once read (ids_left)
        try:
            self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
            whole = writes_at_open(self.db)
            problems = damage(self.db) if whole else damage_before_ready(self.db)
            if problems:
                self.db.close()
                raise NotesdError(damaged(path, problems, "notesd will not serve from it"))
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL mode (got {mode})")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA temp_store=MEMORY")  # no temp files: works in a chroot
            self._migrate()
            self.indexed = self._search_index()
            self.unindexed = self._backlog()
            self.count = self.db.execute("SELECT count(*) FROM notes").fetchone()[0]
            self.files = self._held_files()  # before the checker's are open
            self.checker = None  # the whole file is checked already if so:
            if not whole and sqlite3.sqlite_version_info >= QUICK_CHECK_TABLE:
                self.checker = sqlite3.connect(path, timeout=BUSY_TIMEOUT,
                                               check_same_thread=False)
                self.checker.execute("SELECT 1 FROM sqlite_master").fetchall()  # opens -wal, -shm
                # checked() stops the check this way: interrupt() is lost on
                # a statement that has not begun yet.
                self.checker.set_progress_handler(lambda: self.checker_stop, BUDGET_STEPS)
        except sqlite3.Error as e:
            raise NotesdError(f"cannot open database {path}: {e}") from None
        self.checking, self.checker_stop, self.checker_done = None, False, threading.Event()
        self.deadline, self.budget_aborts = float("inf"), 0
        self.db.set_progress_handler(self._past_deadline, BUDGET_STEPS)

    def _search_index(self):
        """Is ?q= served by the index? A database indexed elsewhere, opened
        by a SQLite without FTS5, would fail every write in its triggers."""
        if not _has_index(self.db):
            return False
        if not _has_trigram(self.db):
            raise sqlite3.DatabaseError(
                f"its search index needs FTS5's trigram tokenizer, which this SQLite "
                f"{sqlite3.sqlite_version} lacks (3.34 or later, with FTS5)")
        return True

    def indexes(self, text):
        """Can the index serve a search for `text`?"""
        return self.indexed and len(text) >= SEARCH_MIN

    def index_some(self, seconds):
        """Index queued notes, INDEX_CHUNK notes and INDEX_CHUNK_BYTES at
        most per transaction (one note at least), for about `seconds`; then
        self.unindexed says how many are left."""
        deadline = time.monotonic() + seconds
        while True:
            queued = self.db.execute(
                f"SELECT u.id, {NOTE_BYTES.format('n.text')} FROM notes_unindexed AS u"
                " CROSS JOIN notes AS n ON n.id = u.id ORDER BY u.id LIMIT ?",
                (INDEX_CHUNK,)).fetchall()
            last = self._chunk_end(queued)
            if last is None:
                self.unindexed = 0
                return
            self.begin()
            try:
                self.db.execute("INSERT INTO notes_search (rowid, text) SELECT n.id, n.text"
                                " FROM notes_unindexed AS u CROSS JOIN notes AS n"
                                " ON n.id = u.id WHERE u.id <= ?", (last,))
                self.db.execute("DELETE FROM notes_unindexed WHERE id <= ?", (last,))
                self.db.execute("INSERT INTO notes_search (notes_search, rank)"
                                " VALUES ('merge', ?)", (INDEX_MERGE,))
                self.commit()
            finally:
                self.rollback()
            if last == queued[-1][0] and len(queued) < INDEX_CHUNK:
                self.unindexed = 0
                return
            if time.monotonic() >= deadline:
                self.unindexed = self._backlog()
                return

    @staticmethod
    def _chunk_end(queued):
        """The last id of the next indexing transaction, from `queued`
        ((id, bytes) in id order): as many notes as INDEX_CHUNK_BYTES
        holds, one at least; None if nothing is queued."""
        last, size = None, 0
        for note_id, length in queued:
            size += length
            if last is not None and size > INDEX_CHUNK_BYTES:
                break
            last = note_id
        return last

    def _backlog(self):
        """How many notes wait for the index, at most (the span of their
        ids: two index look-ups, where count(*) reads them all); 0 if none."""
        if not self.indexed:
            return 0
        span = self.db.execute("SELECT (SELECT max(id) FROM notes_unindexed)"
                               " - (SELECT min(id) FROM notes_unindexed) + 1").fetchone()[0]
        return span or 0

    def search_counts(self):
        """/status's search figures: notes waiting for the index, and notes
        too long for it (searched by scanning); None without an index."""
        if not self.indexed:
            return {"unindexed": None, "scanned": None}
        return {"unindexed": self.db.execute("SELECT count(*) FROM notes_unindexed").fetchone()[0],
                "scanned": self.db.execute("SELECT count(*) FROM notes_scanned").fetchone()[0]}

    def _past_deadline(self):
        return time.monotonic() > self.deadline

    @contextlib.contextmanager
    def budget(self, seconds, hint):
        """Abort a statement of the block that runs past `seconds` (sqlite's
        progress handler), as a 503 that says so and how to avoid it."""
        self.deadline = time.monotonic() + seconds
        try:
            yield
        except sqlite3.OperationalError as e:
            if time.monotonic() <= self.deadline or "interrupt" not in str(e):
                raise
            self.budget_aborts += 1
            raise _http_error(503, f"this request needed more than the {seconds * 1000:g} ms "
                              f"(key command_budget) a request may hold notesd's main loop; "
                              f"{hint}",
                              ("Retry-After", "1")) from None
        finally:
            self.deadline = float("inf")

    def _held_files(self):
        """{descriptor: path} of the database, -wal and -shm files that sqlite
        holds open (it opened all three for the first read, above), found in
        /proc/self/fd. Without /proc, vanished() can tell nothing."""
        wanted = {os.path.realpath(self.path) + suffix for suffix in ("", "-wal", "-shm")}
        held = {}
        with contextlib.suppress(OSError):
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/self/fd/{fd}")
                    if target in wanted:
                        held[int(fd)] = target
        return held

    def check_whole_file(self, report):
        """Start the quick_check of the whole file in a thread, on the
        checker connection: sqlite3 lets other threads run meanwhile, and a
        WAL reader holds up no writer. `report(problems)` gets its verdict
        ([] if sound, None if it did not finish). Once only; nothing to do
        before SQLite 3.33, where the check before READY was of the whole
        file."""
        if self.checker is None:
            return

        def check():
            started = time.monotonic()
            try:
                problems = damage(self.checker)
            except sqlite3.Error as e:  # stopped by checked() (a stop), or unreadable
                log.log(logging.INFO if str(e) == "interrupted" else logging.WARNING,
                        "quick_check of %s did not finish: %s", self.path, e)
                problems = None
            finally:
                self.checker_done.set()  # the connection is checked()'s to close
            if problems is not None:
                log.info("quick_check of %s: %s in %.2f s", self.path,
                         "damage found" if problems else "ok", time.monotonic() - started)
            report(problems)
        self.checking = threading.Thread(target=check, name="quick_check", daemon=True)
        self.checking.start()

    def chroot(self, root):
        """After chroot(2): the paths as seen from the new root."""
        self.path = jailed(self.path, root)
        self.files = {fd: jailed(path, root) for fd, path in self.files.items()}

    def rescue(self):
        """Copy the database as this connection still sees it to a new file
        beside its path, as `backup` does (backup_database): removed files
        stay readable through the descriptors sqlite holds, and the online
        backup API reads through them. Returns the copy's path."""
        copy = f"{self.path}.rescued-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        backup_database(self.db, copy)
        return copy

    def vanished(self):
        """Why the files sqlite holds are no longer the files at their paths
        (removed or replaced: a deleted -wal takes every commit since the last
        checkpoint with it at the next start, a deleted database everything at
        the next stop), or None. notesd cannot prevent it; it can notice."""
        for fd, path in self.files.items():
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return f"{path} was removed while notesd runs"
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                return f"{path} was replaced while notesd runs"
        return None

    def probe(self):
        """A write that touches the disk (the header's user_version, rewritten
        as it is): do writes work again, after the disk was full?"""
        self.begin()
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            self.db.execute(f"PRAGMA user_version = {int(version)}")
            self.commit()
        finally:
            self.rollback()

    def ids_left(self):
        """How many ids AUTOINCREMENT may still give before MAX_ID. The
        largest id so far is read once and then kept by the writes (and
        forgotten by a rollback): reading it for every batch of creates
        cost POST a tenth of its main-loop time (yappi)."""
        if self.top is None:
            row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'notes'").fetchone()
            self.top = row[0] if row else 0
        return MAX_ID - self.top

    def _migrate(self):
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this "
                                        f"notesd knows ({len(MIGRATIONS)})")
        for number in range(version, len(MIGRATIONS)):
            self.db.execute("BEGIN IMMEDIATE")
            step = MIGRATIONS[number]
            step(self.db) if callable(step) else self.db.execute(step)
            self.db.execute(f"PRAGMA user_version = {number + 1}")
            self.db.execute("COMMIT")
        if not _has_index(self.db):  # made where SQLite had no FTS5: the index's steps
            self.db.execute("BEGIN IMMEDIATE")
            for step in MIGRATIONS[1:]:  # each does nothing without an index
                step(self.db)
            self.db.execute("COMMIT")

    def begin(self):
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self):
        self.db.execute("COMMIT")

    def rollback(self):
        if self.db.in_transaction:
            self.top = None  # the ids of the rolled-back writes are free again
            self.db.execute("ROLLBACK")

    def ping(self):
        self.db.execute("SELECT 1").fetchone()

    def checked(self):
        """Close the checker connection, stopping its check first if it
        still runs (close(), at a stop). Main thread only."""
        if self.checker is None:
            return
        self.checker_stop = True  # its progress handler ends the check
        if self.checking is None or self.checker_done.wait(timeout=1):
            self.checker.close()
            self.checker = None

    def close(self):
        """The checker first: only the last connection to close checkpoints
        the WAL and removes it (closed after, it left a -wal that held every
        acknowledged write of the run, attack review)."""
        self.checked()
        self.rollback()
        self.db.close()

    def page(self, after, limit, text=None, backwards=False):
        """Up to `limit` notes with id > after, oldest first, text containing
        `text` (case-sensitive): the index finds the candidates, instr()
        keeps exactly those that contain it. `backwards`: those with
        id <= after, newest first (the browsable page's "previous" link).
        Stops early, two rows or more in, once their texts pass PAGE_BYTES
        characters: JSON spells a character in a byte or more, so the HTTP
        thread, which cuts the page exactly (list_notes), could not send the
        rows after; and one row past its page tells it that more exist."""
        side, order = ("<=", "DESC") if backwards else (">", "ASC")
        if text and self.indexes(text):
            cursors = self._search(text, after, limit, side, order)
        elif text:  # too short for the index, or no index: scan (long notes apart)
            # The cheaper test first: with an index, instr() and then the look
            # in notes_scanned for the few that match (first: a full scan took
            # 9% longer); without, the size, so that instr() sees no long note.
            terms = ["instr(text, ?2) > 0", f"NOT {self._long('id', 'text')}"]
            where = " AND ".join(terms if self.indexed else terms[::-1])
            cursors = [self.db.execute(f"SELECT * FROM notes WHERE id {side} ?1 AND {where}"
                                       f" ORDER BY id {order} LIMIT ?3", (after, text, limit)),
                       self._scanned(text, after, limit, side, order)]
        else:
            cursors = [self.db.execute(
                f"SELECT * FROM notes WHERE id {side} ? ORDER BY id {order} LIMIT ?",
                (after, limit))]
        found = cursors[0] if len(cursors) == 1 else \
            heapq.merge(*cursors, key=lambda row: -row[0] if backwards else row[0])
        rows, size = [], 0
        try:
            for row in itertools.islice(found, limit):
                rows.append(Row._make(row))
                size += len(row[1])
                if size > PAGE_BYTES and len(rows) > 1:
                    break
        finally:
            for cursor in cursors:
                cursor.close()
        return rows

    def _search(self, text, after, limit, side, order):
        """Three iterators, each in id order: the indexed notes that contain
        the text, and those of the queue (notes_unindexed) and of the notes
        too long to index (notes_scanned) that do; page() merges them. Each
        is driven by its own ids, so a page of a word in most notes stops
        after a page of them: `id IN (index UNION ALL queue)` built the
        whole set first (242 ms for such a word in 300k notes, 1.6 ms now).
        CROSS JOIN keeps the queue the outer loop."""
        args = (text, after, limit)
        phrase = '"' + text.replace('"', '""') + '"'  # an FTS5 string: no operators
        indexed = self.db.execute(
            "SELECT n.* FROM notes_search AS s JOIN notes AS n ON n.id = s.rowid"
            f" WHERE notes_search MATCH ?4 AND s.rowid {side} ?2 AND instr(n.text, ?1) > 0"
            f" ORDER BY s.rowid {order} LIMIT ?3", args + (phrase,))
        queued = self.db.execute(
            "SELECT n.* FROM notes_unindexed AS u CROSS JOIN notes AS n ON n.id = u.id"
            f" WHERE u.id {side} ?2 AND instr(n.text, ?1) > 0 ORDER BY u.id {order} LIMIT ?3",
            args)
        return [indexed, queued, self._scanned(text, after, limit, side, order)]

    def _long(self, note_id, text):
        """SQL: is the note too long for the index? With an index, the
        triggers have put it in notes_scanned; without one (scan mode, SQLite
        before 3.34), its size tells."""
        if self.indexed:
            return f"{note_id} IN (SELECT id FROM notes_scanned)"
        return f"{NOTE_BYTES.format(text)} > {INDEX_NOTE_BYTES}"

    def _scanned(self, text, after, limit, side, order):
        """The notes too long to index (_long) that contain `text`, in id
        order, read one at a time and matched by Python, with the budget
        looked at between two and within each (_contains): SQLite's instr()
        costs the note's length times the text's, in one step the progress
        handler cannot interrupt (a 20,000-character ?q= over 20 notes of
        1 MB held the loop 7 s; without an index, 'a' * 999 + 'b' over 200
        of them 4.2 s), and the handler runs every BUDGET_STEPS steps, 150
        rows of 1 MB and more (?q=zz over 150 of them: 293 ms, not aborted;
        attack review)."""
        ids = self.db.execute(f"SELECT id FROM notes WHERE id {side} ? AND"
                              f" {self._long('id', 'text')} ORDER BY id {order}",
                              (after,)).fetchall()
        for (note_id,) in ids:
            row = self.db.execute("SELECT * FROM notes WHERE id = ?", (note_id,)).fetchone()
            if row and self._contains(row[1], text):
                yield row
                limit -= 1
                if not limit:
                    return

    def _contains(self, text, sub):
        """`sub in text`, a window of SCAN_WINDOW characters at a time, the
        budget looked at before each: str.find is linear on CPython 3.10+
        (two-way), but on 3.9 a crafted `sub` made it quadratic, 346 ms for
        one note of 1 MB (attack review). Windows overlap by len(sub) - 1."""
        for start in range(0, max(len(text) - len(sub), 0) + 1, SCAN_WINDOW):
            if self._past_deadline():  # as the progress handler's abort says it
                raise sqlite3.OperationalError("interrupted")
            if text.find(sub, start, start + SCAN_WINDOW + len(sub) - 1) >= 0:
                return True
        return False

    def get(self, note_id):
        row = self.db.execute("SELECT * FROM notes WHERE id = ?", (note_id,)).fetchone()
        return row and Row._make(row)

    def insert(self, texts, now):
        """New notes for `texts` (at most 333: SQLite's oldest limit of 999
        variables), in one statement; their Rows, in order. AUTOINCREMENT gives
        each row the largest id so far plus one, so the n rows of a statement
        get the n ids that end at lastrowid."""
        values = ", ".join(["(?, ?, ?)"] * len(texts))
        cursor = self.db.execute(f"INSERT INTO notes (text, created, updated) VALUES {values}",
                                 [value for text in texts for value in (text, now, now)])
        self.unindexed += len(texts) * self.indexed
        self.top = cursor.lastrowid  # AUTOINCREMENT: the largest id there is now
        first = cursor.lastrowid - len(texts) + 1
        return [Row(first + n, text, now, now) for n, text in enumerate(texts)]

    def put(self, note_id, text, now, old):
        self.unindexed += self.indexed
        if old:
            self.db.execute("UPDATE notes SET text = ?, updated = ? WHERE id = ?",
                            (text, now, note_id))
            return Row(note_id, text, old.created, now)
        self.db.execute("INSERT INTO notes (id, text, created, updated) VALUES (?, ?, ?, ?)",
                        (note_id, text, now, now))
        if self.top is not None:
            self.top = max(self.top, note_id)
        return Row(note_id, text, now, now)

    def delete(self, note_id):
        return self.db.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount

###############################################################################
# Main loop ###################################################################
###############################################################################


class Command:
    """One request for the main loop, like a concurrent.futures work item.

    Any thread makes one and waits on it; the main loop alone completes it.
    The reply path is a single pre-acquired lock that finish() releases: the
    cheapest one-shot signal between threads (no Event, no Queue per request).
    A second lock, `_claim`, settles who owns the outcome: the main loop
    claims a command before running it, a waiter that gives up claims it to
    cancel it. So a client told 503 can retry: its write never runs later.
    """

    __slots__ = ("name", "args", "result", "error", "queued_at", "_done", "_claim")

    def __init__(self, name, *args):
        self.name = name
        self.args = args
        self.result = self.error = None
        self.queued_at = time.monotonic()
        self._done = threading.Lock()
        self._done.acquire()
        self._claim = threading.Lock()

    def claim(self):
        """Main loop only: True if it may run the command (nobody gave up on it)."""
        return self._claim.acquire(blocking=False)

    def finish(self, result=None, error=None):
        """Main loop only."""
        self.result, self.error = result, error
        self._done.release()

    def wait(self, timeout=REPLY_TIMEOUT):
        """Any thread but the main loop: the result, or the error raised."""
        if not self._done.acquire(timeout=timeout):
            if self._claim.acquire(blocking=False):  # cancelled: it will never run
                raise _http_error(503, "the main loop did not answer in time; nothing "
                                  "was changed", ("Retry-After", "5"))
            # Running already: its verdict comes within sqlite's busy timeout.
            if not self._done.acquire(timeout=BUSY_TIMEOUT + timeout):
                raise _http_error(503, "the main loop did not answer in time; the "
                                  "outcome is unknown", ("Retry-After", "5"))
        if self.error is not None:
            raise self.error
        return self.result


class MainLoop:
    """The owner of all state; runs in the main thread.

    Methods for other threads: submit() (put a command and wait for it),
    and reading the attributes `heartbeat`, `storage_problem`, `lag`, `config`
    and `closing`, which the loop replaces but never mutates in place.
    Methods for the main thread: run(), drain(), and the command handlers
    (the do_* methods, looked up by command name).

    To build your own daemon on notesd, put your periodic work in tick().
    """

    #: commands that write: they run inside the batch's transaction.
    WRITES = frozenset({"create", "put", "delete"})
    #: commands whose reply a rollback makes untrue: the writes, and the reads
    #: that may have seen them (not status or config, which it leaves alone).
    TRANSACTIONAL = WRITES | {"list", "get"}

    def __init__(self, config, commands, store, logs, systemd):
        self.config = config
        self.systemd = systemd
        # Tick faster when systemd's watchdog needs a WATCHDOG=1 more often.
        self.period = min(TICK, systemd.watchdog or TICK)
        self.commands = commands
        self.store = store
        self.logs = logs
        self.responses = collections.deque()  # status codes from HTTP threads;
        # deque.append and popleft are thread-safe (documented), so HTTP threads
        # hand their counts to the owner without a lock.
        self.requests = collections.Counter()
        self.started = time.time()
        self.heartbeat = time.monotonic()
        self.storage_problem = None  # why storage fails now (for /health), or None
        self.storage_error = None    # the last storage error and when (for /status)
        self.no_writes = None        # why writes are refused until a restart: the
        # database files are not ours any more, or the database is damaged
        self.quick_check = "running" if store.checker else "ok"  # of the whole file
        # Set once its verdict is in: writes wait for it (submit).
        self.verified = threading.Event()
        if not store.checker:
            self.verified.set()
        self.lag = self._lag_window = 0.0
        self.reloads, self.last_reload = 0, None
        self.last_restart = None   # the verdict on the last SIGUSR2, for `restart`
        self.successor = None      # the Successor being started, if one is
        self.handed_over = False   # a successor serves: stop without a word to systemd
        self.stopping = self.closing = False
        self.server = self.pidfile = None
        self.carried = collections.deque()  # reads a batch had no time for
        self.index_credit, self.index_clock = 0.0, time.monotonic()  # _index_share
        self.aborted = False
        self.slowest = self.slowest_before = None  # (command, seconds, at)
        self.slowest_since = time.monotonic()

    # -- for any thread ----------------------------------------------------

    def submit(self, name, *args):
        """Queue a command and return its result (or raise its error). A
        write first waits for the verdict of the whole file's quick_check:
        where the checks before READY cannot look (a free page that is also
        a page of notes), a write let through before it overwrote 14 notes
        (attack review)."""
        if name in self.WRITES and self.quick_check != "ok":
            self.verified.wait(REPLY_TIMEOUT)  # set by do_checked, or by a stop
            if self.quick_check == "running":  # no verdict in time, or a stop came first
                raise _http_error(503, "notesd is still checking its database (PRAGMA "
                                  "quick_check) before it takes writes", ("Retry-After", "5"))
        if self.closing:
            raise _http_error(503, "notesd is shutting down", ("Retry-After", "5"))
        command = Command(name, *args)
        try:
            self.commands.put_nowait(command)
        except queue.Full:
            raise _http_error(503, "too many requests waiting; try again",
                              ("Retry-After", "1")) from None
        return command.wait()

    def report_check(self, problems):
        """The quick_check thread's verdict (do_checked). put() waits while
        the queue is full: the verdict is never dropped."""
        self.commands.put(Command("checked", problems))

    # -- main thread only --------------------------------------------------

    def run(self):
        """Execute commands as they come, and tick() at least once a TICK."""
        next_tick = time.monotonic()
        while not self.stopping:
            wait = max(0.0, next_tick - time.monotonic())
            behind = self.store.unindexed and not self.carried and self._may_index()
            first = self._next(min(wait, INDEX_IDLE) if behind else wait)
            if first is None and behind:  # idle a while: catch the search index up
                self._index(INDEX_SLICE)
            if first is not None or self.carried:
                self.execute(self._batch(first))
            now = time.monotonic()
            if self.store.unindexed:
                now = self._index_share(now)
            self.heartbeat = now
            if now >= next_tick:
                self.tick(now - next_tick)
                next_tick = now + self.period

    def _next(self, timeout):
        """The next queued command, waiting up to `timeout` (not at all while
        reads are carried over from the last batch), or None."""
        try:
            return self.commands.get(timeout=0 if self.carried else timeout)
        except queue.Empty:
            return None

    def drain(self, server, grace=STOP_GRACE):
        """After the listener closed: answer the requests in flight, and
        nothing else. Every STOP_PASS the server closes the connections that
        became idle (after a restart, those idle for HANDOVER_IDLE: until then
        one more request is answered) and marks the busy ones to close after
        their reply (ApiServer.last_call); it marks them again after taking a batch,
        before running it, so every command run here answers with
        Connection: close (a handler is BUSY before it submits). Ends when
        no connection is left and the queue is empty, or after `grace`."""
        self.verified.set()  # writes still waiting for a verdict get 503 (submit)
        deadline = time.monotonic() + grace
        patience = HANDOVER_IDLE if self.handed_over else 0.0
        while time.monotonic() < deadline:
            left = server.last_call(patience)
            first = self._next(STOP_PASS)
            if first is None and not self.carried:
                if not left and self.commands.empty():
                    break
                continue
            batch = self._batch(first)
            server.last_call(patience)
            self.execute(batch)
        self.closing = True
        shutting = _http_error(503, "notesd is shutting down", ("Retry-After", "5"))
        while self.carried:
            self.carried.popleft().finish(error=shutting)
        while True:  # anything queued after the last look gets a clear 503
            try:
                self.commands.get_nowait().finish(error=shutting)
            except queue.Empty:
                break

    def tick(self, late):
        """Periodic work, once a TICK: heartbeat, storage check, statistics.
        Your own daemon's periodic work goes here; keep each run short."""
        self._check_storage()
        self.lag, self._lag_window = max(self._lag_window, late), 0.0
        self._count_responses()
        if self.systemd.watchdog:  # proof of life: only a turning main loop sends it
            self.systemd.notify("WATCHDOG=1")

    def _index_share(self, now):
        """Index for the loop's share of the time since the last call (a
        chunk at least, once it is due; never more than a slice at once),
        however busy it is. The clock after it."""
        share = INDEX_SHARE_BEHIND if self.store.unindexed > INDEX_BACKLOG else INDEX_SHARE
        credit = self.index_credit + (now - self.index_clock) * share
        self.index_credit = min(credit, INDEX_SLICE)
        self.index_clock = now
        if self.index_credit > 0 and self._may_index():
            self._index(self.index_credit)
            self.index_clock = time.monotonic()
            self.index_credit -= self.index_clock - now
        return self.index_clock

    def _may_index(self):
        """Indexing writes too (the free list gives it pages): not before the
        whole file's verdict, nor while storage fails."""
        return self.quick_check == "ok" and not self.storage_problem

    def _index(self, seconds):
        try:
            self.store.index_some(seconds)
        except sqlite3.Error as e:
            self._storage_failed(f"storage error while indexing: {e}")

    def _check_storage(self):
        """Once a TICK: are the database files still the ones at their paths,
        and does storage answer? After a failed write (a full disk) a write
        probe tells when writes work again: /health recovers by itself."""
        if self.no_writes is None:
            vanished = self.store.vanished()
            if vanished:
                self._refuse_writes(f"{vanished}; writes are refused until notesd "
                                    f"is restarted; {self._rescue()} (see the README, Backups)")
        if self.no_writes or self.storage_problem and self.quick_check != "ok":
            return  # the probe writes: not before the whole file's verdict
        try:
            if self.storage_problem:
                self.store.probe()
            else:
                self.store.ping()
        except sqlite3.Error as e:
            self._storage_failed(f"storage error: {e}")
        else:
            self._storage_works()

    def _rescue(self):
        """What the daemon still holds, saved before a stop loses it."""
        try:
            return f"every note it held was saved to {self.store.rescue()}"
        except (OSError, sqlite3.Error, NotesdError) as e:
            return f"could not save the notes it held: {e}"

    def _storage_failed(self, message):
        """Say so in /health and /status, and in the log once per new cause.
        Why writes are refused for good stays the problem shown: a later
        error (a search reading the damaged pages) is only the last error."""
        if message != self.storage_problem:
            log.error("%s", message)
        self.storage_problem = self.no_writes or message
        self.storage_error = {"message": message, "at": utc_now()}

    def _refuse_writes(self, message):
        """For good: no write may touch these files again in this run."""
        self.no_writes = message
        self._storage_failed(message)

    def _storage_works(self):
        if self.storage_problem and not self.no_writes:
            log.info("storage works again")
            self.storage_problem = None

    def _batch(self, first):
        """The reads carried over from the last batch (claimed already), then
        the first command and what else waits, less those cancelled."""
        carried, self.carried = list(self.carried), collections.deque()
        batch = [] if first is None else [first]
        for command in carried or batch:
            self._lag_window = max(self._lag_window, time.monotonic() - command.queued_at)
            break
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self.commands.get_nowait())
            except queue.Empty:
                break
        return carried + [command for command in batch if command.claim()]

    def execute(self, batch):
        """Run a batch: first its writes and quick reads, the writes sharing one
        transaction committed (one fsync) before any reply goes out, so every
        acknowledged write is durable; then its pages (GET /, searches), each
        under the key `command_budget`, for PAGES_SLICE in all (or one budget,
        if less): the rest are carried to the next turn of the loop, so the
        heartbeat, tick() and the watchdog keep their rhythm however many
        searches wait, and the quick commands queued meanwhile go first. One search
        must never hold the loop that every other request waits on. Every command
        of a batch was in flight at once: any order among them is one the
        clients could have seen (linearizable)."""
        started = time.monotonic()
        pages = [command for command in batch if command.name == "list"]
        quick = [command for command in batch if command.name != "list"]
        self._run_transaction(quick)
        # Replied before the pages run, not after: a GET /ID/ waited out a
        # whole budget of searches behind it (p50 107 ms, bench/search.py).
        for command in quick:
            command.finish(command.result, command.error)
        slice_ = min(PAGES_SLICE, self.config.command_budget / 1000)
        for n, command in enumerate(pages):
            if n and time.monotonic() - started > slice_:
                self.carried.extend(pages[n:])
                break
            self._run_step([command], lambda c=command: [self.do_list(*c.args)])
            command.finish(command.result, command.error)
        log.debug("ran a batch of %d commands", len(batch) - len(self.carried))

    def _run_transaction(self, commands):
        """The writes and quick reads of a batch, and the COMMIT of its writes."""
        pending = []  # commands that ran in the open transaction: saved only by its COMMIT
        delta = 0     # their change to the note count, applied on commit
        for group, run in self._steps(commands):
            if self._run_step(group, run, opens=group[0].name in self.WRITES):
                if self.store.db.in_transaction:
                    pending += [c for c in group if c.name in self.TRANSACTIONAL and not c.error]
                    delta += sum(c.result[2] for c in group
                                 if c.name in self.WRITES and not c.error)
            elif self.aborted:
                self._abort(pending)
                pending, delta = [], 0
        if self.store.db.in_transaction:  # also after writes that were refused
            try:
                self.store.commit()
                self.store.count += delta
            except sqlite3.Error as e:
                self._storage_failed(f"storage error: commit failed: {e}")
                self._abort(pending)
            else:
                self._storage_works()

    def _run_step(self, commands, run, opens=False):
        """Run one step, setting each command's result or error; True if it
        ran. `opens`: a write, which needs the batch's transaction open.
        Sets self.aborted when a storage error spoiled the transaction."""
        self.aborted = False
        started = time.monotonic()
        try:
            if opens:
                if self.no_writes:
                    raise _http_error(503, self.no_writes, ("Retry-After", "60"))
                if not self.store.db.in_transaction:
                    self.store.begin()
            results = run()
        except NotesdError as e:
            # Without its traceback: that holds the frames it left, their
            # locals (a page of rows) too, and the commands hold the error,
            # a cycle only the cyclic GC frees. 100 refused 4 MiB pages held
            # 300 MB that way (attack review).
            e = e.with_traceback(None)
            for command in commands:
                command.error = e
            return False
        except sqlite3.Error as e:
            self._storage_failed(f"storage error in {commands[0].name}: {e}")
            for command in commands:
                command.error = _http_error(503, f"storage error: {e}", ("Retry-After", "5"))
            self.aborted = True
            return False
        except Exception as e:  # a bug: keep serving, say so in the log
            log.exception("internal error in command %s", commands[0].name)
            for command in commands:
                command.error = _http_error(500, f"internal error: {type(e).__name__}")
            return False
        finally:
            seconds = time.monotonic() - started
            if self.slowest is None or seconds > self.slowest[1] or \
                    started - self.slowest_since > 60:  # rarely: the call cost GET 2% (yappi)
                self._timed(commands[0].name, seconds)
        for command, result in zip(commands, results):
            if isinstance(result, NotesdError):  # one of a group refused
                command.error = result
            else:
                command.result = result
        return True

    def _timed(self, name, seconds):
        """Keep the slowest command of the last minute, for /status."""
        now = time.monotonic()
        if now - self.slowest_since > 60:
            self.slowest_before, self.slowest = self.slowest, None
            self.slowest_since = now
        if self.slowest is None or seconds > self.slowest[1]:
            self.slowest = (name, seconds, utc_now())

    def _steps(self, batch):
        """The batch as (commands, run) steps, run() giving their results: all
        creates first, as one INSERT (a tenth more POSTs per second, bench/),
        then every other command on its own, in order, but for GETs of a note
        next to each other, one step (a step's bookkeeping cost GET 3%)."""
        creates = [command for command in batch if command.name == "create"]
        if creates:
            yield creates, lambda: self.do_create([command.args[0] for command in creates])
        rest = [command for command in batch if command.name != "create"]
        for name, group in itertools.groupby(rest, key=lambda command: command.name):
            if name == "get":
                gets = list(group)
                yield gets, lambda gets=gets: [self.do_get(*c.args) for c in gets]
                continue
            handler = getattr(self, "do_" + name)
            for command in group:
                yield [command], lambda handler=handler, args=command.args: [handler(*args)]

    def _abort(self, pending):
        """Roll back the open transaction and fail the commands that ran in it."""
        self.store.rollback()
        for command in pending:
            command.result = None
            command.error = _http_error(503, "storage error: rolled back, nothing was saved",
                                        ("Retry-After", "5"))

    def _count_responses(self):
        responses = self.responses
        while responses:
            self.requests[f"{responses.popleft() // 100}xx"] += 1

    # -- command handlers (main thread only) ---------------------------------
    # Writes return (reply, created?, change to the note count).

    def do_list(self, after, limit, text, backwards=False, replies=None):
        """(rows, bytes held): a page. A large one is counted in `replies`
        (the server's ByteBudget for large replies) here, before the rows
        leave the loop, or refused (503): 100 clients asking for 4 MiB pages
        at once had 100 pages built at once (1 GB; attack review). The HTTP
        thread gives the bytes back when its request ends."""
        rows = self._page(after, limit, text, backwards)
        size = sum(len(row.text) for row in rows) if replies is not None else 0
        if size <= REPLY_SMALL:
            return rows, 0
        if not replies.reserve(size, REPLIES_HELD):
            raise _http_error(503, "too many large replies in flight; try again",
                              ("Retry-After", "1"))
        return rows, size

    def _page(self, after, limit, text, backwards):
        scan = text and not self.store.indexes(text)
        hint = (f"a ?q= that the index cannot serve (shorter than {SEARCH_MIN} characters) "
                "scans every note: use a longer one" if scan else
                "narrow it (a smaller limit, a longer ?q=), or retry once the search "
                "index has caught up with recent writes (/status: search.unindexed); "
                f"notes over {INDEX_NOTE_BYTES} bytes are always scanned (search.scanned)")
        with self.store.budget(self.config.command_budget / 1000, hint):
            return self.store.page(after, limit, text, backwards)

    def do_get(self, note_id):
        return self.store.get(note_id)

    def do_create(self, texts):
        """Several creates at once (see _steps): a result for each text, or
        the error for those that no id is left for: ids past MAX_ID would
        break the API's own schema, and JavaScript clients (2**53 - 1)."""
        left = self.store.ids_left()
        rows = self.store.insert(texts[:left], utc_now()) if left > 0 else []
        if len(rows) == len(texts):
            return [(row, True, 1) for row in rows]
        full = _http_error(507, f"no note ids are left: the largest, {MAX_ID}, is taken")
        return [(row, True, 1) for row in rows] + [full] * (len(texts) - len(rows))

    def do_put(self, note_id, text, if_match):
        old = self.store.get(note_id)
        _check_precondition(old, if_match)
        return self.store.put(note_id, text, utc_now(), old), old is None, int(old is None)

    def do_delete(self, note_id, if_match):
        _check_precondition(self.store.get(note_id), if_match)
        return None, False, -self.store.delete(note_id)

    def do_status(self):
        self._count_responses()
        config = self.config
        return {
            "pid": os.getpid(),
            "version": __version__,
            "python": sys.version.split()[0],
            "started_at": datetime.datetime.fromtimestamp(
                self.started, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "uptime": round(time.time() - self.started, 3),
            "listen": self.server.url if self.server else None,
            "pidfile": config.pidfile,
            "database": config.database,
            "notes": self.store.count,
            "requests": dict(sorted(self.requests.items())),
            "queue_depth": self.commands.qsize(),
            "loop_lag_ms": round(self.lag * 1000, 3),
            "threads": threading.active_count(),
            "rss_bytes": rss_bytes(),
            "reloads": self.reloads,
            "last_reload": self.last_reload,
            "last_restart": self.last_restart,
            "storage": {"ok": self.storage_problem is None, "problem": self.storage_problem,
                        "last_error": self.storage_error, "quick_check": self.quick_check},
            "search": {"mode": "index" if self.store.indexed else "scan",
                       **self.store.search_counts()},
            "commands": self._command_figures(),
        }

    def _command_figures(self):
        slowest = max(filter(None, (self.slowest, self.slowest_before)), default=None,
                      key=lambda entry: entry[1])
        return {"budget_aborts": self.store.budget_aborts,
                "slowest_last_minute": slowest and {
                    "command": slowest[0], "ms": round(slowest[1] * 1000, 3), "at": slowest[2]}}

    def do_patch_config(self, changes):
        new = self.config.replace(changes)
        restart = sorted(set(self.config.changed(new)) - LIVE_KEYS)
        if restart:
            raise _http_error(409, "these keys need a restart: " + ", ".join(restart))
        self.apply(new)
        return new.public()

    def do_checked(self, problems):
        """The verdict of the quick_check of the whole file, which began
        when the daemon started to serve (Store.check_whole_file). Damage
        outside the tables checked before READY (the search index, the free
        list) stops writes, as damage found at start would have stopped
        the start: /health and `check` say so until a restart."""
        self.store.checked()
        self.quick_check = "unfinished" if problems is None else "damaged" if problems else "ok"
        if problems:
            self._refuse_writes(damaged(self.store.path, problems,
                                        "Writes are refused until notesd is restarted"))
        elif problems is None:  # an I/O error: no verdict, so no writes
            self._refuse_writes(f"the quick_check of {self.store.path} did not finish (see "
                                "the log); writes are refused until notesd is restarted")
        self.verified.set()

    def do_signal(self, signum):
        getattr(self, "on_" + SIGNAL_COMMANDS[signum])()

    # -- signal actions (main thread only) -------------------------------

    def on_stop(self):
        log.info("stopping (signal)")
        if not self.handed_over:  # else systemd's main process is the successor now
            self.systemd.notify("STOPPING=1")
            if self.successor is not None:  # a restart under way: the stop wins
                self.successor.stop()
        self.stopping = True

    def on_upgrade(self):
        """SIGUSR2 (`restart`, as nginx and gunicorn): start the notesd.py on
        disk as a successor that inherits the listening socket (Successor);
        once it serves and holds the pid file, stop gracefully. If it cannot
        start, keep serving and say why in last_restart."""
        if self.stopping:
            log.warning("restart: notesd is stopping; ignored")
            return
        if self.successor is not None:
            log.warning("restart: one is under way already; ignored")
            return
        problem = _handover_problem(self.config, self.server)
        if problem:
            return self.do_upgrade_failed(problem)
        self.systemd.notify("RELOADING=1",
                            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        log.info("restart: starting a successor from %s", os.path.abspath(__file__))
        try:
            self.successor = Successor(self.config, self.server, self.pidfile,
                                       self.commands, self.logs.foreground)
        except OSError as e:
            self.do_upgrade_failed(f"cannot start the successor: {_reason(e)}")

    def do_handed_over(self, text):
        """The successor serves and holds the pid file (Successor._run)."""
        log.info("restart: %s; stopping", text)
        self.last_restart = {"ok": True, "message": text, "at": time.time()}
        self.handed_over = True
        self.pidfile.handed_over = True
        self.on_stop()

    def do_upgrade_failed(self, message, stopped=False):
        """The successor is gone (Successor.end) or was never started."""
        self.successor = None
        self.last_restart = {"ok": False, "message": message, "at": time.time(),
                             "serving": not stopped}
        if stopped:  # the stop is under way, and says so to systemd itself
            log.warning("restart given up: %s", message)
            return
        log.error("restart failed, this daemon keeps serving: %s", message)
        self.systemd.notify("READY=1", f"STATUS=restart failed: {message}")

    def on_reload(self):
        """SIGHUP: re-read the file, apply what can change live, keep the old
        configuration whole if the new one is invalid."""
        self.reloads += 1
        self.systemd.notify("RELOADING=1",
                            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            new = Config.load(self.config.path, self.config.overrides, self.config._root)
        except NotesdError as e:
            log.error("reload failed, keeping the old configuration: %s", e)
            self.last_reload = {"ok": False, "message": str(e), "at": time.time()}
            self.systemd.notify("READY=1", f"STATUS=reload failed: {e}")
            return
        restart = sorted(set(self.config.changed(new)) - LIVE_KEYS)
        if restart:
            log.warning("reload: changes to %s need a restart; not applied", ", ".join(restart))
            new = self.config.replace({k: _show(new, k) for k in self.config.changed(new)
                                       if k in LIVE_KEYS}, "reload")
        self.apply(new)
        self.last_reload = {"ok": True, "message": "applied", "restart_needed": restart,
                            "at": time.time()}
        log.info("reloaded configuration from %s", self.config.path or "defaults")
        self.systemd.notify("READY=1", "STATUS=configuration reloaded")

    def on_reopen_logs(self):
        self.logs.reopen()
        log.info("log files reopened")

    def apply(self, new):
        """Publish a new live configuration to every thread."""
        changed = self.config.changed(new)
        self.config = new
        if self.server:
            self.server.config = new
        self.logs.configure(new)
        if changed:
            log.info("configuration changed: %s", ", ".join(changed))


def _show(config, key):
    """A config value as text that Config.replace() accepts again."""
    return config.public()[key] if key != "token" else config.token


def _check_precondition(row, if_match):
    """If-Match (RFC 9110 13.1.1): '*' needs a current note, a tag must match it."""
    if if_match is None:
        return
    if row is None or (if_match.strip() != "*" and etag(row) not in
                       [t.strip() for t in if_match.split(",")]):
        raise _http_error(412, "precondition failed: the note has changed or does not exist")


def rss_bytes():
    """Resident set size of this process, from /proc, else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SignalRelay:
    """Turns signals into commands for the main loop.

    A Python signal handler runs in the main thread between bytecodes, maybe
    while that thread is inside queue.Queue.get() holding the queue's lock:
    calling Queue.put there would deadlock (Queue is not reentrant). So we use
    signal.set_wakeup_fd: the C-level handler writes the signal number to a
    socketpair, the Python-level handler does nothing, and this thread reads
    the numbers and puts commands on the queue like any other client.
    """

    def __init__(self, commands):
        self.commands = commands
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        for signum in SIGNAL_COMMANDS:
            signal.signal(signum, lambda signum, frame: None)
        signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._relay, name="signals", daemon=True).start()

    def _relay(self):
        while True:
            for signum in self.reader.recv(64):
                if signum in SIGNAL_COMMANDS:
                    # put() blocks when the queue is full: a signal is never dropped.
                    self.commands.put(Command("signal", signum))

###############################################################################
# HTTP API ####################################################################
###############################################################################
# The routes come first: the handler, the OpenAPI document and the browsable
# page are all read off this one table, so they cannot disagree.

Op = collections.namedtuple("Op", "handler summary statuses request response")

# Statuses: what each operation itself may answer. A note's are 404 for any
# id the route does not take (/-1/, /x/); every operation may also answer
# COMMON_STATUSES.
NOTE_OPS = {
    "GET": Op("get_note", "Get a note (with an ETag)", (200, 404), None, "Note"),
    "PUT": Op("put_note", "Replace the note, or create it with this id",
              (200, 201, 400, 404, 411, 412, 413, 415), "NoteText", "Note"),
    "DELETE": Op("delete_note", "Delete the note, whether or not it exists",
                 (204, 404, 412), None, None),
}

#: (OpenAPI path, regular expression, {method: Op}).
ROUTES = [
    ("/", r"/", {
        "GET": Op("list_notes", "List notes, oldest first; ?limit=N&after=ID&q=TEXT",
                  (200, 400), None, "NoteList"),
        "POST": Op("create_note", "Create a note (JSON, form or multipart body); a "
                   "browser's form post gets 303 See Other to the note's page",
                   (201, 303, 400, 411, 413, 415, 507), "NoteText", "Note"),
    }),
    ("/{id}/", r"/([0-9]+)/", NOTE_OPS),
    ("/{id}", r"/([0-9]+)", NOTE_OPS),
    ("/health", r"/health", {
        "GET": Op("health", "Liveness: main loop heartbeat and storage; needs no token",
                  (200, 503), None, "Health"),
    }),
    ("/status", r"/status", {
        "GET": Op("status", "Process and server statistics", (200,), None, "Status"),
    }),
    ("/config", r"/config", {
        "GET": Op("get_config", "The live configuration, token redacted", (200,), None, "Config"),
        "PATCH": Op("patch_config", "Change live keys; all or nothing (409 for the "
                    "others, readOnly here)", (200, 400, 409, 411, 413), "Config", "Config"),
    }),
    ("/openapi.json", r"/openapi\.json", {
        "GET": Op("openapi", "This document", (200,), None, None),
    }),
]
#: What the handler matches: (pattern, {method: Op}, the Allow header's value).
ROUTE_TABLE = [(re.compile(regex), methods, ", ".join(sorted({"HEAD", "OPTIONS", *methods})))
               for _, regex, methods in ROUTES]

#: Methods that change nothing (RFC 9110 9.2.1): no Origin check for them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: The bodies an HTML form sends (HTML 4.10.21.7), and the methods its
#: _method field may ask for (ApiHandler.form_method).
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
FORM_METHODS = frozenset({"PUT", "DELETE", "PATCH"})
#: The ?done= of the page a browser's form post leads to, by its method.
DONE = {"POST": "created", "PUT": "saved", "DELETE": "deleted", "PATCH": "changed"}
#: A Host header we are willing to echo into URLs (RFC 9110 7.2; RFC 3986 3.2.2):
#: a name of at most 253 characters (RFC 1035 2.3.4), or an IPv6 literal. A
#: 32 KB Host (allowed_hosts = *) was repeated in every note's url: a page of
#: 1000 notes was 32 MB, eight times PAGE_BYTES (attack review).
HOST_RE = re.compile(r"(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")
#: The largest id SQLite can store; a larger one names no note.
SQLITE_MAX_INT = 2**63 - 1
#: The most fields in a header section, as http.client allows; 431 above.
MAX_HEADERS = 100
#: bytes of the request line and header section together, line ends
#: included: nginx's default (large_client_header_buffers, 4 x 8 KiB).
#: Without it a stalled client held 100 lines of 64 KiB. 431 above it, 414
#: for a request line that alone is longer; also bounds a chunked trailer.
MAX_HEADER_SECTION = 32 * 1024
#: A token (RFC 9110 5.6.2): a method, a field name, a chunk extension's name.
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: A request line (RFC 9112 3): single spaces between its three parts, and
#: no control character anywhere. str.split() also took VT, FF, NBSP and
#: runs of spaces for separators, where a proxy in front may not.
REQUEST_LINE = re.compile(rb"(%s) ([^\x00-\x20\x7f]+) ([^\x00-\x20\x7f]+)" % TOKEN)
#: A field line (RFC 9112 5): no whitespace in or around the name, which also
#: refuses obsolete line folding (5.2); no control character but HTAB in the
#: value (RFC 9110 5.5): a bare CR or a NUL is where parsers disagree.
FIELD_LINE = re.compile(rb"(%s):([^\x00-\x08\x0a-\x1f\x7f]*)\r?\n" % TOKEN)
#: A chunk-size line (RFC 9112 7.1, 7.1.1): at most 16 hex digits (a 64-bit
#: size; longer is an overflow, not a size), extensions of a token and an
#: optional token or quoted-string value, CRLF. No leading or trailing
#: blanks, no bare LF: chunk framing is where smuggling parsers differ.
CHUNK_LINE = re.compile(
    rb'([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|"(?:[\t !#-\[\]-~\x80-\xff]'
    rb'|\\[\t -~\x80-\xff])*"))?)*)\r\n' % (TOKEN, TOKEN))
#: The longest chunk-size line read; its extensions count towards max_body.
MAX_CHUNK_LINE = 4096
#: body_framing()'s answer for a chunked body (RFC 9112 7.1).
CHUNKED = "chunked"
#: The most fields a form body (urlencoded or multipart) may hold; notesd's
#: forms have one. A 1 MiB body of 'a&a&...' made half a million pairs, and
#: of tiny parts seconds of CPU: Werkzeug's max_form_parts (CVE-2023-25577).
MAX_FORM_FIELDS = 100
#: A number as HTTP and our query strings write it: ASCII digits only
#: (str.isdigit() also takes '²', which int() refuses).
DIGITS = re.compile(r"[0-9]+")
#: What client_number() gives for any number above every bound notesd has.
NUMBER_CAP = 2**63
NUMBER_DIGITS = len(str(NUMBER_CAP))  # 19: a number of fewer digits is below it
#: What a note's text may not hold: the control characters (Unicode category
#: Cc: C0, DEL and C1) but tab, LF and CR, the characters XML 1.0 (2.2) keeps
#: out of text. json.dumps spells each in six bytes (\u0001), so a 1 MiB note
#: made a 6 MiB reply (issue 9), and a terminal acts on them (ESC, CSI).
CONTROL_CHARS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
CONTROL_RE = re.compile(f"[{CONTROL_CHARS}]")


def client_number(text):
    """The one parser for every number a client sends (ids, limit, after,
    Content-Length): an int, NUMBER_CAP for anything larger, or None if
    `text` is not ASCII digits. Never int() on thousands of digits: that
    raises ValueError past 4300 digits (CPython 3.11+, CVE-2020-10735),
    and took quadratic time before."""
    if len(text) < NUMBER_DIGITS and text.isdigit() and text.isascii():
        return int(text)  # the common case, below NUMBER_CAP (a fifth of a GET's parsing)
    if not DIGITS.fullmatch(text):
        return None
    digits = text.lstrip("0") or "0"
    return NUMBER_CAP if len(digits) > NUMBER_DIGITS else min(int(digits), NUMBER_CAP)


#: An HTTP/1.x version (RFC 9112 2.3).
VERSION_RE = re.compile(r"HTTP/1\.(\d)")
#: REQUEST_LINE and VERSION_RE in one, on the line as text: what nearly every
#: request line is, matched at once; anything else goes the long way.
REQUEST_LINE_11 = re.compile(r"(%s) ([^\x00-\x20\x7f]+) (HTTP/1\.(\d))" % TOKEN.decode("ascii"))


def read_headers(rfile, budget=MAX_HEADER_SECTION, what="header section"):
    """The header section of a request (RFC 9112 5), or a chunked body's
    trailer section (7.1.2), read up to its empty line, in at most `budget`
    bytes, as {lower-case name: value}; a repeated field's values are joined
    with ', ' (RFC 9110 5.3). A small parser in place of
    http.client.parse_headers, whose trip through the email package was half
    of a GET's CPU in the handler thread (yappi). Look fields up by their
    lower-case names."""
    headers = {}
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(budget + 1)
        budget -= len(line)
        if budget < 0:
            raise _http_error(431, f"the {what} is over its limit of {MAX_HEADER_SECTION} "
                              "bytes (a header section's includes the request line)")
        if line in (b"\r\n", b"\n"):
            return headers
        if not line.endswith(b"\n"):
            # End of stream before the empty line: the request is incomplete
            # (an If-Match may be what is missing), so it never runs.
            raise ConnectionAbortedError(f"the client closed the connection mid-{what}")
        match = FIELD_LINE.fullmatch(line)
        if not match:
            raise _http_error(400, f"malformed line in the {what}: {line[:80]!r}")
        name, value = match.group(1).decode("ascii").lower(), match.group(2).strip(b" \t")
        value = value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    raise _http_error(431, f"more than {MAX_HEADERS} fields in the {what}")


def body_framing(headers, version):
    """How a request's body is delimited (RFC 9112 6.3): None if it has no
    body, its Content-Length, or CHUNKED. Anything two parsers could frame
    differently is refused (400, or 501 for a coding notesd does not know;
    the connection then closes), so that a proxy in front and notesd never
    disagree on where the next request starts: request smuggling (11.2)."""
    codings, length = headers.get("transfer-encoding"), headers.get("content-length")
    if codings is not None:
        # 6.1: a server MAY refuse both together, and then MUST close;
        # identity included (it was dropped from the registry anyway).
        if length is not None:
            raise _http_error(400, "Transfer-Encoding and Content-Length together")
        # 6.1: HTTP/1.0 has no Transfer-Encoding: its framing is faulty.
        if version == "HTTP/1.0":
            raise _http_error(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in codings.split(",") if c.strip()]
        # 6.3: unless chunked is the final coding the length is unknown: 400.
        # 6.1: chunked is never applied twice.
        if not codings or codings[-1] != CHUNKED or codings.count(CHUNKED) > 1:
            raise _http_error(400, f"bad Transfer-Encoding {headers['transfer-encoding'][:80]!r}"
                              "; only 'chunked' is supported")
        if len(codings) > 1:  # 6.1: a coding we do not understand is 501
            raise _http_error(501, f"transfer coding {codings[0][:40]!r} is not supported; "
                              "send chunked alone")
        return CHUNKED
    if length is None:
        return None
    number = client_number(length)  # repeated fields arrive joined: '5, 6' is no number
    if number is None:
        raise _http_error(400, f"bad Content-Length {length[:40]!r}: one number expected")
    return number


def read_chunked(rfile, limit):
    """A chunked body (RFC 9112 7.1) as a bytearray, of at most `limit`
    bytes: data and chunk extensions (which are ignored) count, so that
    neither can be used to send more. A chunk that would pass the limit is
    refused from its size line (413), before its data is read; malformed
    framing is 400; trailer fields are read as a header section and ignored
    (7.1.2). End of stream anywhere raises ConnectionAbortedError: a body
    cut short never runs. Each read has the connection's `timeout`; a
    deadline for the whole request would go in _KernelTimedReader.readinto,
    where every read of the request passes."""
    body = bytearray()
    while True:
        line = rfile.readline(MAX_CHUNK_LINE + 1)
        if not line.endswith(b"\n") and len(line) <= MAX_CHUNK_LINE:
            raise ConnectionAbortedError("the client closed the connection mid-body")
        match = CHUNK_LINE.fullmatch(line)
        if not match:
            raise _http_error(400, f"malformed chunk-size line {line[:40]!r}")
        size = int(match.group(1), 16)
        if len(body) + size + len(match.group(2)) > limit:
            raise _http_error(413, f"the chunked body is over the limit of {limit} bytes")
        limit -= len(match.group(2))
        if size == 0:
            read_headers(rfile, what="trailer section")
            return body
        data = rfile.read(size)
        end = rfile.read(2)
        if len(data) < size or len(end) < 2:
            raise ConnectionAbortedError("the client closed the connection mid-body")
        if end != b"\r\n":
            raise _http_error(400, "chunk data longer than its size, or not ended by CRLF")
        body += data


class ByteBudget:
    """Bytes held at once, all connections together, under a bound; one for
    request bodies (the live key max_body_total: without it, 400 clients
    posting 1 MiB multipart bodies at once took 3.5 GB, VmHWM), one for
    large replies (REPLIES_HELD). A request reserves its body's bytes before
    reading it (all of max_body for a chunked body, whose length is unknown)
    and is answered 503 if they do not fit; the handler gives them back when
    the request ends, however it ends. A large reply reserves its bytes
    before it is written, and gives them back once it is (respond).

    Any HTTP thread. A lock, where the main loop's state has none: this is
    the connections' own accounting, and the lock is held for an addition."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = 0

    def reserve(self, size, bound):
        """Take `size` bytes if they fit under `bound`; a body is always let
        in when no other is held, so a max_body above the bound still works."""
        with self.lock:
            if self.held and self.held + size > bound:
                return False
            self.held += size
            return True

    def release(self, size):
        with self.lock:
            self.held -= size


#: Where a connection is, for the connection cap (ApiServer.make_room):
#: waiting for the first byte of a request, inside a request's head, reading
#: its body, or past them (waiting for the main loop, writing the reply).
IDLE, HEAD, BODY, BUSY = "idle", "head", "body", "busy"


def _timeval(seconds):
    """struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; never zero, which means no timeout."""
    whole, micro = int(seconds), int(seconds % 1 * 1e6)
    return struct.pack("ll", whole, micro or (0 if whole else 1))


class _KernelTimedReader(io.RawIOBase):
    """Reads a socket whose read timeout the kernel keeps (SO_RCVTIMEO): when
    it expires recv() fails with EAGAIN, raised here as socket.timeout, just as
    a Python socket timeout would be, so http.server handles both alike.

    It also keeps each request's deadline: `timeout` bounds every read, and
    the whole request too, head and body, counted from its first byte. A
    timeout per read alone let a request dribbled a byte at a time stay open
    for ever (issue 9). The kernel's timeout is lowered to the time left only
    when a request needs a second recv() (most arrive whole in one) and is
    raised again for the next request: no system call more on the fast path.
    A request pipelined behind another may have its first bytes read with
    that one; its clock then starts at its next recv(), so it gets at most
    twice `timeout`.

    One per connection, made by the accept thread (ApiServer.process_request);
    the connection's thread calls expect_request() and reads. `phase` and
    `since` (when it began) are what ApiServer.make_room looks at, from the
    accept thread, which may also evict() the connection."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = self.armed = timeout  # armed: the timeout SO_RCVTIMEO holds now
        self.deadline = self.expired = None  # expired: why the last read gave up
        self.phase, self.since = IDLE, time.monotonic()
        self.evicted = False
        self.fresh = True  # no request read yet: see _await_request
        self.last = False  # notesd stops: no request after the one in flight
        self.patience = 0.0  # a restart's stop: see last_call

    def readable(self):
        return True

    def expect_request(self):
        """Connection thread: the next byte read starts a new request. A new
        connection has been idle since it was accepted, a kept-alive one
        since now."""
        self.deadline = self.expired = None
        if self.phase != IDLE:
            self.phase, self.since = IDLE, time.monotonic()
        if self.armed != self.timeout:
            # Also the way in for a stop (last_call sets armed to None), so
            # the fast path checks nothing more: no request is read after
            # the last one, not even one already in the read buffer. After a
            # restart (patience), the client may not have been told
            # Connection: close yet (its reply was written before the stop
            # marked it): one more request is read, and answered so.
            if self.last and not self.patience:
                raise self._expire("notesd is stopping")
            self._arm(self.timeout)

    def last_call(self, patience=0.0):
        """Main thread, holding ApiServer.lock, during a stop: a connection
        waiting for a request is closed now (its read side shut down, as
        evict() does), unless its request's bytes are there already (then
        it is in flight), or it has been idle for less than `patience` (a
        restart: HANDOVER_IDLE). Every reply not yet written says
        Connection: close (respond() looks at `last`), and the next request
        boundary ends the connection (expect_request). Setting the handler's
        close_connection from here instead ended connections whose reply,
        written just before, had not said so, while their clients were
        already sending the next request: wrk saw resets on restarts."""
        self.last, self.armed, self.patience = True, None, patience
        if self.phase == IDLE and not self.evicted and \
                time.monotonic() - self.since >= patience and self.nothing_sent():
            self.evict()

    def readinto(self, buffer):
        if self.phase == IDLE and self.fresh:
            self._await_request()
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._expire(f"the request took longer than timeout = {self.timeout:g}s")
            if self.armed is None or left < self.armed:  # None: a stop's last_call
                self._arm(left)
        try:
            count = self.sock.recv_into(buffer)
        except BlockingIOError:
            raise self._expire("timed out reading the request") from None
        if not count and self.evicted:
            raise self._expire("closed to make room for other clients: the request was "
                               f"not complete after {SLOW_HEAD:g}s")
        if count and self.deadline is None:  # a request's first bytes: its clock starts
            now = time.monotonic()
            self.deadline = now + self.timeout
            if self.phase == IDLE:
                self.phase, self.since = HEAD, now
        return count

    def _await_request(self):
        """Connection thread, on a new connection: wait for its first
        request's first byte without taking it (MSG_PEEK), then say HEAD.
        The accept thread closes an IDLE connection only if it finds no byte
        waiting in the socket, so the byte must stay there until the phase
        has changed. A recv() that took it left a window, while this thread
        waited for the GIL to say HEAD, in which a request that had arrived
        was nowhere to be seen, and its connection was closed for room (CI:
        once in twenty floods of 20 connections, each sending at once).

        Only the first request pays this system call: the peek let go of
        the GIL once more per request, and with 16 keep-alive clients that
        cost GET a tenth of its speed. On a kept-alive connection the same
        window remains, and is the race every server closing idle
        connections has (RFC 9112 section 9.5: a client retries a request
        whose connection closed under it); a new one must not be closed
        with its request unread."""
        self.fresh = False
        try:
            if not self.sock.recv(1, socket.MSG_PEEK):
                return  # closed (or closed for room): recv_into says so
        except BlockingIOError:
            raise self._expire("timed out reading the request") from None
        self.phase, self.since = HEAD, time.monotonic()

    def evict(self):
        """Accept thread, holding ApiServer.lock (so the connection's thread
        cannot have closed the socket): end the connection to free its slot.
        Its thread's recv() returns at once and raises socket.timeout; the
        write side stays open for a 408."""
        self.evicted = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def evictable(self, now):
        """Accept thread: may this connection be closed to make room?"""
        return not self.evicted and (
            self.phase == IDLE or
            (self.phase in (HEAD, BODY) and now - self.since >= SLOW_HEAD))

    def nothing_sent(self):
        """Accept thread: True if no byte waits in the socket either (MSG_PEEK).
        An idle connection is closed only then: a request the client has
        sent but that was not read yet must not be dropped."""
        try:
            return not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError: nothing there; others: a dead connection
            return True

    def _arm(self, seconds):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self.armed = seconds

    def _expire(self, reason):
        self.expired = reason
        return socket.timeout(reason)


class ApiServer(http.server.ThreadingHTTPServer):
    """The HTTP server: a thread per connection, serving ApiHandler.

    Created (bound) while still privileged; `config` is the live Config that
    the main loop replaces on reload or PATCH; `loop` the MainLoop to submit to.

    The connection cap (issue 9). A thread per connection is the design, so
    the number of connections is what bounds the threads, the descriptors
    and the GIL convoy when thousands of threads wake at once (8,000
    connections closed together once left /health silent for 11 s). The
    accept thread admits a connection while fewer than capacity() are
    open: max_connections (nginx's default worker_connections, 512), or
    less if the open-file limit leaves room for less. At the cap it makes
    room as nginx does when worker_connections run short: it closes the
    connection idle the longest (kept alive, or never sent a byte); failing
    that, the one whose request head or body has been arriving the
    longest, if for more than SLOW_HEAD (slowloris, and its cousin that
    stalls in the body: 520 of those held every slot for `timeout`; it
    gets 408). Otherwise the new connection gets 503 with Retry-After and
    Connection: close, at once, from the accept thread, without a thread of
    its own. A request read whole is never closed for room: it is bounded
    by the main loop's reply timeout.
    The new connection takes a closed one's slot at once, while its thread
    finishes: up to EVICTING_MAX of them, within the open-file limit.

    `connections` maps each open connection's socket to its reader, those
    closed for room (`leaving` of them) until their threads end; the accept
    thread adds, the connection's thread removes (shutdown_request), both
    under `lock`, a Condition the accept thread waits on for a slot.
    `victims` is the accept thread's own (see victim()).
    """

    daemon_threads = True  # an idle keep-alive client must not hold up exit
    request_queue_size = BACKLOG
    allow_reuse_address = True  # a restart rebinds at once despite TIME_WAIT

    def __init__(self, config, listener=None):
        host, port, self.address_family = config.address
        self.config = config
        self.loop = None
        self.bodies, self.replies = ByteBudget(), ByteBudget()
        if listener is not None:
            self._adopt(listener)
        else:
            try:
                super().__init__((host, port), ApiHandler)
            except OSError as e:
                raise NotesdError(f"cannot listen on {config.listen}: "
                                  f"{e.strerror or e}") from None
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        self.host_header = f"{shown}:{port}"
        self.url = f"http://{shown}:{port}/"
        # Protected mode, as in redis: a public address and no token means we
        # answer only clients on loopback, and tell the others how to fix it.
        self.public = not ipaddress.ip_address(host).is_loopback
        self.connections, self.leaving = {}, 0
        self.victims, self.victims_at = collections.deque(), 0.0
        self.lock = threading.Condition()
        # Non-blocking accept(): the socket may be shared (a restart's old
        # daemon and successor, systemd's socket). poll() wakes both for one
        # connection, the other process takes it, and a blocking accept()
        # would sleep until the next one: shutdown() waits on that thread,
        # and a stop hung (CI). EAGAIN instead, which socketserver ignores
        # (_handle_request_noblock); as nginx does. Accepted sockets block
        # (get_request).
        self.socket.setblocking(False)
        self.fd_room = _connection_room()
        self.refused, self.warned_at = 0, None
        if self.fd_room < config.max_connections:
            log.warning("the open-file limit leaves room for %d connections at once, "
                        "fewer than max_connections = %d", self.fd_room,
                        config.max_connections)

    def _adopt(self, listener):
        """Serve on a listening socket bound by someone else: systemd (socket
        activation) or the daemon this one succeeds (restart)."""
        self.address_family = listener.family
        super().__init__(listener.getsockname(), ApiHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.server_address = listener.getsockname()
        self.server_name, self.server_port = self.server_address[:2]
        host, port, _ = self.config.address
        if port and (host, port) != tuple(self.server_address[:2]):
            log.warning("serving on the inherited socket %s:%d, not listen = %s (which "
                        "allowed_hosts follows by default)", *self.server_address[:2],
                        self.config.listen)

    def last_call(self, patience=0.0):
        """Main thread, during a stop (MainLoop.drain): see
        _KernelTimedReader.last_call. Returns how many connections are open."""
        with self.lock:
            for reader in list(self.connections.values()):
                reader.last_call(patience)
            return len(self.connections)

    def capacity(self):
        """Connections served at once: max_connections (a live key), or fewer
        if the open-file limit leaves room for fewer."""
        return min(self.config.max_connections, self.fd_room)

    def process_request(self, request, client_address):
        """Accept thread: a thread for the connection if there is room, else 503."""
        with self.lock:
            admitted = self.make_room()
            if admitted:
                self.connections[request] = _KernelTimedReader(request, self.config.timeout)
        if not admitted:
            self.refuse(request, f"too many connections (max_connections = "
                        f"{self.capacity()}); try again")
            return
        super().process_request(request, client_address)

    def make_room(self):
        """Accept thread, holding `lock`: True if a new connection may have a
        thread, after closing an idle or slow one at the cap (see the class
        docstring). It waits (EVICT_WAIT at most) only while too many closed
        ones are still finishing, or the descriptors are short."""
        if len(self.connections) - self.leaving >= self.capacity():
            victim = self.victim()
            if victim is None:
                return False
            self.evict(victim)
        ceiling = min(self.config.max_connections + EVICTING_MAX, self.fd_room)
        return self.lock.wait_for(lambda: len(self.connections) < ceiling, EVICT_WAIT)

    def victim(self):
        """Accept thread, holding `lock`: the connection to close for room,
        or None. Idle ones first, the longest idle first (nginx); then the
        slowest request head. In a flood every new connection needs one, and
        looking through all the connections each time took most of the
        accept thread's CPU (yappi, 1,100 slow clients): the candidates are
        sorted once into `victims` and taken from the front, each checked
        again when its turn comes; sorted again when used up, or after
        SLOW_HEAD, so that heads grown slow since then join in."""
        now = time.monotonic()
        if now - self.victims_at > SLOW_HEAD:
            self.victims.clear()
        for fresh in (not self.victims, True):
            if fresh:
                self.victims = collections.deque(sorted(
                    (r for r in self.connections.values() if r.evictable(now)),
                    key=_eviction_order))
                self.victims_at = now
            while self.victims:
                reader = self.victims.popleft()
                if self.connections.get(reader.sock) is reader and reader.evictable(now) \
                        and (reader.phase != IDLE or reader.nothing_sent()):
                    return reader
            if fresh:
                return None
        return None

    def evict(self, reader):
        """Accept thread, holding `lock`: close a connection for room."""
        reader.evict()
        self.leaving += 1

    def refuse(self, request, message):
        """Accept thread: 503 and close, at once. The socket is non-blocking,
        so a client that reads nothing cannot hold up the accept thread; the
        reply is a few hundred bytes, which any send buffer takes. What the
        client sent already is read first: closing a socket with unread data
        sends RST, which could reach the client before the reply."""
        body = json.dumps({"message": message}).encode() + b"\n"
        head = (f"{STATUS_HEADS[503]}Date: {http_date()}\r\nContent-Type: {JSON_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)
            request.recv(65536)
        except OSError:
            pass
        try:
            request.send(head.encode("latin-1") + body)
        except OSError:
            pass
        request.close()
        if self.loop:
            self.loop.responses.append(503)
        self.warn_refusing(message)

    def warn_refusing(self, message):
        """Say in the log that connections are refused, once a minute at most."""
        self.refused += 1
        now = time.monotonic()
        if self.warned_at is None or now - self.warned_at >= REFUSALS_LOGGED_EVERY:
            log.warning("refusing connections: %s (%d since the last warning)",
                        message, self.refused)
            self.refused, self.warned_at = 0, now

    def get_request(self):
        """accept(). When the descriptors run out (EMFILE, ENFILE), the
        listening socket stays readable and socketserver would retry at once:
        it spun at 97% CPU (issue 9). Close an idle connection if there is
        one, and wait for a connection to end, ACCEPT_BACKOFF at most."""
        try:
            request, address = super().get_request()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            with self.lock:
                victim = self.victim()
                if victim is not None:
                    self.evict(victim)
                self.lock.wait(ACCEPT_BACKOFF)
            self.warn_refusing(f"accept() failed: {e.strerror}")
            raise
        # The listener is non-blocking (see __init__); BSD's accept() passes
        # that on, Linux's does not, and Python clears it only for a
        # listener with a timeout (the socket module's docs, "Timeouts and
        # the accept method"). A connection's reads and writes block.
        request.setblocking(True)
        return request, address

    def shutdown_request(self, request):
        """The connection's thread, as it ends: its slot is free."""
        with self.lock:
            reader = self.connections.pop(request, None)
            if reader is not None and reader.evicted:
                self.leaving -= 1
            self.lock.notify()
        super().shutdown_request(request)

    def server_bind(self):
        # Not HTTPServer.server_bind: its socket.getfqdn() can wait on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # socketserver would print a traceback to stderr for a client that
        # vanished; that is not an error of ours.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("connection from %s: %s", client_address[0], error)
        else:
            log.exception("unexpected error serving %s", client_address[0])


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """One connection. Parses requests, checks them, submits commands to the
    main loop and writes the replies. Runs in the connection's thread; touches
    no state but the immutable Config and the MainLoop's submit().
    self.headers is a plain dict keyed by lower-case field name (read_headers)."""

    protocol_version = "HTTP/1.1"   # keep-alive; every response has a Content-Length
    disable_nagle_algorithm = True  # else a small reply waits ~40 ms on delayed ACK
    server_version = "notesd/" + __version__
    sys_version = ""                # do not advertise the Python version

    def setup(self):
        # The connection's read and write timeouts, kept by the kernel
        # (SO_RCVTIMEO, SO_SNDTIMEO; socket(7)). A Python socket timeout would
        # poll() before each recv(): a syscall per request that cost 13% of
        # GET throughput (bench/).
        self.reader = self.server.connections[self.request]  # made on accept
        timeval = _timeval(self.reader.timeout)
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.request.setsockopt(socket.SOL_SOCKET, option, timeval)
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        """BaseHTTPRequestHandler's, which handle() calls while the connection
        stays open, with the reader told where each request begins (its
        deadline, and the phase ApiServer.make_room looks at). http.server
        closes a connection whose read timed out without a word: right for
        an idle one (RFC 9112 9.5), but a request begun and cut off by its
        deadline, or closed for room mid-head, gets 408 (RFC 9110 15.5.9)."""
        self.reader.expect_request()
        # Nothing of the last request on this connection may answer for this one.
        self.command, self.requestline, self.headers = None, "", None
        # The bytes its body reserved (reserve_body) go back whatever happens:
        # a reply, an error, a vanished client; only once the reply is
        # written, for a note's text is in it too.
        self.body_framing, self.reserved, self.reply_held = None, 0, 0
        try:
            self._handle_request()
            if self.reader.expired and self.reader.phase == HEAD:
                self.close_connection = True
                self.respond(408, {"message": self.reader.expired})
        finally:
            if self.reserved:
                self.server.bodies.release(self.reserved)
            if self.reply_held:
                self.server.replies.release(self.reply_held)

    def _handle_request(self):
        """BaseHTTPRequestHandler.handle_one_request, less what notesd never
        needs: every method has a do_METHOD (dispatch, or __getattr__'s 405),
        and wfile is unbuffered (nothing to flush). A call and two attribute
        looks fewer on every request."""
        try:
            self.raw_requestline = self.rfile.readline(MAX_HEADER_SECTION + 1)
            if not self.raw_requestline:
                self.close_connection = True
            elif self.parse_request():
                getattr(self, "do_" + self.command)()
        except socket.timeout:  # a read or a write timed out: drop the connection
            self.close_connection = True

    def dispatch(self):
        self.reader.phase = BUSY  # the head is in: never closed to make room now
        config = self.server.config
        # A body that no handler reads must not be taken for the next request
        # on this connection (request smuggling): read_body() clears this, and
        # respond() closes the connection if it is still set.
        self.body_unread = self.body_framing not in (None, 0)
        self.fields = self.method = None  # read_fields(), route()
        try:
            path, _, query = self.path.partition("?")
            path = _decode_unreserved(path)
            self.authorize(config, path)
            handler, args = self.route(path)
            status, payload, headers = handler(*args, query)
            if self.command == "POST" and status < 300 and self.is_form() and self.wants_html():
                status, payload, headers = self.see_other(path, headers)
        except NotesdError as e:
            log.debug("%s %s: %d %s", self.command, self.path, e.status, e)
            status, payload, headers = e.status, {"message": str(e)}, e.headers
        except socket.timeout:
            self.close_connection = True
            status, payload, headers = 408, {"message": "timed out reading the request"}, ()
        except OSError as e:  # the client went away mid-request
            log.debug("client %s: %s", self.client_address[0], e)
            self.close_connection = True
            return
        except Exception as e:
            log.exception("internal error on %s %s", self.command, self.path)
            status, payload, headers = 500, {"message": f"internal error: {type(e).__name__}"}, ()
        self.respond(status, payload, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    def __getattr__(self, name):
        # Any other method (TRACE, CONNECT, QUERY ...): BaseHTTPRequestHandler
        # looks for do_METHOD and answers 501 without Allow where there is
        # none. route() answers it as any method a resource does not take:
        # 405 with Allow (RFC 9110 15.5.6), as the README says.
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def route(self, path):
        for pattern, methods, allow in ROUTE_TABLE:
            match = pattern.fullmatch(path)
            if match:
                method = "GET" if self.command == "HEAD" else self.command
                if method == "OPTIONS":
                    return (lambda query: (204, None, [("Allow", allow)])), ()
                if method == "POST" and method not in methods and self.is_form():
                    method = self.form_method(methods)
                if method not in methods:
                    raise _http_error(405, f"{self.command} is not allowed on {path}",
                                      ("Allow", allow))
                self.method = method
                return getattr(self, methods[method].handler), match.groups()
        raise _http_error(404, f"no such resource: {path}")

    def form_method(self, methods):
        """The method a browser's form asks for in its `_method` field: HTML
        forms send only GET and POST (HTML 4.10.18.6), so the page's edit,
        delete and patch forms post `_method=PUT`, `DELETE` or `PATCH`, and
        the form's `text` field is the body. The form must be notesd's own
        page (check_own_page): another site's form may post here too. POST
        (then 405) if the field names no method this resource takes."""
        method = self.read_fields().get("_method", "").upper()
        if method not in FORM_METHODS or method not in methods:
            return "POST"
        self.check_own_page(self.server.config, "a form's _method")
        return method

    def check_own_page(self, config, what):
        """CSRF: a browser makes some writes by itself, for any page that asks,
        with what it holds for notesd (the Basic credentials it remembers).
        Those need notesd's own page behind them: an Origin, or else a Referer,
        in allowed_hosts (OWASP, "verifying origin with standard headers").
        authorize() refused a foreign Origin already; this refuses none too."""
        source = self.headers.get("origin") or self.headers.get("referer")
        if source is None or not _origin_allowed(source, config.allowed_hosts,
                                                 self.headers.get("host"),
                                                 self.server.server_port):
            raise _http_error(403, f"{what} needs an Origin or Referer header naming an "
                              "origin in 'allowed_hosts': a page of notesd's own")

    def authorize(self, config, path):
        host = self.headers.get("host")
        if path != "/health" and not _host_allowed(host, config.allowed_hosts):
            # /health is spared: monitoring calls a server by any of its
            # names, and the answer tells a rebinding page nothing.
            raise _http_error(421, f"notesd does not answer to the name in Host: "
                              f"{host[:100]!r}. Add it to 'allowed_hosts' in the [notesd] "
                              "section of the config file, then reload")
        origin = self.headers.get("origin")
        if origin is not None and self.command not in SAFE_METHODS and \
                not _origin_allowed(origin, config.allowed_hosts, host, self.server.server_port):
            # A browser sends Origin with every cross-site POST: a web page
            # must not write to a notesd on the visitor's machine (CSRF).
            raise _http_error(403, f"cross-origin request from {origin[:100]} refused: only "
                              "the origins in 'allowed_hosts' may write")
        if self.server.public and not config.token and not _is_loopback(self.client_address[0]):
            raise _http_error(403, "protected mode: notesd listens on a public address "
                              "without a token, so it answers loopback clients only. Set "
                              "'token = SECRET' in the [notesd] section of the config file "
                              "(or run with --token SECRET), restart or reload, and send "
                              "'Authorization: Bearer SECRET'")
        if config.token and path != "/health":
            scheme, given = _presented_token(self.headers.get("authorization", ""))
            if not hmac.compare_digest(given, config.token.encode()):
                # A browser asks its user only when challenged with a scheme it
                # knows, Basic (RFC 7617); then it sends the token with every
                # load of the page, link and reload. API clients use Bearer.
                challenge = "Basic" if _prefers_html(self.headers.get("accept", "")) else "Bearer"
                raise _http_error(401, "a valid token is required: 'Authorization: Bearer "
                                  "TOKEN', or in a browser, any user name and the token as "
                                  "password", ("WWW-Authenticate", f'{challenge} realm="notesd"'))
            if scheme == "basic" and self.command not in SAFE_METHODS:
                self.check_own_page(config, "a write signed in with Basic")

    # -- endpoints: each returns (status, payload, headers) ----------------

    def list_notes(self, query):
        params = _query(query)
        limit = _int_param(params, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
        after = _int_param(params, "after", 0, 0, SQLITE_MAX_INT)
        text = params.get("q") or None
        if text and len(text) > QUERY_MAX:
            raise _http_error(400, f"'q' is longer than {QUERY_MAX} characters")
        if text and CONTROL_RE.search(text):
            # No note holds one, and FTS5 reads a NUL as the end of its query
            # ("unterminated string"): a storage error, not the client's.
            raise _http_error(400, "'q' holds a control character; notes hold none but "
                              "tab, LF and CR")
        rows, self.reply_held = self.server.loop.submit(
            "list", after, limit + 1, text, False, self.server.replies)
        base, headers = self.base_url(), []
        notes, encoded = _encode_page([_note_json(row, base) for row in rows[:limit]], len(base))
        pages = {}  # what the browsable page links to as next and previous
        if len(rows) > len(notes):  # rows left over: another page exists (RFC 8288)
            following = {"after": notes[-1]["id"], "limit": limit,
                         **({"q": text} if text else {})}
            pages["next"] = f"{base}/?{urllib.parse.urlencode(following)}"
            headers.append(("Link", f'<{pages["next"]}>; rel="next"'))
        if after and self.wants_html():
            # The page that ends at `after`: the `limit` notes up to it, newest
            # first; it starts after the one before the oldest of them.
            earlier, _ = self.server.loop.submit("list", after, limit, text, True)
            if earlier:
                back = {"after": earlier[-1].id - 1, "limit": limit, **({"q": text} if text else {})}
                if not back["after"]:
                    del back["after"]
                pages["prev"] = f"{base}/?{urllib.parse.urlencode(back)}"
        return 200, EncodedList(notes, encoded, pages), headers

    def create_note(self, query):
        row, _, _ = self.server.loop.submit("create", self.read_text())
        note = _note_json(row, self.base_url())
        return 201, note, [("Location", note["url"]), ("ETag", etag(row))]

    def get_note(self, note_id, query):
        note_id = client_number(note_id)
        row = self.server.loop.submit("get", note_id) if note_id <= SQLITE_MAX_INT else None
        if row is None:
            raise _http_error(404, f"no note with id {note_id}")
        return 200, _note_json(row, self.base_url()), [("ETag", etag(row))]

    def put_note(self, note_id, query):
        note_id = client_number(note_id)
        if not 1 <= note_id <= MAX_ID:
            raise _http_error(400, f"note ids go from 1 to {MAX_ID}")
        text = self.read_text()
        row, created, _ = self.server.loop.submit("put", note_id, text,
                                                  self.headers.get("if-match"))
        note = _note_json(row, self.base_url())
        headers = [("ETag", etag(row))] + ([("Location", note["url"])] if created else [])
        return (201 if created else 200), note, headers

    def delete_note(self, note_id, query):
        note_id, if_match = client_number(note_id), self.headers.get("if-match")
        if note_id <= SQLITE_MAX_INT:
            self.server.loop.submit("delete", note_id, if_match)
        elif if_match is not None:
            _check_precondition(None, if_match)
        return 204, None, ()

    def health(self, query):
        # Read the loop's heartbeat directly instead of queueing: this must
        # answer, and say so, exactly when the main loop is stuck or swamped.
        loop = self.server.loop
        age = time.monotonic() - loop.heartbeat
        body = {"status": "ok", "heartbeat_age": round(age, 3),
                "loop_lag_ms": round(loop.lag * 1000, 3), "queue_depth": loop.commands.qsize()}
        last = loop.last_reload
        if last:  # the verdict for `reload`, whatever token the daemon kept;
            # the message (which may quote the file) only in /status
            body["last_reload"] = {"ok": last["ok"], "at": last["at"]}
        if loop.last_restart:  # and for `restart`
            body["last_restart"] = {k: v for k, v in loop.last_restart.items()
                                    if k in ("ok", "at", "serving")}
        # While a successor serves, the old daemon still answers for itself
        # until it closes (MainLoop.drain): not a 503 on every restart.
        problem = ("notesd is shutting down" if loop.closing or (
                       loop.stopping and not loop.handed_over) else
                   f"main loop stuck: no heartbeat for {age:.1f}s" if age > HEARTBEAT_STALE else
                   loop.storage_problem)
        if problem:
            body.update(status="unavailable", message=problem)
            return 503, body, [("Retry-After", "5")]
        return 200, body, ()

    def status(self, query):
        return 200, self.server.loop.submit("status"), ()

    def get_config(self, query):
        return 200, self.server.config.public(), ()

    def patch_config(self, query):
        # From the page's form (form_method), the patch is its text field.
        body = self.read_text().encode() if self.command == "POST" else self.read_body()
        changes = _parse_json_object(body, "the configuration patch")
        return 200, self.server.loop.submit("patch_config", changes), ()

    def openapi(self, query):
        return 200, openapi_document(bool(self.server.config.token)), ()

    # -- request bodies ----------------------------------------------------

    def reserve_body(self):
        """The body's framing (a length or CHUNKED) once its bytes are reserved
        in the server's ByteBudget, or the error that refuses it from the
        headers alone, without reading it: 411, 413, 503 (the connection then
        closes: the body is unread). handle_one_request() releases them."""
        framing, config = self.body_framing, self.server.config
        if framing is None:
            raise _http_error(411, "a request body needs a Content-Length header or "
                              "Transfer-Encoding: chunked")
        if framing != CHUNKED and framing > config.max_body:
            shown = "more than 2**63" if framing == NUMBER_CAP else framing
            raise _http_error(413, f"the body is {shown} bytes; the limit is {config.max_body}")
        if not self.reserved:
            size = config.max_body if framing == CHUNKED else framing
            if not self.server.bodies.reserve(size, config.max_body_total):
                raise _http_error(503, "too many request bodies in flight; try again",
                                  ("Retry-After", "1"))
            self.reserved = size
        return framing

    def read_body(self):
        """The body, whatever its framing: the one way every handler reads one.
        Meanwhile the connection is in its BODY phase: one stalled there may
        be closed for room, as a slow head may (ApiServer.victim)."""
        framing = self.reserve_body()
        self.reader.phase, self.reader.since = BODY, time.monotonic()
        if framing == CHUNKED:
            body = read_chunked(self.rfile, self.server.config.max_body)
        else:
            body = self.rfile.read(framing)
            if len(body) < framing:
                raise ConnectionAbortedError("the client closed the connection mid-body")
        self.reader.phase = BUSY
        self.body_unread = False
        return body

    def read_fields(self):
        """The fields of a JSON, form or multipart body, read and parsed once:
        form_method() reads them before the handler does."""
        if self.fields is None:
            body = self.read_body()
            content_type = self.headers.get("content-type", JSON_TYPE)
            parse = BODY_PARSERS.get(_media_type(content_type))
            if parse is None:
                raise _http_error(415, f"unsupported Content-Type {content_type!r}; use "
                                  + ", ".join(BODY_PARSERS))
            try:
                self.fields = parse(body, content_type)
            except (ValueError, LookupError, RecursionError, email.errors.MessageError) as e:
                # UnicodeDecodeError is a ValueError; LookupError is an unknown charset.
                raise _http_error(400, f"malformed body: {e}") from None
        return self.fields

    def read_text(self):
        """The note text from a JSON, form or multipart body."""
        text = self.read_fields().get("text")
        if not isinstance(text, str):
            raise _http_error(400, "the body needs a 'text' field holding a string")
        if not text.isascii():  # ASCII is valid UTF-8: only others may hold a surrogate
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _http_error(400, "'text' is not valid Unicode (lone surrogate)") from None
        control = CONTROL_RE.search(text)
        if control:
            raise _http_error(400, f"'text' holds the control character "
                              f"U+{ord(control.group()):04X} at position {control.start()}; "
                              "a note holds no control characters but tab, LF and CR")
        return text

    # -- responses ---------------------------------------------------------

    def respond(self, status, payload, headers=()):
        """Status line, headers and body in one write (one TCP segment for a
        small reply, and no Nagle stall between them). A reply larger than
        REPLY_SMALL is written only if its bytes fit in the server's budget
        for replies (hold_reply), else 503."""
        if payload is None:
            body, content_type = b"", None
        elif self.wants_html():
            body, content_type = render_page(self, status, payload, headers), HTML_TYPE
            headers = [*headers, *PAGE_HEADERS]
        elif isinstance(payload, EncodedList):
            body, content_type = payload.encoded, JSON_TYPE
        else:
            body, content_type = json.dumps(payload).encode() + b"\n", JSON_TYPE
        if len(body) > REPLY_SMALL:
            try:
                self.hold_reply(len(body))
            except NotesdError as e:
                status, headers, content_type = e.status, e.headers, JSON_TYPE
                body = json.dumps({"message": str(e)}).encode() + b"\n"
        # Once notesd stops, every reply ends its connection (a reply the
        # stop's last_call has not marked yet too): a kept-alive client asks
        # again on a new one, the successor's after a restart.
        if getattr(self, "body_unread", False) or self.reader.last or self.server.loop.stopping:
            self.close_connection = True
        head = STATUS_HEADS[status] + f"Date: {http_date()}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if status != 204:  # RFC 9110 8.6: no Content-Length in a 204
            head += f"Content-Length: {len(body)}\r\n"
        for name, value in headers:
            head += f"{name}: {value}\r\n"
        if self.close_connection:
            head += "Connection: close\r\n"
        elif self.request_version == "HTTP/1.0":  # it asked to keep alive: say yes
            head += "Connection: keep-alive\r\n"
        data = (head + "\r\n").encode("latin-1")
        if self.command == "HEAD":
            self.wfile.write(data)
        elif len(body) <= REPLY_SMALL:
            self.wfile.write(data + body)
        else:  # a large body in a write of its own rather than copied after its head
            self.wfile.write(data)
            self.wfile.write(body)
        self.server.loop.responses.append(status)
        if self.server.config.access_log:
            log.info('%s "%s" %d %d', self.client_address[0],
                     getattr(self, "requestline", ""), status, len(body))

    def hold_reply(self, size):
        """Count a large reply (over REPLY_SMALL: respond() asks only then)
        of `size` bytes in the server's budget for large replies (REPLIES_HELD) until the request ends (handle_one_request),
        or refuse it, 503. A page is counted already, by the main loop, before
        its rows leave it (MainLoop.do_list); any other large reply is, here,
        before it is written."""
        if not self.reply_held:
            if not self.server.replies.reserve(size, REPLIES_HELD):
                raise _http_error(503, "too many large replies in flight; try again",
                                  ("Retry-After", "1"))
            self.reply_held = size

    def parse_request(self):
        """BaseHTTPRequestHandler.parse_request for HTTP/1.x, with read_headers()
        for the header section. Sets command, path, request_version, headers and
        close_connection; answers a bad request itself and returns False."""
        self.command, self.request_version, self.close_connection = None, "HTTP/0.9", True
        line = self.raw_requestline
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line
        self.requestline = str(line, "iso-8859-1")
        if len(self.raw_requestline) > MAX_HEADER_SECTION:
            self.send_error(414, f"the request line is over {MAX_HEADER_SECTION} bytes")
            return False
        match = REQUEST_LINE_11.fullmatch(self.requestline)  # the common case, at once
        if match:
            command, path, version, minor = match.group(1, 2, 3, 4)
        else:
            words = REQUEST_LINE.fullmatch(line)
            if not words:
                self.send_error(400, f"Bad request syntax ({self.requestline[:200]!r})")
                return False
            command, path, version = (word.decode("iso-8859-1") for word in words.groups())
            match = VERSION_RE.fullmatch(version)
            if not match:
                self.send_error(505 if version.startswith("HTTP/") else 400,
                                f"Unsupported HTTP version ({version!r})")
                return False
            minor = match.group(1)
        # '//x' would read as a host in a URL built from the path (gh-87389).
        self.command, self.path, self.request_version = command, "/" + path.lstrip("/"), version
        try:
            self.headers = read_headers(self.rfile,
                                        MAX_HEADER_SECTION - len(self.raw_requestline))
            if "content-length" in self.headers or "transfer-encoding" in self.headers:
                self.body_framing = body_framing(self.headers, version)
        except NotesdError as e:
            self.send_error(e.status, str(e))
            return False
        if minor != "0" and "host" not in self.headers:
            self.send_error(400, "an HTTP/1.1 request needs a Host header (RFC 9112 3.2)")
            return False
        connection = self.headers.get("connection", "").lower()
        self.close_connection = ("close" in connection or
                                 (minor == "0" and "keep-alive" not in connection))
        if minor != "0" and self.headers.get("expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def handle_expect_100(self):
        # RFC 9110 10.1.1: a request whose framing says it has no content is
        # simply served, with no 100; refuse a body we would refuse anyway
        # before the client sends it, rather than invite it with 100 Continue.
        if not self.body_framing:
            return True
        try:
            self.reserve_body()
        except NotesdError as e:
            self.close_connection = True
            self.respond(e.status, {"message": str(e)}, e.headers)
            return False
        return super().handle_expect_100()

    def send_error(self, code, message=None, explain=None):
        """The server's own errors (bad request line 400, 414, 431, 501) as JSON."""
        self.close_connection = True
        self.respond(code, {"message": message or _phrase(code)})

    def wants_html(self):
        """Does the client prefer HTML (a browser), and not ask for the JSON
        itself with ?format=json (the page's "raw JSON" link)?"""
        headers = getattr(self, "headers", None)
        # No command: the request line was refused, and the headers (if any)
        # are the last request's; its error is JSON.
        if self.command is None or headers is None or \
                not _prefers_html(headers.get("accept", "")):
            return False
        return "format=json" not in self.path.partition("?")[2].split("&")

    def is_form(self):
        """Is the body what an HTML form sends?"""
        return _media_type(self.headers.get("content-type", "")) in FORM_TYPES

    def see_other(self, path, headers):
        """Post/Redirect/Get: a browser's form post is answered 303 See Other
        (RFC 9110 15.4.4) with the page to show next, which says what was
        done (?done=): a reload then shows that page again, and does not
        post the form twice."""
        target = dict(headers).get("Location") or self.base_url() + (
            "/" if self.method == "DELETE" else path)
        return 303, None, [("Location", f"{target}?done={DONE[self.method]}")]

    def base_url(self):
        host = self.headers.get("host", "")
        return "http://" + (host if HOST_RE.fullmatch(host) else self.server.host_header)

    def log_message(self, format, *args):
        # BaseHTTPRequestHandler logs its own errors (timeouts, bad requests)
        # to stderr; in a daemon they belong in the log, at debug level.
        log.debug("%s: %s", self.client_address[0], format % args)


class EncodedList(list):
    """A payload whose JSON is made already: list_notes() encodes a page note
    by note to stop at PAGE_BYTES, and respond() sends those bytes rather
    than encode the page twice. The browsable view reads it as the list,
    and links to `pages` ({"next": url, "prev": url}, as there are)."""

    __slots__ = ("encoded", "pages")

    def __init__(self, items, encoded, pages=None):
        super().__init__(items)
        self.encoded = encoded
        self.pages = pages or {}


def _encode_page(notes, url_room):
    """(the notes that fit, their JSON): as many as fit in PAGE_BYTES, at
    least one. A page that fits whatever its text holds is encoded whole:
    a json.dumps() per note cost a page of 100 small notes a third of its
    speed. JSON may spell a character in 12 bytes (a surrogate pair of
    \\u escapes), so only a page whose text is under a twelfth of
    PAGE_BYTES is sure to fit; a longer one is encoded note by note, never
    more than PAGE_BYTES and one note at a time in memory. `url_room`: the
    length of the base each note's url starts with."""
    room = NOTE_JSON_ROOM + url_room
    if sum(len(note["text"]) + room for note in notes) * 12 <= PAGE_BYTES:
        return notes, json.dumps(notes).encode() + b"\n"  # ASCII: a character is a byte
    parts, size = [], 2
    for note in notes:
        part = json.dumps(note)
        size += len(part) + 2
        if parts and size > PAGE_BYTES:
            break
        parts.append(part)
    return notes[:len(parts)], f"[{', '.join(parts)}]\n".encode()


@functools.lru_cache(maxsize=64)
def _media_type(content_type):
    """'application/json' of 'Application/JSON; charset=utf-8': a client
    sends the same Content-Type every time, so the answer is kept."""
    return content_type.partition(";")[0].strip().lower()


def _note_json(row, base):
    return {"id": row.id, "url": f"{base}/{row.id}/", "text": row.text,
            "created": row.created, "updated": row.updated}


def _phrase(status):
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


#: The status line and Server header of every status, built once.
STATUS_HEADS = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                              f"Server: {ApiHandler.server_version}\r\n"
                for status in http.HTTPStatus}
_date = (0, "")


def http_date():
    """The Date header's value (RFC 9110 6.6.1), formatted once a second.
    Any thread: the tuple is replaced whole, so a reader never sees half."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


#: The port of an origin that names none (RFC 6454 4).
DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_host(origin):
    """(host[:port] as written, name, port) of an Origin header (RFC 6454 7),
    the port the scheme's default if it names none, name None if it is no
    host name; None if it is malformed ('http://[' makes urlsplit raise) or
    "null": such an origin matches nothing."""
    try:
        url = urllib.parse.urlsplit(origin)
    except ValueError:
        return None
    if not url.netloc:
        return None
    name, port = _split_host(url.netloc) or (None, None)
    return url.netloc, name, port or DEFAULT_PORTS.get(url.scheme.lower())


# Every request asks: 0.3 us from the cache, 2-4 us without (timeit). A
# bounded cache, as the client chooses Host.
@functools.lru_cache(maxsize=256)
@functools.lru_cache(maxsize=256)
def _host_allowed(host, allowed):
    """DNS rebinding: a web page whose name the attacker points at 127.0.0.1
    is served by notesd as its own site, and may read and write it all. The
    browser writes that name in Host, so notesd answers only to the names of
    allowed_hosts (RFC 9110 7.2, 15.5.20). Ports are not compared, as the page
    chooses its port, never its name. An IP address is always allowed: a
    browser sends one only to the site that has that address as its name.
    No Host (HTTP/1.0) is allowed too: no browser omits it. And with *, any
    Host, even one that is no host name (a container's 'notes_app').
    Cached: a client sends the same Host with every request, and parsing it
    as an address was a tenth of a GET's own code (yappi); `allowed` is the
    live config's tuple, so a reload asks afresh."""
    if host is None or ("*", None) in allowed:
        return True
    parsed = _split_host(host)
    if parsed is None:
        return False
    name = parsed[0]
    return any(entry == name for entry, _ in allowed) or _is_address(name)


def _origin_allowed(origin, allowed, host, own_port):
    """Cross-site writes (CSRF): a write whose Origin is not in allowed_hosts
    is refused. Compared against allowed_hosts, not against the request's own
    Host: behind a proxy Host may be the proxy's, and a rebinding page's Origin
    equals its Host. An entry with a port needs that port (0: the port notesd
    listens on); one without takes any. With *, the origin must be the
    request's own Host, the rule before allowed_hosts."""
    parsed = _origin_host(origin)
    if parsed is None:
        return False
    netloc, name, port = parsed
    for entry, entry_port in allowed:
        if entry == "*" and netloc.lower() == (host or "").lower():
            return True
        if entry == name and (own_port if entry_port == 0 else entry_port) in (None, port):
            return True
    return False


def _eviction_order(reader):
    """Idle connections before slow heads, each the oldest first."""
    return reader.phase != IDLE, reader.since


def _connection_room():
    """How many connections the open-file limit leaves room for: the soft
    limit less what the daemon keeps for itself (FD_RESERVE)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return soft - min(FD_RESERVE, soft // 2)


def _is_loopback(address):
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


#: RFC 3986 2.3: the characters a URI means the same by, percent-encoded or not.
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(path):
    """`path` with its percent-encoded unreserved characters decoded (RFC 3986
    6.2.2.2), so /%31/ routes as /1/, as the seed's Werkzeug routes it. Any
    other escape stays as it is: %2F is no path separator, %3F no query."""
    if "%" not in path:
        return path
    def decode(match):
        char = chr(int(match.group(1), 16))
        return char if char in UNRESERVED else match.group()
    return PERCENT_RE.sub(decode, path)


def _first_values(pairs):
    """{name: value} of (name, value) pairs, a repeated name keeping its first
    value: what Werkzeug's MultiDict.get gives, so a form the seed's Flask-API
    app stored "first" from (text=first&text=second) stores "first" here."""
    fields = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def _query(query):
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise _http_error(400, f"bad query string: {e}") from None
    return _first_values(pairs)


def _int_param(params, name, default, low, high):
    text = params.get(name)
    if text is None:
        return default
    number = client_number(text)
    if number is None or not low <= number <= high:
        raise _http_error(400, f"'{name}' must be a whole number from {low} to {high}")
    return number


def _presented_token(authorization):
    """(scheme, token) of an Authorization header: 'Bearer TOKEN' (RFC 6750
    2.1), or 'Basic' with the token as password and any user name (RFC 7617
    2), which a browser asks its user for; (scheme, b"") for anything else.
    The caller compares the token in constant time, whatever the scheme."""
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return scheme, value.strip().encode()
    if scheme == "basic":
        try:
            user_password = base64.b64decode(value.strip(), validate=True)
        except ValueError:  # binascii.Error
            return scheme, b""
        return scheme, user_password.partition(b":")[2]
    return scheme, b""


def _prefers_html(accept):
    """Does an Accept header (RFC 9110 12.5.1) rank text/html at least as high as JSON?"""
    if "html" not in accept:
        return False
    weights = {}
    for item in accept.split(","):
        media, _, params = item.partition(";")
        match = re.search(r"q\s*=\s*([0-9.]+)", params)
        try:
            weights[media.strip().lower()] = float(match.group(1)) if match else 1.0
        except ValueError:
            weights[media.strip().lower()] = 0.0
    html_weight = weights.get("text/html", 0.0)
    json_weight = weights.get(JSON_TYPE, weights.get("application/*", weights.get("*/*", 0.0)))
    return html_weight > 0 and html_weight >= json_weight


def _parse_json_object(body, what="the body"):
    try:
        value = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # RecursionError: [[[[... nested too deep
        raise _http_error(400, f"malformed JSON in {what}: {e}") from None
    if not isinstance(value, dict):
        raise _http_error(400, f"{what} must be a JSON object")
    return value


def _form_fields(body, content_type):
    return _first_values(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                                errors="strict", max_num_fields=MAX_FORM_FIELDS))


def _multipart_fields(body, content_type):
    """The fields of a multipart/form-data body (RFC 7578; RFC 2046 5.1.1),
    files left out. Parsed in place: each part is found with find() and
    decoded straight from a memoryview, so only the fields' text is copied.
    The email package (the cgi module is gone in 3.13) copied a 1 MiB body
    about ten times over: 10 MiB of peak memory per request (tracemalloc)."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_boundary()
    if not boundary or len(boundary) > 70:
        raise ValueError("not a multipart body (missing boundary?)")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    view, fields = memoryview(body), {}
    # The first boundary opens the body, or ends a preamble.
    pos = 0 if body.startswith(delimiter[2:]) else body.find(delimiter) + 2
    if pos == 1:
        raise ValueError("no boundary in the body")
    pos += len(delimiter) - 2
    for _ in range(MAX_FORM_FIELDS + 1):
        if body.startswith(b"--", pos):  # the closing boundary
            return fields
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise ValueError("malformed boundary line")
        part_end = body.find(delimiter, line_end)
        blank = body.find(b"\r\n\r\n", line_end, part_end + 2)
        if part_end < 0 or blank < 0:
            raise ValueError("a part is not closed by a boundary, or has no empty line")
        _multipart_field(fields, body[line_end + 2:blank], view[blank + 4:part_end])
        pos = part_end + len(delimiter)
    raise ValueError(f"more than {MAX_FORM_FIELDS} parts")


def _multipart_field(fields, head, content):
    """Add one part's field to `fields`, unless it is a file."""
    part = email.parser.BytesHeaderParser().parsebytes(bytes(head))
    name = part.get_param("name", header="content-disposition")
    if name and part.get_filename() is None:
        encoding = part.get("content-transfer-encoding", "").strip().lower()
        if encoding == "base64":  # RFC 7578 4.7 forbids these; senders that did
            content = binascii.a2b_base64(content)
        elif encoding == "quoted-printable":
            content = binascii.a2b_qp(content)
        # the first of a repeated field, as _first_values keeps it
        fields.setdefault(name, str(content, part.get_content_charset("utf-8")))


def _json_fields(body, content_type):
    return _parse_json_object(body)


#: How each supported request Content-Type turns into fields.
BODY_PARSERS = {
    JSON_TYPE: _json_fields,
    "application/x-www-form-urlencoded": _form_fields,
    "multipart/form-data": _multipart_fields,
}

###############################################################################
# Browsable HTML & OpenAPI ####################################################
###############################################################################

#: The page's style and script, each allowed by its hash in PAGE_HEADERS.
PAGE_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:62em;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.3em}h1 a{color:inherit;text-decoration:none}
nav a{display:inline-block;padding:.6em .4em;margin-right:.6em}
pre{background:#f6f6f4;border:1px solid #ddd;padding:.8em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
.req{font-family:monospace;font-size:1.05em;overflow-wrap:anywhere}.s2{color:#185}.s4,.s5{color:#b22}
form{margin:1em 0;padding:.8em;border:1px solid #ddd}label{display:block;font-weight:bold;margin-bottom:.3em}
textarea{box-sizing:border-box;width:100%;min-height:6em;font:inherit}
button{min-height:44px;min-width:44px;padding:0 1.2em;margin-top:.5em;font:inherit}
output{display:block;margin-top:.5em;color:#b22;white-space:pre-wrap;overflow-wrap:anywhere}
output:empty{display:none}.notice{border:1px solid #185;background:#eef7f1;padding:.6em .8em}
"""
PAGE_SCRIPT = """
// Every form works without this script: a plain POST, whose _method field
// names PUT, DELETE or PATCH. With it, Delete asks first, and a refused
// request keeps the page and says why right under the button.
const done={POST:'created',PUT:'saved',DELETE:'deleted',PATCH:'changed'};
for(const f of document.forms)f.addEventListener('submit',async e=>{
  const m=f.elements._method?f.elements._method.value:'POST',t=f.elements.text,
    out=f.querySelector('output');
  if(m==='DELETE'&&!confirm('Delete this note?')){e.preventDefault();return;}
  if(!window.fetch)return;
  e.preventDefault();out.textContent='';
  const h={'Accept':'application/json'};let body;
  if(t){h['Content-Type']='application/json';
    body=m==='PATCH'?t.value:JSON.stringify({text:t.value});}
  try{
    const r=await fetch(f.action,{method:m,headers:h,body:body});
    if(r.status===401){f.submit();return;}  // the browser asks for the token
    if(r.ok){location.href=(m==='DELETE'?'/':r.headers.get('Location')||location.pathname)
      +'?done='+done[m];return;}
    let why=r.statusText;try{why=(await r.json()).message;}catch(x){}
    out.textContent=r.status+' '+why;
  }catch(x){out.textContent='no answer: '+x.message;}
  out.scrollIntoView({block:'nearest'});
});
"""


def _csp_hash(text):
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: The headers of every HTML page. Clickjacking: a page on another local port
#: framed /config, and one click on its Patch button changed log_level. No
#: page may be framed (CSP frame-ancestors; X-Frame-Options for browsers
#: before CSP 2), only the page's own script and style run (by hash: no nonce
#: to make per page), forms post only to notesd, and links leave no Referer
#: elsewhere. JSON replies go without: nothing in them can be clicked, and a
#: frame, as any page load, asks for text/html and gets the page.
PAGE_HEADERS = (
    ("Content-Security-Policy", f"default-src 'none'; script-src {_csp_hash(PAGE_SCRIPT)}; "
                                f"style-src {_csp_hash(PAGE_STYLE)}; img-src data:; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; "
                                "frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)
#: The page's icon, in the page: browsers ask for /favicon.ico otherwise.
PAGE_ICON = ("data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'"
             "%3E%3Crect width='16' height='16' rx='3' fill='%23185'/%3E%3C/svg%3E")

PAGE = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>notesd: $path</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="$icon">
<style>$style</style></head><body>
<h1><a href="/">notesd</a> $version</h1>
<nav><a href="/">notes</a><a href="/status">status</a><a href="/health">health</a><a
href="/config">config</a><a href="/openapi.json">openapi.json</a></nav>
$notice$before<p class="req">$method $target$raw</p>
<pre class="s$cls">HTTP/1.1 $status $phrase
$headers</pre>
$pager$body$pager$after<script>$script</script></body></html>
""")

#: The forms of a page, by its kind. A newline follows each <textarea>, as
#: browsers drop the first one there (HTML 13.2.6.4.7): a note's own leading
#: newline survives Save. Each form ends in the <output> the script writes to.
FORMS = {
    "list": '<form method="post" action="/">\n'
            '<label for="text">New note</label>\n'
            '<textarea id="text" name="text">\n$text</textarea>\n'
            '<button>Create</button>\n<output></output>\n</form>\n',
    "note": '<form method="post" action="$url">\n'
            '<input type="hidden" name="_method" value="PUT">\n'
            '<label for="text">Edit note</label>\n'
            '<textarea id="text" name="text">\n$text</textarea>\n'
            '<button>Save</button>\n<output></output>\n</form>\n'
            '<form method="post" action="$url">\n'
            '<input type="hidden" name="_method" value="DELETE">\n'
            '<button>Delete</button>\n<output></output>\n</form>\n',
    "config": '<form method="post" action="/config">\n'
              '<input type="hidden" name="_method" value="PATCH">\n'
              '<label for="text">Change live settings (a JSON object)</label>\n'
              '<textarea id="text" name="text">\n$text</textarea>\n'
              '<button>Patch</button>\n<output></output>\n</form>\n',
}
#: What a page says after a form post led to it (?done=): our own words only.
NOTICES = {"created": "Note created.", "saved": "Note saved.", "deleted": "Note deleted.",
           "changed": "Configuration changed."}

_LINK_RE = re.compile(r"&quot;(https?://[^&\s]+)&quot;")


def render_page(handler, status, payload, headers):
    """The browsable page: request, status, headers, the JSON with its links
    clickable, and forms for the resource. Everything user-provided is escaped."""
    path, _, query = handler.path.partition("?")
    path = _decode_unreserved(path)
    if path == "/openapi.json" and status == 200:
        body = _operation_list(payload)  # the raw JSON is a link away
    else:
        text = html.escape(json.dumps(payload, indent=2, ensure_ascii=False))
        body = "<pre>" + _LINK_RE.sub(r'&quot;<a href="\1">\1</a>&quot;', text) + "</pre>\n"
    forms = _page_forms(handler, status, payload, path)
    # Read leniently: the resource may ignore its query, however malformed.
    done = re.search(r"(?:^|&)done=(\w+)(?:&|$)", query) if status < 400 else None
    done = done and NOTICES.get(done.group(1))
    # The headers the JSON answer carries (its length aside).
    shown = [("Server", handler.server_version), ("Date", http_date()),
             ("Content-Type", JSON_TYPE), *headers]
    pages = getattr(payload, "pages", None)
    raw = handler.command in ("GET", "HEAD") and (  # the JSON itself, in the browser
        f"{path}?{query}&format=json" if query else f"{path}?format=json")
    pager = "".join(f'<a rel="{rel}" href="{html.escape(pages[rel])}">{label}</a>\n'
                    for rel, label in (("prev", "&larr; previous"), ("next", "next &rarr;"))
                    if pages and rel in pages)
    return PAGE.substitute(
        version=__version__, method=html.escape(handler.command), path=html.escape(path),
        target=html.escape(handler.path), status=status, phrase=_phrase(status),
        cls=status // 100, headers=html.escape("\n".join(f"{k}: {v}" for k, v in shown)),
        raw=f' &middot; <a href="{html.escape(raw)}">raw JSON</a>' if raw else "",
        notice=f'<p class="notice" role="status">{done}</p>\n' if done else "",
        before=forms if path == "/" else "", after="" if path == "/" else forms,
        pager=f'<nav class="pager">\n{pager}</nav>\n' if pager else "", body=body,
        icon=PAGE_ICON, style=PAGE_STYLE, script=PAGE_SCRIPT).encode()


def _page_forms(handler, status, payload, path):
    """The forms for the resource at `path`: for a note, with its text; after
    a browser's form post that failed, the form again with what was sent,
    so nothing typed is lost."""
    kind = ("list" if path == "/" else "config" if path == "/config" else
            "note" if re.fullmatch(r"/[0-9]+/?", path) else None)
    if status >= 400:  # (no fields yet if the parser refused the request)
        fields = getattr(handler, "fields", None) if handler.command == "POST" else None
        text = fields.get("text") if isinstance(fields, dict) else None
    else:
        text = {"list": "", "config": '{"log_level": "debug"}'}.get(kind)
        if kind == "note" and isinstance(payload, dict):
            text = payload.get("text")
    if kind is None or not isinstance(text, str):
        return ""
    return string.Template(FORMS[kind]).substitute(url=html.escape(path), text=html.escape(text))


def _operation_list(document):
    """/openapi.json as a page: its operations, one a line, not 3,000 lines of JSON."""
    items = [f"<li><b>{method.upper()}</b> {html.escape(template)}: "
             f"{html.escape(operation['summary'])}</li>"
             for template, item in document["paths"].items()
             for method, operation in item.items()
             if method not in ("parameters", "head", "options")]
    return f'<ul>\n{chr(10).join(items)}\n</ul>\n'


#: Note text as a request may give it: no control characters but tab, LF, CR.
TEXT_SCHEMA = {"type": "string", "pattern": f"^[^{CONTROL_CHARS}]*$"}

SCHEMAS = {
    "Note": {"type": "object", "required": ["id", "url", "text", "created", "updated"],
             "properties": {"id": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                            "url": {"type": "string", "format": "uri"},
                            "text": {"type": "string"},
                            "created": {"type": "string", "format": "date-time"},
                            "updated": {"type": "string", "format": "date-time"}}},
    "NoteList": {"type": "array", "items": {"$ref": "#/components/schemas/Note"}},
    "NoteText": {"type": "object", "required": ["text"], "properties": {"text": TEXT_SCHEMA}},
    "Error": {"type": "object", "required": ["message"],
              "properties": {"message": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"enum": ["ok", "unavailable"]},
                              "message": {"type": "string"},
                              "heartbeat_age": {"type": "number"},
                              "loop_lag_ms": {"type": "number"},
                              "queue_depth": {"type": "integer"},
                              "last_reload": {"type": "object", "properties": {
                                  "ok": {"type": "boolean"}, "at": {"type": "number"}}},
                              "last_restart": {"type": "object", "properties": {
                                  "ok": {"type": "boolean"}, "at": {"type": "number"}}}}},
    "Status": {"type": "object", "required": ["pid", "version", "uptime", "notes"],
               "properties": {k: {} for k in (
                   "pid", "version", "python", "started_at", "uptime", "listen", "pidfile",
                   "database", "notes", "requests", "queue_depth", "loop_lag_ms", "threads",
                   "rss_bytes", "reloads", "last_reload", "last_restart", "storage", "search",
                   "commands")}},
    # GET /config shows every key; PATCH changes live ones, and answers 409
    # for a new value of the others (readOnly: not to be sent).
    "Config": {"type": "object", "additionalProperties": False,
               "properties": {k: {**_config_schema(k), "description": o.help + (
                   "" if o.live else " (needs a restart)"), **({} if o.live else {"readOnly": True})}
                   for k, o in DEFAULTS.items()}},
}

#: Responses any operation may give, besides its own: a malformed or too
#: large request (400, 414, 431), a stalled one (408) or one whose body has
#: a transfer coding notesd does not know (501), before notesd knows the
#: operation; no token (401), protected mode or a foreign Origin (403), a
#: Host not in allowed_hosts (421), a full queue or notesd stopping (503).
#: /health needs no token and answers any Host.
COMMON_STATUSES = (400, 401, 403, 408, 414, 421, 431, 501, 503)
HEALTH_STATUSES = (400, 403, 408, 414, 431, 501, 503)
#: Response headers: {status: (name, required, description)}.
RESPONSE_HEADERS = {
    201: (("Location", True, "the note's URL"), ("ETag", True, "the note's entity tag")),
    303: (("Location", True, "the page to show next"),),
    401: (("WWW-Authenticate", True, "Bearer, or Basic for a client that prefers HTML"),),
    503: (("Retry-After", False, "seconds to wait before trying again"),),
}
#: The id of a note's path: any whole number (GET: 404 but for a note; DELETE:
#: 204, whether or not it exists); PUT, which may create it, takes 1 to MAX_ID.
ID_PARAMETER = {"name": "id", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": 0}}
PUT_ID_PARAMETER = {**ID_PARAMETER, "schema": {"type": "integer", "minimum": 1,
                                               "maximum": MAX_ID}}
LIST_PARAMETERS = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                 "maximum": PAGE_MAX, "default": PAGE_DEFAULT}},
    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                 "maximum": SQLITE_MAX_INT}},
    {"name": "q", "in": "query", "schema": TEXT_SCHEMA,
     "description": "only notes whose text contains this"},
]


def _slug(template):
    """A name for operationIds: '/' -> notes, '/{id}/' -> note, '/{id}' -> note_bare."""
    name = template.strip("/").replace("{id}", "note").replace(".", "_") or "notes"
    return name + ("_bare" if "{" in template and not template.endswith("/") else "")


def _headers(code, op):
    """The response headers of an operation's status `code`."""
    headers = list(RESPONSE_HEADERS.get(code, ()))
    if code == 200 and op.response == "Note":
        headers.append(("ETag", True, "the note's entity tag"))
    if code == 200 and op.response == "NoteList":
        headers.append(("Link", False, 'the next page, rel="next" (RFC 8288)'))
    if code == 204 and op.handler == "options":
        headers.append(("Allow", True, "the methods the resource takes"))
    return {name: {"required": required, "description": text, "schema": {"type": "string"}}
            for name, required, text in headers}


def _operation(template, method, op):
    """One OpenAPI operation object, read off an Op of the route table."""
    def content(schema):
        return {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    common = HEALTH_STATUSES if template == "/health" else COMMON_STATUSES
    responses = {}
    for code in sorted({*op.statuses, *common}):
        response = {"description": _phrase(code)}
        schema = op.response if code < 300 else "Error" if code >= 400 else None
        if code != 204 and schema and method != "HEAD":
            response["content"] = content(schema)
        headers = _headers(code, op)
        if headers:
            response["headers"] = headers
        responses[str(code)] = response
    operation = {"summary": op.summary, "operationId": f"{method.lower()}_{_slug(template)}",
                 "responses": responses}
    if op.handler == "list_notes":
        operation["parameters"] = LIST_PARAMETERS
    if op.handler in ("put_note", "delete_note"):
        operation["description"] = ("If-Match (RFC 9110 13.1.1): 412 unless the note's ETag "
                                    "is one of its tags, or it is * and the note exists")
    if op.handler == "put_note":
        operation["parameters"] = [PUT_ID_PARAMETER]
    if op.request:
        body = content(op.request)
        if op.request == "NoteText":
            for form in FORM_TYPES:
                body[form] = body[JSON_TYPE]
        operation["requestBody"] = {"required": True, "content": body}
    return operation


@functools.lru_cache(maxsize=2)
def openapi_document(token_required):
    """The OpenAPI 3.1 description of every route the server answers; what
    authentication it requires follows the key `token` (RFC 9110 11)."""
    paths = {}
    for template, _, methods in ROUTES:
        item = {m.lower(): _operation(template, m, op) for m, op in methods.items()}
        item["head"] = _operation(template, "HEAD", methods["GET"])
        options = Op("options", "Allowed methods", (204, 404) if "{id}" in template else (204,),
                     None, None)
        item["options"] = _operation(template, "OPTIONS", options)
        if "{id}" in template:
            item = {"parameters": [ID_PARAMETER], **item}
        if token_required and template == "/health":
            for operation in item.values():
                operation["security"] = []
        paths[template] = item
    document = {
        "openapi": "3.1.0",
        "info": {"title": "notesd", "version": __version__,
                 "description": "Notes REST API of the notesd daemon. A client that prefers "
                                "text/html (a browser) gets every resource as a page."},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "basic": {"type": "http", "scheme": "basic",
                      "description": "any user name, the token as password"}}},
    }
    if token_required:
        document["security"] = [{"bearer": []}, {"basic": []}]
    return document

###############################################################################
# Files root touches ##########################################################
###############################################################################
# Every file notesd creates or writes, maybe as root, is opened by
# open_safely(), as every file postfix touches as root goes through one
# safe_open() (src/util/safe_open.c): one rule, in one place. The attacker is
# a local user who can write a directory on the way: the daemon's own user
# owns state_dir, and a pid file may sit in a shared directory such as /tmp.


#: Who the daemon becomes when it drops root (keys `user` and `group`).
Account = collections.namedtuple("Account", "name uid gid groups")


def daemon_account(config):
    """The Account that keys `user` and `group` name, or None when neither is
    set. Reads /etc/passwd and /etc/group now: after chroot they may be gone."""
    if not (config.user or config.group):
        return None
    try:
        user = pwd.getpwnam(config.user) if config.user else None
        gid = grp.getgrnam(config.group).gr_gid if config.group else (
            user.pw_gid if user else os.getgid())
    except KeyError as e:  # removed since the configuration was checked
        raise NotesdError(f"no such user or group: {e}") from None
    groups = os.getgrouplist(user.pw_name, gid) if user else [gid]
    return Account(config.user or None, user.pw_uid if user else os.getuid(), gid, groups)


@contextlib.contextmanager
def acting_as(account):
    """Root opens files as the daemon's user (effective ids only, given back
    on exit): the kernel then checks each access, symbolic links that sqlite
    follows included, as that user's own, and the files it creates are his.
    Main thread, before any HTTP thread runs."""
    if account is None or os.geteuid() != 0:
        yield
        return
    groups, gid = os.getgroups(), os.getegid()
    os.setgroups(account.groups)
    os.setegid(account.gid)
    os.seteuid(account.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(gid)
        os.setgroups(groups)


def open_safely(path, flags, mode=0o600):
    """os.open(path, flags, mode) for a file that must be what its name says.

    Refuses, with a NotesdError that names the path:
      - a symbolic link (O_NOFOLLOW): the directory's owner could point it at
        /etc/shadow, and root would truncate, chown or append to that;
      - anything but a regular file: a FIFO would block us for ever (so the
        open itself is O_NONBLOCK until checked), a device would be written;
      - a file with a second hard link: another name for someone else's file.
    Exit code 4 (LSB: insufficient privilege) when we may not open it at all.
    Returns a blocking, close-on-exec descriptor; any thread."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotesdError(f"{path} is a symbolic link; refusing to follow it") from None
        if isinstance(e, FileNotFoundError):
            raise
        raise NotesdError(f"cannot open {path}: {e.strerror}",
                          exit_code=4 if isinstance(e, PermissionError) else 1) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotesdError(f"{path} is not a regular file; refusing to use it")
        if st.st_nlink > 1:
            raise NotesdError(f"{path} has {st.st_nlink} hard links; refusing to use it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def trusted_ids(account=None):
    """The uids and gids whose files and directories root may use: root's,
    ours and, when it is a user of its own, the daemon's. `group` without
    `user` leaves the daemon root: its group is then trusted with nothing."""
    uids, gids = {0, os.geteuid()}, {0, os.getegid()}
    if account is not None and account.uid != 0:
        uids.add(account.uid)
        gids.add(account.gid)
    return uids, gids


def check_directory(path, trusted, file_stat=None, root_groups=False):
    """Refuse to keep a file root writes in a directory that somebody else
    may write: he could swap the file for his own between two runs.
    `trusted` is trusted_ids(): the directory's owner must be one of its
    uids, and group and others may not write it, unless the group is
    trusted, or the directory is sticky (/tmp) and `file_stat`, the file we
    opened, is trusted too: nobody else may then rename or remove it. So
    systemd treats a PIDFile= in a directory an unprivileged user can write.
    `root_groups`: a directory of root's that its group may write is fine (the
    administrator gave that group, often a system one, write access: Debian
    and Ubuntu's /var/log is root:syslog 0775); for logs and ancestors only."""
    directory = os.path.dirname(path) or "."
    st = os.stat(directory)
    uids, gids = trusted
    others = (st.st_mode & stat.S_IWOTH or
              (st.st_mode & stat.S_IWGRP and st.st_gid not in gids and
               not (root_groups and st.st_uid == 0)))
    kept = (st.st_mode & stat.S_ISVTX and file_stat is not None and
            file_stat.st_uid in uids)
    if st.st_uid not in uids or (others and not kept):
        who = " or ".join(sorted({_user_name(uid) for uid in uids}))
        raise NotesdError(
            f"{path}: its directory {directory} (mode {stat.S_IMODE(st.st_mode):04o}, owner "
            f"{_user_name(st.st_uid)}) may be written by others, who could replace the "
            f"file; use a directory that only {who} can write")


def check_ancestors(directory):
    """Refuse a path under a directory that someone we do not trust could
    change: whoever may write a directory above `directory` may swap the
    component below it for a symbolic link between our checks and our
    opens (which go by path: sqlite's, the log's). So root or we must own
    every directory from / down to `directory`'s parent, writable by no one
    else, or sticky with the component below ours (check_directory). Only
    root and us: not even the daemon's user, who owns state_dir itself."""
    _check_route(os.path.abspath(directory), set())


def _check_route(path, seen):
    """check_ancestors() for `path` as written, and for the target of every
    symbolic link on the way: a later open walks through all of them."""
    while path != "/" and path not in seen:
        seen.add(path)
        parent = os.path.dirname(path)
        if os.path.isdir(parent):  # else both are still to be made, by us
            try:
                below = os.lstat(path)
            except FileNotFoundError:
                below = None
            check_directory(path, trusted_ids(), below, root_groups=True)
            if below is not None and stat.S_ISLNK(below.st_mode):
                _check_route(os.path.normpath(os.path.join(parent, os.readlink(path))), seen)
        path = parent


def jailed(path, root):
    """`path` as seen after chroot(root); unchanged if it lies outside."""
    root = root.rstrip("/")
    return path[len(root):] if path.startswith(root + "/") else path


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def backup_database(source, dest, force=False):
    """Write a consistent copy of the database open as `source`, a sqlite3
    connection, to the file `dest`; return the number of notes in the copy.
    On any error a NotesdError (exit code 1) says why, `dest` is as it was
    and no temporary file is left. Any thread that may use `source`: the
    CLI's `backup` now, maybe the main loop one day.

    The steps, each for a reason:
      1. A new file beside `dest` (_backup_file), which sqlite then opens by
         name: see there why its directory must pass check_directory.
      2. Connection.backup(pages=-1) is sqlite3_backup_step(-1): every page
         in one step, inside one read transaction of `source` (the one it is
         in, if any), so the copy is one snapshot, with every transaction
         committed before it began and none after. In WAL mode a reader does
         not block the writer (https://www.sqlite.org/wal.html), so the
         daemon keeps committing meanwhile; a copy in several steps would
         start again after each of its commits. The copy keeps no journal
         (journal_mode=OFF): until it is renamed it is ours alone, and
         thrown away on any error.
      3. Page 1 is copied as it is, so the copy's header still says WAL
         (bytes 18 and 19 are 2: https://www.sqlite.org/fileformat2.html,
         1.3.3) and its first reader would make a -wal and -shm beside it.
         Set to 1, it is one self-contained file in rollback mode that opens
         read-only anywhere; notesd turns it back to WAL when it starts on
         it. The two bytes are written here, with no connection open: PRAGMA
         journal_mode=DELETE would first open the copy in WAL mode, making
         both files.
      4. PRAGMA quick_check of the copy, then its notes counted: a copy of a
         damaged database is no backup, and `start` would refuse it.
      5. fsync, then the name (_put_in_place)."""
    dest = os.path.abspath(dest)
    if os.path.isdir(dest):
        raise NotesdError(f"{dest} is a directory; name the file to write")
    if os.path.lexists(dest) and not force:
        raise NotesdError(f"{dest} exists; not replacing it without --force")
    fd, temp = _backup_file(dest)
    try:
        copy = sqlite3.connect(temp, isolation_level=None)
        try:
            copy.execute("PRAGMA journal_mode=OFF")
            source.backup(copy, pages=-1)
        finally:
            copy.close()
        os.pwrite(fd, b"\x01\x01", 18)
        notes = _count_checked(temp, dest)
        os.fsync(fd)
        _put_in_place(temp, dest, force)
        return notes
    except sqlite3.Error as e:
        raise NotesdError(f"cannot write {dest}: {e}") from None
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _backup_file(dest):
    """(fd, path) of a new, empty file beside `dest`, mode 0600 whatever the
    umask (it holds every note). O_CREAT|O_EXCL never opens a file that is
    there already, nor follows a symbolic link, so what open_safely checks
    holds by construction (and backup's exit code is 1, not its 4); the dot
    name keeps a copy in progress out of a glob such as notes-*.db. sqlite opens the file again by
    name, so its directory must pass check_directory: whoever else could
    write there could swap the file for a link to /etc/shadow in between,
    and root would write the copy into that."""
    directory, name = os.path.split(dest)
    temp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as e:
        raise NotesdError(f"cannot write {dest}: {e.strerror} ({directory})") from None
    try:
        os.fchmod(fd, 0o600)  # the umask took bits away (0277 leaves 0400)
        check_directory(dest, trusted_ids(), os.fstat(fd))  # the same directory
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    return fd, temp


def _count_checked(temp, dest):
    """The notes in the copy `temp`, once it passes quick_check. Read-only:
    in rollback mode (backup_database, step 3) a reader makes no file."""
    db = sqlite3.connect(f"file:{urllib.parse.quote(temp)}?mode=ro", uri=True)
    try:
        problems = damage(db)
        if problems:
            raise NotesdError(f"the database is damaged; PRAGMA quick_check of its copy says: "
                              f"{'; '.join(problems)}. {dest} was not written; see README.md "
                              "(Backups, Restore)")
        return db.execute("SELECT count(*) FROM notes").fetchone()[0]
    finally:
        db.close()


def _put_in_place(temp, dest, force):
    """Give the fsync'd copy `temp` its name `dest`, atomically: os.link
    never replaces a file (EEXIST, if one appeared since we looked), so
    without `force` nothing is ever lost; os.replace does replace one. Then
    fsync the directory: rename(2) and link(2) are atomic, not durable."""
    try:
        if force:
            os.replace(temp, dest)
        else:
            os.link(temp, dest)
            os.unlink(temp)
    except FileExistsError:
        raise NotesdError(f"{dest} exists; not replacing it without --force") from None
    except OSError as e:
        raise NotesdError(f"cannot write {dest}: {e.strerror}") from None
    fd = os.open(os.path.dirname(dest), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


###############################################################################
# Logging #####################################################################
###############################################################################


class _RedactToken(logging.Filter):
    """Keeps the token out of every log line, whatever logged it."""

    token = ""

    def filter(self, record):
        if self.token:
            message = record.getMessage()
            if self.token in message:
                record.msg, record.args = message.replace(self.token, "***"), None
        return True


class _EscapeControls(logging.Filter):
    """Writes every control character of a log line (C0 but tab, DEL, C1)
    as \\xNN, whatever logged it: request lines, paths and error messages
    carry the client's bytes, and an ESC reaching a sysadmin's `tail -f`
    would run terminal escape sequences (Apache's CVE-2003-0020), a newline
    would forge a log line. The one place every line passes."""

    CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

    def filter(self, record):
        message = record.getMessage()
        if self.CONTROLS.search(message):
            message = self.CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", message)
        record.msg, record.args = message, None  # formatted once, here
        return True


class _LogFile(logging.handlers.WatchedFileHandler):
    """WatchedFileHandler that opens its file with open_safely(), at start and
    at every reopen, and whose reopening cannot raise into the caller: its
    emit() reopens a moved file before the try that guards the write, so a
    log directory gone missing would otherwise take down the main loop."""

    def __init__(self, filename, trusted, **kwargs):
        self.trusted = trusted  # trusted_ids(): root, us, the daemon's user
        super().__init__(filename, **kwargs)

    def _open(self):
        fd = open_safely(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:  # root appends to it and hands it over: it must be ours (check_directory)
            check_directory(self.baseFilename, self.trusted, os.fstat(fd), root_groups=True)
            check_ancestors(os.path.dirname(self.baseFilename))
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record):
        try:
            super().emit(record)
        except Exception:
            self.handleError(record)


class Logs:
    """The daemon's one log handler: syslog (facility daemon), stderr or a file.

    A file survives logrotate twice over: WatchedFileHandler reopens it when
    it was moved, and SIGUSR1 (reopen()) reopens it when asked.
    """

    def __init__(self, config, foreground):
        self.foreground = foreground
        target = config.log
        if foreground and not config._log_explicit:
            target = "stderr"
        self.path = None
        if target == "stderr":
            handler = logging.StreamHandler(sys.stderr)
            fmt = "%(asctime)s notesd[%(process)d] %(levelname)s %(message)s"
        elif target == "syslog":
            try:
                handler = logging.handlers.SysLogHandler(
                    config.syslog_address, logging.handlers.SysLogHandler.LOG_DAEMON)
            except OSError as e:
                raise NotesdError(f"cannot reach syslog at {config.syslog_address}: {e}") from None
            handler.append_nul = False
            fmt = "notesd[%(process)d]: %(levelname)s %(message)s"
        else:
            try:
                handler = _LogFile(target, trusted_ids(daemon_account(config)), encoding="utf-8")
            except OSError as e:  # open_safely's own refusals carry the path already
                raise NotesdError(f"cannot open log file {target}: {e.strerror}") from None
            self.path = target
            fmt = "%(asctime)s notesd[%(process)d] %(levelname)s %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
        self.redact = _RedactToken()
        handler.addFilter(self.redact)
        handler.addFilter(_EscapeControls())
        self.handler = handler
        log.handlers = [handler]
        log.propagate = False
        self.configure(config)

    def configure(self, config):
        """Apply the live keys: level and the token to redact. Main loop only."""
        log.setLevel(config.log_level.upper())
        self.redact.token = config.token

    def reopen(self):
        """SIGUSR1: reopen a log file (after logrotate moved it), keeping the
        old one if the new cannot be opened. Main loop only."""
        handler = self.handler
        if isinstance(handler, logging.FileHandler):
            with handler.lock:
                try:
                    stream = handler._open()
                except (OSError, NotesdError) as e:
                    log.error("cannot reopen log file %s: %s", handler.baseFilename, e)
                    return
                old, handler.stream = handler.stream, stream
                if old:
                    old.close()

    def hand_to(self, account):
        """Give a log file to the daemon's user, so that it can reopen it:
        through the descriptor, never the path (which may have changed)."""
        if self.path and account:
            os.fchown(self.handler.stream.fileno(), account.uid, account.gid)

    def chroot(self, root):
        """After chroot(2) the log's path is relative to the new root, if inside it."""
        if self.path and self.path.startswith(root.rstrip("/") + "/"):
            self.handler.baseFilename = self.path = jailed(self.path, root)


###############################################################################
# Process control #############################################################
###############################################################################
# The pid file is locked with fcntl (POSIX record locks) for the daemon's
# life. Its lock, not its content, says whether notesd runs: F_GETLK names the
# holder's pid without taking the lock (APUE 14.3, lock_test), so `stop` never
# signals a pid read from a stale file. POSIX locks drop when the process
# closes any descriptor of the file: the daemon opens its pid file only once.
#
# A lock alone proves nothing, though: anybody who can read a pid file can
# lock it. An open file description lock (F_OFD_SETLK) even reads back as
# pid -1, and kill(-1, SIGTERM) as root ends every process on the machine.
# So the CLI signals only a pid that running_pid() has tied to the file.

#: struct flock, by platform: (struct format, field names).
FLOCK = (("hhqqi4x", ("type", "whence", "start", "len", "pid"))
         if sys.platform.startswith("linux") else
         ("qqihh", ("start", "len", "pid", "type", "whence")))
#: seconds a daemon that holds the lock may take to write its pid into the
#: file (between lockf() and write() in PidFile: microseconds, in practice).
PID_WRITE_GRACE = 1.0


def _lock_owner(fd):
    """The pid that holds a write lock on the open file `fd` (-1: an OFD
    lock), or None when nobody does. A read lock counts as none: it is never
    a daemon's, and anyone who may read the file can take one (with the pid
    it names, after pid reuse); `start` then takes a new file (PidFile)."""
    fmt, names = FLOCK
    query = dict(type=fcntl.F_WRLCK, whence=os.SEEK_SET, start=0, len=0, pid=0)
    answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(fmt, *(query[n] for n in names)))
    result = dict(zip(names, struct.unpack(fmt, answer)))
    return result["pid"] if result["type"] == fcntl.F_WRLCK else None


def _lock_holder(path):
    """_lock_owner() of the pid file at `path`; None if it is gone or unusable."""
    try:
        fd = _open_published(path)
    except (OSError, NotesdError):
        return None
    try:
        return _lock_owner(fd)
    finally:
        os.close(fd)


def running_pid(path):
    """The pid of the notesd that owns the pid file `path`, or None when no
    process holds its lock. Never takes the lock.

    The file must have been written by someone we trust (_open_published).
    Its lock holder counts as that notesd only if it holds a write lock
    (which needs the file open for writing), is a real process (pid > 1),
    the file holds its pid (the daemon writes it after locking), and, where
    /proc lets us look, it has the file open. Anything else holding the
    lock raises a NotesdError that names it: it is not notesd, and nothing
    may signal it for notesd."""
    try:
        fd = _open_published(path)
    except FileNotFoundError:
        return None
    try:
        deadline = time.monotonic() + PID_WRITE_GRACE
        while True:
            pid = _lock_owner(fd)
            if pid is None:
                return None
            if pid > 1 and _file_names(fd, pid) and _holds_open(pid, os.fstat(fd)):
                return pid
            if pid <= 1 or time.monotonic() >= deadline:  # no daemon locks as -1
                raise NotesdError(f"the pid file {path} is locked by {_describe(pid)}, "
                                  "which is not the notesd that wrote it")
            time.sleep(POLL)
    finally:
        os.close(fd)


def _file_names(fd, pid):
    """Does the pid file say `pid`?"""
    return os.pread(fd, 32, 0).strip() == str(pid).encode()


def _holds_open(pid, file_stat):
    """Has process `pid` the file open? True when /proc will not tell us
    (another user's daemon, or one that dropped root and so is no longer
    dumpable): the pid file's content must then do, and we could not
    signal that process anyway, unless it runs as our own user."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        return True
    except OSError:
        return False
    for fd in fds:
        try:
            if os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), file_stat):
                return True
        except OSError:
            pass
    return False


def _describe(pid):
    """A process holding a lock, for a message: pid and command line."""
    if pid <= 0:
        return "an open file description lock of some other process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read(512).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    # Its owner chose that command line: no escape sequence reaches a terminal.
    command = "".join(c if c.isprintable() else "?" for c in command)
    return f"pid {pid}" + (f" ({command})" if command else "")


class AlreadyRunning(NotesdError):
    def __init__(self, pid):
        super().__init__(f"already running, pid {pid}", exit_code=0)


def _open_public(path):
    """Open (or create) a file that root writes for all to read, the pid file
    and the URL file: open_safely(), in a directory nobody else can write."""
    fd = open_safely(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        check_directory(path, trusted_ids(), os.fstat(fd))
        check_ancestors(os.path.dirname(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


class PidFile:
    """The daemon's pid file, created and locked for the daemon's whole life.

    A restart hands the lock over with no moment in which nobody holds it
    (`status` would say "not running"), in byte ranges, since POSIX locks
    are a process's own and cannot be inherited: the daemon holds the whole
    file; it lets go of all but byte 0 once its successor serves
    (free_tail); the successor locks from byte 1 on and writes its pid
    (take_over); the daemon lets go of byte 0 (release), which the
    successor then takes too. F_GETLK, which `status` and `stop` ask, names
    one of the holders all along, and running_pid() still believes it only
    if the file names it (the moment between the write and the release is
    the PID_WRITE_GRACE it already waits)."""

    def __init__(self, path, successor=False):
        self.handed_over = False
        if successor:  # locked in take_over(), from the daemon it succeeds;
            # until then the file is that one's, and remove() leaves it alone
            self.path, self.fd, self.owned = path, _open_public(path), False
            return
        self.owned = True
        for _ in range(10):
            fd = self._lock(path)
            if fd is None:
                continue
            # A `stop` may have unlinked the file between our open and our
            # lock: then the lock guards nothing. Lock the file at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise NotesdError(f"cannot lock pid file {path}: it keeps being replaced")
        os.ftruncate(fd, 0)  # a stale pid file is ours now
        os.fchmod(fd, 0o644)  # whatever the umask: monitoring reads it as any user
        # A URL file left by a daemon killed before it could remove it names a
        # port that anybody may have bound since: gone before our pid shows,
        # or `check` would send him the token until we write ours.
        _remove_published(url_file(path))
        os.write(fd, b"%d\n" % os.getpid())
        self.path, self.fd = path, fd

    @staticmethod
    def _lock(path):
        # No O_TRUNC: until we hold the lock, the file may be a live daemon's.
        fd = _open_public(path)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise NotesdError(f"cannot lock pid file {path}: {e.strerror}") from None
            pid = running_pid(path)  # raises for a holder that is not notesd
            if pid:
                raise AlreadyRunning(pid) from None
            # Only read locks, which any reader may take and no daemon does:
            # a new file at the path leaves them on the old one.
            _remove_published(path)
            return None
        return fd

    def free_tail(self):
        """Restart, the daemon: keep byte 0 only; the successor takes the rest."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 0, 1)

    def reclaim(self):
        """Restart failed after free_tail, and the successor is gone (its locks
        with it): the whole file is ours again, and names us again, since
        the successor may have written its pid before it hung or died."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_over(self.fd, b"%d\n" % os.getpid())

    def release(self):
        """Restart, the daemon: the successor holds the rest; let go of byte 0."""
        self.handed_over = True
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def take_over(self, channel):
        """Restart, the successor, once it serves (see the class docstring).
        `channel` is the socket shared with the daemon it succeeds: "GO" when
        that one holds byte 0 only, "LOCKED" back once we hold the rest. If
        the daemon is gone instead, its locks went with it: the file is ours.
        Anything else (it gave up: a stop, a timeout) raises NotesdError."""
        channel.settimeout(START_TIMEOUT)
        word = b""
        with contextlib.suppress(OSError):
            word = channel.recv(16)
        if not word.startswith(b"GO"):
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise NotesdError("the daemon it was to succeed gave up the restart") from None
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 0, 1)
        _write_over(self.fd, b"%d\n" % os.getpid())
        with contextlib.suppress(OSError):
            channel.sendall(b"LOCKED\n")
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)  # byte 0, as soon as it lets go
        channel.close()
        self.owned = True

    def remove(self):
        """At exit: the pid file and the URL file beside it, unless a
        successor owns them now, or while they are still the predecessor's.
        May fail after dropping privileges; `stop` then removes them."""
        if self.handed_over or not self.owned:
            return
        _remove_published(url_file(self.path))
        _remove_published(self.path)


def url_file(pidfile):
    """Where the daemon writes the URL it really serves: beside the pid file."""
    return os.path.splitext(pidfile)[0] + ".url"


def write_url(pidfile, url):
    fd = _open_public(url_file(pidfile))
    try:
        os.fchmod(fd, 0o644)  # as the pid file
        _write_over(fd, url.encode() + b"\n")  # a successor writes the same URL
    finally:
        os.close(fd)


def _write_over(fd, data):
    """Replace a published file's text in place: written over, then cut,
    never emptied first, so a reader (`status`, `check`, `restart`) sees
    the old text or the new one, never nothing."""
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _open_published(path):
    """Open, to read, a file that a notesd published for all to read (the pid
    file, the URL file), if someone we trust wrote it. Else a user who may
    create files in its directory (/tmp) could plant both before notesd ever
    ran: `start` would then believe it runs, and `check` send him the token.
    Trusted: root and us, and for a caller that is not root the directory's
    owner too (a monitoring user reading another user's daemon's files); the
    directory must pass check_directory() with those."""
    fd = open_safely(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        uids, gids = trusted_ids()
        if os.geteuid() != 0:
            uids.add(os.stat(os.path.dirname(path) or ".").st_uid)
        if st.st_uid not in uids:
            raise NotesdError(f"{path} belongs to {_user_name(st.st_uid)}, who is not "
                              "trusted to speak for notesd; refusing to use it")
        check_directory(path, (uids, gids), st)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: What a URL file may hold: the URL the daemon serves, nothing else.
URL_FILE_RE = re.compile(r"http://[0-9A-Za-z.-]+(?::\d+)?/|http://\[[0-9A-Fa-f:.]+\](?::\d+)?/")


def read_url(config):
    """The URL in the URL file, or None if it is missing, untrusted or not a
    URL that notesd writes (it reaches the terminal, and check sends a token)."""
    try:
        fd = _open_published(url_file(config.pidfile))
    except (OSError, NotesdError):
        return None
    with os.fdopen(fd, "rb") as f:
        url = f.read(4096).decode("ascii", errors="replace").strip()
    return url if URL_FILE_RE.fullmatch(url) else None


def _remove_published(path):
    """Remove a pid or URL file, if someone we trust wrote it
    (_open_published) and it is still the file at that path: root must not
    delete another user's file (in /tmp, say) because it has our name."""
    try:
        fd = _open_published(path)
    except (OSError, NotesdError):
        return
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid):
    """Is `pid` a live process (a zombie counts as gone: it has exited)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_for(predicate, timeout):
    """Poll `predicate` every POLL seconds until true or `timeout`; its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(POLL)
    return True


def inherited_listener(environ=os.environ):
    """The listening socket passed as systemd passes it (sd_listen_fds(3)):
    fd 3, LISTEN_FDS=1, LISTEN_PID naming this process; or None. Read at
    the very start, before anything forks, and the variables unset: a child
    must not take them for its own. A restart's successor gets its socket
    the same way (Successor), so one path serves both."""
    count, pid = environ.pop("LISTEN_FDS", None), environ.pop("LISTEN_PID", None)
    environ.pop("LISTEN_FDNAMES", None)
    if count is None or pid != str(os.getpid()):
        return None
    if count != "1":
        raise NotesdError(f"LISTEN_FDS={count}: notesd serves on one socket; pass it one")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
        listening = (sock.type == socket.SOCK_STREAM and
                     sock.family in (socket.AF_INET, socket.AF_INET6) and
                     sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError as e:
        raise NotesdError(f"LISTEN_FDS: fd {LISTEN_FDS_START} is no socket: {e}") from None
    if not listening:
        raise NotesdError(f"LISTEN_FDS: fd {LISTEN_FDS_START} is not a listening TCP socket")
    os.set_inheritable(LISTEN_FDS_START, False)
    return sock


class SystemdNotifier:
    """The sd_notify(3) protocol: newline-separated KEY=VALUE datagrams to the
    AF_UNIX socket named by $NOTIFY_SOCKET ('@' starts an abstract address).

    Connected once, at start-up, so that it keeps working after chroot. Sends
    nothing when systemd is not listening. `watchdog` is how often the main
    loop must send WATCHDOG=1: half of $WATCHDOG_USEC (sd_watchdog_enabled(3)).
    """

    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.socket = None
        if address:
            try:
                self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.socket.connect(address)
            except OSError as e:
                log.warning("cannot reach NOTIFY_SOCKET %s: %s", address, e)
                self.socket = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        self.watchdog = None
        if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog = int(usec) / 2e6

    def notify(self, *fields):
        if self.socket:
            try:
                self.socket.send(("\n".join(fields) + "\n").encode())
            except OSError as e:
                log.debug("sd_notify failed: %s", e)


###############################################################################
# Daemonizer ##################################################################
###############################################################################
# `start` runs these steps in order (APUE 13.3 "Coding Rules"; systemd's
# daemon(7), "SysV Daemons"). 1-2 happen in cmd_start, 3-5 in daemonize(),
# 6-8 in serve(), which `run` calls directly in the foreground.
#   1. validate the config, make every path absolute (Config.load)
#   2. exit 0 if the pid file is locked by a running notesd (1 if by something
#      else); else re-execute `start` with a clean environment and a safe PATH
#   3. readiness pipe, fork: the original process waits for the verdict
#   4. setsid, fork again: never a session leader, so never a controlling tty
#   5. chdir /, signals reset, close fds, stdio on /dev/null, no core dumps
#   6. umask; state_dir, handed to the daemon's user; pid file: lock, then write
#   7. logging; the open-file limit raised; bind; storage, opened as the
#      daemon's user; chroot; drop privileges. Every file root writes goes
#      through open_safely().
#   8. HTTP thread, READY to the waiting parent, main loop in the main thread


def _clean_environment(config):
    """Step 2, second half: re-execute the interpreter with an environment of
    KEEP_ENVIRONMENT and a safe PATH (daemon(7), step 5). Only exec really
    replaces it: the kernel shows the exec-time environment in
    /proc/PID/environ, and a library may read it from there. The new
    interpreter runs isolated and without site (-I -S): notesd needs only the
    standard library, so no .pth file in site-packages runs in the daemon,
    which also starts faster and smaller (bench/). Its arguments are rebuilt,
    not replayed: the absolute path of this file, the configuration, and the
    command `start`, whatever was typed (`restart` replayed would stop the
    daemon twice). Returns only when clean."""
    clean = {k: v for k, v in os.environ.items() if k in KEEP_ENVIRONMENT}
    clean["PATH"] = SAFE_PATH
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), *config.argv(), "start"]
    if os.environ != clean or not (sys.flags.isolated and sys.flags.no_site) or \
            sys.argv != argv[3:]:
        token = config.overrides.get("token")
        os.execve(sys.executable, argv,
                  clean if token is None else {**clean, TOKEN_ENVIRONMENT: token})


def daemonize(config):
    """Steps 3-5, then serve(). Returns start's exit code in the original
    process; the daemon never returns from here."""
    reader, writer = os.pipe()
    child = os.fork()
    if child:
        os.close(writer)
        os.waitpid(child, 0)  # the intermediate child leaves at once
        return _await_ready(reader, config)
    code, readiness = 1, None
    try:
        os.close(reader)
        _new_session()
        _reset_process_state(keep={writer})
        readiness = Readiness(writer)
        code = serve(config, readiness, foreground=False)
    except BaseException as e:  # whatever happens, never return into the CLI
        if readiness is None:
            readiness = Readiness(writer)
        readiness.failed(f"daemon failed: {e}")  # a no-op once it said READY
    finally:
        logging.shutdown()
        os._exit(code)


def _new_session():
    """Step 4. setsid() leaves the terminal's session and process group, so
    no terminal signal reaches us; the second fork makes the daemon a non-
    leader of that session, which can never acquire a controlling terminal
    (APUE 13.3, System V rule). The leader leaves with os._exit: no atexit
    handlers or buffers of the parent's run twice."""
    os.setsid()
    if os.fork():
        os._exit(0)


def _reset_process_state(keep):
    """Step 5: shed everything inherited from whoever started us (the umask
    too, but serve() sets that: `run` needs it as well)."""
    os.chdir("/")        # do not keep a mounted filesystem busy
    _reset_signals()
    _close_inherited_fds(keep)
    _stdio_to_devnull()
    # Core dumps off: they would hold the token and the notes.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _reset_signals():
    """Default dispositions and an empty mask: both survive fork and exec, so a
    parent that ignored or blocked SIGTERM (nohup, some init scripts) would
    otherwise leave us unstoppable (daemon(7), steps 3-4)."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(signum, signal.SIG_IGN if signum in KEEP_IGNORED else signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # signals the kernel or Python keeps for itself
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _close_inherited_fds(keep):
    """Close every fd but stdio and `keep`: listing /proc/self/fd costs what is
    open, where looping to RLIMIT_NOFILE can cost a million close() calls."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536))
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own fd, already closed


def _stdio_to_devnull():
    """stdin, stdout, stderr on /dev/null: a stray print or read must not fail
    or block, and must not write onto a terminal or a file that fd once was."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


class Readiness:
    """Tells whoever waits that we serve, or why we cannot: the process waiting
    in `start` (one line on the readiness pipe: READY|RUNNING|ERROR text), and
    systemd when it supervises us (sd_notify). Either may be absent."""

    def __init__(self, fd=None, handover=None):
        self.fd = fd
        self.handover = handover  # a successor's channel to its predecessor
        self.systemd = SystemdNotifier()

    def _send(self, kind, text):
        if self.handover is not None:
            with contextlib.suppress(OSError):
                self.handover.sendall(f"{kind} {text}\n".encode())
        if self.fd is not None:
            try:
                os.write(self.fd, f"{kind} {text}\n".encode())
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def ready(self, text):
        self._send("READY", text)
        self.systemd.notify("READY=1", f"STATUS={text}", f"MAINPID={os.getpid()}")

    def running(self, text):
        self._send("RUNNING", text)

    def failed(self, text):
        if self.fd is None:  # `run`: nobody reads a pipe, so say it on stderr
            print(f"notesd: {text}", file=sys.stderr)
        self._send("ERROR", text)
        self.systemd.notify(f"STATUS=failed: {text}")


def _await_ready(reader, config):
    """Step 3, the waiting side: the daemon's verdict becomes start's exit code."""
    deadline = time.monotonic() + START_TIMEOUT
    data = b""
    with os.fdopen(reader, "rb", buffering=0) as pipe:
        while b"\n" not in data and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], deadline - time.monotonic())
            chunk = pipe.read(512) if ready else b""
            if ready and not chunk:
                break  # EOF: the daemon is gone
            data += chunk
    kind, _, text = data.decode(errors="replace").strip().partition(" ")
    if kind == "READY":
        print(text)
        return 0
    if kind == "RUNNING":  # a concurrent start won: wait until it serves
        _wait_for(lambda: read_url(config), START_TIMEOUT)
        print(f"notesd {text}, {read_url(config)}")
        return 0
    print("notesd: " + (text if kind == "ERROR" else
                        "the daemon exited before it was ready; see its log"
                        if not data else "no answer from the daemon"), file=sys.stderr)
    return 1


def _handover_problem(config, server):
    """Why this daemon cannot hand its socket to a successor, or None: the
    reason `restart` falls back to a stop and a start (main loop)."""
    if config.user or config.chroot:
        return ("the daemon has dropped root (user, chroot), so it cannot start its "
                "successor: needs a stop and a start")
    try:
        new = Config.load(config.path, config.overrides, config._root)
    except NotesdError as e:
        return str(e)
    host, port, _ = new.address
    if (port and port != server.server_address[1]) or host != server.server_address[0]:
        return (f"listen changed from {config.listen} to {new.listen}: needs a stop "
                "and a start")
    return None


class Successor:
    """The daemon's side of a restart: starts the notesd.py now on disk as
    its successor and hands it the listening socket, as systemd's socket
    activation would (fd 3, LISTEN_FDS=1, LISTEN_PID set by a shell that
    then execs Python, so it names the process that reads it), and a
    socketpair on fd 4 (HANDOVER_ENVIRONMENT) to agree the handover:

      successor: READY text (it serves: both accept from the one socket)
      daemon:    PidFile.free_tail(), then GO
      successor: PidFile.take_over(), then LOCKED
      daemon:    PidFile.release(), and a graceful stop (MainLoop.drain)

    ERROR text, an exit or START_TIMEOUT instead of READY, or no LOCKED
    within HANDOVER_TIMEOUT: the daemon ends the successor (end()) and keeps
    serving, and reports why (last_restart). A stop of the daemon at any
    moment of this wins (stop()): nothing is left serving once it exits.
    The successor's stderr, where a syntax error or a bad configuration is
    told, comes back on a pipe, but for a `run` daemon, whose stderr
    (systemd's journal) it keeps. Runs in a thread of its own; tells the
    main loop by commands, the last thing it does."""

    def __init__(self, config, server, pidfile, commands, foreground):
        self.pidfile, self.commands = pidfile, commands
        self.lock = threading.Lock()  # stop() and the thread agree on `phase`
        self.phase, self.stopped = "starting", False  # starting, handing, done
        self.hung = self.reaped = False
        self.wake, self.waker = os.pipe()  # stop() wakes the thread's waits
        self.channel, theirs = socket.socketpair()
        errors, stderr = os.pipe() if not foreground else (None, 2)
        try:
            self.pid = self._spawn(config, server.socket.fileno(), theirs.fileno(), stderr,
                                   "run" if foreground else "start")
        finally:
            theirs.close()
            if errors is not None:
                os.close(stderr)
        self.errors = errors
        self.thread = threading.Thread(target=self._run, name="successor", daemon=True)
        self.thread.start()

    @staticmethod
    def _spawn(config, listener, channel, stderr, command):
        env = {k: v for k, v in os.environ.items()
               if k in KEEP_ENVIRONMENT or k == "NOTIFY_SOCKET"}
        env.update(PATH=SAFE_PATH, LISTEN_FDS="1", **{HANDOVER_ENVIRONMENT: str(HANDOVER_FD)})
        if config.overrides.get("token") is not None:
            env[TOKEN_ENVIRONMENT] = config.overrides["token"]
        # Copies above 10 first: dup2 onto itself would keep close-on-exec.
        copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (listener, channel, stderr)]
        try:
            return os.posix_spawn("/bin/sh", [
                "/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$0" "$@"', sys.executable,
                "-I", "-S", os.path.abspath(__file__), *config.argv(), command], env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in
                              zip(copies, (LISTEN_FDS_START, HANDOVER_FD, 2))],
                setsigmask=())
        finally:
            for fd in copies:
                os.close(fd)

    def stop(self):
        """Main thread, on a stop of the daemon: the restart must not leave
        a successor serving. Before GO, the thread gives up and ends it;
        between GO and LOCKED (milliseconds), the handover completes and the
        thread then stops the successor; once handed over, the successor
        is the daemon and the stop is the old one's alone."""
        with self.lock:
            self.stopped = True
            if self.phase == "starting":
                os.write(self.waker, b"!")

    def join(self):
        """Main thread, before it exits: wait until the successor is ended,
        or serves on its own."""
        self.thread.join(START_TIMEOUT + HANDOVER_TIMEOUT + SUCCESSOR_GRACE)

    def _run(self):
        kind, text = self._await()
        with self.lock:  # stop() looks at the phase, and wakes us only while starting
            go = kind == "READY" and not self.stopped
            self.phase = "handing" if go else "done"
            os.close(self.wake)
            os.close(self.waker)
        problem = self._hand_over() if go else text
        self.channel.close()
        with self.lock:
            self.phase, stopped = "done", self.stopped
        if stopped:
            problem = ("notesd was told to stop during the restart" +
                       (": its successor stops too" if problem is None else ""))
        elif problem is None:
            return self.commands.put(Command("handed_over", text))
        self.end(0.0 if self.hung else SUCCESSOR_GRACE)
        if go and not self.pidfile.handed_over:
            self._reclaim()
        self.commands.put(Command("upgrade_failed", problem, stopped))

    def _reclaim(self):
        try:
            self.pidfile.reclaim()
        except OSError as e:  # a reader's lock on it (issue 8): `stop` still finds us
            log.warning("restart: cannot take back the whole pid file %s: %s",
                        self.pidfile.path, e.strerror)

    def _hand_over(self):
        """After READY: GO; the pid file passes on LOCKED (None), or why not."""
        try:
            self.pidfile.free_tail()
            self.channel.sendall(b"GO\n")
            said = self._line()
            if said and said.startswith("LOCKED"):
                self.pidfile.release()
                return None
            problem = ("the successor exited before it took the pid file" if said == "" else
                       f"the successor did not take the pid file within {HANDOVER_TIMEOUT:g}s")
        except OSError as e:
            problem = f"the handover failed: {e}"
        self.hung = True  # its main loop waits for the pid file: TERM would wait too
        return problem  # _run ends it, then reclaims the pid file

    def end(self, patience):
        """TERM the successor, and KILL it after `patience` seconds (at once if
        0, for a hung one: TERM waits for a main loop that does not run); reap
        it either way. Its pid cannot name another process until it is reaped,
        so the late KILL is safe. Successor thread only."""
        if self.reaped:  # its pid may name another process by now
            return
        try:
            os.kill(self.pid, signal.SIGTERM if patience else signal.SIGKILL)
            deadline = time.monotonic() + patience
            while not os.waitpid(self.pid, os.WNOHANG)[0]:
                if time.monotonic() >= deadline:
                    log.warning("restart: the successor did not stop within %gs; killed",
                                patience)
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(POLL)  # a child: no pidfd needed, its pid stays ours
        except ChildProcessError:
            pass
        self.reaped = True

    def _line(self):
        """The successor's next line; "" if it closed the channel (it exited),
        None if no line came within HANDOVER_TIMEOUT."""
        data = b""
        self.channel.settimeout(HANDOVER_TIMEOUT)
        try:
            while b"\n" not in data:
                chunk = self.channel.recv(512)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            return None
        except OSError:
            pass
        return data.decode(errors="replace")

    def _await(self):
        """(READY or ERROR, text): the successor's verdict, or why none came."""
        deadline = time.monotonic() + START_TIMEOUT
        said, told = b"", b""
        sources = [self.channel] + ([self.errors] if self.errors is not None else [])
        while b"\n" not in said and sources and time.monotonic() < deadline:
            ready = select.select(sources + [self.wake], [], [], deadline - time.monotonic())[0]
            if self.wake in ready:
                break  # stop(): _run says why
            for source in ready:
                if source is self.channel:
                    chunk = self.channel.recv(512)
                    said += chunk
                else:
                    chunk = os.read(self.errors, 4096)
                    told = (told + chunk)[-4096:]
                if not chunk:
                    sources.remove(source)
        if self.errors is not None:
            os.close(self.errors)
        kind, _, text = said.decode(errors="replace").strip().partition(" ")
        if kind in ("READY", "ERROR") or self.stopped:
            return kind, text
        if b"\n" not in said and time.monotonic() >= deadline:
            self.hung = True  # deaf to TERM too, most likely
            return "ERROR", f"the successor was not ready within {START_TIMEOUT:g}s"
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        lines = [l for l in told.decode(errors="replace").splitlines() if l.strip()]
        return "ERROR", (f"the successor exited ({_exit_status(status)}) before it "
                         "was ready" + (": " + lines[-1].strip() if lines else ""))


def _exit_status(status):
    return (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else
            f"status {os.WEXITSTATUS(status)}")


def serve(config, readiness, foreground, listener=None):
    """Steps 6-8, then the main loop until stopped. Returns the exit code.
    `listener`: a socket bound already (inherited_listener); with a
    readiness.handover, this daemon succeeds a running one (Successor)."""
    os.umask(config.umask)  # here, not in step 5: `run` (systemd) needs it too
    successor = readiness.handover is not None
    try:
        account = daemon_account(config)
        _make_state_dir(config, account)
        pidfile = PidFile(config.pidfile, successor)
    except AlreadyRunning as e:
        if foreground:  # `run` did not start anything: that is a failure
            raise NotesdError(str(e)) from None
        readiness.running(str(e))
        return 0
    except (NotesdError, OSError) as e:
        readiness.failed(_reason(e))
        return 1
    commands = queue.Queue(config.queue_size)
    try:
        SignalRelay(commands)  # now: a TERM during start-up is not lost
        logs = Logs(config, foreground)
        logs.hand_to(account)
        _raise_fd_limit()
        server = ApiServer(config, listener)
        store = _open_store(config.database, account)
        write_url(config.pidfile, server.url)
        _enter_jail(config, account, logs, store)
    except (NotesdError, OSError) as e:
        log.error("cannot start: %s", _reason(e))
        readiness.failed(_reason(e))
        pidfile.remove()
        return 1
    loop = MainLoop(config, commands, store, logs, readiness.systemd)
    server.loop, loop.server, loop.pidfile = loop, server, pidfile
    threading.Thread(target=server.serve_forever, args=(ACCEPT_POLL,),
                     name="http", daemon=True).start()
    log.info("notesd %s started, pid %d, serving %s%s", __version__, os.getpid(), server.url,
             " on an inherited socket" if listener else "")
    readiness.ready(f"notesd {__version__} running, pid {os.getpid()}, {server.url}")
    store.check_whole_file(loop.report_check)
    if successor:
        try:
            pidfile.take_over(readiness.handover)
        except NotesdError as e:  # it gave up on us: leave as we came
            log.error("restart: %s; stopping", e)
            _shut_down(server, loop, store, pidfile)
            return 1
        if not foreground:  # its stderr was a pipe to the daemon it succeeds
            _stdio_to_devnull()
    code = 0
    try:
        loop.run()
    except Exception:  # a bug; shut down cleanly all the same, and say why
        log.exception("main loop failed")
        code = 1
    finally:
        _shut_down(server, loop, store, pidfile)
    return code


def _raise_fd_limit():
    """Step 7: the soft limit on open files up to the hard one, before the
    server sizes its connection cap from it (ApiServer.capacity). Each
    connection holds a descriptor; the usual soft limit of 1024 would cap
    notesd near a thousand clients however high max_connections is. systemd
    sets 1024 soft and 512K hard, and asks programs that need more, and never
    select() on them, to raise the soft limit themselves (Lennart Poettering,
    "File Descriptor Limits", 2019); socketserver waits with poll(). With an
    unlimited hard limit, the kernel still refuses more than fs.nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)


def _make_state_dir(config, account):
    """Step 6, first half: state_dir, created 0700 if missing. With a daemon
    user it becomes that user's, for the database and log live there. Root
    hands over only a directory that cannot be somebody else's:
      - never through a symbolic link (O_NOFOLLOW): whoever may write its
        parent could point state_dir at /etc, and the parent must not be
        writable by others (check_directory);
      - one that is the user's already, or root's and holding nothing but
        notesd's own files: a fresh one, or one left by a run as root before
        `user` was set. A typo such as state_dir = /var/lib must not give
        /var/lib to the user."""
    path = os.path.normpath(config.state_dir)
    check_ancestors(path)
    # Parents it makes must let the daemon's user through (0755, like
    # install -d), whatever the umask; state_dir itself is 0700.
    mask = os.umask(0o022)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    finally:
        os.umask(mask)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if account is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotesdError(f"state_dir {path} is not a directory (a symbolic link?); "
                              "refusing to hand it to the daemon's user") from None
        raise
    try:
        st = os.fstat(fd)
        check_directory(path, trusted_ids(account), st)
        foreign = sorted(set(os.listdir(fd)) - _own_names(config, path))
        if st.st_uid != account.uid and (st.st_uid != 0 or foreign):
            holds = f" and holds {', '.join(foreign[:3])}" if foreign else ""
            raise NotesdError(f"state_dir {path} belongs to {_user_name(st.st_uid)}{holds}; "
                              f"refusing to hand it to the daemon's user "
                              f"{account.name or account.uid} (chown it yourself if it is "
                              "meant for notesd)")
        os.fchown(fd, account.uid, account.gid)
    finally:
        os.close(fd)


def _own_names(config, directory):
    """The names of the files notesd itself keeps in `directory`."""
    db = config.database
    paths = (db, db + "-wal", db + "-shm", db + "-journal", config.log,
             config.pidfile, url_file(config.pidfile))
    return {os.path.basename(p) for p in paths
            if os.path.dirname(os.path.normpath(p)) == directory}


def _open_store(path, account):
    """Step 7: the database, opened as the daemon's user (acting_as), so
    that a symbolic link planted as -wal or -shm, which sqlite would follow,
    leads nowhere that user may not go anyway. Files left by a run as root
    are handed over first, through their descriptors."""
    check_directory(path, trusted_ids(account))
    check_ancestors(os.path.dirname(path))
    for name in (path, path + "-wal", path + "-shm") if account else ():
        try:
            fd = open_safely(name, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fchown(fd, account.uid, account.gid)
        finally:
            os.close(fd)
    with acting_as(account):
        return Store(path)


def _reason(error):
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error)


def _enter_jail(config, account, logs, store):
    """Step 7's second half: with every file open and the socket bound,
    chroot, then drop privileges for good (the files were handed over as
    they were opened: _make_state_dir, Logs.hand_to, _open_store)."""
    if not (config.chroot or account):
        return
    # Afterwards the interpreter's own files may be out of reach (outside the
    # chroot, or under a 0700 home such as pyenv's /root/.pyenv), and a codec
    # is imported on first use: look up now every one the daemon may need.
    for name in (*CODECS, locale.getpreferredencoding(False)):
        codecs.lookup(name)
    if config.chroot:
        os.chroot(config.chroot)
        os.chdir("/")
        logs.chroot(config.chroot)
        store.chroot(config.chroot)
    if account is None:
        return
    os.setgroups(account.groups)  # the user's groups, not root's
    os.setgid(account.gid)        # before setuid: afterwards we could not
    os.setuid(account.uid)
    if account.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise NotesdError("privileges were not dropped: could become root again")


def _shut_down(server, loop, store, pidfile):
    """TERM/INT, or a successor serves: stop accepting, answer the requests
    in flight with Connection: close, close idle connections at once, close
    storage, remove the pid file (unless handed over). Main thread only."""
    server.shutdown()      # serve_forever returns: no new connections
    server.socket.close()  # new clients now wait for the successor, or are refused
    loop.drain(server)     # the requests in flight, then 503s
    if loop.successor is not None:  # a restart a stop overtook: it ends first
        loop.successor.join()
    server.server_close()
    store.close()
    pidfile.remove()
    log.info("stopped")


###############################################################################
# CLI #########################################################################
###############################################################################
# Each command takes (config, args) and returns the exit code. Messages go
# to stdout, errors to stderr; nothing below main() exits.


def cmd_start(config, args):
    if args.handover is not None:  # a restart's successor: a daemon already
        return serve(config, Readiness(handover=args.handover), False, args.listener)
    if args.listener is not None:
        raise NotesdError("a socket passed by LISTEN_FDS is served by `run`, not `start`")
    pid = running_pid(config.pidfile)
    if pid:
        print(f"notesd already running, pid {pid}, {read_url(config) or config.listen}")
        return 0
    _clean_environment(config)
    return daemonize(config)


def cmd_run(config, args):
    return serve(config, Readiness(handover=args.handover), True, args.listener)


def cmd_stop(config, args):
    daemon = Verified.find(config.pidfile)
    if not daemon:
        _remove_leftovers(config)
        print("notesd is not running")
        return 0
    stopped = set()
    with contextlib.ExitStack() as predecessors:
        while daemon and daemon.pid not in stopped:
            # A restart may have handed over while we stopped its daemon (the
            # signal came just after the pid file passed): stop wins, so a
            # successor that now holds the pid file is stopped too; and the
            # old daemon a successor replaced may still be finishing its
            # last requests: stopped means that one is gone too.
            stopped.add(daemon.pid)
            old = _predecessor(config, daemon.pid)
            if old:
                predecessors.enter_context(old)
            code = _stop_one(config, args, daemon)
            if code:
                return code
            daemon = Verified.find(config.pidfile)
            if old and not _wait_for(lambda: not old.alive(), config.timeout):
                print(f"notesd: pid {old.pid}, which a restart replaced, did not finish "
                      f"its requests within {config.timeout:g}s", file=sys.stderr)
                return 1
    _remove_leftovers(config)
    return 0


def _predecessor(config, pid):
    """The daemon that `pid` succeeded in a restart (Successor), if it still
    runs, finishing its last requests (MainLoop.drain): the parent that
    started it, as long as that one has the pid file open. Held by a pidfd
    (Verified); None if /proc does not let us look."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rpartition(")")[2].split()[1])
        pidfile = os.stat(config.pidfile)
        fd = os.pidfd_open(parent) if hasattr(os, "pidfd_open") else None
    except (OSError, ValueError, IndexError):
        return None
    old = Verified(parent, fd)
    if parent <= 1 or not os.access(f"/proc/{parent}/fd", os.R_OK) or \
            not _holds_open(parent, pidfile):
        old.__exit__()
        return None
    return old


def _stop_one(config, args, daemon):
    pid = daemon.pid
    with daemon:
        daemon.signal(signal.SIGTERM)
        # Stopped means gone and its lock released: a process whose main thread
        # has exited is a zombie while its other threads still hold the lock.
        def stopped():
            return not daemon.alive() and _lock_holder(config.pidfile) != pid
        if not _wait_for(stopped, config.timeout):
            if not args.force:
                print(f"notesd: pid {pid} did not exit within {config.timeout:g}s "
                      "(use --force to kill it)", file=sys.stderr)
                return 1
            daemon.signal(signal.SIGKILL)
            _wait_for(stopped, config.timeout)
            print(f"notesd killed, pid {pid}")
        else:
            print(f"notesd stopped, pid {pid}")
    return 0


class Verified:
    """The notesd that running_pid() verified, held from then on by a pidfd
    (pidfd_open(2), Linux 5.3; Python 3.9) where the kernel has them: a
    signal sent seconds later (stop --force, after the timeout) or a check
    of whether it lives can then never reach another process that reused
    its pid. Without pidfds, the pid it is (the gap is then the wait)."""

    def __init__(self, pid, fd):
        self.pid, self.fd = pid, fd

    @classmethod
    def find(cls, path):
        """The verified notesd of the pid file at `path`, or None."""
        pid = running_pid(path)
        if not pid:
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None  # gone between the two looks
        except (AttributeError, OSError):
            return cls(pid, None)
        if running_pid(path) != pid:  # the pid was reused before the pidfd
            os.close(fd)
            return None
        return cls(pid, fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)

    def alive(self):
        if self.fd is None:
            return _alive(self.pid)
        return not select.select([self.fd], [], [], 0)[0]  # readable once it exits

    def signal(self, signum):
        if self.fd is None:
            return _signal(self.pid, signum)
        try:
            signal.pidfd_send_signal(self.fd, signum)
        except ProcessLookupError:
            pass  # it exited: nothing to signal
        except PermissionError:
            raise NotesdError(f"not permitted to signal pid {self.pid}; run as its user "
                              "or root", exit_code=4) from None


def _signal(pid, signum):
    """Signal a pid that running_pid() verified; never a group or everyone."""
    if pid <= 1:  # kill(0) is our group, kill(-1) everyone, 1 is init
        raise NotesdError(f"refusing to signal pid {pid}")
    try:
        os.kill(pid, signum)
    except PermissionError:
        # LSB: 4 is "user had insufficient privilege".
        raise NotesdError(f"not permitted to signal pid {pid}; run as its user or root",
                          exit_code=4) from None


def _remove_leftovers(config):
    """The pid and URL files a daemon could not remove (privileges dropped,
    chroot, or killed), once nobody holds the lock."""
    try:
        fd = _open_published(config.pidfile)
    except (OSError, NotesdError):
        return  # gone, or not ours to remove
    try:
        unlocked = _lock_owner(fd) is None
    finally:
        os.close(fd)
    if unlocked:
        _remove_published(config.pidfile)
        _remove_published(url_file(config.pidfile))


def cmd_restart(config, args):
    """Hand over to a new daemon started from the notesd.py on disk, which
    inherits the listening socket (SIGUSR2; Successor): no connection is
    refused. Else, saying why, stop, then start."""
    daemon = Verified.find(config.pidfile)
    if not daemon:
        return cmd_start(config, args)
    with daemon:
        why = _cannot_hand_over(config, daemon.pid)
        if not why:
            return _hand_over(config, daemon)
    print(f"notesd: {why}; stopping and starting instead")
    code = cmd_stop(config, args)
    return code if code else cmd_start(config, args)


def _cannot_hand_over(config, pid):
    """Why `restart` must stop and start instead of handing over, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = dict(line.split(":", 1) for line in f if ":" in line)["SigCgt"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except (OSError, KeyError):
        return f"cannot tell whether pid {pid} can hand over (no /proc)"
    if not int(caught, 16) >> (signal.SIGUSR2 - 1) & 1:
        return f"pid {pid} is a notesd that cannot hand over (an older version)"
    if config.user or config.chroot:
        return "with user or chroot the daemon has dropped root and cannot start its successor"
    url = urllib.parse.urlsplit(read_url(config) or "http://-/")
    host, port, _ = config.address
    if url.hostname != "-" and ((port and port != url.port) or host != url.hostname):
        return f"listen changed to {config.listen}, and the daemon serves {url.geturl()}"
    script = os.path.abspath(__file__)
    if script in argv and _options(argv[argv.index(script) + 1:]) != _options(config):
        return "the daemon was started with other options than these"
    return None


def _options(source):
    """The -c file and the keys given on a command line (a daemon's argv, or
    a loaded Config's), paths absolute, token aside: a successor gets its
    daemon's options, so a restart with others must stop and start."""
    if not isinstance(source, Config):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                args = build_parser().parse_intermixed_args(source)
        except SystemExit:
            return None
        path = args.config and os.path.abspath(args.config)
        given = {key: getattr(args, key) for key in DEFAULTS}
    else:
        path, given = source.path, source.overrides
    return path, {key: os.path.abspath(text) if key in PATH_KEYS or (
                      key == "log" and text not in LOG_TARGETS) else text
                  for key, text in given.items()
                  if text is not None and key != "token"}


def _hand_over(config, daemon):
    """SIGUSR2, then wait until the successor holds the pid file and the old
    daemon is gone (success), or the daemon reports why it failed. The
    successor's pid shows a moment before the handover is agreed (LOCKED):
    a successor lost then leaves the old daemon serving, which says so."""
    old, sent = daemon.pid, time.time()
    daemon.signal(signal.SIGUSR2)
    new = []

    def handed():
        try:
            pid = running_pid(config.pidfile)
        except NotesdError:
            pid = None
        if pid and pid != old:
            new.append(pid)
        return new
    failed = _await_restart(config, daemon, sent, handed, START_TIMEOUT + config.timeout)
    if failed is None:
        failed = _await_restart(config, daemon, sent, lambda: not daemon.alive(),
                                config.timeout)
        if failed == "late":
            print(f"notesd: pid {old} still finishing its requests after {config.timeout:g}s")
        elif not isinstance(failed, dict):  # None, or "exited" between two looks
            print(f"notesd stopped, pid {old}")
    if isinstance(failed, dict):
        print(f"notesd: restart failed, pid {old} " +
              ("keeps serving: " if failed.get("serving", True) else "stops: ") +
              (failed.get("message") or "see its log for why"), file=sys.stderr)
        return 1
    if not new:
        print(f"notesd: restart of pid {old} failed" +
              (" (it exited: a stop?)" if failed == "exited" else "") + "; see its log",
              file=sys.stderr)
        return 1
    url = read_url(config)
    if url is None:  # a stop came after the handover, and was the last word
        print(f"notesd: pid {new[-1]} took over, and has been stopped since")
        return 0
    print(f"notesd {_version_of(config)} running, pid {new[-1]}, {url}")
    return 0


def _await_restart(config, daemon, sent, done, seconds):
    """Poll done() until it is true (None), or say why not: the daemon's
    record of a failed restart (a dict), "exited", or "late"."""
    deadline, look = time.monotonic() + seconds, 0.0
    while not done():
        if time.monotonic() >= look:
            failed = _restart_failure(config, sent)
            if failed:
                return failed
            look = time.monotonic() + 0.1
        if not daemon.alive():
            return "exited"
        if time.monotonic() >= deadline:
            return "late"
        time.sleep(POLL)
    return None


def _restart_failure(config, sent):
    """The daemon's record of a restart that failed since `sent`, or None."""
    last = _last_verdict(config, "last_restart")
    if last is None or last.get("at", 0) < sent or last.get("ok"):
        return None
    return last


def _last_verdict(config, key):
    """The daemon's record `key` of its last reload or restart ({} if none),
    from /status, or /health when /status wants a token we lack; None if
    the daemon cannot be asked."""
    try:
        status, body = api_request(config, "/status")
        if status == 401:
            status, body = api_request(config, "/health")
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return body.get(key) or {}


def _version_of(config):
    """The version the daemon serving at the URL file says (Server header),
    or "?" if it cannot be asked."""
    try:
        url = urllib.parse.urlsplit(daemon_url(config))
    except OSError:  # no URL file: a stop came since, say
        return "?"
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=config.timeout)
    try:
        connection.request("HEAD", "/health")
        server = connection.getresponse().getheader("Server", "")
    except (OSError, http.client.HTTPException):
        server = ""
    finally:
        connection.close()
    return server.partition("/")[2] or "?"


def cmd_status(config, args):
    pid = running_pid(config.pidfile)  # an error means "unknown": 4, in main()
    if pid:
        try:
            uptime = _duration(time.time() - os.stat(config.pidfile).st_mtime)
        except OSError:
            uptime = "unknown"
        print(f"notesd running, pid {pid}, {read_url(config) or config.listen}, "
              f"uptime {uptime}")
        return 0
    if os.path.exists(config.pidfile):
        print(f"notesd is not running, but the pid file {config.pidfile} exists")
        return 1
    print("notesd is not running")
    return 3


def _duration(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def cmd_reload(config, args):
    """The file was already validated by main(); signal, then wait for the
    daemon to report this reload's outcome in /status, or in /health when
    /status refuses the token: a reload that could not apply the file's new
    token leaves the daemon with its old one, which we do not know."""
    daemon = Verified.find(config.pidfile)
    if not daemon:
        print("notesd is not running", file=sys.stderr)
        return 7
    pid, sent = daemon.pid, time.time()
    with daemon:
        daemon.signal(signal.SIGHUP)
    outcome = {}

    def reloaded():
        last = _last_verdict(config, "last_reload")
        if last is None:
            return False
        outcome.update(last)
        return last.get("at", 0) >= sent
    if not _wait_for(reloaded, config.timeout):
        print(f"notesd: pid {pid} did not confirm the reload within {config.timeout:g}s",
              file=sys.stderr)
        return 1
    if not outcome.get("ok"):
        reason = (outcome.get("message") or unreadable_config(config) or
                  "see its log for why; it keeps its old configuration")
        print(f"notesd: reload failed: {reason}", file=sys.stderr)
        return 6
    restart = outcome.get("restart_needed")
    print(f"notesd reloaded, pid {pid}" +
          (f"; needs a restart for: {', '.join(restart)}" if restart else ""))
    return 0


def unreadable_config(config):
    """Why the daemon, once it has dropped root, could not read its
    configuration file again on reload; None if it can (as far as the file's
    own mode tells: a 0600 root file with `user` is the usual mistake)."""
    if not (config.path and config.user):
        return None
    try:
        account, st = daemon_account(config), os.stat(config.path)
    except (OSError, NotesdError):
        return None
    if st.st_uid == account.uid:
        readable = st.st_mode & stat.S_IRUSR
    elif st.st_gid in account.groups:
        readable = st.st_mode & stat.S_IRGRP
    else:
        readable = st.st_mode & stat.S_IROTH
    if readable:
        return None
    group = grp.getgrgid(account.gid).gr_name
    return (f"user {config.user} cannot read {config.path} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}, gid {st.st_gid}), so a reload "
            f"cannot take effect; make it readable to that user, for example "
            f"chown root:{group} {config.path}; chmod 0640 {config.path}")


def daemon_url(config):
    """Where the daemon serves, from its URL file (OSError if there is none:
    not yet written, or not trusted). Never `listen` instead: with port 0,
    or before the daemon binds, anybody may hold that port, and requests
    carry the token."""
    url = read_url(config)
    if url is None:
        raise FileNotFoundError(f"no URL file {url_file(config.pidfile)} (starting?)")
    return url


def api_request(config, path, method="GET", body=None):
    """(status, JSON object) of a request to the running daemon, within
    `timeout` in all: a server that drips its reply a byte at a time would
    outlast any per-read timeout (SIGALRM: the CLI is one thread)."""
    url = urllib.parse.urlsplit(daemon_url(config))
    host = url.hostname
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    connection = http.client.HTTPConnection(host, url.port, timeout=config.timeout)
    headers = {"Accept": JSON_TYPE}
    if config.token:
        headers["Authorization"] = "Bearer " + config.token

    def late(signum, frame):
        raise TimeoutError(f"no whole reply within {config.timeout:g}s")
    previous = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, config.timeout)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        reply = json.loads(response.read(1 << 20) or b"{}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        connection.close()
    if not isinstance(reply, dict):
        raise ValueError(f"{path} answered {type(reply).__name__}, not a JSON object")
    return response.status, reply


def cmd_check(config, args):
    """Nagios plugin API: one line 'NOTESD STATE - text | perfdata', exit 0-3."""
    pid = running_pid(config.pidfile)  # an error means UNKNOWN: 3, in main()
    if not pid:
        print("NOTESD CRITICAL - notesd is not running")
        return 2
    try:
        code, health = api_request(config, "/health")
        if code != 200:
            print(f"NOTESD CRITICAL - {health.get('message', f'/health answered {code}')}")
            return 2
        code, status = api_request(config, "/status")
        if code != 200:  # healthy, but its figures are not ours to read
            print(f"NOTESD UNKNOWN - /status answered {code}: "
                  f"{status.get('message', 'no figures')}")
            return 3
    except (OSError, ValueError, http.client.HTTPException) as e:
        print(f"NOTESD CRITICAL - no answer from {read_url(config) or 'notesd'}: {e}")
        return 2
    lag = health.get("loop_lag_ms", 0.0)
    state = 2 if lag >= args.crit_lag else 1 if lag >= args.warn_lag else 0
    name = ("OK", "WARNING", "CRITICAL")[state]
    perf = (f"'lag'={lag}ms;{args.warn_lag:g};{args.crit_lag:g};0; "
            f"'requests'={sum(status.get('requests', {}).values())}c "
            f"'notes'={status.get('notes', 0)};;;0; 'rss'={status.get('rss_bytes', 0)}B;;;0;")
    print(f"NOTESD {name} - pid {pid}, up {_duration(status.get('uptime', 0))}, "
          f"main loop lag {lag:.1f} ms | {perf}")
    return state


def cmd_backup(config, args):
    """A consistent copy of the database to DEST (backup_database), whether
    the daemon runs or not. The database is read as the daemon's user
    (acting_as), as _open_store opens it: for a stopped daemon sqlite makes
    the -wal and -shm, which are then that user's own, not root's handed
    over by sqlite (which it does, robustFchown in os_unix.c); and the
    kernel checks every open, of a symbolic link the user planted as -wal
    or -shm too, as the user's. (SQLite 3.40 refuses such links even as
    root; notesd does not count on every version to.) The open and the
    first read open all three files and take the snapshot; the copy is then
    written with our own ids.

    mode=rw, not mode=ro: a read-only connection works too, but cannot
    checkpoint when it closes, so it leaves the -wal and -shm it made beside
    a stopped daemon's database. A read-write one that closes last removes
    them, as the daemon does; while the daemon runs it writes nothing.
    Neither mode makes a database that is not there."""
    path = config.database
    account = daemon_account(config)
    if not os.path.exists(path):
        raise NotesdError(f"no database at {path}: nothing to back up")
    check_directory(path, trusted_ids(account))
    source = None
    try:
        with acting_as(account):
            source = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True,
                                     timeout=BUSY_TIMEOUT, isolation_level=None)
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        notes = backup_database(source, args.dest, args.force)
    except sqlite3.Error as e:
        raise NotesdError(f"cannot read database {path}: {e}") from None
    finally:
        if source is not None:
            source.close()
    print(f"notesd backup {os.path.abspath(args.dest)}: {notes} notes")
    return 0


def cmd_configtest(config, args):
    if args.example:
        print(example_config(), end="")
        return 0
    for key, value in config.public().items():
        shown = ("yes" if value else "no") if isinstance(value, bool) else value
        print(f"{key} = {shown}")
    print(f"notesd: configuration {config.path or '(defaults)'} is valid", file=sys.stderr)
    return 0


#: A CLI command: its function, one line of help, whether it loads the
#: configuration leniently (Config.load), and for the commands that report a
#: state, the exit code and line for "cannot tell" (any error).
Cli = collections.namedtuple("Cli", "run help lenient unknown")

COMMANDS = {
    "start": Cli(cmd_start, "start the daemon; returns once it serves", False, None),
    "stop": Cli(cmd_stop, "stop it (SIGTERM; --force adds SIGKILL after the timeout)",
                True, None),
    "restart": Cli(cmd_restart, "hand over to a new daemon started from the notesd.py on "
                   "disk, which inherits the listening socket (else stop, then start); "
                   "refused, before anything, if the configuration is invalid", False, None),
    "reload": Cli(cmd_reload, "re-read the config file (SIGHUP) and confirm", False, None),
    "status": Cli(cmd_status, "is it running? (LSB exit codes)", True,
                  (4, "notesd status unknown: {}")),
    "run": Cli(cmd_run, "run in the foreground (systemd, containers, debugging)", False, None),
    "check": Cli(cmd_check, "health check for cron and monitoring (Nagios plugin format)",
                 True, (3, "NOTESD UNKNOWN - {}")),
    "configtest": Cli(cmd_configtest, "validate the configuration and print it", False, None),
    "backup": Cli(cmd_backup, "write a consistent copy of the database to DEST, whether the "
                  "daemon runs or not (--force: replace DEST)", False, None),
}
#: the commands whose daemon will have to read the configuration file again.
WARN_UNREADABLE = ("start", "restart", "run", "configtest")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="notesd.py", description="notesd: a notes REST API daemon.",
        epilog="Exit codes: 0 ok; 1 failed; 2 usage; 3 not running (status), UNKNOWN "
               "(check); 4 status unknown, or not permitted (stop, reload); "
               "6 invalid configuration; 7 not running (reload).")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND",
                        help="; ".join(f"{name}: {c.help}" for name, c in COMMANDS.items()))
    parser.add_argument("dest", nargs="?", metavar="DEST",
                        help="backup: the file to write the copy to (and only backup takes it)")
    parser.add_argument("-c", "--config", metavar="FILE", default=os.environ.get("NOTESD_CONFIG"),
                        help="INI file with a [notesd] section (default: $NOTESD_CONFIG)")
    parser.add_argument("-V", "--version", action="version", version=f"notesd {__version__}")
    parser.add_argument("--force", action="store_true",
                        help="stop: SIGKILL when SIGTERM did not work within the timeout; "
                             "backup: replace an existing DEST")
    parser.add_argument("--warn-lag", type=float, default=500.0, metavar="MS",
                        help="check: WARNING at this main-loop lag (default 500)")
    parser.add_argument("--crit-lag", type=float, default=2000.0, metavar="MS",
                        help="check: CRITICAL at this main-loop lag (default 2000)")
    parser.add_argument("--example", action="store_true",
                        help="configtest: print an example config file with every key")
    keys = parser.add_argument_group("configuration keys (win over the file)")
    for key, option in DEFAULTS.items():
        shown = option.default or ("see text" if key in DERIVED_KEYS else "none")
        default = "" if "default" in option.help else f" (default: {shown})"
        keys.add_argument("--" + key.replace("_", "-"), dest=key, metavar="VALUE",
                          help=option.help + default)
    return parser


###############################################################################
# main() ######################################################################
###############################################################################


def main(argv=None):
    """The CLI: errors become one line and an exit code here, and only here."""
    parser = build_parser()
    # intermixed: DEST may come after an option too (backup --force DEST)
    args = parser.parse_intermixed_args(argv)
    if (args.dest is None) == (args.command == "backup"):
        parser.error(f"{args.command} takes no DEST" if args.dest is not None else
                     "backup needs DEST, the file to write the copy to")
    token = os.environ.pop(TOKEN_ENVIRONMENT, None)
    if args.token is None:
        args.token = token
    cli = COMMANDS[args.command]
    try:
        # Before anything else: the variables must not reach a child.
        args.listener = inherited_listener()
        handover = os.environ.pop(HANDOVER_ENVIRONMENT, None)
        args.handover = (socket.socket(fileno=HANDOVER_FD) if handover == str(HANDOVER_FD)
                         and args.listener is not None else None)
        config = Config.load(args.config, {key: getattr(args, key) for key in DEFAULTS},
                             lenient=cli.lenient)
        for warning in config.warnings:
            print(f"notesd: warning: {warning}", file=sys.stderr)
        problem = args.command in WARN_UNREADABLE and unreadable_config(config)
        if problem:
            print(f"notesd: warning: {problem}", file=sys.stderr)
        return cli.run(config, args)
    except NotesdError as e:
        if cli.unknown:
            code, line = cli.unknown
            print(line.format(e))
            return code
        print(f"notesd: {e}", file=sys.stderr)
        # A lenient command that still cannot read its configuration failed.
        return 1 if cli.lenient and isinstance(e, ConfigError) else e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
