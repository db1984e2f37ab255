//! `--proxy http://[user:pass@]host:port`: HTTP CONNECT (RFC 9110 §9.3.6), TCP only.

pub mod codec;

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tungate_api::Target;

use crate::connector::{BoxFuture, ConnectError, Connector, Dialer, UdpPath};

/// An HTTP proxy at a fixed address (a host name was resolved at start).
#[derive(Debug)]
pub struct HttpConnect {
    proxy: SocketAddr,
    credentials: Option<(String, String)>,
    dialer: Dialer,
    name: String,
}

impl HttpConnect {
    pub fn new(proxy: SocketAddr, credentials: Option<(String, String)>, dialer: Dialer) -> Self {
        HttpConnect { proxy, credentials, dialer, name: format!("HTTP proxy {proxy}") }
    }

    fn io(&self, what: &'static str, source: io::Error) -> ConnectError {
        ConnectError::Io { upstream: self.name.clone(), what, source }
    }
}

impl Connector for HttpConnect {
    fn connect<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<TcpStream, ConnectError>> {
        Box::pin(async move {
            let mut stream = self.dialer.tcp(self.proxy).await.map_err(|e| self.io("connecting to the proxy", e))?;
            let creds = self.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
            let request = codec::connect_request(target, creds);
            stream.write_all(&request).await.map_err(|e| self.io("sending CONNECT", e))?;
            // One byte at a time: whatever the destination sends right behind the head
            // (a server's banner) must stay in the stream for the client.
            let mut buf = Vec::with_capacity(128);
            let head = loop {
                let parsed = codec::parse_head(&buf).map_err(|e| {
                    self.io("reading the CONNECT response", io::Error::new(io::ErrorKind::InvalidData, e))
                })?;
                if let Some(head) = parsed {
                    break head;
                }
                let byte = stream.read_u8().await.map_err(|e| self.io("reading the CONNECT response", e))?;
                buf.push(byte);
            };
            let reason = format!("HTTP {} {}", head.status, head.reason);
            match head.status {
                200..=299 => Ok(stream),
                // 407 is the standard answer; tinyproxy (1.11) answers CONNECT with 401.
                401 | 407 => Err(ConnectError::Auth { upstream: self.name.clone(), reason }),
                _ => Err(ConnectError::Refused { upstream: self.name.clone(), target: target.clone(), reason }),
            }
        })
    }

    fn open_udp<'a>(&'a self, _target: &'a Target) -> BoxFuture<'a, Result<Box<dyn UdpPath>, ConnectError>> {
        Box::pin(async move {
            Err(ConnectError::NoUdp { upstream: self.name.clone(), reason: "HTTP CONNECT carries TCP only".into() })
        })
    }
}
