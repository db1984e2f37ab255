//! Every `unsafe` line of backend-lwip: lwIP's raw TCP API behind a safe [`Stack`].
//!
//! # Ownership model
//!
//! * lwIP keeps global state, so one [`Stack`] may exist per process; a second
//!   [`Stack::new`] returns [`AlreadyRunning`]. Every call into lwIP goes through
//!   `&mut Stack`, so calls never overlap and no lock is needed.
//! * lwIP calls back into Rust only from inside those calls. The callbacks only record
//!   what happened in the [`Sink`] (events, output packets, received pbufs) and never
//!   unwind: each body runs under `catch_unwind`.
//! * PCBs are never handed out. The engine names a connection by [`PcbId`], an index into
//!   the sink's slot table; a slot forgets its PCB the moment lwIP frees it (error
//!   callback) or the engine gives it back to lwIP ([`Stack::detach`], [`Stack::abort`]),
//!   so no method can reach a freed PCB whatever the engine does.
//! * `tcp_write` and `tcp_recved` take `u16` lengths; [`Stack::write`] and the credit path
//!   of [`Stack::read`] split every length into pieces of at most `u16::MAX`, so a
//!   truncated length cannot be passed.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::c_void;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use slab::Slab;
use tungate_core::{PacketBuf, PacketPool};

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unreachable_pub,
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    missing_debug_implementations
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/lwip_bindings.rs"));
}

use sys::{err_t, pbuf, tcp_pcb};

const ERR_OK: err_t = sys::err_enum_t_ERR_OK as err_t;

/// How long a PCB stays in TIME-WAIT here, in lwIP's slow-timer ticks (500 ms): 2 s.
const TIME_WAIT_TICKS: u32 = 4;
const ERR_MEM: err_t = sys::err_enum_t_ERR_MEM as err_t;
const ERR_ABRT: err_t = sys::err_enum_t_ERR_ABRT as err_t;

/// Set while a [`Stack`] exists: lwIP's globals admit one.
static CLAIMED: AtomicBool = AtomicBool::new(false);
/// The live stack's sink, for callbacks (which get no context pointer we could use for it).
static SINK: AtomicPtr<Sink> = AtomicPtr::new(ptr::null_mut());

/// A second lwIP stack was requested in this process.
#[derive(Debug, thiserror::Error)]
#[error("lwIP is already running in this process (it keeps global state; one stack per process)")]
pub struct AlreadyRunning;

/// lwIP could not set up its interface or listener.
#[derive(Debug, thiserror::Error)]
#[error("lwIP set-up failed: {0}")]
pub struct SetupError(&'static str);

/// The port lwIP's one listener is bound to (any port would do: see [`Stack::new`]).
const LISTENER_PORT: u16 = 1;

/// Names one accepted connection; valid until [`Stack::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PcbId(usize);

/// What lwIP reported during the last calls; drained with [`Stack::drain_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A handshake completed. `dst` is the original destination (the patched lwIP keeps
    /// the SYN's destination as the PCB's local address).
    Accepted { pcb: PcbId, client: SocketAddr, dst: SocketAddr },
    /// Data or FIN arrived ([`Stack::read`], [`Stack::rx_finished`]).
    Readable(PcbId),
    /// The client acknowledged data: send space opened.
    Writable(PcbId),
    /// lwIP freed the PCB without a graceful close: the client reset it, or it timed out.
    Closed(PcbId),
}

/// State the callbacks write and the engine reads, between lwIP calls.
struct Sink {
    events: Vec<Event>,
    out: VecDeque<PacketBuf>,
    pool: PacketPool,
    slots: Slab<Slot>,
}

struct Slot {
    /// `None` once lwIP freed the PCB or the engine handed it back.
    pcb: Option<NonNull<tcp_pcb>>,
    /// Received pbuf chains not yet delivered, with the offset into the first.
    rx: VecDeque<NonNull<pbuf>>,
    rx_offset: usize,
    /// The client's FIN arrived (after every byte in `rx`).
    fin: bool,
    /// The engine's flow for this connection.
    owner: usize,
    /// lwIP freed the PCB through the error callback.
    reset: bool,
}

