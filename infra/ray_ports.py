"""Prints N distinct free TCP ports on 127.0.0.1, space-separated (used by ray_up.sh).

All N sockets stay bound until the numbers are printed, so the kernel hands out N different ports.
A port can still be taken by someone else between this and Ray binding it; ray_up.sh then fails
with Ray's own "address in use" message rather than joining someone else's service.
"""

from __future__ import annotations

import socket
import sys


def free_ports(count: int) -> list[int]:
    """`count` distinct ports the kernel reports free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: ray_ports.py COUNT  (COUNT a positive integer)", file=sys.stderr)
        return 2
    print(" ".join(str(port) for port in free_ports(int(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
