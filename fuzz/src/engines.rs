//! Each stack's packet input through its engine, in memory, driven the way the driver
//! drives it (packets, flush, wake-ups, timers, output, polled I/O) with a handler that
//! accepts, rejects, writes, reads, closes and aborts as the input says.
//!
//! Inputs are operations, not raw packets: segments are built with right checksums and
//! with sequence and acknowledgement numbers near the ones in use (the client's initial
//! sequence number, and what the engine last sent to that 4-tuple), so the fuzzer reaches
//! established connections instead of stopping at a checksum; raw and mutated packets
//! (checksums optionally made right) cover the rest.
//!
//! Checked on every input: each packet is counted once, under the heading a look at it
//! predicts ([`assert_counted_once`]); every packet an engine writes is well-formed (it
//! classifies, and a TCP segment's checksum is right).
//!
//! backend-system is not here: its engine needs kernel listeners on the TUN's address; its
//! NAT's packet rewriting is covered by its own unit and mutation tests.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use smoltcp::wire::TcpControl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tungate_core::api::tcp::now_or_never;
use tungate_core::device::mem;
use tungate_core::engine::Engine;
use tungate_core::packet::{self, Classified, SegmentFields};
use tungate_core::{
    Backend, DeviceInfo, Dispatch, Mtu, PacketBuf, Start, TcpConn, TcpHandler, TcpRequest, UdpHandler, UdpSession,
};
use tungate_testkit::mutation::assert_counted_once;

use crate::packets::fix_checksums;
use crate::reader::{Reader, Writer};

/// What one step of an input does. Encoded (see [`Reader`]) as a kind byte (modulo 7, in
/// the order below) and the variant's fields in order; [`Op::write`] is the encoder the
/// seeds use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A TCP segment from client `client` to destination `dst`, right checksums.
    Segment {
        client: u8,
        dst: u8,
        v6: bool,
        /// None, SYN, FIN, RST, PSH (modulo 5).
        control: u8,
        /// Added to the client's initial sequence number.
        seq: i16,
        /// Added to the next sequence number the engine last sent this 4-tuple.
        ack: Option<i16>,
        window: u16,
        /// Payload bytes (modulo 1400).
        payload: u16,
        window_scale: Option<u8>,
        mss: Option<u16>,
        /// A byte changed after building (offset, value, whether the checksums are made
        /// right again).
        mutation: Option<(u16, u8, bool)>,
    },
    /// A UDP datagram from client `client` to destination `dst`.
    Datagram { client: u8, dst: u8, v6: bool, len: u16 },
    /// Any bytes, checksums made right or not.
    Raw { bytes: Vec<u8>, fix: bool },
    /// The clock moves on.
    Advance { ms: u16 },
    /// The handler decides every request it holds.
    Decide { accept: bool },
    /// The handler acts on one of its connections: write (n bytes), read, shut down,
    /// abort, drop (action modulo 5).
    Conn { index: u8, action: u8, n: u16 },
    /// The handler replies on one of its UDP sessions.
    Reply { index: u8, len: u16 },
}

impl Op {
    pub fn read(r: &mut Reader<'_>) -> Op {
        match r.u8() % 7 {
            0 => Op::Segment {
                client: r.u8(),
                dst: r.u8(),
                v6: r.bool(),
                control: r.u8(),
                seq: r.u16() as i16,
                ack: r.option(|r| r.u16() as i16),
                window: r.u16(),
                payload: r.u16(),
                window_scale: r.option(Reader::u8),
                mss: r.option(Reader::u16),
                mutation: r.option(|r| (r.u16(), r.u8(), r.bool())),
            },
            1 => Op::Datagram { client: r.u8(), dst: r.u8(), v6: r.bool(), len: r.u16() },
            2 => Op::Raw { bytes: r.bytes().to_vec(), fix: r.bool() },
            3 => Op::Advance { ms: r.u16() },
            4 => Op::Decide { accept: r.bool() },
            5 => Op::Conn { index: r.u8(), action: r.u8(), n: r.u16() },
            _ => Op::Reply { index: r.u8(), len: r.u16() },
        }
    }