impl Slot {
    fn free_rx(&mut self) {
        for p in self.rx.drain(..) {
            // SAFETY: every pointer in `rx` is a chain lwIP handed to `on_recv` with
            // ownership (we returned ERR_OK); it is freed exactly once, here.
            unsafe { sys::pbuf_free(p.as_ptr()) };
        }
        self.rx_offset = 0;
    }
}

/// One lwIP instance: its interface, its catch-all listener and the sink.
pub(crate) struct Stack {
    sink: NonNull<Sink>,
    netif: NonNull<sys::netif>,
    listener: NonNull<tcp_pcb>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").finish_non_exhaustive()
    }
}

// SAFETY: lwIP (NO_SYS, no thread-local state) may be driven from any thread as long as
// calls never overlap. `Stack` is the only way in, every call takes `&mut self`, and
// `Stack` is not `Sync`; moving it moves the whole lwIP instance with it.
unsafe impl Send for Stack {}

impl Stack {
    /// Initialises lwIP with an interface of MTU `mtu` that accepts every destination,
    /// and one listener that takes every SYN the engine feeds it.
    pub(crate) fn new(mtu: u16) -> Result<Stack, StackError> {
        if CLAIMED.swap(true, Ordering::AcqRel) {
            return Err(StackError::AlreadyRunning(AlreadyRunning));
        }
        let sink = Box::new(Sink {
            events: Vec::new(),
            out: VecDeque::new(),
            // At most ~2 MiB of buffers kept: a burst larger than that (thousands of
            // handshakes at once) allocates, and its buffers are freed instead of kept.
            pool: PacketPool::new(usize::from(mtu), (2 << 20) / usize::from(mtu).max(1)),
            slots: Slab::new(),
        });
        let sink = NonNull::from(Box::leak(sink));
        SINK.store(sink.as_ptr(), Ordering::Release);
        // SAFETY: `netif` is a plain C struct for which all-zero is the documented
        // "unconfigured" state that netif_add fills in.
        let netif: Box<sys::netif> = Box::new(unsafe { std::mem::zeroed() });
        let netif = NonNull::from(Box::leak(netif));
        // SAFETY: lwIP is not running (CLAIMED was false), so initialising it is allowed;
        // `netif` points to a live, zeroed struct that stays allocated (leaked until Drop)
        // for as long as lwIP lists it; `netif_init` only writes fields of it.
        let listener = unsafe {
            sys::lwip_init();
            let added = sys::netif_add_noaddr(netif.as_ptr(), ptr::null_mut(), Some(netif_init), Some(sys::ip_input));
            if added.is_null() {
                return Err(Self::fail(netif, sink, "netif_add"));
            }
            // After netif_add, which zeroes the MTU (0 would mean "no limit": lwIP would
            // then advertise and send its compile-time maximum MSS).
            (*netif.as_ptr()).mtu = mtu;
            (*netif.as_ptr()).mtu6 = mtu;
            sys::netif_set_default(netif.as_ptr());
            sys::netif_set_link_up(netif.as_ptr());
            sys::netif_set_up(netif.as_ptr());
            let pcb = sys::tcp_new_ip_type(sys::lwip_ip_addr_type_IPADDR_TYPE_ANY as u8);
            if pcb.is_null() {
                sys::netif_remove(netif.as_ptr());
                return Err(Self::fail(netif, sink, "tcp_new"));
            }
            // The any-address: the patched lookup hands every SYN to the first listener
            // regardless of address and port. A fixed port, not 0: lwIP's `tcp_new_port`
            // starts each `lwip_init` at a random port in 0xc000..=0xffff and, from
            // 0xffff, wraps to 0, which `tcp_bind` takes for "no port free" (one start in
            // 16 384 failed; `engines_start_again_and_again`, found by fuzzing). No other
            // PCB exists yet, so no port is taken.
            let any = ip_any_type();
            if sys::tcp_bind(pcb, &any, LISTENER_PORT) != ERR_OK {
                sys::tcp_abort(pcb);
                sys::netif_remove(netif.as_ptr());
                return Err(Self::fail(netif, sink, "tcp_bind"));
            }
            let listener = sys::tcp_listen_with_backlog(pcb, 255);
            if listener.is_null() {
                sys::tcp_abort(pcb);
                sys::netif_remove(netif.as_ptr());
                return Err(Self::fail(netif, sink, "tcp_listen"));
            }
            sys::tcp_accept(listener, Some(on_accept));
            listener
        };
        let listener = NonNull::new(listener).ok_or(StackError::Setup(SetupError("tcp_listen")))?;
        Ok(Stack { sink, netif, listener })
    }

