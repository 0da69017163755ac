"""A small authoritative DNS server on a loopback port, for the DNS-host target tests.

Usage: dns_server.py ADDR PORT ZONE_FILE

ZONE_FILE is JSON, read again for every query so a test can change the answers while the
server runs: {"name.": {"A": ["127.0.0.1"], "AAAA": ["::1"], "ttl": 2}}. A name that is not
in the file gets NXDOMAIN; a known name without records of the asked type gets an empty
NOERROR answer. UDP only; every answer fits in 512 bytes for the few records a test uses.
Prints "ready" once bound. Only ever binds a loopback address.
"""

import ipaddress
import json
import socket
import struct
import sys

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1


def read_question(packet):
    """The question's name (lower case, with the final dot), type and its raw bytes."""
    labels = []
    i = 12
    while True:
        length = packet[i]
        if length == 0:
            i += 1
            break
        if length & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[i + 1 : i + 1 + length].decode("ascii").lower())
        i += 1 + length
    qtype, qclass = struct.unpack("!HH", packet[i : i + 4])
    return ".".join(labels) + ".", qtype, qclass, packet[12 : i + 4]


def answer(packet, zone_path):
    query_id, flags = struct.unpack("!HH", packet[:4])
    name, qtype, qclass, question = read_question(packet)
    with open(zone_path) as f:
        zone = json.load(f)
    entry = zone.get(name)
    rcode = 0 if entry is not None else 3
    records = []
    if entry is not None and qclass == CLASS_IN:
        ttl = int(entry.get("ttl", 60))
        if qtype == TYPE_A:
            records = [(TYPE_A, ttl, ipaddress.IPv4Address(a).packed) for a in entry.get("A", [])]
        elif qtype == TYPE_AAAA:
            records = [(TYPE_AAAA, ttl, ipaddress.IPv6Address(a).packed) for a in entry.get("AAAA", [])]
    # QR, AA, the client's RD, RA.
    reply_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
    out = struct.pack("!HHHHHH", query_id, reply_flags, 1, len(records), 0, 0) + question
    for rtype, ttl, data in records:
        # The name is a pointer to the question's (offset 12).
        out += struct.pack("!HHHIH", 0xC00C, rtype, CLASS_IN, ttl, len(data)) + data
    return out


def main():
    addr, port, zone_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if not ipaddress.ip_address(addr).is_loopback:
        sys.exit("refusing a non-loopback address")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    print("ready", flush=True)
    while True:
        packet, peer = sock.recvfrom(4096)
        try:
            sock.sendto(answer(packet, zone_path), peer)
        except (ValueError, IndexError, struct.error, OSError) as e:
            print(f"bad query from {peer}: {e}", flush=True)


if __name__ == "__main__":
    main()
