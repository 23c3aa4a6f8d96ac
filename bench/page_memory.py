#!/usr/bin/env python3
"""bench/page_memory.py - peak RSS of notesd serving a page of large notes.

    python3 bench/page_memory.py [--notesd PATH] [--notes 40] [--size 1048576]
                                 [--limit 40] [--char 0x01]

Issue 9, item 4: a note of 1 MiB of control characters is 6 MiB of JSON
(json.dumps writes \\u0001), so GET /?limit=40 over 40 of them built a reply
of 240 MiB. This starts notesd through its real CLI (temp state dir, port 0),
stops it, puts the notes straight into its database with sqlite3 (as notes
from before notesd refused control characters would be), starts it again and
reads the daemon's VmHWM (peak RSS, /proc/PID/status) before and after one
GET /?limit=N, then after following its Link headers to the end. Prints the
figures; run it against an older notesd.py with --notesd to compare.
Stdlib only; everything it starts is stopped, the temp dir removed.
"""
import argparse
import http.client
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
NOTESD = os.path.join(os.path.dirname(HERE), "notesd.py")


def cli(args, directory, *command):
    argv = [sys.executable, args.notesd, "--state-dir", directory, "--listen", "127.0.0.1:0",
            "--pidfile", os.path.join(directory, "notesd.pid"), "--access-log", "no",
            "--log", os.path.join(directory, "notesd.log"), *command]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {r.stderr}")


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def get(url):
    """(body length, next URL or None) of one GET; the body is read and dropped."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        connection.request("GET", parts.path + "?" + parts.query,
                           headers={"Accept": "application/json"})
        response = connection.getresponse()
        length = len(response.read())
        link = re.fullmatch(r'<([^>]+)>; rel="next"', response.getheader("Link") or "")
        return length, link and link.group(1)
    finally:
        connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notesd", default=NOTESD)
    parser.add_argument("--notes", type=int, default=40)
    parser.add_argument("--size", type=int, default=1 << 20, help="characters a note")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--char", type=lambda t: chr(int(t, 0)), default="0x01")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="notesd-page-memory-")
    try:
        cli(args, directory, "start")
        cli(args, directory, "stop")
        with sqlite3.connect(os.path.join(directory, "notes.db")) as db:
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
            db.executemany("INSERT INTO notes (text, created, updated) VALUES (?, ?, ?)",
                           [(args.char * args.size, now, now)] * args.notes)
        cli(args, directory, "start")
        with open(os.path.join(directory, "notesd.pid")) as f:
            pid = int(f.read())
        with open(os.path.join(directory, "notesd.url")) as f:
            base = f.read().strip()
        before = peak_rss(pid)
        length, following = get(f"{base}?limit={args.limit}")
        first = peak_rss(pid)
        pages, total = 1, length
        while following:
            size, following = get(following)
            pages, total = pages + 1, total + size
        mib = 1 << 20
        print(f"{args.notesd}: {args.notes} notes of {args.size} x U+{ord(args.char):04X}, "
              f"GET /?limit={args.limit}")
        print(f"  peak RSS before {before / mib:.1f} MiB; after the first page "
              f"{first / mib:.1f} MiB (+{(first - before) / mib:.1f}), reply "
              f"{length / mib:.1f} MiB")
        print(f"  all {pages} pages, {total / mib:.1f} MiB: peak RSS "
              f"{peak_rss(pid) / mib:.1f} MiB")
    finally:
        subprocess.run([sys.executable, args.notesd, "--state-dir", directory, "--pidfile",
                        os.path.join(directory, "notesd.pid"), "stop", "--force"],
                       capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
