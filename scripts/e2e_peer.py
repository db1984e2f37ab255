#!/usr/bin/env python3
"""Kernel-socket peers for tungate's namespace tests: servers run in the "server"
namespace, clients in the "client" namespace, so every byte crosses the gateway.

Servers print "listening" once bound (the harness waits for that line) and serve
until killed. Clients exit 0 on success and print one line of evidence; on a
mismatch they print the reason and exit 1.

  serve-sink HOST PORT      TCP: read to EOF, answer the hex SHA-256, close
  serve-source HOST PORT    TCP: read "N\\n", send N bytes of stream(N), close
  serve-sink-counted HOST PORT  TCP: read "N\\n" then N bytes, answer the hex SHA-256 (no FIN needed)
  serve-udp-echo HOST PORT  UDP: echo every datagram to its sender
  serve-udp-whoami HOST PORT  UDP: answer every datagram with its sender's port
  serve-whoami HOST PORT      TCP: send "peer ADDRESS\\n" (the connection's source), close
  whoami HOST PORT            TCP: print the line the whoami server sends
  soak HOST PORT UDPPORT RESOLVER SECONDS
                            mixed load (bulk, short connections, UDP, DNS by fake-IP)
  session-limit HOST PORT UDPPORT N KEEP
                            through a gateway with --max-sessions KEEP: N connections to
                            an echo server and N UDP sessions to a whoami server; the
                            least recently active past KEEP are reset/closed, the rest kept
  serve-http DIR HOST PORT  HTTP/1.1 file server (GET)
  upload HOST PORT N        send stream(N), half-close, compare the server's digest
  upload-counted HOST PORT N  send "N\\n" + stream(N) without half-close, compare the digest
  download HOST PORT N      request N bytes, compare length and digest with stream(N)
  udp HOST PORT COUNT       COUNT datagrams; each echo must match and come from HOST:PORT
  refused HOST PORT         connect must be refused (RST) within 1 s
  reset HOST PORT           connect may succeed, then the connection must be reset (RST)
                            within 1 s (a capture that completes handshakes itself)
  serve-slow-sink HOST PORT RATE  TCP: read at most RATE bytes/s until EOF (a slow upstream)
  serve-slow-source HOST PORT RATE  as serve-source, at about RATE bytes/s
  udp-refused HOST PORT     a datagram to a closed UDP port must fail the connected
                            socket's receive with ECONNREFUSED within 3 s
  push HOST PORT N SECONDS  send up to N bytes for at most SECONDS, print "pushed B bytes"
  serve-echo HOST PORT      TCP (asyncio, thousands of connections): echo until EOF, close
  many HOST PORT N SIZE     open N connections at once; on each send SIZE bytes of its own
                            pattern and check the echo by digest; print "ready N" with all
                            N open, wait for a line on stdin, then close all and check each
                            sees EOF; print "ok many N"
  hold HOST PORT N SIZE     as many, but for measurements: failures are counted, not
                            fatal; prints "ready OPENED FAILED", then "ok hold N ..."
  sequential HOST PORT N    N connections one after another: send 32 bytes of its own,
                            check the echo, close first; print "ok sequential N"
  churn HOST PORT N C       N short connections, C at a time: each sends 32 bytes of its
                            own, checks the echo and closes first; print "ok churn N", or
                            how many were refused, reset, timed out or echoed wrong
  serve-answer-close HOST PORT  TCP (asyncio): read a 32-byte request, answer it with
                            the request and 1 KiB of its own pattern, then close first
  churn-server-closes HOST PORT N C  as churn against serve-answer-close: each request
                            reads the answer to EOF (the server closes first), checks it;
                            fails if any failed or took over 1 s ("slowest" in the line)
"""
import asyncio
import functools
import hashlib
import http.server
import random
import resource
import socket
import socketserver
import sys
import time

CHUNK = 1 << 20


def stream(n):
    """The deterministic byte stream of length n, in chunks."""
    rng = random.Random(n)
    left = n
    while left > 0:
        k = min(CHUNK, left)
        yield rng.randbytes(k)
        left -= k


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, handler):
        self.address_family = family(addr[0])
        super().__init__(addr, handler)


