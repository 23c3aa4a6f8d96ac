#!/usr/bin/env python3
"""bench/search.py - issue 13's targets: indexed search and the command budget.

    python3 bench/search.py [--notes N] [--big N] [--notesd PATH] [--quick] [--json FILE]
                            [--quiet-build] [--big-only]

1. Fills a fresh notesd with N notes (default 300,000) through the API (wrk,
   POST /, a Lua script; every thousandth note carries a unique word), checks
   that a search for a sample of those words finds exactly its note (against
   a direct scan of the database), then times a few hundred searches of 5 or
   more characters, one client, sequentially.
2. A storm: 100 searchers (wrk -t1 -c100, a Lua script counting statuses)
   for 15 s, while a thread GETs /health every 100 ms and another GETs
   random notes one after the other; then `notesd.py ... check`.
3. A database of --big notes (default 1,000,000; 0 skips it) in the old
   schema (user_version 1), inserted directly: its size, the first `start`
   (migration 2), the time until the index has caught up, the size after
   (stopped, checkpointed), and a second `start`.
Prints a table with the issue's targets, writes the same as JSON (default
bench/results/search.json). Exit status: 0 all targets met, 1 a target
failed, 2 the benchmark itself failed (partial results still written).
Reuses bench/run.py (Notesd, parse_wrk, http_request, ...). Stdlib + wrk.
"""
import argparse
import bisect
import collections
import contextlib
import http.client
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import run as rb  # noqa: E402  bench/run.py: Notesd, parse_wrk, http_request, ...

DEFAULT_JSON = os.path.join(HERE, "results", "search.json")
FULL = dict(notes=300_000, big=1_000_000, storm_s=15, exact_sample=50, alone=400,
            storm_queries=400, catchup_s=900, big_catchup_s=3600, deadline=2 * 3600)
QUICK = dict(notes=30_000, big=100_000, storm_s=5, exact_sample=30, alone=200,
             storm_queries=200, catchup_s=120, big_catchup_s=300, deadline=15 * 60)
FILL_CONNS = 16
STORM_CONNS = 100
HEALTH_EVERY = 0.1
SEED = 13
CATEGORIES = ("unique", "word", "common", "miss", "spaces")
TARGETS = {
    "exact": "every sampled word: exactly its note",
    "alone_p99": "p99 <= 10 ms",
    "health": "200 throughout",
    "get_p99": "p99 <= 100 ms",
    "storm_status": "only 200 / 503",
    "check": "OK (exit 0)",
    "start2": "<= 1 s",
}
log = rb.log


# ---------------------------------------------------------------- texts

def vocabulary(n=2000):
    """n distinct lower-case pseudo-words (3-12 letters) and their Zipf
    cumulative weights (rank r: 1/r), so a few words are in most notes."""
    rng = random.Random(SEED)
    words, seen = [], set()
    while len(words) < n:
        w = "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") +
                    (rng.choice("nrst") if rng.random() < 0.3 else "")
                    for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if 3 <= len(w) <= 12 and w not in seen:
            seen.add(w)
            words.append(w)
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(n)))
    return words, cum


def unique_word(j):
    """The word of the j-th thousandth note: 'Xq' + 5 letters. Upper-case X
    is in no other text, so it matches nowhere else, also as a substring."""
    s = ""
    for _ in range(5):
        s = chr(97 + j % 26) + s
        j //= 26
    return "Xq" + s


def note_text(rng, words, cum, total):
    target = rng.randint(40, 200)
    parts, n = [], 0
    while n < target:
        w = words[bisect.bisect_left(cum, rng.random() * total)]
        parts.append(w)
        n += len(w) + 1
    return parts


def queries(rng, words, cum, unique, count):
    """`count` (category, query) pairs, the categories equally often:
    unique (one note), word (any vocabulary word of >= 5 letters),
    common (the 10 most frequent such), miss (random letters; verified by
    the scan when checked), spaces (two words or word ends and starts)."""
    long_words = [w for w in words if len(w) >= 5]
    common = [w for w in words[:60] if len(w) >= 5][:10]
    total = cum[-1]

    def weighted():
        return words[bisect.bisect_left(cum, rng.random() * total)]
    out = []
    for i in range(count):
        cat = CATEGORIES[i % len(CATEGORIES)]
        if cat == "unique":
            q = rng.choice(unique)
        elif cat == "word":
            q = rng.choice(long_words)
        elif cat == "common":
            q = rng.choice(common)
        elif cat == "miss":
            q = "".join(rng.choice("abcdefghijklmnopqrstuvwyz") for _ in range(rng.randint(6, 9)))
        else:
            a, b = weighted(), weighted()
            q = (a + " " + b) if rng.random() < 0.5 else (a[-3:] + " " + b[:3])
            if len(q) < 5:
                q = a + " " + b
        out.append((cat, q))
    rng.shuffle(out)
    return out


def lua_str(s):
    return '"%s"' % s.replace("\\", "\\\\").replace('"', '\\"')