    /// Undoes a half-done [`Stack::new`].
    ///
    /// # Safety
    /// `netif` and `sink` come from `Box::leak` in `new` and are no longer used by lwIP.
    unsafe fn fail(netif: NonNull<sys::netif>, sink: NonNull<Sink>, what: &'static str) -> StackError {
        SINK.store(ptr::null_mut(), Ordering::Release);
        // SAFETY: per this function's contract both came from `Box::leak` and nothing
        // refers to them any more.
        unsafe {
            drop(Box::from_raw(netif.as_ptr()));
            drop(Box::from_raw(sink.as_ptr()));
        }
        CLAIMED.store(false, Ordering::Release);
        StackError::Setup(SetupError(what))
    }

    fn sink(&mut self) -> &mut Sink {
        // SAFETY: the sink lives as long as the stack. Callbacks only touch it while lwIP
        // runs inside a `Stack` method, and no method holds this borrow across a call
        // into lwIP, so the borrow is unique while it lives.
        unsafe { self.sink.as_mut() }
    }

    fn pcb(&mut self, id: PcbId) -> Option<NonNull<tcp_pcb>> {
        let pcb = self.sink().slots.get(id.0).and_then(|s| s.pcb)?;
        // SAFETY: the slot holds only live PCBs: lwIP frees an attached PCB only through
        // the error callback (which clears the slot) or from TIME-WAIT, and a PCB is
        // taken out of the slot below as soon as it is seen in TIME-WAIT.
        let time_wait = unsafe { pcb.as_ref().state } == sys::tcp_state_TIME_WAIT;
        if time_wait {
            // lwIP frees TIME-WAIT PCBs without a callback: hand it over now.
            self.detach(id);
            return None;
        }
        Some(pcb)
    }

    /// Makes the slot forget its PCB and returns it (to hand back to lwIP).
    fn take_pcb(&mut self, id: PcbId) -> Option<NonNull<tcp_pcb>> {
        self.sink().slots.get_mut(id.0).and_then(|s| s.pcb.take())
    }

    /// Feeds one IP packet to lwIP. Returns false if lwIP could not take it (no memory,
    /// or a length it cannot represent).
    pub(crate) fn input(&mut self, packet: &[u8]) -> bool {
        let Ok(len) = u16::try_from(packet.len()) else { return false };
        // SAFETY: pbuf_alloc returns a fresh PBUF_RAM pbuf of `len` contiguous payload
        // bytes or null. pbuf_take copies exactly `len` bytes from `packet`, which has
        // them. ip_input takes ownership of the pbuf on ERR_OK; on error it is ours to
        // free. Callbacks run during ip_input and touch only the sink, which no Rust
        // borrow holds across this call.
        unsafe {
            let p = sys::pbuf_alloc(sys::pbuf_layer_PBUF_RAW, len, sys::pbuf_type_PBUF_RAM);
            if p.is_null() {
                return false;
            }
            if sys::pbuf_take(p, packet.as_ptr().cast(), len) != ERR_OK {
                sys::pbuf_free(p);
                return false;
            }
            if sys::ip_input(p, self.netif.as_ptr()) != ERR_OK {
                sys::pbuf_free(p);
                return false;
            }
        }
        true
    }

    /// Runs lwIP's TCP timer (fast timer every call, slow timer every second call); due
    /// every 250 ms while [`has_pcbs`](Self::has_pcbs).
    pub(crate) fn tick(&mut self) {
        // SAFETY: lwIP is initialised and no other call is in progress (`&mut self`).
        unsafe { sys::tcp_tmr() }
        self.end_time_wait();
    }

