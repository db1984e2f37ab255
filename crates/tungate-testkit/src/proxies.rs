//! The gateway in front of real proxies from Debian's packages, through a real TUN:
//! dante (SOCKS5, TCP and UDP ASSOCIATE, no-auth and username/password), microsocks
//! (SOCKS5, TCP only) and tinyproxy (HTTP CONNECT). Every proxy runs in the server
//! namespace on the veth address 10.78.0.2, which the gateway reaches around its TUN;
//! the proxies reach the test servers on 10.77.0.2 and fd77::2 inside that namespace.

use std::process::Command;

use crate::netns::Topology;

/// The veth address of the server namespace, where the proxies listen.
const PROXY_HOST: &str = "10.78.0.2";
/// The proxy test account (dante authenticates against the server namespace's own
/// passwd/shadow, which the test puts in place; the host's are not touched).
const USER: &str = "tgproxy";
const PASS: &str = "tg-s3cret";

/// Starts dante on `port`; `method` is `none` or `username`.
fn dante(t: &mut Topology, port: u16, method: &str) {
    dante_on(t, PROXY_HOST, port, method);
}

/// Starts dante on `host`:`port`.
pub(crate) fn dante_on(t: &mut Topology, host: &str, port: u16, method: &str) {
    let conf = format!(
        "logoutput: stderr\n\
         internal: {host} port = {port}\n\
         external: 10.77.0.2\n\
         external: fd77::2\n\
         socksmethod: {method}\n\
         clientmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n\
         socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n\
         socks pass {{ from: 0.0.0.0/0 to: ::/0 }}\n\
         socks pass {{ from: ::/0 to: 0.0.0.0/0 }}\n"
    );
    let path = t.write_state(&format!("danted-{port}.conf"), conf.as_bytes());
    t.daemon(&["danted", "-f", &path], port);
}

/// Gives the server namespace a passwd/shadow with the test account (for dante's
/// username method).
fn proxy_account(t: &Topology) {
    let hash = Command::new("openssl").args(["passwd", "-6", "-salt", "tungatetest", PASS]).output().expect("openssl");
    assert!(hash.status.success(), "openssl passwd failed");
    let hash = String::from_utf8(hash.stdout).expect("utf-8").trim().to_owned();
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let shadow = std::fs::read_to_string("/etc/shadow").expect("read /etc/shadow");
    t.server_etc("passwd", &format!("{passwd}{USER}:x:64999:65534::/nonexistent:/usr/sbin/nologin\n"));
    t.server_etc("shadow", &format!("{shadow}{USER}:{hash}:20000:0:99999:7:::\n"));
}

/// tinyproxy on `port`, with Basic credentials when `auth`.
fn tinyproxy(t: &mut Topology, port: u16, auth: bool) {
    let mut conf = format!(
        "User nobody\nGroup nogroup\nPort {port}\nListen {PROXY_HOST}\nTimeout 600\nMaxClients 100\n\
         LogLevel Info\nDisableViaHeader Yes\n"
    );
    if auth {
        conf.push_str(&format!("BasicAuth {USER} {PASS}\n"));
    }
    let path = t.write_state(&format!("tinyproxy-{port}.conf"), conf.as_bytes());
    t.daemon(&["tinyproxy", "-d", "-c", &path], port);
}

/// The servers every proxy test talks to: HTTP (v4, v6), a sink and a source for the
/// 64 MiB transfers, a UDP echo. Returns the served file's bytes.
pub(crate) fn servers(t: &mut Topology) -> Vec<u8> {
    let body = crate::services::pattern(2 * 1024 * 1024 + 3, 12);
    t.serve_file("file.bin", &body);
    t.peer_server(&["serve-sink", "10.77.0.2", "9000"]);
    t.peer_server(&["serve-source", "10.77.0.2", "9001"]);
    t.peer_server(&["serve-sink-counted", "10.77.0.2", "9002"]);
    t.peer_server(&["serve-udp-echo", "10.77.0.2", "5353"]);
    body
}

