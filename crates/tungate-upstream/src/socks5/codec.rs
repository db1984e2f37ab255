//! The SOCKS5 messages a client sends and the replies it parses. Every parser takes the
//! bytes received so far and returns `Ok(None)` while a message is incomplete, so a
//! connector can read into one buffer and call it again; none of them panics on any input.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tungate_api::Target;

const VERSION: u8 = 5;
const AUTH_VERSION: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// How the client authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// RFC 1929; each part at most 255 bytes.
    UserPass {
        user: String,
        pass: String,
    },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            // The password never reaches a log line.
            Auth::UserPass { user, .. } => f.debug_struct("UserPass").field("user", user).finish_non_exhaustive(),
        }
    }
}

/// The method the server chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    NoAuth,
    UserPass,
}

/// A request's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect = 1,
    UdpAssociate = 3,
}

/// A reply code other than success (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyCode(pub u8);

impl ReplyCode {
    /// What the code means, for the log line.
    pub fn meaning(self) -> &'static str {
        match self.0 {
            1 => "general SOCKS server failure",
            2 => "connection not allowed by ruleset",
            3 => "network unreachable",
            4 => "host unreachable",
            5 => "connection refused",
            6 => "TTL expired",
            7 => "command not supported",
            8 => "address type not supported",
            _ => "unassigned reply code",
        }
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.meaning(), self.0)
    }
}

/// Why a SOCKS5 exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Socks5Error {
    #[error("the proxy speaks SOCKS version {0}, not 5")]
    Version(u8),
    #[error("the proxy accepts none of the offered authentication methods")]
    NoAcceptableMethod,
    #[error("the proxy chose authentication method {0:#04x}, which was not offered")]
    UnexpectedMethod(u8),
    #[error("the proxy rejected the username or password (status {0})")]
    AuthFailed(u8),
    #[error("the proxy refused: {0}")]
    Reply(ReplyCode),
    #[error("the proxy's reply has unknown address type {0}")]
    AddressType(u8),
    #[error("{what} is {len} bytes; SOCKS5 allows at most 255")]
    TooLong { what: &'static str, len: usize },
    #[error("malformed reply from the proxy")]
    Malformed,
}

/// The greeting: version and the methods offered (no-auth, or username/password).
pub fn greeting(auth: &Auth) -> Vec<u8> {
    match auth {
        Auth::None => vec![VERSION, 1, 0x00],
        Auth::UserPass { .. } => vec![VERSION, 1, 0x02],
    }
}

/// The server's method choice: `Ok(Some((method, consumed)))` once two bytes are in.
pub fn parse_method(buf: &[u8], auth: &Auth) -> Result<Option<(Method, usize)>, Socks5Error> {
    let [version, method, ..] = *buf else { return Ok(None) };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    let chosen = match (method, auth) {
        (0x00, Auth::None) => Method::NoAuth,
        (0x02, Auth::UserPass { .. }) => Method::UserPass,
        (0xFF, _) => return Err(Socks5Error::NoAcceptableMethod),
        (other, _) => return Err(Socks5Error::UnexpectedMethod(other)),
    };
    Ok(Some((chosen, 2)))
}

/// The RFC 1929 sub-negotiation request.
pub fn userpass_request(user: &str, pass: &str) -> Result<Vec<u8>, Socks5Error> {
    let (u, p) = (user.as_bytes(), pass.as_bytes());
    let len = |what, b: &[u8]| u8::try_from(b.len()).map_err(|_| Socks5Error::TooLong { what, len: b.len() });
    let (ulen, plen) = (len("the username", u)?, len("the password", p)?);
    let mut out = Vec::with_capacity(3 + u.len() + p.len());
    out.extend([AUTH_VERSION, ulen]);
    out.extend_from_slice(u);
    out.push(plen);
    out.extend_from_slice(p);
    Ok(out)
}

/// The RFC 1929 status: `Ok(Some(consumed))` on success.
pub fn parse_userpass_reply(buf: &[u8]) -> Result<Option<usize>, Socks5Error> {
    let [_version, status, ..] = *buf else { return Ok(None) };
    if status != 0 {
        return Err(Socks5Error::AuthFailed(status));
    }
    Ok(Some(2))
}

