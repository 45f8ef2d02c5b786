"""Loopback target for scripts/tls-bench.sh: `sink` reads and discards, `hold` keeps every connection open,
`source` writes until the client goes away. Binds 127.0.0.1 on the given port (0: any) and prints the port."""
import socket
import sys
import threading

mode, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
held = []


def drain(c):
    while c.recv(1 << 20):
        pass
    c.close()


def pour(c):
    chunk = b"y" * (1 << 20)
    try:
        while True:
            c.sendall(chunk)
    except OSError:
        pass
    c.close()


while True:
    conn, _ = listener.accept()
    if mode == "hold":
        held.append(conn)
    elif mode == "source":
        threading.Thread(target=pour, args=(conn,), daemon=True).start()
    else:
        threading.Thread(target=drain, args=(conn,), daemon=True).start()
