"""Records real PostgreSQL sessions and cuts them into fuzz seeds.

A throwaway PostgreSQL 15 (SCRAM, no TLS) on a loopback port; a recording relay in front of it;
psql, pgbench, pg_dump and tokio-postgres (tests' portcullis-pgclient, extended protocol with
binary results) talk to the relay. Each connection's client-to-server and server-to-client
bytes are cut at message boundaries into small files:

  pgwire/fuzz/seeds/startup/      the first message of each connection (SSLRequest, StartupMessage)
  pgwire/fuzz/seeds/frontend/     client messages after start-up, up to ~4 KB per file
  pgwire/fuzz/seeds/backend/      server messages (after the SSL answer), up to ~4 KB per file
  pgwire/fuzz/seeds/copy_binary/  binary COPY payloads (header, tuples, trailer) from COPY TO
  audit-store/fuzz/seeds/segment_reader/  segments of a real agent's audit store, if given

Run as root from the repository root (the server runs as `postgres`):
  python3 tests/scripts/make_fuzz_seeds.py [--pgclient target/debug/portcullis-pgclient]
      [--segments <state_dir>/audit]
Existing seeds of these targets are replaced. The output depends on timing and random salts,
so the files differ between runs; what matters is that they are real traffic.
"""

import argparse
import glob
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

PASSWORD = "seed-secret"
MAX_SEED = 4096
MAX_FILES = 48