FILL_LUA = r"""
-- POST / N notes of Zipf-distributed words; the n-th with n %% 1000 == 0
-- carries unique_word(n / 1000). After N: GET /health until wrk is stopped.
local N = %(n)d
local words = {%(words)s}
local cum = {%(cum)s}
local total = cum[#cum]
sent = 0
counts = {}
local threads = {}
function setup(t) table.insert(threads, t) end
function init(args) math.randomseed(%(seed)d) end
local function pick()
  local r = math.random() * total
  local lo, hi = 1, #cum
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cum[mid] < r then lo = mid + 1 else hi = mid end
  end
  return words[lo]
end
local function uword(j)
  local s = ""
  for i = 1, 5 do s = string.char(97 + j %% 26) .. s; j = math.floor(j / 26) end
  return "Xq" .. s
end
local calls = 0
function request()
  -- wrk 4.1 calls request() once per thread before it connects and never
  -- sends that one: a GET, so that sent counts only POSTs that go out
  calls = calls + 1
  if calls == 1 or sent >= N then return wrk.format("GET", "/health") end
  sent = sent + 1
  local target = math.random(40, 200)
  local parts, len = {}, 0
  while len < target do local w = pick(); parts[#parts + 1] = w; len = len + #w + 1 end
  if sent %% 1000 == 0 then
    table.insert(parts, math.random(1, #parts + 1), uword(sent / 1000))
  end
  return wrk.format("POST", "/", {["Content-Type"] = "application/json"},
                    '{"text": "' .. table.concat(parts, " ") .. '"}')
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do io.write(string.format("status %%d: %%d\n", k, v)) end
    io.write(string.format("posts sent: %%d\n", t:get("sent")))
  end
end
"""

STORM_LUA = r"""
-- GET /?q= of a random query of the list; statuses counted, 503s by cause.
local queries = {%(queries)s}
counts = {}
causes = {}
local threads = {}
function setup(t) table.insert(threads, t) end
function init(args) math.randomseed(%(seed)d) end
function request()
  return wrk.format("GET", "/?q=" .. queries[math.random(#queries)])
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if status == 503 then
    local cause = "other"
    if string.find(body, "command_budget", 1, true) then cause = "budget"
    elseif string.find(body, "too many requests", 1, true) then cause = "queue_full"
    elseif string.find(body, "did not answer in time", 1, true) then cause = "reply_timeout"
    end
    causes[cause] = (causes[cause] or 0) + 1
  end
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do io.write(string.format("status %%d: %%d\n", k, v)) end
    for k, v in pairs(t:get("causes")) do io.write(string.format("503 %%s: %%d\n", k, v)) end
  end
end
"""


# ---------------------------------------------------------------- clients