/// Appends ATYP, address and port for `target`.
fn put_target(out: &mut Vec<u8>, target: &Target) -> Result<(), Socks5Error> {
    match target {
        Target::Addr(SocketAddr::V4(a)) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
        }
        Target::Addr(SocketAddr::V6(a)) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
        }
        Target::Domain { name, .. } => {
            let len = u8::try_from(name.len())
                .map_err(|_| Socks5Error::TooLong { what: "the domain name", len: name.len() })?;
            out.extend([ATYP_DOMAIN, len]);
            out.extend_from_slice(name.as_bytes());
        }
    }
    out.extend_from_slice(&target.port().to_be_bytes());
    Ok(())
}

/// Reads ATYP, address and port: `Ok(None)` if incomplete, else the address and the
/// bytes it took.
fn take_target(buf: &[u8]) -> Result<Option<(Target, usize)>, Socks5Error> {
    let Some(&atyp) = buf.first() else { return Ok(None) };
    let (addr_len, start) = match atyp {
        ATYP_V4 => (4, 1),
        ATYP_V6 => (16, 1),
        ATYP_DOMAIN => match buf.get(1) {
            Some(&n) => (usize::from(n), 2),
            None => return Ok(None),
        },
        other => return Err(Socks5Error::AddressType(other)),
    };
    let end = start + addr_len + 2;
    if buf.len() < end {
        return Ok(None);
    }
    let addr = &buf[start..start + addr_len];
    let port = u16::from_be_bytes([buf[end - 2], buf[end - 1]]);
    let target = match atyp {
        ATYP_V4 => {
            let octets: [u8; 4] = addr.try_into().map_err(|_| Socks5Error::Malformed)?;
            Target::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(octets)), port))
        }
        ATYP_V6 => {
            let octets: [u8; 16] = addr.try_into().map_err(|_| Socks5Error::Malformed)?;
            Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => {
            let name = std::str::from_utf8(addr).map_err(|_| Socks5Error::Malformed)?;
            Target::Domain { name: name.to_owned(), port }
        }
    };
    Ok(Some((target, end)))
}

/// A CONNECT or UDP ASSOCIATE request for `target` (for UDP ASSOCIATE: the address the
/// client will send from, or all zeros when it does not know it yet).
pub fn request(command: Command, target: &Target) -> Result<Vec<u8>, Socks5Error> {
    let mut out = vec![VERSION, command as u8, 0];
    put_target(&mut out, target)?;
    Ok(out)
}

/// The server's reply: `Ok(Some((bound address, consumed)))` on success. A failure code
/// is [`Socks5Error::Reply`].
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Target, usize)>, Socks5Error> {
    let [version, rep, _rsv, ..] = *buf else { return Ok(None) };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    if rep != 0 {
        return Err(Socks5Error::Reply(ReplyCode(rep)));
    }
    Ok(take_target(&buf[3..])?.map(|(bound, n)| (bound, 3 + n)))
}

