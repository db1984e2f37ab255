//! Packet capture (`--pcap`): every packet crossing the device, both directions, written
//! to a pcap file (LINKTYPE_RAW: each record is one IP packet) that tcpdump and Wireshark
//! read.
//!
//! The tap is a device wrapper ([`Captured`]) that [`serve_with`](crate::backend::serve_with)
//! puts around every backend's device, next to the counters. The driver's task only copies
//! a packet into a bounded queue ([`QUEUE_DEPTH`]); a thread of its own formats and writes
//! the file. When the queue is full the packet is not captured (counted in
//! `pcap_dropped`): capture never slows the gateway down. With capture off the wrapper
//! holds `None` and costs one branch per packet.
//!
//! What a record holds, with TUN offload: a packet read is captured as the stack sees it,
//! so a super-packet the kernel handed over appears as the segments it was split into; a
//! packet written is captured as handed to the kernel, so a super-packet the stack built
//! appears whole (up to 64 KiB, longer than the MTU) and its transport checksum may be
//! only partial (the kernel completes it): Wireshark flags such checksums as wrong.
//!
//! `--pcap-max-size`: once the file would grow past it, capture stops (a warning is
//! logged; later packets are counted in `pcap_dropped`). Stopping keeps the start of an
//! incident, which is what a capture is usually taken for; rotating would need a naming
//! scheme and a file count, and is left to tools like `tcpdump -C` on the pcap.

use std::fs::File;
use std::future::Future;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use byteorder_slice::LittleEndian;
use pcap_file::pcap::{PcapHeader, PcapPacket};
use pcap_file::{DataLink, Endianness, TsResolution};

use super::{PacketBuf, PacketDevice};
use crate::config::Mtu;
use crate::stats::Stats;

/// Packets the capture queue holds before it drops: about 0.1 s of a 1 Gbit/s flow at
/// MTU 1500. The writer thread keeps up with several Gbit/s, so it fills only in bursts.
pub const QUEUE_DEPTH: usize = 8192;

/// The largest record: a super-packet of TUN offload (64 KiB) with room to spare.
const SNAPLEN: u32 = 256 * 1024;

/// How often the writer flushes while packets keep coming, so that a capture read while
/// the gateway runs (`tcpdump -r`) is at most this far behind.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Bytes of pcap's file header and of each record's header.
const FILE_HEADER: u64 = 24;
const RECORD_HEADER: u64 = 16;

/// The sending side of a capture: given to [`serve_with`](crate::backend::serve_with).
#[derive(Debug, Clone)]
pub struct Capture {
    queue: SyncSender<Record>,
    stats: Arc<Stats>,
}

/// The writer thread of a capture; [`finish`](Self::finish) waits for it to write what
/// was queued and close the file.
#[derive(Debug)]
pub struct CaptureWriter {
    thread: std::thread::JoinHandle<io::Result<()>>,
    path: PathBuf,
}

#[derive(Debug)]
struct Record {
    at: Duration,
    data: Vec<u8>,
}

impl Capture {
    /// Creates (truncates) `path`, writes the pcap file header and starts the writer.
    /// `max_size` bounds the file in bytes (see the module docs). Counts in `stats`.
    pub fn create(path: &Path, max_size: Option<u64>, stats: Arc<Stats>) -> io::Result<(Capture, CaptureWriter)> {
        let mut writer = BufWriter::with_capacity(256 * 1024, File::create(path)?);
        let header = PcapHeader {
            datalink: DataLink::RAW,
            snaplen: SNAPLEN,
            endianness: Endianness::Little,
            ts_resolution: TsResolution::MicroSecond,
            ..PcapHeader::default()
        };
        header.write_to(&mut writer).map_err(io::Error::other)?;
        io::Write::flush(&mut writer)?;
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE_DEPTH);
        let thread_stats = stats.clone();
        let shown = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("pcap-writer".into())
            .spawn(move || write_records(rx, writer, max_size.unwrap_or(u64::MAX), &shown, &thread_stats))?;
        Ok((Capture { queue, stats }, CaptureWriter { thread, path: path.to_path_buf() }))
    }

    /// Queues a copy of `packet` (never waits: a full queue drops and counts).
    fn tap(&self, packet: &[u8]) {
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        match self.queue.try_send(Record { at, data: packet.to_vec() }) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Stats::inc(&self.stats.pcap_dropped),
        }
    }
}

impl CaptureWriter {
    /// Waits until everything queued before the last [`Capture`] was dropped is written,
    /// and closes the file.
    pub fn finish(self) -> io::Result<()> {
        let path = self.path;
        self.thread
            .join()
            .map_err(|_| io::Error::other("the pcap writer panicked"))?
            .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
    }
}