class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        h = hashlib.sha256()
        while True:
            b = self.request.recv(CHUNK)
            if not b:
                break
            h.update(b)
        self.request.sendall(h.hexdigest().encode())
        self.request.shutdown(socket.SHUT_WR)


class SinkCounted(socketserver.BaseRequestHandler):
    def handle(self):
        line = read_line(self.request)
        if line is None:
            return
        left = int(line)
        h = hashlib.sha256()
        while left > 0:
            b = self.request.recv(min(CHUNK, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
        self.request.sendall(h.hexdigest().encode())


def read_line(sock):
    """The request line (a length) a client sends first, byte by byte so that nothing after
    it is consumed; None if the client closed first."""
    line = b""
    while not line.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            return None
        line += b
    return line


class Source(socketserver.BaseRequestHandler):
    def handle(self):
        line = read_line(self.request)
        if line is None:
            return
        for chunk in stream(int(line)):
            self.request.sendall(chunk)
        self.request.shutdown(socket.SHUT_WR)


def listening():
    print("listening", flush=True)


def serve_tcp(host, port, handler):
    srv = Server((host, int(port)), handler)
    listening()
    srv.serve_forever()


def serve_udp_echo(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    listening()
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def serve_http(directory, host, port):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    http.server.ThreadingHTTPServer.address_family = family(host)
    srv = http.server.ThreadingHTTPServer((host, int(port)), handler)
    listening()
    srv.serve_forever()


class Banner(socketserver.BaseRequestHandler):
    """A server that speaks first (as SMTP does): a banner line, then an echo of one line."""

    def handle(self):
        self.request.sendall(b"220 banner.test ready\r\n")
        line = self.request.recv(256)
        self.request.sendall(b"250 " + line)


def banner(host, port, max_seconds):
    """Connects, sends nothing, and waits for the server's banner; fails if it takes
    longer than max_seconds. Then one line each way."""
    t = time.monotonic()
    s = connect(host, port)
    first = s.recv(256)
    waited = time.monotonic() - t
    if first != b"220 banner.test ready\r\n":
        fail(f"banner: got {first!r}")
    if waited > float(max_seconds):
        fail(f"banner after {waited:.3f}s, more than {max_seconds}s")
    s.sendall(b"HELO x\r\n")
    reply = s.recv(256)
    if reply != b"250 HELO x\r\n":
        fail(f"banner: reply {reply!r}")
    print(f"ok banner after {waited * 1000:.0f} ms", flush=True)


def connect(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect((host, int(port)))
    return s


def fail(msg):
    print("FAIL " + msg, flush=True)
    sys.exit(1)


def upload(host, port, n):
    n = int(n)
    s = connect(host, port)
    h = hashlib.sha256()
    t = time.monotonic()
    for chunk in stream(n):
        h.update(chunk)
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        b = s.recv(256)
        if not b:
            break
        answer += b
    if answer.decode(errors="replace") != h.hexdigest():
        fail(f"upload of {n} bytes: server digest {answer!r} != {h.hexdigest()}")
    print(f"ok upload {n} bytes sha256={h.hexdigest()} in {time.monotonic() - t:.2f}s", flush=True)


def upload_counted(host, port, n):
    n = int(n)
    s = connect(host, port)
    h = hashlib.sha256()
    t = time.monotonic()
    s.sendall(f"{n}\n".encode())
    for chunk in stream(n):
        h.update(chunk)
        s.sendall(chunk)
    answer = b""
    while len(answer) < 64:
        b = s.recv(64 - len(answer))
        if not b:
            break
        answer += b
    if answer.decode(errors="replace") != h.hexdigest():
        fail(f"counted upload of {n} bytes: server digest {answer!r} != {h.hexdigest()}")
    print(f"ok upload {n} bytes sha256={h.hexdigest()} in {time.monotonic() - t:.2f}s (length-delimited)", flush=True)


def download(host, port, n):
    n = int(n)
    s = connect(host, port)
    s.sendall(f"{n}\n".encode())
    got = hashlib.sha256()
    total = 0
    t = time.monotonic()
    while True:
        b = s.recv(CHUNK)
        if not b:
            break
        got.update(b)
        total += len(b)
    want = hashlib.sha256()
    for chunk in stream(n):
        want.update(chunk)
    if total != n:
        fail(f"download: got {total} bytes, expected {n}")
    if got.hexdigest() != want.hexdigest():
        fail(f"download of {n} bytes corrupted: {got.hexdigest()} != {want.hexdigest()}")
    print(f"ok download {n} bytes sha256={got.hexdigest()} in {time.monotonic() - t:.2f}s", flush=True)


def udp(host, port, count):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(5)
    for i in range(int(count)):
        payload = random.Random(i).randbytes(100 + i * 37)
        s.sendto(payload, (host, int(port)))
        data, peer = s.recvfrom(65535)
        if data != payload:
            fail(f"udp datagram {i}: echo differs")
        if (peer[0], peer[1]) != (host, int(port)):
            fail(f"udp datagram {i}: reply from {peer}, expected {host}:{port}")
    print(f"ok udp {count} datagrams echoed from {host}:{port}", flush=True)


def refused(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(1.0)
    t = time.monotonic()
    try:
        s.connect((host, int(port)))
    except ConnectionRefusedError:
        print(f"ok refused in {(time.monotonic() - t) * 1000:.1f} ms", flush=True)
        return
    except socket.timeout:
        fail("connect to a closed port timed out after 1 s instead of being refused")
    fail("connect to a closed port succeeded")


def udp_refused(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(3.0)
    s.connect((host, int(port)))
    t = time.monotonic()
    s.send(b"anyone there?")
    try:
        s.recv(100)
    except ConnectionRefusedError:
        print(f"ok udp refused in {(time.monotonic() - t) * 1000:.1f} ms", flush=True)
        return
    except socket.timeout:
        fail("no ICMP port unreachable (ECONNREFUSED) within 3 s from a closed UDP port")
    fail("a closed UDP port answered")


def reset(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(1.0)
    t = time.monotonic()
    try:
        s.connect((host, int(port)))
        data = s.recv(1)
    except (ConnectionRefusedError, ConnectionResetError):
        print(f"ok reset in {(time.monotonic() - t) * 1000:.1f} ms", flush=True)
        return
    except socket.timeout:
        fail("no reset within 1 s")
    fail(f"the connection was not reset (read {data!r})")


def denied(host, port):
    """Connects, sends b"DENY" first: the gateway's handler must reset the connection."""
    s = connect(host, port)
    s.settimeout(5.0)
    s.sendall(b"DENY and more")
    try:
        data = s.recv(64)
    except ConnectionResetError:
        print("ok denied: reset", flush=True)
        return
    except socket.timeout:
        fail("a connection opening with DENY was not reset within 5 s")
    fail(f"a connection opening with DENY was not reset (read {data!r})")


def udp_denied(host, port):
    """A UDP session opening with b"DENY" gets no answer; the next datagram from the same
    socket opens a new session and is echoed from host:port."""
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(1.0)
    s.sendto(b"DENY this", (host, int(port)))
    try:
        data, peer = s.recvfrom(65535)
        fail(f"a UDP session opening with DENY was answered from {peer}: {data!r}")
    except socket.timeout:
        pass
    s.settimeout(5.0)
    s.sendto(b"after the denied one", (host, int(port)))
    data, peer = s.recvfrom(65535)
    if data != b"after the denied one" or (peer[0], peer[1]) != (host, int(port)):
        fail(f"the next session: {data!r} from {peer}")
    print("ok udp denied, then a new session echoed", flush=True)


def serve_slow_sink(host, port, rate):
    rate = int(rate)

    class Slow(socketserver.BaseRequestHandler):
        def handle(self):
            tick = 0.05
            while True:
                b = self.request.recv(max(1, int(rate * tick)))
                if not b:
                    break
                time.sleep(tick)

    serve_tcp(host, port, Slow)


def serve_slow_source(host, port, rate):
    """As serve-source, at about `rate` bytes per second."""
    rate = int(rate)

    class SlowSource(socketserver.BaseRequestHandler):
        def handle(self):
            line = read_line(self.request)
            if line is None:
                return
            tick = 0.05
            step = max(1, int(rate * tick))
            for chunk in stream(int(line)):
                for i in range(0, len(chunk), step):
                    self.request.sendall(chunk[i : i + step])
                    time.sleep(tick)
            self.request.shutdown(socket.SHUT_WR)

    serve_tcp(host, port, SlowSource)


def push(host, port, n, seconds):
    n, seconds = int(n), float(seconds)
    s = connect(host, port)
    s.settimeout(0.5)
    sent, deadline = 0, time.monotonic() + seconds
    block = random.Random(1).randbytes(CHUNK)
    while sent < n and time.monotonic() < deadline:
        try:
            sent += s.send(block[: min(CHUNK, n - sent)])
        except socket.timeout:
            pass
    s.close()
    print(f"pushed {sent} bytes", flush=True)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_asyncio(host, port, handle):
    """Serves TCP with the asyncio connection handler `handle` (thousands of connections)."""
    raise_fd_limit()

    async def main():
        srv = await asyncio.start_server(handle, host, int(port), backlog=4096)
        listening()
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


def serve_echo(host, port):
    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            pass  # a client (or the gateway evicting its flow) reset the connection
        finally:
            writer.close()

    serve_asyncio(host, port, echo)


def many(host, port, n, size):
    """The strict form of `hold`: every connection must open and echo."""
    hold(host, port, n, size, strict=True)


def hold(host, port, n, size, strict=False):
    """Opens n connections (at most 256 handshakes at a time), each echoing `size` bytes
    of its own pattern, and holds them. Strict (`many`): any failure fails the run.
    Otherwise (`hold`, for measurements) failures are counted: "ready OPENED FAILED"."""
    raise_fd_limit()
    n, size = int(n), int(size)
    handshakes = None

    async def one(i, opened, release):
        async with handshakes:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 60)
        payload = random.Random(i).randbytes(size)
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(size), 60)
        if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
            raise RuntimeError(f"connection {i}: echo differs")
        opened.append(i)
        await release.wait()
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 60)
        if rest:
            raise RuntimeError(f"connection {i}: {len(rest)} unexpected bytes before EOF")
        writer.close()
        return len(got)

    async def main():
        nonlocal handshakes
        handshakes = asyncio.Semaphore(256)
        opened, release = [], asyncio.Event()
        tasks = [asyncio.create_task(one(i, opened, release)) for i in range(n)]
        while True:
            failed = [t for t in tasks if t.done() and t.exception()]
            if strict and failed:
                raise failed[0].exception()
            if len(opened) + len(failed) == n:
                break
            await asyncio.sleep(0.05)
        print(f"ready {len(opened)}" + ("" if strict else f" {len(failed)}"), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if strict and errors:
            raise errors[0]
        return sum(r for r in results if not isinstance(r, BaseException)), len(errors)

    t = time.monotonic()
    total, errors = asyncio.run(main())
    kind = "many" if strict else "hold"
    print(f"ok {kind} {n} connections echoed {total} bytes in {time.monotonic() - t:.2f}s"
          + ("" if strict else f", {errors} failed"), flush=True)


def sequential(host, port, n):
    n = int(n)
    t = time.monotonic()
    ports = set()
    for i in range(n):
        payload = (f"{i:08d}" * 4).encode()
        s = connect(host, port)
        ports.add(s.getsockname()[1])
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                fail(f"connection {i}: EOF after {len(got)} of {len(payload)} bytes")
            got += chunk
        if got != payload:
            fail(f"connection {i}: echo differs")
        s.close()
        if (i + 1) % 5000 == 0:
            print(f"[sequential] {i + 1}/{n} in {time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
    print(f"ok sequential {n} connections from {len(ports)} client ports in {time.monotonic() - t:.2f}s", flush=True)


def churn_loop(name, host, port, n, concurrency, exchange, slow=None):
    """N connections, C at a time, each running `exchange(reader, writer, request)` (which
    returns None, or why the answer was wrong) with its own 32-byte request. Failures are
    counted by kind; with `slow`, an exchange that took longer counts as failed. Prints
    "ok NAME N connections, C at a time, in Ts, R/s, slowest Ss", or fails saying how many
    failed and how."""
    raise_fd_limit()
    n, concurrency = int(n), int(concurrency)
    failures = {"refused": 0, "reset": 0, "timeout": 0, "wrong answer": 0, "slow": 0, "other": 0}
    first = []
    slowest = 0.0
    used = {}

    async def one(i, slots):
        nonlocal slowest
        async with slots:
            request = f"{i:08d}".encode() * 4
            start = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 30)
                local_port = writer.get_extra_info("sockname")[1]
                handshake = time.monotonic() - start
                try:
                    wrong = await exchange(reader, writer, request)
                    if wrong:
                        failures["wrong answer"] += 1
                        first.append(f"connection {i}: {wrong}")
                finally:
                    writer.close()
                    await writer.wait_closed()
                took = time.monotonic() - start
                slowest = max(slowest, took)
                if slow is not None and took > slow:
                    failures["slow"] += 1
                    reuse = f", port {local_port} last used by connection {used[local_port]}" if local_port in used else ""
                    first.append(f"connection {i}: {took:.2f}s (handshake {handshake:.2f}s{reuse})")
                used[local_port] = i
            except ConnectionRefusedError as e:
                failures["refused"] += 1
                first.append(f"connection {i}: {e!r}")
            except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as e:
                failures["reset"] += 1
                first.append(f"connection {i}: {e!r}")
            except asyncio.TimeoutError:
                failures["timeout"] += 1
            except OSError as e:
                failures["other"] += 1
                first.append(f"connection {i}: {e!r}")

    async def main():
        slots = asyncio.Semaphore(concurrency)
        tasks = [asyncio.create_task(one(i, slots)) for i in range(n)]
        done = 0
        for t in asyncio.as_completed(tasks):
            await t
            done += 1
            if done % 5000 == 0:
                print(f"[{name}] {done}/{n}", file=sys.stderr, flush=True)

    t = time.monotonic()
    asyncio.run(main())
    took = time.monotonic() - t
    bad = sum(failures.values())
    if bad:
        detail = ", ".join(f"{v} {k}" for k, v in failures.items() if v)
        fail(f"{name}: {bad} of {n} connections failed ({detail}) in {took:.1f}s, slowest {slowest:.2f}s; first: {first[:3]}")
    print(f"ok {name} {n} connections, {concurrency} at a time, in {took:.2f}s, {n / took:.0f}/s, "
          f"slowest {slowest:.3f}s", flush=True)


def churn(host, port, n, concurrency):
    """The client closes first, after its 32 bytes came back."""

    async def echo(reader, writer, request):
        writer.write(request)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(request)), 30)
        return None if got == request else "echo differs"

    churn_loop("churn", host, port, n, concurrency, echo)


def answer_for(request):
    """What serve-answer-close sends for a 32-byte request: the request, then 1 KiB."""
    return request + random.Random(request).randbytes(1024)


def serve_answer_close(host, port):
    async def answer(reader, writer):
        try:
            request = await reader.readexactly(32)
            writer.write(answer_for(request))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    serve_asyncio(host, port, answer)


def churn_server_closes(host, port, n, concurrency):
    """The server closes first, after its answer; an exchange over 1 s fails."""

    async def ask(reader, writer, request):
        writer.write(request)
        await writer.drain()
        got = await asyncio.wait_for(reader.read(), 30)
        return None if got == answer_for(request) else f"{len(got)} bytes, not the answer"

    churn_loop("churn-server-closes", host, port, n, concurrency, ask, slow=1.0)


def serve_udp_whoami(host, port):
    """Answers each datagram with the port it came from (the gateway's upstream socket:
    one per session)."""
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    listening()
    while True:
        _, peer = s.recvfrom(65535)
        s.sendto(str(peer[1]).encode(), peer)


class Whoami(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(f"peer {self.client_address[0]}\n".encode())


def whoami(host, port):
    """Prints the source address the server saw: the client's own when it went directly,
    a proxy's when it went through one."""
    line = read_line(connect(host, port))
    if line is None or not line.startswith(b"peer "):
        fail(f"whoami: got {line!r}")
    print(line.decode().strip(), flush=True)


def session_limit(host, port, udp_port, n, keep):
    """Through a gateway run with --max-sessions KEEP: opens N TCP connections to an echo
    server one after another and keeps them; the oldest N-KEEP must be reset (RST, not
    FIN), the newest KEEP still echo. Used again newest first, the newest KEEP leave the
    most recent of them least recently active: one more connection resets that one, not
    the oldest survivor. The same for N UDP sessions to a whoami server (a session's
    upstream port stays while it lives; an evicted one comes back on a new port)."""
    n, keep = int(n), int(keep)
    raise_fd_limit()

    def exchange(c, i):
        line = f"flow {i}\n".encode()
        c.sendall(line)
        got = b""
        while len(got) < len(line):
            part = c.recv(len(line) - len(got))
            if not part:
                fail(f"flow {i}: EOF instead of its echo")
            got += part
        if got != line:
            fail(f"flow {i}: echo {got!r}")

    def reset(c, i):
        c.settimeout(10)
        try:
            got = c.recv(16)
        except ConnectionResetError:
            return
        except socket.timeout:
            fail(f"flow {i}: neither reset nor closed within 10 s")
        fail(f"flow {i}: {got!r} instead of a reset")

    conns = []
    for i in range(n):
        c = socket.create_connection((host, int(port)), timeout=10)
        exchange(c, i)
        conns.append(c)
        time.sleep(0.05)
    for i in range(n - keep):
        reset(conns[i], i)
    for i in reversed(range(n - keep, n)):
        exchange(conns[i], i)
        time.sleep(0.05)
    extra = socket.create_connection((host, int(port)), timeout=10)
    exchange(extra, n)
    reset(conns[n - 1], n - 1)
    exchange(conns[n - keep], n - keep)

    socks = []
    seen = []

    def whoami(i):
        socks[i].sendto(b"?", (host, int(udp_port)))
        socks[i].settimeout(10)
        return int(socks[i].recv(64))

    for i in range(n):
        socks.append(socket.socket(family(host), socket.SOCK_DGRAM))
        seen.append(whoami(i))
    # Sessions alive together (each window of KEEP in a row) have ports of their own. An
    # evicted session's port is free again, and the kernel may give it to a later one
    # (CI saw 150 sessions on 149 ports once).
    for i in range(n):
        alive = seen[max(0, i - keep + 1) : i + 1]
        if len(set(alive)) != len(alive):
            fail(f"sessions {max(0, i - keep + 1)}..{i}, alive together, share an upstream port: {alive}")
    for i in reversed(range(n - keep, n)):
        if whoami(i) != seen[i]:
            fail(f"session {i} was not kept")
    if whoami(0) == seen[0]:
        fail("session 0 was not evicted")
    if whoami(n - keep) != seen[n - keep]:
        fail(f"session {n - keep} (least recent but one) was evicted")
    if whoami(n - 1) == seen[n - 1]:
        fail(f"session {n - 1} (the least recently active) was not evicted")
    print(f"ok session-limit {n} opened, {n - keep + 1} reset each way", flush=True)


def dns_a(resolver, name):
    """One A query over UDP (built by hand: a 12-byte header, one question); the first
    A record's address."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    query = qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question + b"\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    try:
        s.sendto(query, (resolver, 53))
        reply = s.recv(512)
    finally:
        s.close()
    if int.from_bytes(reply[:2], "big") != qid or int.from_bytes(reply[6:8], "big") < 1:
        raise OSError(f"no answer for {name}")
    # The answer follows the echoed question; its RDATA is the last 4 bytes of the reply.
    return socket.inet_ntoa(reply[-4:])


def soak(host, port, udp_port, resolver, seconds):
    """Mixed load for SECONDS through the gateway: bulk both ways (4 MiB echoed through
    the echo server at HOST:PORT, digest checked), short connections (4 at a time, each 50 ms apart, 100
    bytes echoed), UDP sessions (a new client socket every 100 ms on a fixed schedule, 3 datagrams each,
    echoed by the UDP echo server at UDPPORT) and DNS by fake-IP (an A query for
    soak-N.test to RESOLVER, then a connection to the fake address, echoed). Any failure
    ends the run (exit 1). Prints progress every 10 s and "ok soak ..." at the end."""
    raise_fd_limit()
    seconds = float(seconds)
    counts = {"bulk": 0, "short": 0, "udp": 0, "dns": 0}
    deadline = time.monotonic() + seconds

    async def echo(h, data):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(h, int(port)), 30)
        try:
            async def send():
                writer.write(data)
                await writer.drain()
                writer.write_eof()
            sender = asyncio.create_task(send())
            got = await asyncio.wait_for(reader.read(-1), 120)
            await sender
        finally:
            writer.close()
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            raise OSError(f"echo of {len(data)} bytes came back as {len(got)} different bytes")

    async def loop(kind, body, pause=0.0, period=0.0):
        # PERIOD: the i-th run starts at start + i * PERIOD (late runs catch up), so the
        # rate does not follow the latency of the moment: the gateway then holds a steady
        # number of live UDP sessions (rate x its idle timeout), and the soak's RSS and fd
        # samples measure leaks, not how busy the machine happened to be.
        i, start = 0, time.monotonic()
        while time.monotonic() < deadline:
            try:
                await body(i)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                fail(f"soak: {kind} #{i} failed after {counts}: {e!r}")
            counts[kind] += 1
            i += 1
            if period:
                await asyncio.sleep(max(0.0, start + i * period - time.monotonic()))
            elif pause:
                await asyncio.sleep(pause)

    bulk = random.randbytes(4 << 20)

    async def udp_session(i):
        s = socket.socket(family(host), socket.SOCK_DGRAM)
        s.setblocking(False)
        loop_ = asyncio.get_running_loop()
        try:
            for k in range(3):
                payload = f"{i}:{k}".encode()
                await loop_.sock_sendto(s, payload, (host, int(udp_port)))
                got = await asyncio.wait_for(loop_.sock_recv(s, 64), 10)
                if got != payload:
                    raise OSError(f"udp echo {got!r} for {payload!r}")
        finally:
            s.close()

    async def dns(i):
        address = await asyncio.get_running_loop().run_in_executor(None, dns_a, resolver, f"soak-{i % 50}.test")
        await echo(address, f"dns {i}".encode())

    async def progress():
        start = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(10)
            print(f"[soak] {time.monotonic() - start:.0f}s {counts}", file=sys.stderr, flush=True)

    async def main():
        tasks = [loop("bulk", lambda i: echo(host, bulk))]
        tasks += [loop("short", lambda i: echo(host, b"x" * 100), 0.05) for _ in range(4)]
        tasks += [loop("udp", udp_session, period=0.1), loop("dns", dns, period=0.2), progress()]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    print(f"ok soak {seconds:.0f}s {counts}", flush=True)


COMMANDS = {
    "churn": churn,
    "churn-server-closes": churn_server_closes,
    "serve-answer-close": serve_answer_close,
    "sequential": sequential,
    "serve-echo": serve_echo,
    "serve-slow-sink": serve_slow_sink,
    "serve-slow-source": serve_slow_source,
    "push": push,
    "many": many,
    "hold": hold,
    "serve-sink": lambda h, p: serve_tcp(h, p, Sink),
    "serve-source": lambda h, p: serve_tcp(h, p, Source),
    "serve-sink-counted": lambda h, p: serve_tcp(h, p, SinkCounted),
    "serve-banner": lambda h, p: serve_tcp(h, p, Banner),
    "banner": banner,
    "upload-counted": upload_counted,
    "serve-udp-echo": serve_udp_echo,
    "serve-udp-whoami": serve_udp_whoami,
    "serve-whoami": lambda h, p: serve_tcp(h, p, Whoami),
    "whoami": whoami,
    "session-limit": session_limit,
    "soak": soak,
    "serve-http": serve_http,
    "upload": upload,
    "download": download,
    "udp": udp,
    "refused": refused,
    "udp-refused": udp_refused,
    "reset": reset,
    "denied": denied,
    "udp-denied": udp_denied,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