/// 64 MiB up and 64 MiB down, each sha256-checked by the other end. The upload ends
/// with a half-close (FIN, then the server's digest) where the proxy carries one
/// (microsocks and tinyproxy close both ways on the first FIN); otherwise it is
/// length-delimited.
pub(crate) fn each_way_64mib(t: &Topology, proxy_half_closes: bool) {
    let n = (64u64 << 20).to_string();
    let (command, port) = if proxy_half_closes { ("upload", "9000") } else { ("upload-counted", "9002") };
    let up = t.peer_client(&[command, "10.77.0.2", port, &n]);
    assert!(up.starts_with("ok upload 67108864 bytes"), "{up}");
    let down = t.peer_client(&["download", "10.77.0.2", "9001", &n]);
    assert!(down.starts_with("ok download 67108864 bytes"), "{down}");
}

/// A closed port behind the proxy: the client's connect is refused within 1 s.
pub(crate) fn refused(t: &Topology) {
    let out = t.peer_client(&["refused", "10.77.0.2", "9"]);
    assert!(out.starts_with("ok refused"), "{out}\n{}", t.gateway_log());
}

/// Stops the proxies: a connection to a port that is open behind them is then refused,
/// which shows the flows went through the proxy and not around it.
fn without_proxy_refused(t: &mut Topology) {
    t.stop_daemons();
    let out = t.peer_client(&["refused", "10.77.0.2", "8080"]);
    assert!(out.starts_with("ok refused"), "{out}");
}

/// How many log lines contain `needle`.
fn log_lines(t: &Topology, needle: &str) -> usize {
    t.gateway_log().lines().filter(|l| l.contains(needle)).count()
}

/// dante without authentication: GETs over v4 and v6 (the proxy dials both), 64 MiB
/// each way, UDP echoed through UDP ASSOCIATE from the right address, a closed port
/// refused at the client's connect.
///
/// The proxy is named by host (`dante.test`, in the client namespace's hosts file) and
/// listens on 10.77.0.2, an address the client namespace routes into the TUN: the
/// gateway's own TCP and UDP sockets to it get through only because they carry --mark.
pub fn netns_socks5_dante(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    t.client_etc("hosts", "127.0.0.1 localhost\n10.77.0.2 dante.test\n");
    dante_on(&mut t, "10.77.0.2", 1080, "none");
    let body = servers(&mut t);
    t.restart_gateway(&["--proxy", "socks5://dante.test:1080"]);
    t.curl_get("http://10.77.0.2:8080/file.bin", &[], &body);
    t.curl_get("http://[fd77::2]:8080/file.bin", &[], &body);
    each_way_64mib(&t, true);
    // Nineteen more uploads, each ending with the client's FIN before the server's
    // digest: ipstack lost the tail of 3 and then 5 of 6 such uploads before its FIN hold.
    let n = (64u64 << 20).to_string();
    for i in 2..=20 {
        let up = t.peer_client(&["upload", "10.77.0.2", "9000", &n]);
        assert!(up.starts_with("ok upload 67108864 bytes"), "upload {i} of 20: {up}\n{}", t.gateway_log());
    }
    let udp = t.peer_client(&["udp", "10.77.0.2", "5353", "20"]);
    assert!(udp.starts_with("ok udp 20"), "{udp}");
    refused(&t);
    without_proxy_refused(&mut t);
    let stats = t.stop_gateway();
    assert_eq!(stats["udp_fragments"], 0);
    assert!(stats["udp_tx"] >= 20, "echoes came back through the TUN: {stats:?}");
}

/// dante with username/password: the right credentials carry TCP and UDP; wrong ones
/// refuse every connection and say so in one error line naming the proxy.
pub fn netns_socks5_dante_auth(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    proxy_account(&t);
    dante(&mut t, 1082, "username");
    let body = servers(&mut t);
    t.restart_gateway(&["--proxy", &format!("socks5://{USER}:{PASS}@10.78.0.2:1082")]);
    t.curl_get("http://10.77.0.2:8080/file.bin", &[], &body);
    let udp = t.peer_client(&["udp", "10.77.0.2", "5353", "5"]);
    assert!(udp.starts_with("ok udp 5"), "{udp}");

    t.restart_gateway(&["--proxy", &format!("socks5://{USER}:wrong@10.78.0.2:1082")]);
    refused(&t);
    let again = t.peer_client(&["refused", "10.77.0.2", "8080"]);
    assert!(again.starts_with("ok refused"), "{again}");
    assert_eq!(
        log_lines(&t, "SOCKS5 proxy 10.78.0.2:1082 rejected the credentials"),
        1,
        "one error line for wrong credentials:\n{}",
        t.gateway_log()
    );
}