/// The writer thread: records to the file until every sender is gone.
fn write_records(
    rx: Receiver<Record>,
    mut writer: BufWriter<File>,
    max_size: u64,
    path: &Path,
    stats: &Stats,
) -> io::Result<()> {
    let mut size = FILE_HEADER;
    let mut full = false;
    let mut unflushed = false;
    let mut flushed = std::time::Instant::now();
    loop {
        if unflushed && flushed.elapsed() >= FLUSH_EVERY {
            io::Write::flush(&mut writer)?;
            (unflushed, flushed) = (false, std::time::Instant::now());
        }
        let record = match rx.recv_timeout(FLUSH_EVERY) {
            Ok(record) => record,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let len = record.data.len() as u64;
        if full || size + RECORD_HEADER + len > max_size {
            if !full {
                tracing::warn!("the capture {} reached --pcap-max-size; later packets are not written", path.display());
                full = true;
            }
            Stats::inc(&stats.pcap_dropped);
            continue;
        }
        let orig_len = u32::try_from(len).unwrap_or(u32::MAX);
        PcapPacket::new(record.at, orig_len, &record.data)
            .write_to::<_, LittleEndian>(&mut writer, TsResolution::MicroSecond, SNAPLEN)
            .map_err(io::Error::other)?;
        size += RECORD_HEADER + len;
        unflushed = true;
        stats.pcap_packets.fetch_add(1, Ordering::Relaxed);
    }
    io::Write::flush(&mut writer)
}

/// `D`, with every packet read and written copied to a [`Capture`] when there is one.
#[derive(Debug)]
pub struct Captured<D> {
    inner: D,
    capture: Option<Capture>,
}

impl<D: PacketDevice> Captured<D> {
    pub fn new(inner: D, capture: Option<Capture>) -> Self {
        Captured { inner, capture }
    }
}

impl<D: PacketDevice> PacketDevice for Captured<D> {
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        self.inner.readable()
    }

    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        let got = self.inner.try_recv(buf)?;
        if let (true, Some(capture)) = (got, &self.capture) {
            capture.tap(buf.packet());
        }
        Ok(got)
    }

    fn try_recv_batch(&mut self, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let n = self.inner.try_recv_batch(bufs)?;
        if let Some(capture) = &self.capture {
            for buf in &bufs[..n] {
                capture.tap(buf.packet());
            }
        }
        Ok(n)
    }

    async fn send(&mut self, packet: &PacketBuf) -> io::Result<()> {
        if let Some(capture) = &self.capture {
            capture.tap(packet.packet());
        }
        self.inner.send(packet).await
    }

    fn mtu(&self) -> Mtu {
        self.inner.mtu()
    }

    fn max_packet_len(&self) -> usize {
        self.inner.max_packet_len()
    }

    fn segmentation_offload(&self) -> bool {
        self.inner.segmentation_offload()
    }
}

#[cfg(test)]
mod tests {
    use pcap_file::pcap::PcapReader;

    use super::*;
    use crate::device::mem;

    /// Both directions reach the file, in order, byte for byte; past the size bound
    /// nothing more is written and the rest is counted as dropped.
    #[tokio::test]
    async fn packets_both_ways_reach_the_file_and_the_size_bound_holds() {
        let dir = std::env::temp_dir().join(format!("tungate-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("t.pcap");
        let stats = Arc::new(Stats::default());
        // Room for the header and three 100-byte records, not four.
        let max = FILE_HEADER + 3 * (RECORD_HEADER + 100) + 50;
        let (capture, writer) = Capture::create(&path, Some(max), stats.clone()).expect("create");
        let (device, mut peer) = mem::pair(Mtu::DEFAULT, 16);
        let mut device = Captured::new(device, Some(capture));
        let read = vec![0x45u8; 100];
        peer.tx.send(read.clone()).await.expect("send");
        let mut buf = PacketBuf::with_capacity(1500);
        device.readable().await.expect("readable");
        assert!(device.try_recv(&mut buf).expect("read"));
        let written: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![0x60 | i; 100]).collect();
        for packet in &written {
            device.send(&PacketBuf::from_slice(packet)).await.expect("write");
            peer.rx.recv().await.expect("written");
        }
        drop(device);
        writer.finish().expect("finish");
        let file = File::open(&path).expect("open");
        let mut reader = PcapReader::new(file).expect("a pcap file");
        assert_eq!(reader.header().datalink, DataLink::RAW);
        let mut got = Vec::new();
        while let Some(packet) = reader.next_packet() {
            got.push(packet.expect("a record").data.into_owned());
        }
        assert_eq!(got, [read, written[0].clone(), written[1].clone()]);
        let s = stats.snapshot();
        assert_eq!((s.pcap_packets, s.pcap_dropped), (3, 1));
        std::fs::remove_dir_all(&dir).ok();
    }
}
