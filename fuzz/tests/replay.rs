//! Every committed fuzz input, replayed on stable (`make test`): the seeds and what
//! `cargo fuzz` found from them (`corpus/<target>/`), and inputs that once crashed a
//! target (`regressions/<target>/`, each kept as the regression test of its fix).

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(root.join(dir).join(target)).ok())
        .flatten()
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let files = inputs(target);
    assert!(
        files.iter().any(|f| f.starts_with(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"))),
        "{target} has no corpus"
    );
    for file in &files {
        let data = std::fs::read(file).expect("a corpus file");
        if let Err(panic) = std::panic::catch_unwind(|| tungate_fuzz::run(target, &data)) {
            eprintln!("{target}: {} failed", file.display());
            std::panic::resume_unwind(panic);
        }
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn every_target_is_replayed() {
    let here: Vec<&str> = vec![
        "classify",
        "admission",
        "socks5",
        "http_head",
        "dns",
        "sniff",
        "engine_smoltcp",
        "engine_lwip",
        "engine_ipstack",
        "engine_netstack_smoltcp",
    ];
    assert_eq!(here, tungate_fuzz::TARGETS, "a target without a replay test");
}

#[test]
fn classify() {
    replay("classify");
}

#[test]
fn admission() {
    replay("admission");
}

#[test]
fn socks5() {
    replay("socks5");
}

#[test]
fn http_head() {
    replay("http_head");
}

#[test]
fn dns() {
    replay("dns");
}

#[test]
fn sniff() {
    replay("sniff");
}

#[test]
fn engine_smoltcp() {
    replay("engine_smoltcp");
}

#[test]
fn engine_lwip() {
    replay("engine_lwip");
}

#[test]
fn engine_ipstack() {
    replay("engine_ipstack");
}

#[test]
fn engine_netstack_smoltcp() {
    replay("engine_netstack_smoltcp");
}

/// The harness itself: the connection seed reaches an established connection on every
/// engine (the handler reads the client's 300 bytes), so the engine targets fuzz more
/// than the handshake.
#[test]
fn the_connection_seed_carries_data_on_every_engine() {
    use tungate_fuzz::engines::{self, seeds};
    type Run = fn(&[u8]) -> u64;
    let engines: [(&str, Run); 4] = [
        ("smoltcp", engines::smoltcp),
        ("lwip", engines::lwip),
        ("ipstack", engines::ipstack),
        ("netstack-smoltcp", engines::netstack_smoltcp),
    ];
    for v6 in [false, true] {
        let input = seeds::encode(&seeds::connection(v6));
        for (name, run) in engines {
            assert_eq!(run(&input), 300, "{name} (IPv6: {v6}) delivered the client's 300 bytes");
        }
    }
}