    /// Whether lwIP holds any connection (active or TIME-WAIT) that needs its timer.
    pub(crate) fn has_pcbs(&mut self) -> bool {
        // SAFETY: reading two pointer-sized globals; lwIP only changes them inside calls,
        // and none is in progress (`&mut self`).
        unsafe {
            !ptr::addr_of!(sys::tcp_active_pcbs).read().is_null() || !ptr::addr_of!(sys::tcp_tw_pcbs).read().is_null()
        }
    }

    /// Aborts the PCB lwIP keeps in TIME-WAIT for `client` → `dst`, if any (no RST is
    /// sent for a TIME-WAIT PCB): a new connection's SYN on that 4-tuple would otherwise
    /// meet the old one, which answers it with an ACK until TIME-WAIT ends (clients whose
    /// kernel reused a port retried after 1 s and 2 s). Returns whether one was found.
    pub(crate) fn forget_time_wait(&mut self, client: SocketAddr, dst: SocketAddr) -> bool {
        let mut found = false;
        self.abort_time_wait(|p| {
            let this = !found
                && to_socket_addr(&p.remote_ip, p.remote_port) == client
                && to_socket_addr(&p.local_ip, p.local_port) == dst;
            found |= this;
            this
        });
        found
    }

    /// Ends TIME-WAIT 2 s ([`TIME_WAIT_TICKS`]) after a PCB's last segment, not lwIP's 2 × TCP_MSL
    /// (which must stay long for LAST-ACK's sake: see lwipopts.h). Called with the timer.
    fn end_time_wait(&mut self) {
        // SAFETY: reading a u32 global; lwIP changes it only inside calls, and none is in
        // progress (`&mut self`).
        let ticks = unsafe { ptr::addr_of!(sys::tcp_ticks).read() };
        self.abort_time_wait(|p| ticks.wrapping_sub(p.tmr) > TIME_WAIT_TICKS);
    }

    /// Aborts every TIME-WAIT PCB that lwIP owns alone and `chosen` picks.
    fn abort_time_wait(&mut self, mut chosen: impl FnMut(&tcp_pcb) -> bool) {
        // SAFETY: no lwIP call is in progress (`&mut self`). The list is lwIP's; the next
        // pointer is read before a PCB is aborted (`tcp_abort` unlinks and frees it, and
        // touches no other PCB). Only a PCB whose callback argument is null is aborted,
        // i.e. one lwIP owns alone (taken out of our slot, callbacks cleared): a PCB still
        // in one of our slots is left alone, or the slot would point at freed memory.
        unsafe {
            let mut pcb = ptr::addr_of!(sys::tcp_tw_pcbs).read();
            while let Some(p) = pcb.as_ref() {
                let next = p.next;
                if p.callback_arg.is_null() && chosen(p) {
                    clear_callbacks(pcb);
                    sys::tcp_abort(pcb);
                }
                pcb = next;
            }
        }
    }

    pub(crate) fn drain_events(&mut self, out: &mut Vec<Event>) {
        out.append(&mut self.sink().events);
    }

    pub(crate) fn pop_output(&mut self) -> Option<PacketBuf> {
        self.sink().out.pop_front()
    }

    /// Records which engine flow owns `id`.
    pub(crate) fn set_owner(&mut self, id: PcbId, owner: usize) {
        if let Some(slot) = self.sink().slots.get_mut(id.0) {
            slot.owner = owner;
        }
    }

    pub(crate) fn owner(&mut self, id: PcbId) -> Option<usize> {
        self.sink().slots.get(id.0).map(|s| s.owner)
    }

