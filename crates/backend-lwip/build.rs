//! Compiles lwIP from the `lwip` crate's registry sources with tungate's own
//! `csrc/lwipopts.h` and `csrc/arch/cc.h`, and generates bindings for exactly the API the
//! `ffi` module calls.
//!
//! The sources are located, in order, at `$TUNGATE_LWIP_SRC` (a directory holding
//! lwIP's `core/` and `include/`), or in cargo's registry cache as the `lwip-0.4.0`
//! package that `Cargo.toml` locks (and `cargo fetch` downloads) but never builds.

use std::env;
use std::path::{Path, PathBuf};

const LWIP_PACKAGE: &str = "lwip-0.4.0";

/// lwIP's C files this configuration needs (NO_SYS, TCP over IPv4 and IPv6).
const SOURCES: &[&str] = &[
    "core/init.c",
    "core/def.c",
    "core/inet_chksum.c",
    "core/ip.c",
    "core/mem.c",
    "core/memp.c",
    "core/netif.c",
    "core/pbuf.c",
    "core/tcp.c",
    "core/tcp_in.c",
    "core/tcp_out.c",
    "core/timeouts.c",
    "core/ipv4/ip4.c",
    "core/ipv4/ip4_addr.c",
    "core/ipv6/ip6.c",
    "core/ipv6/ip6_addr.c",
    "core/ipv6/icmp6.c",
    "core/ipv6/nd6.c",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ours = manifest.join("csrc");
    let lwip = find_sources().unwrap_or_else(|msg| panic!("{msg}"));
    println!("cargo:rerun-if-env-changed=TUNGATE_LWIP_SRC");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-changed=build.rs");

    let include = lwip.join("include");
    let mut build = cc::Build::new();
    for file in SOURCES {
        build.file(lwip.join(file));
    }
    build
        // Ours first: lwIP includes "lwipopts.h" and "arch/cc.h" by search path.
        .include(&ours)
        .include(&include)
        .opt_level(2)
        .warnings(false)
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-address-of-packed-member");
    build.compile("tungate_lwip");

    let bindings = bindgen::Builder::default()
        .header(ours.join("wrapper.h").to_string_lossy())
        .clang_arg(format!("-I{}", ours.display()))
        .clang_arg(format!("-I{}", include.display()))
        .use_core()
        .layout_tests(false)
        .generate_comments(false)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .allowlist_function(
            "lwip_init|netif_add_noaddr|netif_set_up|netif_set_link_up|netif_set_default|netif_remove|\
             ip_input|tcp_new_ip_type|tcp_bind|tcp_listen_with_backlog|tcp_accept|tcp_arg|tcp_recv|\
             tcp_sent|tcp_err|tcp_write|tcp_output|tcp_recved|tcp_shutdown|tcp_close|tcp_abort|tcp_tmr|\
             pbuf_alloc|pbuf_free|pbuf_copy_partial|pbuf_take",
        )
        .allowlist_var(
            "tcp_active_pcbs|tcp_tw_pcbs|tcp_ticks|TF_ACK_DELAY|TF_ACK_NOW|TF_NODELAY|SOF_KEEPALIVE|TCP_WRITE_FLAG_COPY",
        )
        .allowlist_type("tcp_pcb|pbuf|netif|ip_addr|err_enum_t|lwip_ip_addr_type|pbuf_layer|pbuf_type|tcp_state")
        .generate()
        .expect("bindgen failed on csrc/wrapper.h (is libclang installed? Debian: libclang-dev)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings.write_to_file(out.join("lwip_bindings.rs")).expect("cannot write lwip_bindings.rs");
}

/// The directory holding lwIP's `core/` and `include/`.
fn find_sources() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("TUNGATE_LWIP_SRC") {
        let dir = PathBuf::from(dir);
        return check(&dir).map(|()| dir);
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set; set TUNGATE_LWIP_SRC to lwIP's source directory")?;
    let registry = cargo_home.join("registry").join("src");
    let entries = std::fs::read_dir(&registry).map_err(|e| {
        format!("cannot read {}: {e}; run `cargo fetch` first (it downloads {LWIP_PACKAGE})", registry.display())
    })?;
    for index in entries.flatten() {
        let dir = index.path().join(LWIP_PACKAGE).join("old-src");
        if check(&dir).is_ok() {
            return Ok(dir);
        }
    }
    Err(format!(
        "lwIP sources not found: no {LWIP_PACKAGE}/old-src under {}; run `cargo fetch` (it downloads the \
         package Cargo.lock pins) or set TUNGATE_LWIP_SRC to a directory holding lwIP 2.1's core/ and include/",
        registry.display()
    ))
}

fn check(dir: &Path) -> Result<(), String> {
    if dir.join("core/tcp_in.c").is_file() && dir.join("include/lwip/tcp.h").is_file() {
        Ok(())
    } else {
        Err(format!("{} does not hold lwIP's core/tcp_in.c and include/lwip/tcp.h", dir.display()))
    }
}
