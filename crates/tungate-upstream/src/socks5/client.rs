//! Drives the [`codec`] over a stream to the proxy: the handshake and one
//! request. What the gateway then does with the stream (relay it, or hold it open for a
//! UDP association) is the caller's.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tungate_api::Target;

use super::codec::{self, Auth, Command, Method, Socks5Error};

/// Why a SOCKS5 request failed: the proxy's answer, or the stream to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error(transparent)]
    Socks5(#[from] Socks5Error),
    #[error("the connection to the proxy failed: {0}")]
    Io(#[from] io::Error),
}

/// Authenticates on `stream` and sends one request for `target`; returns the address the
/// proxy reports as bound (for UDP ASSOCIATE: where to send datagrams). Bytes the proxy
/// sends after its reply stay in the stream.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: &Auth,
    command: Command,
    target: &Target,
) -> Result<Target, HandshakeError> {
    // Greeting, authentication sub-negotiation and request each wait for their answer:
    // a proxy may close the connection after a refusal, and RFC 1928 servers need not
    // buffer a pipelined request.
    stream.write_all(&codec::greeting(auth)).await?;
    let mut buf = Vec::with_capacity(64);
    let method = read_until(stream, &mut buf, |b| codec::parse_method(b, auth)).await?;
    if let (Method::UserPass, Auth::UserPass { user, pass }) = (method, auth) {
        stream.write_all(&codec::userpass_request(user, pass)?).await?;
        read_until(stream, &mut buf, |b| Ok(codec::parse_userpass_reply(b)?.map(|n| ((), n)))).await?;
    }
    stream.write_all(&codec::request(command, target)?).await?;
    read_until(stream, &mut buf, codec::parse_reply).await
}

/// Reads into `buf` until `parse` has a whole message; keeps only what follows it. Reads
/// one byte at a time past what is buffered, so nothing after the reply is consumed.
async fn read_until<S, T, P>(stream: &mut S, buf: &mut Vec<u8>, parse: P) -> Result<T, HandshakeError>
where
    S: AsyncRead + Unpin,
    P: Fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>,
{
    loop {
        if let Some((value, used)) = parse(buf)? {
            buf.drain(..used);
            return Ok(value);
        }
        if buf.len() > 512 {
            return Err(Socks5Error::Malformed.into());
        }
        let byte = stream.read_u8().await?;
        buf.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    /// A proxy that checks the greeting and credentials, then answers one CONNECT with
    /// `rep`, and echoes afterwards.
    async fn proxy(mut s: tokio::io::DuplexStream, creds: Option<(&str, &str)>, rep: u8) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).await.unwrap();
        seen.extend(greeting);
        let method = if creds.is_some() { 2 } else { 0 };
        s.write_all(&[5, method]).await.unwrap();
        if let Some((user, pass)) = creds {
            let mut head = [0u8; 2];
            s.read_exact(&mut head).await.unwrap();
            let mut u = vec![0u8; head[1] as usize];
            s.read_exact(&mut u).await.unwrap();
            let mut p = vec![0u8; s.read_u8().await.unwrap() as usize];
            s.read_exact(&mut p).await.unwrap();
            let ok = u == user.as_bytes() && p == pass.as_bytes();
            s.write_all(&[1, if ok { 0 } else { 1 }]).await.unwrap();
            if !ok {
                return seen;
            }
        }
        let mut request = vec![0u8; 5];
        s.read_exact(&mut request).await.unwrap();
        let rest = match request[3] {
            1 => 4 + 2 - 1,
            4 => 16 + 2 - 1,
            _ => request[4] as usize + 2,
        };
        let mut tail = vec![0u8; rest];
        s.read_exact(&mut tail).await.unwrap();
        request.extend(tail);
        seen.extend(&request);
        // The reply, and (on success) the first bytes from the destination right behind it.
        let mut reply = vec![5, rep, 0, 1, 192, 0, 2, 7, 0x04, 0x38];
        if rep == 0 {
            reply.extend(b"hello");
        }
        s.write_all(&reply).await.unwrap();
        seen
    }

    #[tokio::test]
    async fn a_connect_for_a_name_with_credentials() {
        let (mut client, server) = duplex(1024);
        let server = tokio::spawn(proxy(server, Some(("al", "s3cret")), 0));
        let auth = Auth::UserPass { user: "al".into(), pass: "s3cret".into() };
        let target = Target::Domain { name: "example.test".into(), port: 443 };
        let bound = handshake(&mut client, &auth, Command::Connect, &target).await.unwrap();
        assert_eq!(bound, Target::Addr("192.0.2.7:1080".parse().unwrap()));
        let mut first = [0u8; 5];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello", "bytes after the reply stay in the stream");
        let seen = server.await.unwrap();
        assert_eq!(&seen[..3], [5, 1, 2], "offered username/password");
        assert_eq!(&seen[3..8], [5, 1, 0, 3, 12], "CONNECT to a 12-byte name");
        assert_eq!(&seen[8..20], b"example.test");
    }

    #[tokio::test]
    async fn refusals_and_bad_credentials_are_errors_with_their_cause() {
        let (mut client, server) = duplex(1024);
        tokio::spawn(proxy(server, None, 5));
        let err = handshake(&mut client, &Auth::None, Command::Connect, &Target::Addr("10.0.0.1:80".parse().unwrap()))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Socks5(Socks5Error::Reply(codec::ReplyCode(5)))), "{err}");

        let (mut client, server) = duplex(1024);
        tokio::spawn(proxy(server, Some(("al", "right")), 0));
        let auth = Auth::UserPass { user: "al".into(), pass: "wrong".into() };
        let err = handshake(&mut client, &auth, Command::Connect, &Target::Addr("10.0.0.1:80".parse().unwrap()))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Socks5(Socks5Error::AuthFailed(1))), "{err}");
    }

    #[tokio::test]
    async fn a_proxy_that_hangs_up_is_an_io_error() {
        let (mut client, server) = duplex(64);
        drop(server);
        let err = handshake(&mut client, &Auth::None, Command::Connect, &Target::Addr("10.0.0.1:80".parse().unwrap()))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Io(_)), "{err}");
    }
}