class Client:
    """One keep-alive HTTP/1.1 connection to notesd (127.0.0.1 only);
    reconnects after an error."""

    def __init__(self, base, timeout=10):
        self.host, self.port, _ = rb.split_url(base)
        self.timeout = timeout
        self.conn = None

    def get(self, path):
        """(status or 'error: ...', body bytes, headers, ms)."""
        t0 = time.monotonic()
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self.conn.request("GET", path, headers={"Accept": rb.ACCEPT})
                r = self.conn.getresponse()
                body = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                return r.status, body, dict(r.getheaders()), (time.monotonic() - t0) * 1000
            except (OSError, http.client.HTTPException) as e:
                self.close()
                # a kept-alive connection the server closed: retry once at once
                if attempt or isinstance(e, TimeoutError):
                    return "error: %s" % (str(e) or type(e).__name__), b"", {}, \
                        (time.monotonic() - t0) * 1000

    def json(self, path):
        st, body, _, _ = self.get(path)
        if st != 200:
            raise rb.BenchError("GET %s answered %s: %r" % (path, st, body[:300]))
        return json.loads(body)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def pct(values, p):
    """Nearest-rank percentile of a list (None if empty)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def lat(values):
    return {"n": len(values), "p50_ms": r3(pct(values, 50)), "p99_ms": r3(pct(values, 99)),
            "max_ms": r3(max(values) if values else None)}


def r3(x):
    return None if x is None else round(x, 3)


class Probers:
    """Two threads: /health every HEALTH_EVERY s (a new connection each, as
    a monitor does) and GET /ID/ of random notes back to back (one kept-alive
    connection)."""

    def __init__(self, base, max_id):
        self.base, self.max_id = base, max_id
        self.stop_ev = threading.Event()
        self.health = []    # (t, status, ms)
        self.gets = []      # ms
        self.get_bad = collections.Counter()
        self.threads = [threading.Thread(target=self._health, daemon=True),
                        threading.Thread(target=self._get, daemon=True)]

    def __enter__(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in self.threads:
            t.join(15)

    def _health(self):
        nxt = time.monotonic()
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            try:
                st, _, _ = rb.http_request(self.base + "health", timeout=10)
            except Exception as e:       # recorded: a failed probe is a finding
                st = "error: %s" % (str(e) or type(e).__name__)
            self.health.append((round(t0 - self.t0, 3), st, (time.monotonic() - t0) * 1000))
            nxt = max(nxt + HEALTH_EVERY, time.monotonic())
            self.stop_ev.wait(max(0.0, nxt - time.monotonic()))

    def _get(self):
        rng = random.Random(SEED + 1)
        c = Client(self.base)
        try:
            while not self.stop_ev.is_set():
                st, _, _, ms = c.get("/%d/" % rng.randint(1, self.max_id))
                self.gets.append(ms)
                if st != 200:
                    self.get_bad[str(st)] += 1
                    if not isinstance(st, int):
                        self.stop_ev.wait(0.1)
        finally:
            c.close()

    def figures(self):
        bad = [(t, st, round(ms, 1)) for t, st, ms in self.health if st != 200]
        hms = [ms for _, _, ms in self.health]
        return {"health_probes": len(self.health), "health_non200": len(bad),
                "health_non200_list": bad[:50], "health_max_ms": r3(max(hms) if hms else None),
                "health_p99_ms": r3(pct(hms, 99)),
                "get": lat(self.gets), "get_non200": dict(self.get_bad)}


# ---------------------------------------------------------------- wrk

def wrk(url, conns, duration, script, stop_when=None, poll=0.5):
    """wrk -t1 with a Lua script; (parsed by run.parse_wrk, raw output).
    stop_when(): called every `poll` s; True ends wrk early (SIGINT: wrk then
    prints its figures and runs done() as at the end of -d)."""
    rb.split_url(url)
    cmd = ["wrk", "-t1", "-c%d" % conns, "-d%ds" % max(1, int(math.ceil(duration))),
           "--latency", "-H", "Accept: " + rb.ACCEPT, "-s", script, url]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True)
    rb.WRK_PROCS.append(p)
    try:
        if stop_when is not None:
            while p.poll() is None:
                if stop_when():
                    p.send_signal(signal.SIGINT)
                    break
                time.sleep(poll)
        out, _ = p.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise rb.BenchError("wrk did not finish within %d s" % (duration + 30))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        rb.WRK_PROCS.remove(p)
    if p.returncode != 0:
        raise rb.BenchError("wrk exited %d:\n%s" % (p.returncode, out))
    res = rb.parse_wrk(out)
    res["statuses"] = {int(k): int(v) for k, v in re.findall(r"^status (\d+): (\d+)$", out, re.M)}
    res["causes_503"] = {k: int(v) for k, v in re.findall(r"^503 (\w+): (\d+)$", out, re.M)}
    m = re.search(r"^posts sent: (\d+)$", out, re.M)
    if m:
        res["posts_sent"] = int(m.group(1))
    return res, out


# ---------------------------------------------------------------- steps

def status(client):
    return client.json("/status")


def during(big):
    """What the probers saw while the big database's index was built."""
    d = big["during_catchup"]
    if d is None:
        return "no probers (--quiet-build): an idle loop"
    return ("meanwhile /health max %.1f ms, %d non-200; GET /ID/ back to back, p99 %.1f ms"
            % (d["health_max_ms"], d["health_non200"], d["get"]["p99_ms"] or 0))


def wait_indexed(client, timeout):
    """Seconds until /status says search.unindexed == 0 (None: not within
    timeout), and the samples (t, unindexed)."""
    t0 = time.monotonic()
    samples = []
    while True:
        s = status(client)["search"]
        t = time.monotonic() - t0
        samples.append((round(t, 2), s.get("unindexed")))
        if not s.get("unindexed"):
            return round(t, 2), samples
        if t > timeout:
            return None, samples
        time.sleep(0.5)


def scan_truth(db, qs, limit):
    """{query: first `limit` ids whose text contains it}, by a direct scan
    of the database (read-only, beside the running daemon)."""
    con = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(db), uri=True, timeout=30)
    try:
        return {q: [r[0] for r in con.execute(
            "SELECT id FROM notes WHERE instr(text, ?) > 0 ORDER BY id LIMIT ?", (q, limit))]
            for q in set(qs)}
    finally:
        con.close()


def present_unique(db):
    """The unique words in the database (a POST may have been lost)."""
    con = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(db), uri=True, timeout=30)
    try:
        found = set()
        for (text,) in con.execute("SELECT text FROM notes WHERE instr(text, 'Xq') > 0"):
            found.update(re.findall(r"Xq[a-z]{5}", text))
        return sorted(found)
    finally:
        con.close()


def search(client, q):
    st, body, _, ms = client.get("/?q=" + urllib.parse.quote(q, safe=""))
    ids = [n["id"] for n in json.loads(body)] if st == 200 else None
    return st, ids, ms, body