def pg_bin():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not dirs:
        raise SystemExit("no PostgreSQL under /usr/lib/postgresql: run `cargo xtask setup`")
    return dirs[-1]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="portcullis-seeds-")
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        pw = os.path.join(self.dir, "pw")
        with open(pw, "w") as f:
            f.write(PASSWORD)
        shutil.chown(pw, "postgres", "postgres")
        self.as_postgres(
            "initdb", "-D", self.data, "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "--no-sync", f"--pwfile={pw}",
        )
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
            )
        self.as_postgres(
            "pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "start"
        )

    def as_postgres(self, program, *args):
        subprocess.run(
            ["runuser", "-u", "postgres", "--", os.path.join(pg_bin(), program), *args],
            check=True, stdout=subprocess.DEVNULL,
        )

    def stop(self):
        self.as_postgres("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class Relay:
    """Forwards loopback connections to the server and keeps each one's two byte streams."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.sessions = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            session = {"c2s": bytearray(), "s2c": bytearray(), "done": threading.Event()}
            with self.lock:
                self.sessions.append(session)
            threading.Thread(
                target=self.pump, args=(client, upstream, session["c2s"], None), daemon=True
            ).start()
            threading.Thread(
                target=self.pump, args=(upstream, client, session["s2c"], session["done"]),
                daemon=True,
            ).start()

    @staticmethod
    def pump(src, dst, record, done):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if done:
            done.set()

    def take(self):
        time.sleep(0.3)
        with self.lock:
            sessions, self.sessions = self.sessions, []
        for s in sessions:
            s["done"].wait(5)
        return sessions


def startup_messages(c2s):
    """The untagged messages at the start of a client stream (SSLRequest, then start-up)
    and the offset where tagged messages begin."""
    out, at = [], 0
    while at + 8 <= len(c2s):
        length, code = struct.unpack("!II", c2s[at:at + 8])
        out.append(bytes(c2s[at:at + length]))
        at += length
        if code not in (80877103, 80877104):  # SSLRequest, GSSENCRequest: another follows
            break
    return out, at


def tagged(stream, at):
    """Complete tagged messages (tag, length, body) from `at`."""
    msgs = []
    while at + 5 <= len(stream):
        length = struct.unpack("!I", stream[at + 1:at + 5])[0]
        if at + 1 + length > len(stream):
            break
        msgs.append(bytes(stream[at:at + 1 + length]))
        at += 1 + length
    return msgs


def chunks(msgs):
    """Consecutive messages grouped into pieces of at most MAX_SEED bytes (a larger single
    message is cut off: a prefix is still a useful seed)."""
    out, cur = [], b""
    for m in msgs:
        if cur and len(cur) + len(m) > MAX_SEED:
            out.append(cur)
            cur = b""
        cur += m[:MAX_SEED]
    if cur:
        out.append(cur)
    return out


def copy_payloads(s2c, at):
    """Each COPY OUT's payload (its CopyData contents joined), from a server stream."""
    payloads, current = [], None
    for m in tagged(s2c, at):
        tag = m[:1]
        if tag == b"H":
            current = b""
        elif tag == b"d" and current is not None:
            current += m[5:]
        elif tag == b"c" and current is not None:
            payloads.append(current)
            current = None
    return payloads


class Seeds:
    def __init__(self, root):
        self.root = root
        self.files = {}

    def reset(self, target, base):
        path = os.path.join(self.root, base, "seeds", target)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        self.files[target] = (path, set())

    def add(self, target, data, label):
        path, seen = self.files[target]
        digest = hashlib.sha256(data).hexdigest()[:12]
        if digest in seen or len(seen) >= MAX_FILES or not data:
            return
        seen.add(digest)
        with open(os.path.join(path, f"{label}-{digest}"), "wb") as f:
            f.write(data)


def run(cmd, port, env_extra=None, stdin=None, check=True):
    env = dict(os.environ, PGPASSWORD=PASSWORD, PGHOST="127.0.0.1", PGPORT=str(port),
               PGUSER="postgres", PGSSLMODE="prefer")
    env.update(env_extra or {})
    subprocess.run(cmd, env=env, check=check, input=stdin, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pgclient", default="target/debug/portcullis-pgclient")
    ap.add_argument("--segments", help="an agent's audit directory (segment-* files)")
    args = ap.parse_args()
    root = os.getcwd()
    server = Server()
    try:
        record(args, root, server)
    finally:
        server.stop()


def record(args, root, server):
    relay = Relay(server.port)
    seeds = Seeds(root)
    for t in ("startup", "frontend", "backend", "copy_binary"):
        seeds.reset(t, "pgwire/fuzz")
    b = pg_bin()
    p = relay.port
    workloads = [
        ("psql", lambda: run([f"{b}/psql", "-X", "-d", "postgres", "-c",
                              "CREATE TABLE IF NOT EXISTS t (id int, name text, n numeric, at timestamptz, b bytea, a int[]);"
                              "INSERT INTO t SELECT i, 'name ' || i, i / 3.0, now(), '\\x00ff', ARRAY[i, NULL]"
                              " FROM generate_series(1, 20) i;"
                              "SELECT * FROM t ORDER BY id LIMIT 5;", "-c", "SELECT 1/0",
                              "-c", "BEGIN; SAVEPOINT s; SELECT pg_notify('c', 'p'); ROLLBACK TO s; COMMIT;"],
                             p, check=False)),
        ("psql-copy", lambda: run([f"{b}/psql", "-X", "-d", "postgres",
                                   "-c", "\\copy t TO STDOUT WITH (FORMAT binary)",
                                   "-c", "\\copy (SELECT id, name, a FROM t WHERE id < 4) TO STDOUT WITH (FORMAT binary)",
                                   "-c", "\\copy t TO STDOUT WITH (FORMAT csv, HEADER)",
                                   "-c", "\\copy t (id, name) FROM STDIN"], p,
                                  stdin=b"100\tcopied in\n101\t\\N\n\\.\n")),
        ("pgbench-init", lambda: run([f"{b}/pgbench", "-i", "-s", "1", "-q", "postgres"], p)),
        ("pgbench-simple", lambda: run([f"{b}/pgbench", "-t", "3", "-M", "simple", "postgres"], p)),
        ("pgbench-extended", lambda: run([f"{b}/pgbench", "-t", "3", "-M", "extended", "postgres"], p)),
        ("pgbench-prepared", lambda: run([f"{b}/pgbench", "-t", "3", "-M", "prepared", "postgres"], p)),
        ("pg_dump", lambda: run([f"{b}/pg_dump", "-Fc", "-t", "t", "-t", "pgbench_branches", "postgres"], p)),
    ]
    if os.path.exists(args.pgclient):
        url = f"host=127.0.0.1 port={p} user=postgres password={PASSWORD} dbname=postgres sslmode=disable"
        workloads.append(("tokio-postgres", lambda: subprocess.run(
            [args.pgclient, url, "SELECT id, name, n, a FROM t WHERE id < 3",
             "SELECT count(*) FROM pgbench_accounts", "DELETE FROM nowhere"],
            check=False, stdout=subprocess.DEVNULL)))
    for label, work in workloads:
        work()
        for s in relay.take():
            first, at = startup_messages(s["c2s"])
            for m in first:
                seeds.add("startup", m, label)
            for piece in chunks(tagged(s["c2s"], at))[:6]:
                seeds.add("frontend", piece, label)
            # The server answers an SSLRequest with one byte before its messages.
            s2c_at = 1 if first and len(first[0]) == 8 else 0
            for piece in chunks(tagged(s["s2c"], s2c_at))[:6]:
                seeds.add("backend", piece, label)
            for payload in copy_payloads(s["s2c"], s2c_at):
                if payload.startswith(b"PGCOPY\n\xff\r\n\x00"):
                    seeds.add("copy_binary", payload[:MAX_SEED], label)
    if args.segments:
        seeds.reset("segment_reader", "audit-store/fuzz")
        for seg in sorted(glob.glob(os.path.join(args.segments, "segment-*"))):
            with open(seg, "rb") as f:
                data = f.read()
            # Whole lines only, so a cut seed is a torn segment, not a torn record.
            cut = data[:MAX_SEED]
            if len(data) > MAX_SEED and b"\n" in cut:
                cut = cut[:cut.rindex(b"\n") + 1]
            seeds.add("segment_reader", cut, "agent")
            if len(data) > MAX_SEED:
                tail = data[-MAX_SEED:]
                seeds.add("segment_reader", tail[tail.index(b"\n") + 1:], "agent-tail")
    for target, (path, seen) in sorted(seeds.files.items()):
        print(f"{path}: {len(seen)} seeds")


if __name__ == "__main__":
    main()