/// microsocks carries TCP only: TCP goes through it, and UDP follows `--udp`: `direct`
/// sends it around the proxy (echoed), `proxy` drops it after one warning.
pub fn netns_socks5_microsocks(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    t.daemon(&["microsocks", "-i", PROXY_HOST, "-p", "1081"], 1081);
    let body = servers(&mut t);
    t.restart_gateway(&["--proxy", "socks5://10.78.0.2:1081", "--udp", "direct"]);
    t.curl_get("http://10.77.0.2:8080/file.bin", &[], &body);
    each_way_64mib(&t, false);
    refused(&t);
    let udp = t.peer_client(&["udp", "10.77.0.2", "5353", "5"]);
    assert!(udp.starts_with("ok udp 5"), "{udp}");
    assert_eq!(log_lines(&t, "does not carry UDP"), 1, "one warning:\n{}", t.gateway_log());

    t.restart_gateway(&["--proxy", "socks5://10.78.0.2:1081", "--udp", "proxy"]);
    let out = t.client(&["python3", "-c", UDP_UNANSWERED]);
    assert!(out.status.success(), "UDP must be dropped under --udp proxy: {}", String::from_utf8_lossy(&out.stderr));
    without_proxy_refused(&mut t);
    let stats = t.stop_gateway();
    assert!(stats["udp_dropped"] >= 3, "{stats:?}");
}

/// Sends three datagrams to the echo server and fails if any answer comes back in 1 s.
const UDP_UNANSWERED: &str = "import socket,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1.0)\n\
[s.sendto(b'x'*i,('10.77.0.2',5353)) for i in (1,2,3)]\n\
try:\n    s.recv(100); sys.exit('answered')\nexcept socket.timeout:\n    pass\n";

/// tinyproxy (HTTP CONNECT): GETs over v4 and v6, 64 MiB each way, a closed port
/// refused; with Basic credentials required and wrong ones given, connections are
/// refused and one error line names the proxy and its status.
pub fn netns_http_connect_tinyproxy(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    tinyproxy(&mut t, 8888, false);
    tinyproxy(&mut t, 8889, true);
    let body = servers(&mut t);
    t.restart_gateway(&["--proxy", "http://10.78.0.2:8888"]);
    t.curl_get("http://10.77.0.2:8080/file.bin", &[], &body);
    t.curl_get("http://[fd77::2]:8080/file.bin", &[], &body);
    each_way_64mib(&t, false);
    refused(&t);

    t.restart_gateway(&["--proxy", &format!("http://{USER}:{PASS}@10.78.0.2:8889")]);
    t.curl_get("http://10.77.0.2:8080/file.bin", &[], &body);
    t.restart_gateway(&["--proxy", &format!("http://{USER}:wrong@10.78.0.2:8889")]);
    refused(&t);
    let again = t.peer_client(&["refused", "10.77.0.2", "8080"]);
    assert!(again.starts_with("ok refused"), "{again}");
    assert_eq!(
        // tinyproxy 1.11 answers 401 where RFC 9110 says 407; both mean the credentials.
        log_lines(&t, "HTTP proxy 10.78.0.2:8889 rejected the credentials: HTTP 401"),
        1,
        "one error line for the proxy's 401:\n{}",
        t.gateway_log()
    );
    without_proxy_refused(&mut t);
}