    /// Appends this operation in the input format.
    pub fn write(&self, w: &mut Writer) {
        match self {
            Op::Segment { client, dst, v6, control, seq, ack, window, payload, window_scale, mss, mutation } => {
                w.u8(0).u8(*client).u8(*dst).bool(*v6).u8(*control).u16(*seq as u16);
                w.option(*ack, |w, a| {
                    w.u16(a as u16);
                });
                w.u16(*window).u16(*payload);
                w.option(*window_scale, |w, s| {
                    w.u8(s);
                });
                w.option(*mss, |w, m| {
                    w.u16(m);
                });
                w.option(*mutation, |w, (at, value, fix)| {
                    w.u16(at).u8(value).bool(fix);
                });
            }
            Op::Datagram { client, dst, v6, len } => {
                w.u8(1).u8(*client).u8(*dst).bool(*v6).u16(*len);
            }
            Op::Raw { bytes, fix } => {
                w.u8(2).bytes(bytes).bool(*fix);
            }
            Op::Advance { ms } => {
                w.u8(3).u16(*ms);
            }
            Op::Decide { accept } => {
                w.u8(4).bool(*accept);
            }
            Op::Conn { index, action, n } => {
                w.u8(5).u8(*index).u8(*action).u16(*n);
            }
            Op::Reply { index, len } => {
                w.u8(6).u8(*index).u16(*len);
            }
        }
    }
}

/// The client sequence numbers start here.
pub const CLIENT_ISN: u32 = 1_000_000;

fn client(i: u8, v6: bool) -> SocketAddr {
    let port = 40_000 + u16::from(i % 4);
    if v6 {
        SocketAddr::new(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2 + u16::from(i % 4)).into(), port)
    } else {
        SocketAddr::new(std::net::Ipv4Addr::new(198, 18, 0, 2 + i % 4).into(), port)
    }
}

fn destination(i: u8, v6: bool) -> SocketAddr {
    let port = if i.is_multiple_of(2) { 80 } else { 443 };
    if v6 {
        SocketAddr::new(std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2).into(), port)
    } else {
        SocketAddr::new(std::net::Ipv4Addr::new(10, 77, 0, 2).into(), port)
    }
}

fn control(c: u8) -> TcpControl {
    match c % 5 {
        0 => TcpControl::None,
        1 => TcpControl::Syn,
        2 => TcpControl::Fin,
        3 => TcpControl::Rst,
        _ => TcpControl::Psh,
    }
}

/// The handler: holds requests until an input decides; keeps connections and sessions.
#[derive(Default)]
struct Handler {
    requests: Mutex<Vec<TcpRequest>>,
    sessions: Mutex<Vec<UdpSession>>,
}

impl TcpHandler for Handler {
    fn handle_tcp(&self, request: TcpRequest) {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).push(request);
    }
}

impl UdpHandler for Handler {
    fn handle_udp(&self, session: UdpSession) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).push(session);
    }
}

/// The runtime every engine input runs on: one worker thread (ipstack's stream needs a
/// multi-threaded runtime to drop), kept for the process.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
    })
}

pub fn smoltcp(data: &[u8]) -> u64 {
    drive(data, || backend_smoltcp::Smoltcp::new(backend_smoltcp::SmoltcpConfig::default()))
}

pub fn lwip(data: &[u8]) -> u64 {
    // lwIP keeps global state: one stack per process, so runs on several threads (the
    // replay tests) take turns.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    drive(data, || backend_lwip::Lwip::new(backend_lwip::LwipConfig::default()))
}

pub fn ipstack(data: &[u8]) -> u64 {
    drive(data, || backend_ipstack::Ipstack::new(backend_ipstack::IpstackConfig::default()))
}

pub fn netstack_smoltcp(data: &[u8]) -> u64 {
    drive(data, || backend_netstack_smoltcp::NetstackSmoltcp::new(backend_netstack_smoltcp::NetstackConfig::default()))
}