def exact_check(client, db, words):
    """Search each unique word; exact = 200 and the ids equal the scan's,
    which must be one note."""
    truth = scan_truth(db, words, 101)
    out = {"checked": len(words), "exact": 0, "statuses": collections.Counter(), "ms": [],
           "problems": []}
    for w in words:
        st, ids, ms, body = search(client, w)
        out["statuses"][str(st)] += 1
        out["ms"].append(ms)
        if st == 200 and ids == truth[w] and len(ids) == 1:
            out["exact"] += 1
        elif len(out["problems"]) < 10:
            out["problems"].append({"q": w, "status": st, "ids": ids, "truth": truth[w],
                                    "body": body[:200].decode(errors="replace") if st != 200 else None})
    out["statuses"] = dict(out["statuses"])
    out.update(lat(out.pop("ms")))
    return out


def alone(client, db, qs):
    """Sequential searches, one client: latency by category, and the results
    compared with a direct scan (first page of 100)."""
    truth = scan_truth(db, [q for _, q in qs], 100)
    per = collections.defaultdict(list)
    statuses = collections.Counter()
    wrong, hits, problems = 0, collections.Counter(), []
    for cat, q in qs:
        st, ids, ms, body = search(client, q)
        per[cat].append(ms)
        per["all"].append(ms)
        statuses[str(st)] += 1
        if st == 200:
            if ids != truth[q]:
                wrong += 1
                if len(problems) < 5:
                    problems.append({"q": q, "ids": ids[:5], "truth": truth[q][:5]})
            hits[cat] += bool(ids)
        elif len(problems) < 5:
            problems.append({"q": q, "status": st, "body": body[:200].decode(errors="replace")})
    return {"by_category": {k: lat(v) for k, v in per.items()}, "statuses": dict(statuses),
            "not_exact": wrong, "with_results": dict(hits), "problems": problems}