/// `--sniff` through dante, with clients dialling 10.77.0.99, where nothing listens: the
/// server namespace's hosts file sends the sniffed names to 10.77.0.2, so a connection
/// works only if the proxy was asked for the name. TLS (`openssl s_client
/// -servername`) and HTTP (`curl -H Host`) both; a server-speaks-first service is
/// delayed by at most the sniff timeout; a refused destination is reset.
pub fn netns_sniff(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    t.server_etc("hosts", "127.0.0.1 localhost\n10.77.0.2 web.test tls.test\n");
    dante(&mut t, 1080, "none");
    let body = servers(&mut t);
    let (cert, key) = (t.write_state("cert.pem", b""), t.write_state("key.pem", b""));
    let (cert, key) = (cert.as_str(), key.as_str());
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=tls.test", "-days", "1", "-keyout", key, "-out", cert])
        .output()
        .expect("openssl req");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    t.daemon(&["openssl", "s_server", "-quiet", "-accept", "10.77.0.2:8443", "-cert", cert, "-key", key], 8443);
    t.peer_server(&["serve-banner", "10.77.0.2", "2525"]);
    t.restart_gateway(&["--proxy", "socks5://10.78.0.2:1080", "--sniff", "--sniff-timeout", "300"]);

    let tls = t.client(&[
        "bash",
        "-c",
        "echo sniffed | timeout 10 openssl s_client -connect 10.77.0.99:8443 -servername tls.test -ign_eof 2>&1",
    ]);
    let text = String::from_utf8_lossy(&tls.stdout);
    assert!(
        text.contains("CN = tls.test") && text.contains("BEGIN CERTIFICATE"),
        "s_client:\n{text}\n{}",
        t.gateway_log()
    );
    t.curl_get("http://10.77.0.99:8080/file.bin", &["-H", "Host: web.test:8080"], &body);
    // A server-speaks-first service: the client sends nothing, so the sniff waits its
    // 300 ms out and then connects by address.
    let banner = t.peer_client(&["banner", "10.77.0.2", "2525", "1.3"]);
    assert!(banner.starts_with("ok banner"), "{banner}");
    // Sniffing completes the client's handshake first: a closed port is a reset.
    let reset = t.peer_client(&["reset", "10.77.0.2", "9"]);
    assert!(reset.starts_with("ok reset"), "{reset}");
    // Without the proxy, an open port is reset too: nothing went around it.
    t.stop_daemons();
    let reset = t.peer_client(&["reset", "10.77.0.2", "8080"]);
    assert!(reset.starts_with("ok reset"), "{reset}");
    // One name from the ClientHello, one from the Host header; the banner service and the
    // two resets named nothing; dante refused port 9; then the proxy was gone.
    let stats = t.stop_gateway();
    let got = |k: &str| stats.get(k).copied().unwrap_or(0);
    assert_eq!((got("sniffed_tls"), got("sniffed_http")), (1, 1), "{stats:?}");
    assert!(got("sniffed_nothing") >= 2, "{stats:?}");
    assert!(got("upstream_refused") >= 1 && got("upstream_io_errors") >= 1, "{stats:?}");
}

/// dnsmasq on 10.77.0.53:53 (UDP and TCP) in the server namespace: `real.test` is
/// 10.77.0.2, `txt.test` has a TXT record.
pub(crate) fn resolver(t: &mut Topology) {
    let added = Command::new("ip").args(["-n", &t.srv, "addr", "add", "10.77.0.53/32", "dev", "lo"]).status();
    assert!(added.is_ok_and(|s| s.success()), "adding 10.77.0.53 in the server namespace");
    t.daemon(
        &[
            "dnsmasq",
            // Not --no-daemon: that mode answers TCP queries inline, one connection at a time.
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--listen-address=10.77.0.53",
            "--bind-interfaces",
            "--port=53",
            "--address=/real.test/10.77.0.2",
            "--txt-record=txt.test,hello tungate",
        ],
        53,
    );
}

/// `dig +short` in the client namespace; returns its answer lines.
pub(crate) fn dig(t: &Topology, args: &[&str]) -> Vec<String> {
    let mut full = vec!["dig", "+short", "+time=2", "+tries=1"];
    full.extend_from_slice(args);
    let out = t.client(&full);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dig {args:?}: {text}{}\n{}", String::from_utf8_lossy(&out.stderr), t.gateway_log());
    text.lines().map(str::to_owned).collect()
}