/// Runs the operations in `data` against a fresh engine of `make()`'s backend, as a task
/// on the runtime's one worker: the stack crates' own tasks run on that thread too, each
/// time the driver yields, so a run is repeatable as far as the crates' wall clocks allow.
/// Returns how many client bytes the handler read (the harness's own check that inputs
/// reach established connections).
fn drive<B: Backend>(data: &[u8], make: impl FnOnce() -> B + Send + 'static) -> u64 {
    let data = data.to_vec();
    let run = runtime().spawn(async move {
        let handler = Arc::new(Handler::default());
        let dispatch = Dispatch::new(handler.clone(), handler.clone());
        let stats = dispatch.stats.clone();
        let (device, _peer) = mem::pair(Mtu::DEFAULT, 4);
        let mut now = Instant::now();
        let mut engine =
            make().engine(DeviceInfo::of(&device), dispatch, Start { now, seed: 7 }).expect("the engine starts");
        let mut conns: Vec<TcpConn> = Vec::new();
        let mut read = 0u64;
        // The next sequence number the engine sent each 4-tuple (client, destination).
        let mut sent_next: HashMap<(SocketAddr, SocketAddr), u32> = HashMap::new();
        let mut r = Reader::new(&data);
        let mut steps = 0;
        while !r.is_empty() && steps < 256 {
            steps += 1;
            let op = Op::read(&mut r);
            match op {
                Op::Segment {
                    client: c,
                    dst: d,
                    v6,
                    control: ctl,
                    seq,
                    ack,
                    window,
                    payload,
                    window_scale,
                    mss,
                    mutation,
                } => {
                    let (src, dst) = (client(c, v6), destination(d, v6));
                    let control = control(ctl);
                    let ack = ack.map(|off| {
                        let next = sent_next.get(&(src, dst)).copied().unwrap_or(0);
                        next.wrapping_add(off as i32 as u32)
                    });
                    let body = vec![0x5a; usize::from(payload % 1400)];
                    let mut fields =
                        SegmentFields::new(src, dst, control, CLIENT_ISN.wrapping_add(seq as i32 as u32), ack)
                            .payload(&body);
                    fields.window = window;
                    fields.window_scale = window_scale.map(|s| s % 16);
                    if mss.is_some() {
                        fields.mss = mss;
                    }
                    let mut bytes = fields.build();
                    if let Some((at, value, fix)) = mutation {
                        let at = usize::from(at) % bytes.len();
                        bytes[at] = value;
                        if fix {
                            fix_checksums(&mut bytes);
                        }
                    }
                    feed(&mut engine, &stats, now, &bytes);
                }
                Op::Datagram { client: c, dst: d, v6, len } => {
                    let (src, dst) = (client(c, v6), destination(d, v6));
                    let mut out = vec![0u8; 60 + 8 + 1400];
                    let body = vec![0xa5; usize::from(len % 1400)];
                    if let Ok(n) = packet::build_udp(src, dst, &body, &mut out) {
                        feed(&mut engine, &stats, now, &out[..n]);
                    }
                }
                Op::Raw { mut bytes, fix } => {
                    if fix {
                        fix_checksums(&mut bytes);
                    }
                    feed(&mut engine, &stats, now, &bytes);
                }
                Op::Advance { ms } => now += Duration::from_millis(u64::from(ms)),
                Op::Decide { accept } => {
                    let held: Vec<TcpRequest> =
                        std::mem::take(&mut *handler.requests.lock().unwrap_or_else(|p| p.into_inner()));
                    for request in held {
                        if accept {
                            // Ring flows are accepted at once; a backend whose accept
                            // waits (none here) would leave the request pending.
                            if let Some(conn) = now_or_never(request.accept()) {
                                conns.push(conn);
                            }
                        } else {
                            request.reject();
                        }
                    }
                }
                Op::Conn { index, action, n } => {
                    if conns.is_empty() {
                        continue;
                    }
                    let i = usize::from(index) % conns.len();
                    match action % 5 {
                        0 => {
                            let body = vec![0x3c; usize::from(n % 8192)];
                            let _ = now_or_never(conns[i].write(&body));
                        }
                        1 => {
                            let mut buf = [0u8; 4096];
                            if let Some(Ok(n)) = now_or_never(conns[i].read(&mut buf)) {
                                read += n as u64;
                            }
                        }
                        2 => {
                            let _ = now_or_never(conns[i].shutdown());
                        }
                        3 => conns.swap_remove(i).abort(),
                        _ => drop(conns.swap_remove(i)),
                    }
                }
                Op::Reply { index, len } => {
                    let sessions = handler.sessions.lock().unwrap_or_else(|p| p.into_inner());
                    if !sessions.is_empty() {
                        let body = vec![0x77; usize::from(len % 1400)];
                        let _ = sessions[usize::from(index) % sessions.len()].send(&body);
                    }
                }
            }
            service(&mut engine, now, &mut sent_next).await;
        }
        drop(conns);
        handler.sessions.lock().unwrap_or_else(|p| p.into_inner()).clear();
        handler.requests.lock().unwrap_or_else(|p| p.into_inner()).clear();
        service(&mut engine, now, &mut sent_next).await;
        read
    });
    match runtime().block_on(run) {
        Ok(read) => read,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Inputs the seeds start from.
pub mod seeds {
    use super::Op;

    /// A client segment from client 0 to destination 0: `control` as in [`Op::Segment`],
    /// `seq` after the client's initial number, acknowledging all the engine sent if `ack`.
    pub fn segment(control: u8, seq: i16, ack: bool, payload: u16, v6: bool) -> Op {
        Op::Segment {
            client: 0,
            dst: 0,
            v6,
            control,
            seq,
            ack: ack.then_some(0),
            window: 65535,
            payload,
            window_scale: (control == 1).then_some(7),
            mss: (control == 1).then_some(1460),
            mutation: None,
        }
    }

    /// A connection's life: handshake, accepted, 300 bytes up (read by the handler) and
    /// 2 000 down, both FINs, then time passes.
    pub fn connection(v6: bool) -> Vec<Op> {
        vec![
            segment(1, 0, false, 0, v6),
            Op::Decide { accept: true },
            segment(0, 1, true, 0, v6),
            segment(4, 1, true, 300, v6),
            Op::Conn { index: 0, action: 1, n: 0 },
            Op::Conn { index: 0, action: 0, n: 2000 },
            segment(0, 301, true, 0, v6),
            segment(2, 301, true, 0, v6),
            Op::Conn { index: 0, action: 2, n: 0 },
            segment(0, 302, true, 0, v6),
            Op::Advance { ms: 3000 },
        ]
    }

    /// Operations in the input format.
    pub fn encode(ops: &[Op]) -> Vec<u8> {
        let mut w = crate::reader::Writer::default();
        for op in ops {
            op.write(&mut w);
        }
        w.0
    }
}

/// One packet from the TUN, counted once.
fn feed<E: Engine>(engine: &mut E, stats: &tungate_core::Stats, now: Instant, bytes: &[u8]) {
    let mut packet = PacketBuf::from_slice(bytes);
    let before = stats.snapshot();
    engine.handle_packet(now, &mut packet);
    assert_counted_once(&before, &stats.snapshot(), bytes);
}

/// What the driver does between reads: flush, wake-ups, timers, polled I/O (a stream
/// stack's tasks get to run), and the output written, each packet checked.
/// Repeats until a pass finds nothing to do (at most 16 passes).
async fn service<E: Engine>(engine: &mut E, now: Instant, sent_next: &mut HashMap<(SocketAddr, SocketAddr), u32>) {
    for pass in 0..16 {
        engine.flush(now);
        engine.handle_wakeups(now);
        engine.handle_timeout(now);
        let mut busy = poll_fn(|cx| Poll::Ready(engine.poll_io(cx, now).is_ready())).await;
        while let Some(out) = engine.poll_transmit() {
            busy = true;
            match packet::classify(out.packet()) {
                Ok(Classified::Tcp(seg)) => {
                    assert!(packet::tcp_checksum_ok(out.packet(), &seg), "an engine wrote a bad TCP checksum: {seg:?}");
                    sent_next.insert((seg.dst, seg.src), seg.seq.wrapping_add(seg.segment_len as u32));
                }
                Ok(_) => {}
                Err(e) => panic!("an engine wrote a malformed packet ({e}): {:02x?}", out.packet()),
            }
        }
        if !busy && pass >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
}