    /// Offers received bytes to `f`, one contiguous run at a time, until `f` takes less
    /// than offered; returns how many it took. The taken bytes reopen lwIP's window.
    pub(crate) fn read(&mut self, id: PcbId, mut f: impl FnMut(&[u8]) -> usize) -> usize {
        let Some(slot) = self.sink().slots.get_mut(id.0) else { return 0 };
        let mut total = 0;
        'chains: while let Some(&head) = slot.rx.front() {
            let mut skip = slot.rx_offset;
            let mut q = head.as_ptr();
            while !q.is_null() {
                // SAFETY: `q` walks a chain we own (see `Slot::rx`); each node's
                // `payload` holds `len` readable bytes that stay put until the chain is
                // freed below, after the last use of the slice.
                let (run, next) = unsafe {
                    let node = &*q;
                    (std::slice::from_raw_parts(node.payload.cast::<u8>(), usize::from(node.len)), node.next)
                };
                if skip >= run.len() {
                    skip -= run.len();
                    q = next;
                    continue;
                }
                let offered = run.len() - skip;
                let n = f(&run[skip..]).min(offered);
                slot.rx_offset += n;
                total += n;
                if n < offered {
                    break 'chains;
                }
                skip = 0;
                q = next;
            }
            // The whole chain went.
            slot.rx.pop_front();
            slot.rx_offset = 0;
            // SAFETY: ours (see `Slot::rx`), removed from the queue, freed once.
            unsafe { sys::pbuf_free(head.as_ptr()) };
        }
        // The slot borrow ends here: tcp_recved may send a window update, whose output
        // callback writes to the sink.
        if total > 0 {
            if let Some(pcb) = self.pcb(id) {
                let mut left = total;
                while left > 0 {
                    let n = left.min(usize::from(u16::MAX));
                    // SAFETY: `pcb` is live (the slot forgets it when lwIP frees it), n
                    // fits u16 by construction, and no borrow of the sink is held.
                    unsafe { sys::tcp_recved(pcb.as_ptr(), n as u16) };
                    left -= n;
                }
            }
        }
        total
    }

    /// The client's FIN arrived and every byte before it was read.
    pub(crate) fn rx_finished(&mut self, id: PcbId) -> bool {
        self.sink().slots.get(id.0).is_some_and(|s| s.fin && s.rx.is_empty())
    }

    /// The client's FIN arrived (bytes before it may be unread).
    pub(crate) fn fin_received(&mut self, id: PcbId) -> bool {
        self.sink().slots.get(id.0).is_some_and(|s| s.fin)
    }

    /// Whether lwIP freed the PCB without a graceful close (the client reset it, or
    /// retransmissions or keep-alives ran out).
    pub(crate) fn was_reset(&mut self, id: PcbId) -> bool {
        self.sink().slots.get(id.0).is_some_and(|s| s.reset)
    }

    /// Room in the send buffer, in bytes.
    pub(crate) fn send_space(&mut self, id: PcbId) -> usize {
        let Some(pcb) = self.pcb(id) else { return 0 };
        // SAFETY: `pcb` is live; reading a field while no lwIP call runs.
        // (lwIP may still refuse a write when its segment queue is full; `write` stops there.)
        unsafe { pcb.as_ref().snd_buf as usize }
    }

    /// Copies as much of `data` into lwIP's send buffer as it takes; returns how much.
    /// Does not transmit: call [`output`](Self::output).
    pub(crate) fn write(&mut self, id: PcbId, data: &[u8]) -> usize {
        let Some(pcb) = self.pcb(id) else { return 0 };
        let mut total = 0;
        while total < data.len() {
            let room = self.send_space(id);
            let n = (data.len() - total).min(room).min(usize::from(u16::MAX));
            if n == 0 {
                break;
            }
            // SAFETY: `pcb` is live; `data[total..total + n]` is in bounds and n fits u16
            // by construction; TCP_WRITE_FLAG_COPY makes lwIP copy the bytes, so the
            // slice need not outlive the call.
            let err = unsafe {
                sys::tcp_write(pcb.as_ptr(), data[total..].as_ptr().cast(), n as u16, sys::TCP_WRITE_FLAG_COPY as u8)
            };
            if err != ERR_OK {
                break;
            }
            total += n;
        }
        total
    }

    /// Sends what is due (queued data, pending ACKs).
    pub(crate) fn output(&mut self, id: PcbId) {
        if let Some(pcb) = self.pcb(id) {
            // SAFETY: `pcb` is live; output callbacks touch only the sink.
            unsafe { sys::tcp_output(pcb.as_ptr()) };
        }
    }

    /// Sends a delayed ACK now, if one is pending. Called once per flow after each read
    /// batch: lwIP would otherwise hold it until its 250 ms fast timer.
    pub(crate) fn flush_ack(&mut self, id: PcbId) {
        let Some(mut pcb) = self.pcb(id) else { return };
        // SAFETY: `pcb` is live and no lwIP call is in progress, so updating its flags
        // (what lwIP's tcp_ack_now macro does) and calling tcp_output are allowed.
        unsafe {
            let p = pcb.as_mut();
            if p.flags & sys::TF_ACK_DELAY as u16 != 0 {
                p.flags |= sys::TF_ACK_NOW as u16;
                sys::tcp_output(pcb.as_ptr());
            }
        }
    }

    /// Sends FIN after the queued data. Returns false if lwIP refused (no memory, or the
    /// connection is not in a state that can send FIN).
    pub(crate) fn shutdown_write(&mut self, id: PcbId) -> bool {
        let Some(pcb) = self.pcb(id) else { return false };
        // SAFETY: `pcb` is live. tcp_shutdown(tx only) never frees the PCB (it only queues
        // FIN), so `pcb` stays valid.
        unsafe { sys::tcp_shutdown(pcb.as_ptr(), 0, 1) == ERR_OK }
    }

    /// Hands the PCB to lwIP for the rest of its graceful close (LAST-ACK, TIME-WAIT): no
    /// callback will name it again. Received bytes not yet read stay readable.
    pub(crate) fn detach(&mut self, id: PcbId) {
        let Some(pcb) = self.take_pcb(id) else { return };
        Self::hand_over(pcb);
    }

    /// Clears `pcb`'s callbacks and closes it: lwIP owns it from here.
    fn hand_over(pcb: NonNull<tcp_pcb>) {
        // SAFETY: `pcb` was live; the callbacks are cleared first so lwIP never calls us
        // for it again. tcp_close on a PCB that already sent FIN only marks it closed;
        // if lwIP still cannot queue a FIN (no memory) it must be aborted instead.
        unsafe {
            clear_callbacks(pcb.as_ptr());
            if sys::tcp_close(pcb.as_ptr()) != ERR_OK {
                sys::tcp_abort(pcb.as_ptr());
            }
        }
    }

    /// Resets the connection (RST to the client) and frees the PCB.
    pub(crate) fn abort(&mut self, id: PcbId) {
        let Some(pcb) = self.take_pcb(id) else { return };
        // SAFETY: `pcb` was live; callbacks cleared so the error callback tcp_abort
        // raises does not reach us; lwIP frees the PCB.
        unsafe {
            clear_callbacks(pcb.as_ptr());
            sys::tcp_abort(pcb.as_ptr());
        }
    }

    /// Forgets `id`: aborts the PCB if it is still attached and frees unread data.
    pub(crate) fn release(&mut self, id: PcbId) {
        self.abort(id);
        if self.sink().slots.contains(id.0) {
            let mut slot = self.sink().slots.remove(id.0);
            slot.free_rx();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let ids: Vec<usize> = self.sink().slots.iter().map(|(k, _)| k).collect();
        for id in ids {
            self.release(PcbId(id));
        }
        // SAFETY: no lwIP call is in progress. PCBs lwIP still owns (detached ones closing
        // or in TIME-WAIT) are aborted: lwip_init does not clear its lists, and a later
        // stack must not inherit them. tcp_abort unlinks each PCB from its list, so both
        // loops end. Then the listener is closed (listeners close at once) and the
        // interface removed, so lwIP holds no pointer to `netif`, and the heap objects
        // from `new` are freed; the process may start a new stack.
        unsafe {
            for list in [ptr::addr_of_mut!(sys::tcp_active_pcbs), ptr::addr_of_mut!(sys::tcp_tw_pcbs)] {
                loop {
                    let pcb = list.read();
                    if pcb.is_null() {
                        break;
                    }
                    clear_callbacks(pcb);
                    sys::tcp_abort(pcb);
                }
            }
            sys::tcp_accept(self.listener.as_ptr(), None);
            sys::tcp_close(self.listener.as_ptr());
            sys::netif_remove(self.netif.as_ptr());
            SINK.store(ptr::null_mut(), Ordering::Release);
            drop(Box::from_raw(self.netif.as_ptr()));
            drop(Box::from_raw(self.sink.as_ptr()));
        }
        CLAIMED.store(false, Ordering::Release);
    }
}