/// Routes the default fake-IP pools into the TUN (after each gateway start: the routes
/// go with the TUN).
pub(crate) fn route_fake_pools(t: &Topology) {
    for (family, pool) in [("-4", "198.19.0.0/16"), ("-6", "fd19:f4e1::/64")] {
        let out = t.client(&["ip", family, "route", "replace", pool, "dev", "tun0"]);
        assert!(out.status.success(), "route {pool}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// DNS through the gateway and dante: `--dns fake-ip` answers A and AAAA from the
/// default pools and forwards TXT; curl to the name (resolved through the TUN) reaches
/// the server although only the server namespace knows the name, so the proxy was
/// asked for the name; UDP to the fake address is echoed from it; an unmapped fake
/// address is refused. `--dns hijack` sends
/// queries to any address, UDP and TCP, to the resolver. `--dns-over-tcp` carries UDP
/// queries through microsocks, which has no UDP.
pub fn netns_dns(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    t.server_etc("hosts", "127.0.0.1 localhost\n10.77.0.2 web.test\n");
    t.client_etc("resolv.conf", "nameserver 10.77.0.53\noptions timeout:2 attempts:1\n");
    dante(&mut t, 1080, "none");
    t.daemon(&["microsocks", "-i", PROXY_HOST, "-p", "1081"], 1081);
    resolver(&mut t);
    let body = servers(&mut t);

    t.restart_gateway(&["--proxy", "socks5://10.78.0.2:1080", "--dns", "fake-ip", "--stats-addr", "127.0.0.1:9464"]);
    route_fake_pools(&t);
    let v4 = dig(&t, &["@10.77.0.53", "web.test", "A"]);
    let v4: std::net::Ipv4Addr = v4.first().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("A: {v4:?}"));
    assert_eq!(v4.octets()[..2], [198, 19], "{v4} from the IPv4 pool");
    let v6 = dig(&t, &["@10.77.0.53", "web.test", "AAAA"]);
    let v6: std::net::Ipv6Addr = v6.first().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("AAAA: {v6:?}"));
    assert_eq!(v6.segments()[..4], [0xfd19, 0xf4e1, 0, 0], "{v6} from the IPv6 pool");
    assert_eq!(dig(&t, &["@10.77.0.53", "txt.test", "TXT"]), ["\"hello tungate\""], "TXT forwarded to the resolver");
    // A resolver address inside the pool is answered like any other (README: queries to
    // any address).
    let in_pool = dig(&t, &["@198.19.255.53", "web.test", "A"]);
    assert_eq!(in_pool, [v4.to_string()], "a resolver address inside the fake pool");
    t.curl_get("http://web.test:8080/file.bin", &[], &body);
    t.curl_get(&format!("http://{v4}:8080/file.bin"), &[], &body);
    // UDP to the fake address: through dante to the name's echo server, and the echoes
    // come back from the fake address the client sent to.
    let udp = t.peer_client(&["udp", &v4.to_string(), "5353", "5"]);
    assert!(udp.starts_with("ok udp 5"), "{udp}");
    let unmapped = t.peer_client(&["refused", "198.19.255.254", "8080"]);
    assert!(unmapped.starts_with("ok refused"), "{unmapped}");
    // What the gateway counted: two pool answers (A, AAAA; curl asked again), the TXT
    // query forwarded, the flows to fake addresses renamed, the unmapped one refused.
    let m = t.scrape(9464);
    let got = |k: &str| m.get(k).copied().unwrap_or(0);
    assert!(got("dns_fake_answers_total") >= 2, "{m:?}");
    assert!(got("dns_forwarded_total") >= 1, "{m:?}");
    // curl to the name and to the address, and the UDP session to it.
    assert!(got("fake_ip_hits_total") >= 3, "{m:?}");
    assert_eq!(got("upstream_unroutable_total"), 1, "the unmapped fake address: {m:?}");

    t.restart_gateway(&["--proxy", "socks5://10.78.0.2:1080", "--dns", "hijack=10.77.0.53:53"]);
    // Nothing answers DNS on 10.77.0.2: only the hijack does.
    assert_eq!(dig(&t, &["@10.77.0.2", "real.test", "A"]), ["10.77.0.2"]);
    assert_eq!(dig(&t, &["+tcp", "@10.77.0.2", "real.test", "A"]), ["10.77.0.2"]);

    t.restart_gateway(&["--proxy", "socks5://10.78.0.2:1081", "--dns-over-tcp"]);
    assert_eq!(dig(&t, &["@10.77.0.53", "txt.test", "TXT"]), ["\"hello tungate\""], "over TCP through microsocks");
    assert_eq!(dig(&t, &["@10.77.0.53", "real.test", "A"]), ["10.77.0.2"]);
}