/// A datagram for the UDP relay: the header (RSV, FRAG 0, the destination), then
/// `payload`.
pub fn udp_datagram(target: &Target, payload: &[u8]) -> Result<Vec<u8>, Socks5Error> {
    let mut out = Vec::with_capacity(22 + payload.len());
    out.extend([0, 0, 0]);
    put_target(&mut out, target)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// What the UDP relay sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayDatagram<'a> {
    /// A whole datagram from `from`.
    Whole { from: Target, payload: &'a [u8] },
    /// A fragment (FRAG ≠ 0): not reassembled, to be dropped and counted.
    Fragment,
}

/// Parses a datagram from the UDP relay (a datagram is whole or nothing: an incomplete
/// header is malformed).
pub fn parse_udp(buf: &[u8]) -> Result<RelayDatagram<'_>, Socks5Error> {
    let [_, _, frag, ..] = *buf else { return Err(Socks5Error::Malformed) };
    if frag != 0 {
        return Ok(RelayDatagram::Fragment);
    }
    match take_target(&buf[3..])? {
        Some((from, n)) => Ok(RelayDatagram::Whole { from, payload: &buf[3 + n..] }),
        None => Err(Socks5Error::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Target {
        Target::Addr(s.parse().unwrap())
    }

    #[test]
    fn greeting_and_method_choice() {
        assert_eq!(greeting(&Auth::None), [5, 1, 0]);
        let auth = Auth::UserPass { user: "u".into(), pass: "p".into() };
        assert_eq!(greeting(&auth), [5, 1, 2]);
        assert_eq!(parse_method(&[5], &Auth::None), Ok(None));
        assert_eq!(parse_method(&[5, 0, 9], &Auth::None), Ok(Some((Method::NoAuth, 2))));
        assert_eq!(parse_method(&[5, 2], &auth), Ok(Some((Method::UserPass, 2))));
        assert_eq!(parse_method(&[5, 0xFF], &auth), Err(Socks5Error::NoAcceptableMethod));
        assert_eq!(parse_method(&[5, 2], &Auth::None), Err(Socks5Error::UnexpectedMethod(2)), "not offered");
        assert_eq!(parse_method(&[4, 0], &Auth::None), Err(Socks5Error::Version(4)));
        let secret = Auth::UserPass { user: "al".into(), pass: "s3cret".into() };
        assert!(!format!("{secret:?}").contains("s3cret"), "a password never reaches a log line");
    }

    #[test]
    fn username_and_password() {
        assert_eq!(userpass_request("al", "sec").unwrap(), [1, 2, b'a', b'l', 3, b's', b'e', b'c']);
        let long = "x".repeat(256);
        assert_eq!(userpass_request(&long, "p"), Err(Socks5Error::TooLong { what: "the username", len: 256 }));
        assert_eq!(parse_userpass_reply(&[1]), Ok(None));
        assert_eq!(parse_userpass_reply(&[1, 0]), Ok(Some(2)));
        assert_eq!(parse_userpass_reply(&[1, 1]), Err(Socks5Error::AuthFailed(1)));
    }

    #[test]
    fn requests_carry_v4_v6_and_names() {
        assert_eq!(request(Command::Connect, &addr("10.1.2.3:80")).unwrap(), [5, 1, 0, 1, 10, 1, 2, 3, 0, 80]);
        let v6 = request(Command::UdpAssociate, &addr("[::1]:53")).unwrap();
        assert_eq!((v6[1], v6[3], v6.len()), (3, 4, 4 + 16 + 2));
        let name = Target::Domain { name: "example.test".into(), port: 443 };
        let r = request(Command::Connect, &name).unwrap();
        assert_eq!(&r[..5], [5, 1, 0, 3, 12]);
        assert_eq!(&r[5..17], b"example.test");
        assert_eq!(&r[17..], 443u16.to_be_bytes());
        let long = Target::Domain { name: "a".repeat(300), port: 1 };
        assert!(matches!(request(Command::Connect, &long), Err(Socks5Error::TooLong { len: 300, .. })));
    }

    #[test]
    fn replies_parse_incrementally_and_failures_name_their_code() {
        let ok = [5, 0, 0, 1, 192, 0, 2, 1, 0x1F, 0x90];
        for cut in 0..ok.len() {
            assert_eq!(parse_reply(&ok[..cut]), Ok(None), "incomplete at {cut}");
        }
        assert_eq!(parse_reply(&ok), Ok(Some((addr("192.0.2.1:8080"), 10))));
        let err = parse_reply(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(err, Socks5Error::Reply(ReplyCode(5)));
        assert_eq!(err.to_string(), "the proxy refused: connection refused (5)");
        assert_eq!(parse_reply(&[5, 0, 0, 9]), Err(Socks5Error::AddressType(9)));
        let named = [&[5u8, 0, 0, 3, 4][..], b"host", &[0, 7]].concat();
        assert_eq!(parse_reply(&named), Ok(Some((Target::Domain { name: "host".into(), port: 7 }, named.len()))));
    }

    #[test]
    fn udp_datagrams_round_trip_and_fragments_are_flagged() {
        for target in [addr("10.0.0.9:53"), addr("[fd00::9]:53"), Target::Domain { name: "dns.test".into(), port: 53 }]
        {
            let d = udp_datagram(&target, b"query").unwrap();
            assert_eq!(parse_udp(&d), Ok(RelayDatagram::Whole { from: target.clone(), payload: b"query" }));
        }
        let mut fragment = udp_datagram(&addr("10.0.0.9:53"), b"part").unwrap();
        fragment[2] = 1;
        assert_eq!(parse_udp(&fragment), Ok(RelayDatagram::Fragment));
        assert_eq!(parse_udp(&[0, 0, 0, 1, 10, 0]), Err(Socks5Error::Malformed), "truncated header");
    }

    #[test]
    fn no_input_panics_a_parser() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8 % 8).collect();
            let _ = parse_reply(&bytes);
            let _ = parse_udp(&bytes);
            let _ = parse_method(&bytes, &Auth::None);
            let _ = parse_userpass_reply(&bytes);
        }
    }
}
