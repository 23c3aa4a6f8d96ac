#!/usr/bin/env python3
"""bench/backup.py - what `notesd.py backup` costs the writers of a big database.

    python3 bench/backup.py [--notes N] [--notesd PATH] [--before S] [--after S]

Starts notesd through its real CLI in a fresh temp dir (as bench/run.py
does, whose Notesd class and grow_store() it uses), stops it, fills its
database with N notes (default 1,000,000) by inserting directly with sqlite3
into the table notesd created, and starts it again (timed: `start` runs
PRAGMA quick_check over the whole file). Then 8 writer threads POST notes
over HTTP, one keep-alive connection each, for --before seconds; `backup
DEST` runs; the writers go on for --after seconds more. Prints how long the
backup took and, before, during and after it, how many writes were
answered and how long the longest one waited for its reply. Checks the copy:
every note acknowledged before the backup began is in it, and no note that
was never acknowledged. Exit status 0, or 2 when the benchmark itself
failed. Everything it starts is stopped and the temp dir removed.
"""
import argparse
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import (NOTE_TEXT, BenchError, Notesd, grow_store, http_request,  # noqa: E402
                 log, split_url)

WRITERS = 8
HTTP_TIMEOUT = 60  # seconds: a stalled write is what we measure, not an error


class Writers:
    """WRITERS threads POSTing notes until stopped; each reply kept as
    (sent, answered, status, id), monotonic seconds."""

    def __init__(self, url):
        self.host, self.port, _ = split_url(url)
        self.stop = threading.Event()
        self.replies = [[] for _ in range(WRITERS)]
        self.errors = []
        self.threads = [threading.Thread(target=self._write, args=(k,), daemon=True)
                        for k in range(WRITERS)]
        for t in self.threads:
            t.start()

    def _write(self, k):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        i = 0
        try:
            while not self.stop.is_set():
                body = json.dumps({"text": "writer %d note %d: %s" % (k, i, NOTE_TEXT)})
                sent = time.monotonic()
                conn.request("POST", "/", body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                answered = time.monotonic()
                note = json.loads(data).get("id") if r.status == 201 else None
                self.replies[k].append((sent, answered, r.status, note))
                i += 1
        except Exception as e:  # reported, and the run fails
            self.errors.append("writer %d: %s: %s" % (k, type(e).__name__, e))
        finally:
            conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(HTTP_TIMEOUT + 5)
        return [reply for replies in self.replies for reply in replies]


def window(replies, start, end, overlapping=False):
    """Figures for the writes inside [start, end): answered in it, or with
    `overlapping`, any write that was waiting at some moment in it."""
    if overlapping:
        chosen = [r for r in replies if r[0] < end and r[1] > start]
    else:
        chosen = [r for r in replies if r[0] >= start and r[1] < end]
    waits = sorted((r[1] - r[0]) * 1000 for r in chosen)
    if not waits:
        return {"writes": 0}
    return {"writes": len(waits), "per_s": round(len(waits) / max(end - start, 1e-9)),
            "p50_ms": round(statistics.median(waits), 2),
            "p99_ms": round(waits[int(0.99 * (len(waits) - 1))], 2),
            "max_ms": round(waits[-1], 2),
            "non_201": sum(1 for r in chosen if r[2] != 201)}


def run_backup(nd, dest):
    """`backup DEST` with the same options bench/run.py's Notesd.cli gives
    every command; (seconds, notes it counted, its output)."""
    argv = [sys.executable, nd.script, "--listen", "127.0.0.1:0", "--state-dir", nd.dir,
            "--pidfile", nd.pidfile, "--log", nd.logfile, "--access-log", "no",
            "backup", dest]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, env=nd.env, timeout=600)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError("backup exited %d: %s%s" % (r.returncode, r.stdout, r.stderr))
    return seconds, int(r.stdout.rsplit(":", 1)[1].split()[0]), r.stdout.strip()


def check_copy(dest, replies, began, first_writer_id):
    """Every note acknowledged before the backup began is in the copy, and
    every writer's note in it was acknowledged."""
    acked = {r[3] for r in replies if r[2] == 201}
    before = {r[3] for r in replies if r[2] == 201 and r[1] < began}
    db = sqlite3.connect("file:%s?mode=ro" % dest, uri=True)
    try:
        ids = {row[0] for row in db.execute("SELECT id FROM notes WHERE id >= ?",
                                            (first_writer_id,))}
    finally:
        db.close()
    if before - ids:
        raise BenchError("%d notes acknowledged before the backup are not in it"
                         % len(before - ids))
    if ids - acked:
        raise BenchError("%d notes in the copy were never acknowledged" % len(ids - acked))
    return len(before), len(ids)