def fill(nd, cfg, words, cum, tmp):
    lua = os.path.join(tmp, "fill.lua")
    with open(lua, "w") as f:
        f.write(FILL_LUA % {"n": cfg["notes"], "seed": SEED,
                            "words": ",".join(lua_str(w) for w in words),
                            "cum": ",".join("%.9g" % c for c in cum)})
    client = Client(nd.url)
    state = {"notes": 0, "t": time.monotonic(), "stalled": False}

    def done():
        n = status(client)["notes"]
        now = time.monotonic()
        if n > state["notes"]:
            state["notes"], state["t"] = n, now
        elif now - state["t"] > 5:
            state["stalled"] = True
        return n >= cfg["notes"] or state["stalled"]
    t0 = time.monotonic()
    res, _ = wrk(nd.url, FILL_CONNS, cfg["notes"] / 200 + 60, lua, stop_when=done)
    secs = time.monotonic() - t0
    res["notes"] = status(client)["notes"]
    res["seconds"] = round(secs, 1)
    res["posts_per_s"] = round(res["notes"] / secs, 1)
    # POSTs lost to socket errors: topped up here (plain texts), so the store
    # holds N notes; the unique words are then read from the database
    res["topped_up"] = missing = cfg["notes"] - res["notes"]
    if missing > max(100, cfg["notes"] // 100):
        raise rb.BenchError("fill: %d notes, not %d (statuses %s, socket errors %s%s)" % (
            res["notes"], cfg["notes"], res["statuses"], res["socket_errors"],
            ", stalled" if state["stalled"] else ""))
    for i in range(max(0, missing)):
        body = json.dumps({"text": "topped up note %d" % i}).encode()
        st, _, b = rb.http_request(nd.url, "POST", body, {"Content-Type": "application/json"})
        if st != 201:
            raise rb.BenchError("POST / answered %d: %r" % (st, b[:200]))
    client.close()
    return res


def build_old_db(path, n, words, cum):
    """The old schema (user_version 1: the notes table only), n notes of
    40-200 characters of Zipf words, every thousandth with a unique word.
    (run.grow_store copies one fixed text; this needs varied words.)"""
    rng = random.Random(SEED + 2)
    total = cum[-1]
    con = sqlite3.connect(path)
    try:
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL,"
                    " created TEXT NOT NULL, updated TEXT NOT NULL)")
        con.execute("PRAGMA user_version = 1")
        con.execute("PRAGMA synchronous=OFF")
        stamp = "2024-01-01T00:00:00.000000Z"

        def rows():
            for i in range(1, n + 1):
                parts = note_text(rng, words, cum, total)
                if i % 1000 == 0:
                    parts.insert(rng.randint(0, len(parts)), unique_word(i // 1000))
                yield (" ".join(parts), stamp, stamp)
        t0 = time.monotonic()
        with con:
            con.executemany("INSERT INTO notes (text, created, updated) VALUES (?, ?, ?)", rows())
        dt = time.monotonic() - t0
        avg = con.execute("SELECT avg(length(text)) FROM notes").fetchone()[0]
    finally:
        con.close()
    return {"notes": n, "insert_s": round(dt, 1), "avg_chars": round(avg, 1)}


def sizes(db):
    out = {}
    for suffix in ("", "-wal", "-shm"):
        p = db + suffix
        out["db" + suffix] = os.path.getsize(p) if os.path.exists(p) else 0
    out["db+wal_mb"] = round((out["db"] + out["db-wal"]) / 2**20, 1)
    return out


# ---------------------------------------------------------------- the benchmark

def benchmark(cfg, out, tmp, notesd_script, keep):
    deadline = rb.T0 + cfg["deadline"]

    def check_time():
        if time.monotonic() > deadline:
            raise rb.BenchError("benchmark exceeded its %d s time budget" % cfg["deadline"])
    words, cum = vocabulary()
    if not cfg["big_only"]:
        api_phases(cfg, out, tmp, notesd_script, keep, words, cum, check_time)
    if cfg["big"] > 0:
        check_time()
        big_phase(cfg, out, tmp, notesd_script, keep, words, cum)


def api_phases(cfg, out, tmp, notesd_script, keep, words, cum, check_time):
    """1. the fill, exact hits and searches alone; 2. the storm."""
    rng = random.Random(SEED)
    n_unique = cfg["notes"] // 1000
    if n_unique < 1:
        raise rb.BenchError("--notes must be at least 1000")

    # ---- 1. fill through the API
    state = os.path.join(tmp, "state")
    os.makedirs(state)
    nd = rb.Notesd(notesd_script, state)
    keep.append(nd)
    nd.start()
    out["meta"]["notesd_version"] = nd.version
    log("notesd %s up at %s (pid %d); filling %d notes, wrk -c%d"
        % (nd.version, nd.url, nd.pid, cfg["notes"], FILL_CONNS))
    f = fill(nd, cfg, words, cum, tmp)
    out["fill"] = {k: f[k] for k in ("notes", "seconds", "posts_per_s", "statuses", "p50_ms",
                                     "p99_ms", "socket_errors", "topped_up")}
    log("filled %d notes in %.1f s (%.0f POST/s), statuses %s"
        % (f["notes"], f["seconds"], f["posts_per_s"], f["statuses"]))
    client = Client(nd.url)
    unique = present_unique(nd.db)
    if len(unique) != n_unique:
        log("fill: %d unique words in the database, not %d" % (len(unique), n_unique))
    out["fill"]["unique_words"] = len(unique)
    sample = rng.sample(unique, min(cfg["exact_sample"], len(unique)))
    st = status(client)
    out["after_fill_status"] = {"search": st["search"], "commands": st["commands"]}
    # exact hits at once, while the index may still be catching up (informational)
    ex0 = exact_check(client, nd.db, sample)
    ex0["unindexed_before"] = st["search"]["unindexed"]
    out["exact_during_catchup"] = ex0
    log("exact, at once (unindexed %s): %d/%d, statuses %s, p50 %.1f ms, max %.1f ms"
        % (ex0["unindexed_before"], ex0["exact"], ex0["checked"], ex0["statuses"],
           ex0["p50_ms"], ex0["max_ms"]))
    check_time()
    caught, samples = wait_indexed(client, cfg["catchup_s"])
    out["catchup_after_fill"] = {"seconds": caught, "samples": samples[::max(1, len(samples) // 40)]}
    log("index caught up %s" % ("after %.1f s" % caught if caught is not None else
                                "NOT within %d s" % cfg["catchup_s"]))
    ex = exact_check(client, nd.db, sample)
    out["exact"] = ex
    log("exact, indexed: %d/%d, statuses %s" % (ex["exact"], ex["checked"], ex["statuses"]))

    # ---- searches alone
    check_time()
    qs = queries(rng, words, cum, unique, cfg["alone"])
    for cat, q in qs[:20]:      # warm-up, not recorded
        search(client, q)
    a0 = status(client)["commands"]["budget_aborts"]
    al = alone(client, nd.db, qs)
    st = status(client)
    al["budget_aborts"] = st["commands"]["budget_aborts"] - a0
    al["slowest_last_minute"] = st["commands"]["slowest_last_minute"]
    out["alone"] = al
    for cat, v in al["by_category"].items():
        log("alone %-7s n=%3d p50 %6.2f ms p99 %6.2f ms max %6.2f ms"
            % (cat, v["n"], v["p50_ms"], v["p99_ms"], v["max_ms"]))
    log("alone: statuses %s, not exact %d, budget aborts %d"
        % (al["statuses"], al["not_exact"], al["budget_aborts"]))

    # ---- 2. the storm
    check_time()
    sq = queries(random.Random(SEED + 3), words, cum, unique, cfg["storm_queries"])
    lua = os.path.join(tmp, "storm.lua")
    with open(lua, "w") as fh:
        fh.write(STORM_LUA % {"seed": SEED, "queries": ",".join(
            lua_str(urllib.parse.quote(q, safe="")) for _, q in sq)})
    st0 = status(client)
    client.close()
    log("storm: %d searchers for %d s, probers on /health and GET /ID/"
        % (STORM_CONNS, cfg["storm_s"]))
    with Probers(nd.url, cfg["notes"]) as pr:
        s, _ = wrk(nd.url, STORM_CONNS, cfg["storm_s"], lua)
    t_end = time.monotonic()
    rc, line = nd.cli("check")
    t_check = time.monotonic() - t_end
    checks = [{"after_s": round(t_check, 2), "rc": rc, "line": line.strip()}]
    while rc != 0 and time.monotonic() - t_end < 5:   # when does it recover? (informational)
        time.sleep(0.5)
        rc2, line2 = nd.cli("check")
        checks.append({"after_s": round(time.monotonic() - t_end, 2), "rc": rc2,
                       "line": line2.strip()})
        if rc2 == 0:
            break
    st1 = status(client)
    storm = {"wrk": {k: s[k] for k in ("rps", "requests", "p50_ms", "p99_ms", "statuses",
                                       "causes_503", "socket_errors", "non2xx")},
             "probers": pr.figures(), "check": checks,
             "budget_aborts": st1["commands"]["budget_aborts"] - st0["commands"]["budget_aborts"],
             "slowest_last_minute": st1["commands"]["slowest_last_minute"],
             "status_after": {k: st1.get(k) for k in ("loop_lag_ms", "queue_depth", "requests",
                                                      "search", "threads", "rss_bytes")}}
    out["storm"] = storm
    p = storm["probers"]
    log("storm: %d searches (%.0f/s, p50 %.1f ms, p99 %.1f ms), statuses %s, 503 causes %s"
        % (s["requests"], s["rps"], s["p50_ms"], s["p99_ms"], s["statuses"], s["causes_503"]))
    log("storm: /health %d probes, %d non-200, max %.1f ms; GET /ID/ n=%d p50 %.2f p99 %.2f max %.1f ms"
        % (p["health_probes"], p["health_non200"], p["health_max_ms"], p["get"]["n"],
           p["get"]["p50_ms"], p["get"]["p99_ms"], p["get"]["max_ms"]))
    log("check after storm (%.2f s): rc %d %s" % (t_check, checks[0]["rc"], checks[0]["line"]))
    nd.stop()


def big_phase(cfg, out, tmp, notesd_script, keep, words, cum):
    """3. the big old-schema database."""
    big_state = os.path.join(tmp, "big")
    os.makedirs(big_state)
    bd = rb.Notesd(notesd_script, big_state)
    keep.append(bd)
    log("building an old-schema (user_version 1) database of %d notes" % cfg["big"])
    big = build_old_db(bd.db, cfg["big"], words, cum)
    big["size_before"] = sizes(bd.db)
    log("built in %.1f s (avg %.0f chars): %.1f MB" % (big["insert_s"], big["avg_chars"],
                                                        big["size_before"]["db+wal_mb"]))
    big["start1_s"] = round(bd.start(), 3)
    out["meta"]["notesd_version"] = bd.version
    log("first start (migrations 2 and 3): %.3f s" % big["start1_s"])
    bc = Client(bd.url)
    # Probed, a client back to back keeps the loop busy: the index gets its
    # share of a busy loop. --quiet-build leaves the loop idle instead.
    with contextlib.nullcontext() if cfg["quiet_build"] else Probers(bd.url, cfg["big"]) as pr:
        caught, samples = wait_indexed(bc, cfg["big_catchup_s"])
    big["index_catchup_s"] = caught
    big["catchup_samples"] = samples[::max(1, len(samples) // 40)]
    big["during_catchup"] = pr and pr.figures()
    log("index built in the background: %s; %s" % (
        "%.1f s" % caught if caught is not None else "NOT done", during(big)))
    bc.close()
    big["stop1_s"] = round(bd.stop(), 3)
    big["size_after"] = sizes(bd.db)
    big["start2_s"] = round(bd.start(), 3)
    log("size after %.1f MB; second start %.3f s" % (big["size_after"]["db+wal_mb"], big["start2_s"]))
    more = []
    for _ in range(3):                 # informational: how steady is it
        bd.stop()
        more.append(round(bd.start(), 3))
    big["start_more_s"] = more
    log("three more starts: %s s" % more)
    # the same CLI start on an empty store: what process start-up alone
    # costs on this machine right now (load), to tell from the database's share
    empty = rb.Notesd(notesd_script, os.path.join(tmp, "empty"))
    os.makedirs(empty.dir)
    keep.append(empty)
    ref = []
    for _ in range(3):
        ref.append(round(empty.start(), 3))
        empty.stop()
    big["start_empty_s"] = ref
    log("start of an empty store, for reference: %s s" % ref)
    bc = Client(bd.url)
    bu = [unique_word(j) for j in range(1, cfg["big"] // 1000 + 1)]
    big["exact"] = exact_check(bc, bd.db, random.Random(SEED + 4).sample(bu, min(20, len(bu))))
    bq = queries(random.Random(SEED + 5), words, cum, bu, 100)
    for _, q in bq[:10]:
        search(bc, q)
    big["alone"] = alone(bc, bd.db, bq)
    bc.close()
    log("big: exact %d/%d; 100 searches alone p50 %.2f ms p99 %.2f ms, statuses %s"
        % (big["exact"]["exact"], big["exact"]["checked"], big["alone"]["by_category"]["all"]["p50_ms"],
           big["alone"]["by_category"]["all"]["p99_ms"], big["alone"]["statuses"]))
    big["stop2_s"] = round(bd.stop(), 3)
    out["big"] = big


# ---------------------------------------------------------------- report

def summarize(out, cfg):
    """Rows (section, what, value, target key or None, passed or None)."""
    rows = []

    def row(section, what, value, target=None, ok=None):
        rows.append({"section": section, "what": what, "value": value,
                     "target": TARGETS.get(target, ""), "target_id": target,
                     "result": "" if ok is None else ("PASS" if ok else "FAIL")})
    f = out.get("fill")
    if f:
        row("fill", "%d notes by POST, wrk -c%d" % (f["notes"], FILL_CONNS),
            "%.1f s, %.0f POST/s, p99 %.1f ms, statuses %s"
            % (f["seconds"], f["posts_per_s"], f["p99_ms"], fmt_counts(f["statuses"])))
    e0 = out.get("exact_during_catchup")
    if e0:
        row("search", "unique words, at once (unindexed %s)" % e0["unindexed_before"],
            "%d/%d exact, %s, p50 %.1f ms, max %.1f ms"
            % (e0["exact"], e0["checked"], fmt_counts(e0["statuses"]), e0["p50_ms"], e0["max_ms"]))
    c = out.get("catchup_after_fill")
    if c:
        row("search", "index caught up after the fill",
            "%.1f s" % c["seconds"] if c["seconds"] is not None else "not within %d s" % cfg["catchup_s"])
    e = out.get("exact")
    if e:
        row("search", "unique words, indexed", "%d/%d exact, %s"
            % (e["exact"], e["checked"], fmt_counts(e["statuses"])),
            "exact", e["exact"] == e["checked"])
    a = out.get("alone")
    if a:
        for cat in CATEGORIES:
            v = a["by_category"].get(cat)
            if v:
                row("search", "  alone, %s (n=%d)" % (cat, v["n"]),
                    "p50 %.2f  p99 %.2f  max %.2f ms" % (v["p50_ms"], v["p99_ms"], v["max_ms"]))
        v = a["by_category"]["all"]
        row("search", "alone, all %d (>= 5 chars), 1 client" % v["n"],
            "p50 %.2f  p99 %.2f  max %.2f ms; %s; %d not exact; %d budget aborts"
            % (v["p50_ms"], v["p99_ms"], v["max_ms"], fmt_counts(a["statuses"]),
               a["not_exact"], a["budget_aborts"]), "alone_p99", v["p99_ms"] <= 10.0)
    s = out.get("storm")
    if s:
        w, p = s["wrk"], s["probers"]
        row("storm", "%d searchers, %d s" % (STORM_CONNS, cfg["storm_s"]),
            "%d requests, %.0f/s, p50 %.1f ms, p99 %.1f ms" % (w["requests"], w["rps"],
                                                               w["p50_ms"], w["p99_ms"]))
        only = bool(w["statuses"]) and set(w["statuses"]) <= {200, 503} and \
            not sum(w["socket_errors"].values())
        row("storm", "searchers' statuses",
            "%s; 503 causes %s; sock err %s" % (fmt_counts(w["statuses"]),
                                                fmt_counts(w["causes_503"]) or "-",
                                                rb.fmt_sock(w["socket_errors"])),
            "storm_status", only)
        row("storm", "budget aborts / slowest command (last minute)",
            "%d / %s" % (s["budget_aborts"], fmt_slowest(s["slowest_last_minute"])))
        row("storm", "/health every %g s" % HEALTH_EVERY,
            "%d probes, %d non-200, max %.1f ms, p99 %.1f ms"
            % (p["health_probes"], p["health_non200"], p["health_max_ms"], p["health_p99_ms"]),
            "health", p["health_non200"] == 0 and p["health_probes"] > 0)
        g = p["get"]
        row("storm", "GET /ID/ back to back",
            "n=%d, p50 %.2f, p99 %.2f, max %.1f ms%s"
            % (g["n"], g["p50_ms"], g["p99_ms"], g["max_ms"],
               "; non-200 %s" % fmt_counts(p["get_non200"]) if p["get_non200"] else ""),
            "get_p99", g["p99_ms"] is not None and g["p99_ms"] <= 100.0 and not p["get_non200"])
        ck = s["check"][0]
        row("storm", "check, %.1f s after the storm" % ck["after_s"],
            "exit %d: %s" % (ck["rc"], ck["line"].split(" | ")[0]), "check", ck["rc"] == 0)
        if len(s["check"]) > 1:
            last = s["check"][-1]
            row("storm", "  check again, %.1f s after" % last["after_s"],
                "exit %d: %s" % (last["rc"], last["line"].split(" | ")[0]))
    b = out.get("big")
    if b:
        n = b["notes"]
        label = "%gM" % (n / 1e6) if n >= 1_000_000 else "%dk" % (n // 1000)
        row("%s" % label, "old-schema database (user_version 1), no index",
            "%.1f MB (%d notes, avg %.0f chars, inserted in %.1f s)"
            % (b["size_before"]["db+wal_mb"], n, b["avg_chars"], b["insert_s"]))
        row(label, "first start (runs migrations 2 and 3)", "%.3f s" % b["start1_s"])
        row(label, "index built in the background after it",
            ("%.1f s" % b["index_catchup_s"] if b["index_catchup_s"] is not None
             else "not within %d s" % cfg["big_catchup_s"]) + "; " + during(b))
        sa = b["size_after"]
        row(label, "size with the index (stopped: db + wal)",
            "%.1f MB (x%.2f; wal %d bytes)" % (sa["db+wal_mb"],
                                               sa["db+wal_mb"] / b["size_before"]["db+wal_mb"],
                                               sa["db-wal"]))
        row(label, "second start", "%.3f s" % b["start2_s"], "start2", b["start2_s"] <= 1.0)
        row(label, "  three more starts", " / ".join("%.3f s" % x for x in b["start_more_s"]))
        row(label, "  start of an empty store (reference)",
            " / ".join("%.3f s" % x for x in b["start_empty_s"]))
        cats = b["alone"]["by_category"]
        row(label, "  searches alone, p99 by category", ", ".join(
            "%s %.1f ms" % (c, cats[c]["p99_ms"]) for c in CATEGORIES if c in cats))
        v = cats["all"]
        row(label, "unique words / 100 searches alone",
            "%d/%d exact; p50 %.2f, p99 %.2f, max %.2f ms; %s"
            % (b["exact"]["exact"], b["exact"]["checked"], v["p50_ms"], v["p99_ms"], v["max_ms"],
               fmt_counts(b["alone"]["statuses"])))
    return rows


def fmt_counts(d):
    return " ".join("%s:%s" % (k, d[k]) for k in sorted(d, key=str))


def fmt_slowest(s):
    return "%s %.1f ms" % (s["command"], s["ms"]) if s else "-"


def render(rows):
    head = ("", "measure", "value", "target", "result")
    cells = [(r["section"], r["what"], r["value"], r["target"], r["result"]) for r in rows]
    widths = [max(len(str(c[i])) for c in [head] + cells) for i in range(len(head))]
    lines = []
    for i, c in enumerate([head] + cells):
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(c, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Issue 13's targets: search and the command budget.")
    ap.add_argument("--notes", type=int, help="notes filled through the API (default 300000, "
                    "--quick 30000)")
    ap.add_argument("--big", type=int, help="notes of the old-schema database (default 1000000, "
                    "--quick 100000; 0 skips it)")
    ap.add_argument("--notesd", default=os.path.join(ROOT, "notesd.py"), metavar="PATH")
    ap.add_argument("--quick", action="store_true", help="smoke run, a few minutes")
    ap.add_argument("--json", default=DEFAULT_JSON, metavar="FILE")
    ap.add_argument("--quiet-build", action="store_true",
                    help="build the big database's index with no probers (an idle loop)")
    ap.add_argument("--big-only", action="store_true",
                    help="only the big database (3.), not the fill and the storm")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL, quiet_build=args.quiet_build,
               big_only=args.big_only)
    if args.notes is not None:
        cfg["notes"] = args.notes
    if args.big is not None:
        cfg["big"] = args.big
    notesd_script = rb.preflight("search.py", args.notesd)
    if notesd_script is None:
        return 2
    out = {"meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                    "config": cfg, "notesd_script": notesd_script,
                    "git_head": rb.git_head(notesd_script), "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(),
                    "loadavg_before": os.getloadavg()}}
    keep, error = [], None
    tmp = tempfile.mkdtemp(prefix="notesd-search-")
    try:
        benchmark(cfg, out, tmp, notesd_script, keep)
    except KeyboardInterrupt:
        error = "interrupted"
        log("interrupted; cleaning up")
    except Exception as e:
        error = "%s: %s" % (type(e).__name__, e)
        log("ERROR " + error)
        for nd in keep:
            log("notesd log tail (%s):\n%s" % (nd.dir, nd.log_tail(1500)))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in list(rb.WRK_PROCS):
            if p.poll() is None:
                p.kill()
        for nd in keep:
            try:
                nd.cleanup()
            except Exception as e:
                log("cleanup of notesd in %s: %s" % (nd.dir, e))
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    meta = out["meta"]
    headline = ("notesd %s (%s), search benchmark%s: %d notes, storm %d s, big %d; "
                % (meta.get("notesd_version"), meta["git_head"], "  [--quick]" if args.quick else "",
                   cfg["notes"], cfg["storm_s"], cfg["big"]))
    return rb.report(args.json, out, summarize(out, cfg), error, headline, render)


if __name__ == "__main__":
    sys.exit(main())