/// Why lwIP could not be started ([`LwipEngine::new`](crate::LwipEngine::new)).
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    AlreadyRunning(#[from] AlreadyRunning),
    #[error(transparent)]
    Setup(#[from] SetupError),
}

fn ip_any_type() -> sys::ip_addr_t {
    sys::ip_addr_t {
        u_addr: sys::ip_addr__bindgen_ty_1 { ip6: sys::ip6_addr_t { addr: [0; 4], zone: 0 } },
        type_: sys::lwip_ip_addr_type_IPADDR_TYPE_ANY as u8,
    }
}

fn to_socket_addr(ip: &sys::ip_addr_t, port: u16) -> SocketAddr {
    let ip = if u32::from(ip.type_) == sys::lwip_ip_addr_type_IPADDR_TYPE_V6 {
        // SAFETY: the type tag says the v6 member is the one written; lwIP stores
        // addresses in network byte order word by word.
        let words = unsafe { ip.u_addr.ip6.addr };
        let mut octets = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        // SAFETY: the type tag says the v4 member is the one written (network order).
        let word = unsafe { ip.u_addr.ip4.addr };
        IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes()))
    };
    SocketAddr::new(ip, port)
}

/// Clears every callback and the argument of `pcb`.
///
/// # Safety
/// `pcb` is a live PCB and no other lwIP call is in progress.
unsafe fn clear_callbacks(pcb: *mut tcp_pcb) {
    // SAFETY: per this function's contract.
    unsafe {
        sys::tcp_arg(pcb, ptr::null_mut());
        sys::tcp_recv(pcb, None);
        sys::tcp_sent(pcb, None);
        sys::tcp_err(pcb, None);
    }
}

