"""Echo server and client scripts, run with ``python3 -c`` in containers and namespaces."""

ECHO_SERVER = """
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.create_server((host, port), reuse_port=False)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
"""``python3 -c ECHO_SERVER HOST PORT``: echoes every connection until it closes."""

ECHO_CLIENT = """
import socket, sys, time
payload = bytes(range(256)) * 4096  # 1 MiB
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
        s.sendall(payload[:16])
        got = b""
        while len(got) < 16:
            chunk = s.recv(16 - len(got))
            if not chunk:
                raise ConnectionError("closed before the echo")
            got += chunk
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
s.sendall(payload[16:])
s.shutdown(socket.SHUT_WR)
while len(got) < len(payload):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print(len(got), got == payload)
"""
"""``python3 -c ECHO_CLIENT PORT DEADLINE_S``: sends 1 MiB through PORT (retrying the connect
until the echo path is up, at most DEADLINE_S), prints the bytes got back and whether they
match."""
