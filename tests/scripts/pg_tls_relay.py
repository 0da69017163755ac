"""A PostgreSQL TLS relay that terminates TLS in the server's place, as a machine in the
middle would: it answers the client's SSLRequest with its own certificate, opens its own TLS
session to the real server and moves the decrypted bytes both ways unchanged.

Used by tests/postgres.rs to show that the server itself checks SCRAM channel binding: the
agent binds its login to the certificate it saw (the relay's), the server to its own, so a
login through the relay must fail while one without binding (md5) goes through.

usage: pg_tls_relay.py <server port> <certificate> <key>
Prints the port it listens on (127.0.0.1), then serves until killed.
"""

import socket
import ssl
import struct
import sys
import threading

SSL_REQUEST = struct.pack("!II", 8, 80877103)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def handle(client, server_port, server_ctx, client_ctx):
    try:
        if recv_exact(client, 8) != SSL_REQUEST:
            client.close()
            return
        client.sendall(b"S")
        front = server_ctx.wrap_socket(client, server_side=True)
        upstream = socket.create_connection(("127.0.0.1", server_port))
        upstream.sendall(SSL_REQUEST)
        if recv_exact(upstream, 1) != b"S":
            front.close()
            return
        back = client_ctx.wrap_socket(upstream)
    except (OSError, EOFError, ssl.SSLError):
        client.close()
        return
    threading.Thread(target=pump, args=(front, back), daemon=True).start()
    pump(back, front)


def main():
    server_port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    # The relay plays the attacker: it trusts whatever the server shows.
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=handle, args=(client, server_port, server_ctx, client_ctx), daemon=True
        ).start()


if __name__ == "__main__":
    main()