/// Runs a callback body with the sink, returning `fallback` if there is no stack or the
/// body panicked (a panic must not unwind into C).
fn with_sink<R>(fallback: R, f: impl FnOnce(&mut Sink) -> R) -> R {
    let sink = SINK.load(Ordering::Acquire);
    if sink.is_null() {
        return fallback;
    }
    // SAFETY: callbacks run only inside lwIP calls made by a `Stack` method, which holds
    // no borrow of the sink across the call, so this is the only live reference.
    let sink = unsafe { &mut *sink };
    match catch_unwind(AssertUnwindSafe(|| f(sink))) {
        Ok(r) => r,
        Err(_) => {
            tracing::error!("panic in an lwIP callback; the event is dropped");
            fallback
        }
    }
}

fn slot_of(arg: *mut c_void) -> Option<usize> {
    // The argument is the slot index plus one (null means "no slot").
    (arg as usize).checked_sub(1)
}

/// netif init: output functions and name; lwIP calls it from netif_add.
unsafe extern "C" fn netif_init(netif: *mut sys::netif) -> err_t {
    // SAFETY: lwIP passes the netif being added, which is live and ours.
    unsafe {
        let n = &mut *netif;
        n.output = Some(on_output_ip4);
        n.output_ip6 = Some(on_output_ip6);
        n.name = [b't' as _, b'g' as _];
    }
    ERR_OK
}

unsafe extern "C" fn on_output_ip4(_: *mut sys::netif, p: *mut pbuf, _: *const sys::ip4_addr_t) -> err_t {
    // SAFETY: lwIP passes a live pbuf chain it keeps ownership of.
    unsafe { queue_output(p) }
}

unsafe extern "C" fn on_output_ip6(_: *mut sys::netif, p: *mut pbuf, _: *const sys::ip6_addr_t) -> err_t {
    // SAFETY: as for `on_output_ip4`.
    unsafe { queue_output(p) }
}

