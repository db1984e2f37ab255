#!/usr/bin/env python3
"""Runs a tungate variant on a TUN that this process made, as Android's VpnService or a
supervisor does: `tun_fd_parent.py BIN ARGS...` creates the TUN that `--tun NAME` names
(IFF_TUN | IFF_NO_PI), sets its `--mtu`, gives it the `--address` prefixes and brings it
up, then execs BIN with `--tun-fd FD` in place of `--tun NAME` (and `--offload off`: an
inherited TUN has no offload). For the namespace tests (NETNS_GATEWAY_WRAP)."""

import fcntl
import os
import struct
import subprocess
import sys

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    binary, args = sys.argv[1], sys.argv[2:]
    rest, name, mtu, addresses = [], None, "1500", []
    i = 0
    while i < len(args):
        flag = args[i]
        if flag in ("--tun", "--offload") and i + 1 < len(args):
            if flag == "--tun":
                name = args[i + 1]
            i += 2
            continue
        if flag == "--mtu" and i + 1 < len(args):
            mtu = args[i + 1]
        if flag == "--address" and i + 1 < len(args):
            addresses.append(args[i + 1])
        rest.append(flag)
        i += 1
    if name is None:
        sys.exit("tun_fd_parent.py: no --tun NAME among the arguments")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    subprocess.run(["ip", "link", "set", name, "mtu", mtu], check=True)
    for address in addresses:
        extra = ["nodad"] if ":" in address else []
        subprocess.run(["ip", "addr", "add", address, "dev", name, *extra], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    os.set_inheritable(fd, True)
    os.execv(binary, [binary, "--tun-fd", str(fd), "--offload", "off", *rest])


if __name__ == "__main__":
    main()