def benchmark(args, tmp):
    nd = Notesd(os.path.abspath(args.notesd), os.path.join(tmp, "state"))
    os.mkdir(nd.dir, 0o700)
    try:
        nd.start()  # makes the database; one note is grow_store's template
        status, _, body = http_request(nd.url, "POST", json.dumps({"text": NOTE_TEXT}).encode(),
                                       {"Content-Type": "application/json"})
        if status != 201:
            raise BenchError("POST / answered %d: %r" % (status, body[:200]))
        nd.stop()
        big = grow_store(nd.db, args.notes)
        log("database: %d notes (%d inserted in %.1f s), %.0f MB"
            % (big["count"], big["inserted"], big["insert_s"], os.path.getsize(nd.db) / 1e6))
        started = nd.start()
        log("start with %d notes, PRAGMA quick_check included: %.3f s" % (big["count"], started))

        writers = Writers(nd.url)
        time.sleep(args.before)
        dest = os.path.join(tmp, "backup.db")
        began = time.monotonic()
        seconds, counted, line = run_backup(nd, dest)
        ended = began + seconds
        log(line)
        time.sleep(args.after)
        replies = writers.finish()
        if writers.errors:
            raise BenchError("; ".join(writers.errors[:3]))
        before, in_copy = check_copy(dest, replies, began, big["count"] + 1)
        rows = [("before, %g s" % args.before, window(replies, began - args.before, began)),
                ("during the backup", window(replies, began, ended, overlapping=True)),
                ("after, %g s" % args.after, window(replies, ended, ended + args.after))]
        return {"notes": big["count"], "db_mb": round(os.path.getsize(nd.db) / 1e6),
                "start_s": round(started, 3), "backup_s": round(seconds, 3),
                "counted": counted, "copy_mb": round(os.path.getsize(dest) / 1e6),
                "acked_before": before, "writer_notes_in_copy": in_copy, "windows": rows}
    except Exception:
        log("notesd log tail:\n" + nd.log_tail(1500))
        raise
    finally:
        nd.cleanup()


def main(argv=None):
    ap = argparse.ArgumentParser(description="What a backup costs notesd's writers.")
    ap.add_argument("--notes", type=int, default=1_000_000, help="notes in the database")
    ap.add_argument("--notesd", default=os.path.join(os.path.dirname(HERE), "notesd.py"),
                    metavar="PATH", help="notesd.py to benchmark (default: the one in the repo)")
    ap.add_argument("--before", type=float, default=5.0, metavar="S",
                    help="seconds of writes before the backup (default 5)")
    ap.add_argument("--after", type=float, default=5.0, metavar="S",
                    help="seconds of writes after it (default 5)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="notesd-bench-backup-")
    try:
        res = benchmark(args, tmp)
    except (BenchError, OSError, sqlite3.Error, subprocess.SubprocessError) as e:
        print("backup.py: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("notesd backup of %d notes (%d MB) while %d writers POST, load avg %.2f"
          % (res["notes"], res["db_mb"], WRITERS, os.getloadavg()[0]))
    print("start (with PRAGMA quick_check): %.3f s" % res["start_s"])
    print("backup: %.3f s for the whole command (copy %d MB, %d notes counted); "
          "all %d notes acknowledged before it began are in the copy, and only "
          "acknowledged ones (%d writers' notes in it)"
          % (res["backup_s"], res["copy_mb"], res["counted"], res["acked_before"],
             res["writer_notes_in_copy"]))
    print("%-20s %8s %8s %9s %9s %9s %8s" % ("writes", "answered", "per s", "p50 ms",
                                             "p99 ms", "max ms", "non-201"))
    for name, w in res["windows"]:
        print("%-20s %8d %8s %9s %9s %9s %8s"
              % (name, w["writes"], w.get("per_s", "-"), w.get("p50_ms", "-"),
                 w.get("p99_ms", "-"), w.get("max_ms", "-"), w.get("non_201", "-")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
