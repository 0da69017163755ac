"""Statements and portals share the server's names with SQL: a SQL cursor is a portal, a
statement made with SQL PREPARE can be bound, and DEALLOCATE, CLOSE and the protocol's Close
free names for the other side to take. Speaks the protocol itself (no client library sends
these sequences) and prints what each step got back, labelled, for the test to read.

Usage: pg_shared_names.py PORT USER DATABASE (the test passes it to `python3 -c`)
"""
import socket
import struct
import sys

port, user, database = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].encode()
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(30)  # a reply that never comes fails the test instead of hanging it
body = struct.pack("!I", 196608) + b"user\0" + user + b"\0database\0" + database + b"\0\0"
s.sendall(struct.pack("!I", len(body) + 4) + body)


def until_ready():
    data = b""
    while not (len(data) >= 6 and data[-6:-1] == b"Z\0\0\0\x05"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def msg(tag, payload):
    return tag + struct.pack("!I", len(payload) + 4) + payload


def execute(portal):
    return msg(b"E", portal + b"\0" + struct.pack("!I", 0))


def bind(portal, statement):
    return msg(b"B", portal + b"\0" + statement + b"\0" + struct.pack("!hhh", 0, 0, 0))


def parse(statement, sql):
    return msg(b"P", statement + b"\0" + sql + b"\0" + struct.pack("!h", 0))


def query(sql):
    return msg(b"Q", sql + b"\0")


SYNC = msg(b"S", b"")


def values(data):
    """The values of the DataRows in `data`."""
    out, i = [], 0
    while i + 5 <= len(data):
        tag, n = data[i : i + 1], struct.unpack("!I", data[i + 1 : i + 5])[0]
        if tag == b"D":
            row, j = data[i + 5 : i + 1 + n], 2
            for _ in range(struct.unpack("!h", row[:2])[0]):
                size = struct.unpack("!i", row[j : j + 4])[0]
                j += 4
                out.append(None if size < 0 else row[j : j + size].decode())
                j += max(size, 0)
        i += 1 + n
    return out


until_ready()
# A SQL cursor run by the protocol's Execute.
s.sendall(query(b"BEGIN; DECLARE c CURSOR FOR SELECT card, note FROM customers"))
print("declared", until_ready())
s.sendall(msg(b"D", b"Pc\0") + execute(b"c") + SYNC)
print("executed", until_ready())
# A statement made with SQL PREPARE, bound by the protocol.
s.sendall(query(b"ROLLBACK; PREPARE p AS SELECT card, note FROM customers"))
print("prepared", until_ready())
s.sendall(bind(b"", b"p") + execute(b"") + SYNC)
print("bound", until_ready())
# A statement made with Parse, deallocated, its name taken by SQL PREPARE, bound again.
s.sendall(parse(b"q", b"SELECT 1") + SYNC)
print("parsed", until_ready())
s.sendall(query(b"DEALLOCATE q; PREPARE q AS SELECT card, note FROM customers"))
print("replaced", until_ready())
s.sendall(bind(b"", b"q") + execute(b"") + SYNC)
print("rebound", until_ready())
# A portal made with Bind, closed by SQL, its name taken by DECLARE, executed again.
s.sendall(query(b"BEGIN"))
until_ready()
s.sendall(parse(b"r", b"SELECT 1") + bind(b"c2", b"r") + SYNC)
print("bound c2", until_ready())
s.sendall(query(b"CLOSE c2; DECLARE c2 CURSOR FOR SELECT card, note FROM customers"))
print("redeclared", until_ready())
s.sendall(execute(b"c2") + SYNC)
print("reexecuted", until_ready())
# A statement made with SQL PREPARE, closed by the protocol, its name taken by Parse, run
# by SQL EXECUTE: what its columns are computed from is the new statement's, not the old.
s.sendall(query(b"ROLLBACK; PREPARE s1 AS SELECT 1 AS v"))
until_ready()
s.sendall(msg(b"C", b"Ss1\0") + SYNC)
until_ready()
s.sendall(parse(b"s1", b"SELECT length(email) FROM customers ORDER BY id") + SYNC)
until_ready()
s.sendall(query(b"EXECUTE s1"))
print("lengths", values(until_ready()))
# A cursor's name, freed when its transaction ended, taken by a portal made with Bind and
# read with SQL FETCH: masked by the portal's statement, not by the old cursor's query.
s.sendall(query(b"BEGIN; DECLARE k CURSOR FOR SELECT 1 AS v; COMMIT"))
until_ready()
s.sendall(query(b"BEGIN"))
until_ready()
s.sendall(parse(b"k1", b"SELECT length(email) FROM customers ORDER BY id") + bind(b"k", b"k1") + SYNC)
until_ready()
s.sendall(query(b"FETCH ALL FROM k"))
print("fetched lengths", values(until_ready()))
# A name that exists is not redefined: the server keeps the first statement and portal, and
# refuses the second.
s.sendall(query(b"ROLLBACK"))
until_ready()
s.sendall(parse(b"d1", b"SELECT 1") + SYNC)
until_ready()
s.sendall(parse(b"d1", b"SELECT card, note FROM customers") + SYNC)
print("reparsed", until_ready())
s.sendall(query(b"BEGIN"))
until_ready()
s.sendall(bind(b"pp", b"d1") + SYNC)
until_ready()
s.sendall(bind(b"pp", b"d1") + SYNC)
print("portal rebound", until_ready())
s.sendall(query(b"ROLLBACK"))
print("done", until_ready())
# A portal name reused behind a Sync not answered yet: the earlier portal may still exist
# (here it does, in the transaction block), and the agent cannot tell yet: refused.
s.sendall(query(b"BEGIN"))
until_ready()
s.sendall(bind(b"pq", b"d1") + SYNC + bind(b"pq", b"d1") + SYNC)
answers = until_ready()
while answers.count(b"Z\0\0\0\x05") < 2:
    answers += until_ready()
print("pipelined rebind", answers)
s.sendall(query(b"ROLLBACK"))
until_ready()
# A client that prepares without end meets the agent's budget for one session (10,000
# statements): refused with 54000, the session goes on, and closing one makes room.
s.sendall(b"".join(parse(b"n%d" % i, b"SELECT %d" % i) for i in range(10_000)) + SYNC)
answers = until_ready()
print("budget parsed", answers.count(b"1\0\0\0\x04"), "refused", b"C54000" in answers)
print("budget error", answers[answers.find(b"E\0"):])
s.sendall(msg(b"C", b"Sn0\0") + parse(b"again", b"SELECT 1") + SYNC)
print("budget after close", until_ready())
s.sendall(query(b"SELECT 1"))
print("end", until_ready())


# A setting the server reports (ParameterStatus) set from a masked column: withheld.
s.sendall(query(b"SELECT set_config('application_name', email, false) FROM customers ORDER BY id LIMIT 1"))
print("reported setting", until_ready())
# A notification the session sends itself from a masked column, delivered at commit.
s.sendall(query(b"LISTEN c"))
until_ready()
s.sendall(query(b"BEGIN; SELECT pg_notify('c', email) FROM customers ORDER BY id LIMIT 1"))
until_ready()
s.sendall(query(b"COMMIT"))
print("notification", until_ready())


def function_call(oid, args, result_format):
    body = struct.pack("!IhhH", oid, 1, 0, len(args))
    for a in args:
        body += struct.pack("!I", len(a)) + a
    return msg(b"F", body + struct.pack("!h", result_format))


# The fast-path function call runs a function by OID, outside SQL: its result is masked like
# a computed column's (content detectors), in text format; in binary format, where the type
# is not known, a detected value ends the session instead of passing.
s.sendall(query(b"SELECT 'query_to_xml(text,boolean,boolean,text)'::regprocedure::oid"))
oid = int(values(until_ready())[0])
leak = [b"SELECT card FROM customers ORDER BY id", b"true", b"false", b""]
s.sendall(function_call(oid, leak, 0))
print("function call", until_ready())
# A policy that forbids a function by name applies to the fast-path call of it by OID.
s.sendall(query(b"SELECT 'to_ascii(text)'::regprocedure::oid"))
to_ascii = int(values(until_ready())[0])
s.sendall(function_call(to_ascii, [b"x"], 0))
print("forbidden function call", until_ready())
s.sendall(function_call(oid, leak, 1))
answers = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    answers += chunk
print("binary function call", answers)
