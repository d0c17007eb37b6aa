"""Helpers the lab and experiment scripts share: free ports, listening checks, a migshaper
child process and its control API. Standard library only.

Scripts import it by path relative to their own location:

    sys.path.insert(0, os.path.join(REPO, "scripts", "lib"))
    import migshaper_lab as lab

Shell scripts use its command line:

    python3 scripts/lib/migshaper_lab.py free-ports 2          # two free 127.0.0.1 ports
    python3 scripts/lib/migshaper_lab.py wait-listening 127.0.0.1 4444 --pid 1234 --timeout 5
"""

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


class LabError(Exception):
    """A lab step failed; the message says which and why."""


def free_ports(n):
    """n distinct TCP ports free on 127.0.0.1 (all bound at once, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port():
    return free_ports(1)[0]


def listening(host, port, pid=None):
    """True if a TCP socket listens on host:port (or on the wildcard), per /proc/net/tcp{,6}
    (with `pid`: /proc/PID/net/tcp{,6}, the network namespace of that process). Never
    connects: a probe connection to a migration listener would be taken for the migration
    stream."""
    want = set()
    try:
        ip = socket.gethostbyname(host)
        want.add(socket.inet_aton(ip)[::-1].hex().upper())  # /proc/net/tcp: little-endian
    except OSError:
        pass
    want.add("00000000")
    base = f"/proc/{pid}/net" if pid else "/proc/net"
    for path in (f"{base}/tcp", f"{base}/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    addr, hexport = fields[1].rsplit(":", 1)
                    if fields[3] != "0A" or int(hexport, 16) != port:
                        continue
                    if path.endswith("6"):
                        return True  # v6 (or v4-mapped/wildcard) listener on that port
                    if addr in want:
                        return True
        except OSError:
            pass
    return False


def wait_listening(host, port, timeout=10.0, alive=None, pid=None):
    """Waits until something listens on host:port (see listening(); `pid`: in that process's
    network namespace). False if `timeout` seconds pass first, or if alive() (the process
    expected to listen) turns false. /proc offers no notification, so this polls every
    50 ms."""
    deadline = time.time() + timeout
    while not listening(host, port, pid):
        if time.time() > deadline or (alive is not None and not alive()):
            return False
        time.sleep(0.05)
    return True


def die_with_parent():
    """preexec_fn: the child gets SIGKILL if the script that started it dies (even by
    SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def http_json(url, method="GET", body=None, token=None, timeout=10):
    """One request to migshaper's control API; the JSON answer. `token` defaults to
    $MIGSHAPER_CONTROL_TOKEN, as for the CLI. LabError if the API refuses or is out of
    reach."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token = token or os.environ.get("MIGSHAPER_CONTROL_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise LabError(f"migshaper {method} {url}: {e.code} {e.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as e:
        raise LabError(f"migshaper control API {url}: {e}")


def start_migshaper(binary, serve_args, log_path, timeout=10.0, preexec_fn=None):
    """Starts `BINARY --log-format json serve SERVE_ARGS` and waits for its listening lines.

    SERVE_ARGS should give the control API a free port (`--control 127.0.0.1:0`); it must not
    be off: its "control API listening" line, which comes after every route's "listening"
    line, is what this waits for. The log goes to log_path,
    copied line by line by a thread. Returns (process, first route's address, control URL);
    LabError if it exits or stays silent for `timeout` seconds."""
    cmd = [binary, "--log-format", "json", "serve", *serve_args]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, preexec_fn=preexec_fn)
    found = {}
    ready = threading.Event()

    def copy_log():
        with open(log_path, "wb") as out:
            for raw in p.stderr:
                out.write(raw)
                out.flush()
                if ready.is_set():
                    continue
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if ev.get("message") == "listening":
                    found.setdefault("via", ev.get("listen"))
                elif ev.get("message") == "control API listening":
                    found["control"] = "http://" + ev.get("addr")
                    ready.set()
        ready.set()  # it exited

    threading.Thread(target=copy_log, daemon=True).start()
    ready.wait(timeout)
    if "control" in found:
        return p, found.get("via"), found["control"]
    try:
        rc = p.wait(1)  # its log ended: it is exiting
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise LabError(f"migshaper did not report its addresses; see {log_path}")
    raise LabError(f"migshaper exited with {rc}; see {log_path}")


def stop(proc, timeout):
    """SIGTERM (migshaper drains its connections), then SIGKILL after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv):
    ap = argparse.ArgumentParser(description="Lab helpers for shell scripts.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fp = sub.add_parser("free-ports", help="print N free 127.0.0.1 ports, space-separated")
    fp.add_argument("n", type=int)
    wl = sub.add_parser("wait-listening",
                        help="exit 0 once something listens on HOST PORT (never connects)")
    wl.add_argument("host")
    wl.add_argument("port", type=int)
    wl.add_argument("--pid", type=int, help="fail as soon as this process has exited")
    wl.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    if args.cmd == "free-ports":
        print(*free_ports(args.n))
        return 0

    def alive():
        try:
            with open(f"/proc/{args.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")  # an exited child its parent has not reaped yet

    if wait_listening(args.host, args.port, args.timeout, alive if args.pid else None):
        return 0
    if args.pid and not alive():
        print(f"process {args.pid} exited", file=sys.stderr)
    else:
        print(f"nothing listens on {args.host}:{args.port} after {args.timeout} s",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
