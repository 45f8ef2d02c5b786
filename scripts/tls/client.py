"""TLS client for scripts/tls-bench.sh (loopback only).

bulk PORT socks|raw BYTES TARGET_PORT   send BYTES inside TLS (SOCKS5 CONNECT to TARGET_PORT first with `socks`)
download PORT socks|raw BYTES TARGET_PORT
                                        receive BYTES inside TLS from a `source` target, then close
idle PORT socks|raw N TARGET_PORT tls|clear
                                        open N tunnels, print "open", hold them until stdin closes
"""
import os
import socket
import ssl
import struct
import sys
import time

CTX = ssl.create_default_context(cafile=os.environ["CA"])


def connect(port, socks, target, tls=True):
    s = socket.create_connection(("127.0.0.1", port))
    if tls:
        s = CTX.wrap_socket(s, server_hostname="localhost")
    if socks:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target))
        reply = b""
        while len(reply) < 10:
            reply += s.recv(10 - len(reply))
        assert reply[1] == 0, reply
    return s


cmd, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if cmd == "bulk":
    total, target = int(sys.argv[4]), int(sys.argv[5])
    s = connect(port, mode == "socks", target)
    chunk = b"x" * (256 * 1024)
    sent, t0 = 0, time.time()
    while sent < total:
        s.sendall(chunk)
        sent += len(chunk)
    s.close()
    print(f"{sent / (time.time() - t0) * 8 / 1e9:.2f}")
elif cmd == "download":
    total, target = int(sys.argv[4]), int(sys.argv[5])
    s = connect(port, mode == "socks", target)
    buf = bytearray(256 * 1024)
    got, t0 = 0, time.time()
    while got < total:
        n = s.recv_into(buf)
        if n == 0:
            break
        got += n
    elapsed = time.time() - t0
    s.close()
    assert got >= total, f"only {got} bytes arrived"
    print(f"{got / elapsed * 8 / 1e9:.2f}")
else:
    n, target, tls = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "tls"
    conns = []
    for _ in range(n):
        s = connect(port, mode == "socks", target, tls)
        s.sendall(b"ping")
        conns.append(s)
    print("open", flush=True)
    sys.stdin.read()