/// Copies an outgoing packet into a pooled buffer on the output queue. The queue is not
/// bounded here: it holds what lwIP emits within one engine step (bounded by the windows),
/// and the driver writes it all to the device, waiting when the device pushes back.
///
/// # Safety
/// `p` is a live pbuf chain.
unsafe fn queue_output(p: *mut pbuf) -> err_t {
    with_sink(ERR_MEM, |sink| {
        // SAFETY: per this function's contract.
        let total = usize::from(unsafe { (*p).tot_len });
        let mut buf = sink.pool.take_fitting(total);
        let spare = buf.spare_mut();
        // SAFETY: `spare` has at least `total` bytes; pbuf_copy_partial copies at most
        // `total` (which fits u16: it came from tot_len).
        let copied = unsafe { sys::pbuf_copy_partial(p, spare.as_mut_ptr().cast(), total as u16, 0) };
        buf.set_len(usize::from(copied));
        sink.out.push_back(buf);
        ERR_OK
    })
}

unsafe extern "C" fn on_accept(_: *mut c_void, pcb: *mut tcp_pcb, err: err_t) -> err_t {
    if pcb.is_null() || err != ERR_OK {
        return ERR_OK;
    }
    let slot = with_sink(None, |sink| {
        let key = sink.slots.insert(Slot {
            pcb: NonNull::new(pcb),
            rx: VecDeque::new(),
            rx_offset: 0,
            fin: false,
            owner: 0,
            reset: false,
        });
        // SAFETY: lwIP passes the new, live PCB.
        let p = unsafe { &*pcb };
        let client = to_socket_addr(&p.remote_ip, p.remote_port);
        let dst = to_socket_addr(&p.local_ip, p.local_port);
        sink.events.push(Event::Accepted { pcb: PcbId(key), client, dst });
        Some(key)
    });
    let Some(key) = slot else {
        // SAFETY: the PCB is live and we return ERR_ABRT after aborting it, as lwIP requires.
        unsafe { sys::tcp_abort(pcb) };
        return ERR_ABRT;
    };
    // SAFETY: the PCB is live and ours to configure.
    unsafe {
        sys::tcp_arg(pcb, (key + 1) as *mut c_void);
        sys::tcp_recv(pcb, Some(on_recv));
        sys::tcp_sent(pcb, Some(on_sent));
        sys::tcp_err(pcb, Some(on_err));
        let p = &mut *pcb;
        p.flags |= sys::TF_NODELAY as u16;
        p.so_options |= sys::SOF_KEEPALIVE as u8;
    }
    ERR_OK
}

unsafe extern "C" fn on_recv(arg: *mut c_void, _: *mut tcp_pcb, p: *mut pbuf, err: err_t) -> err_t {
    let Some(key) = slot_of(arg) else {
        // Not ours (cannot happen: callbacks are cleared before a slot goes). Refuse.
        return ERR_MEM;
    };
    let taken = with_sink(false, |sink| {
        let Some(slot) = sink.slots.get_mut(key) else { return false };
        match NonNull::new(p) {
            Some(chain) if err == ERR_OK => slot.rx.push_back(chain),
            Some(_) => return false,
            None => slot.fin = true,
        }
        sink.events.push(Event::Readable(PcbId(key)));
        true
    });
    // ERR_OK: we own the pbuf. ERR_MEM: lwIP keeps it and offers it again later. A FIN
    // (null pbuf) is never refused: lwIP would not offer it again.
    if taken || p.is_null() { ERR_OK } else { ERR_MEM }
}

unsafe extern "C" fn on_sent(arg: *mut c_void, _: *mut tcp_pcb, _: u16) -> err_t {
    if let Some(key) = slot_of(arg) {
        with_sink((), |sink| sink.events.push(Event::Writable(PcbId(key))));
    }
    ERR_OK
}

unsafe extern "C" fn on_err(arg: *mut c_void, err: err_t) {
    // ERR_RST (the client reset it) or ERR_ABRT (retransmissions or keep-alives ran out).
    // lwIP has already freed the PCB.
    if let Some(key) = slot_of(arg) {
        with_sink((), |sink| {
            if let Some(slot) = sink.slots.get_mut(key) {
                slot.pcb = None;
                slot.reset = true;
                tracing::debug!(err, "lwIP closed a connection");
                sink.events.push(Event::Closed(PcbId(key)));
            }
        });
    }
}
