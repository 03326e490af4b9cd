"""Deepen the accept backlog of a child broker's listening sockets.

Mosquitto 2.0.11 listens with a backlog of 100 and has no setting for it. When thousands of devices
reconnect at once (a site's Wi-Fi or VPN comes back), SYNs beyond those 100 are dropped and each dropped
device waits for TCP's 1, 3, 7 s SYN retransmits. Linux lets any holder of a listening socket call
listen() again to change its backlog, and pidfd_getfd(2) (Linux 5.6) lets a parent take a copy of its
child's socket: so intrapush raises the backlog of the child's own sockets, up to net.core.somaxconn.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket

log = logging.getLogger("appliance.broker")

ACCEPT_BACKLOG = 4096  # what every device listener asks for; the kernel caps it at net.core.somaxconn
SYS_PIDFD_GETFD = 438  # the same number on x86-64 and arm64
TCP_LISTEN = "0A"


def _listening_inodes(ports: set[int]) -> set[str]:
    """Socket inodes of every TCP socket listening on one of `ports` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def deepen_backlog(pid: int, ports: list[int], backlog: int = ACCEPT_BACKLOG) -> int:
    """listen(backlog) again on process `pid`'s sockets listening on `ports`; returns how many. Raises
    OSError when the kernel refuses (no pidfd_getfd, or no ptrace right over the process)."""
    pidfd = os.pidfd_open(pid)
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    wanted = _listening_inodes(set(ports))
    done = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue  # closed meanwhile
            if not (target.startswith("socket:[") and target[8:-1] in wanted):
                continue
            fd = syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                code = ctypes.get_errno()
                raise OSError(code, f"pidfd_getfd: {os.strerror(code)}")
            sock = socket.socket(fileno=fd)
            try:
                sock.listen(backlog)
                done += 1
            finally:
                sock.close()  # our copy only: the child keeps its own
    finally:
        os.close(pidfd)
    return done


def try_deepen_backlog(pid: int, ports: list[int], backlog: int = ACCEPT_BACKLOG) -> None:
    """deepen_backlog(), logging instead of raising: a shallow backlog slows a storm, it breaks nothing."""
    try:
        count = deepen_backlog(pid, ports, backlog)
    except (OSError, AttributeError) as exc:  # AttributeError: os.pidfd_open needs Linux
        reason = "not permitted" if getattr(exc, "errno", None) in (errno.EPERM, errno.EACCES) else str(exc)
        log.warning("event=backlog_unchanged pid=%d backlog=100 reason=%r note=%r", pid, reason,
                    "thousands of simultaneous reconnects will wait for SYN retransmits")
        return
    log.info("event=backlog_deepened pid=%d sockets=%d backlog=%d", pid, count, backlog)
