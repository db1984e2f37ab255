//! `tungate-soak [--minutes M] [--out DIR] [VARIANT...]`: soaks each variant in turn
//! (see `tungate_testkit::soak`) and writes DIR/VARIANT.csv (a sample every 10 s),
//! DIR/VARIANT.row and DIR/README.md (machine, revision, command, a row for every
//! variant soaked into DIR, by this run or another beside it). Needs root and
//! `$TUNGATE_BIN_DIR` (`make soak` sets both up). Exits 1 if any soak failed.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use tungate_testkit::soak::soak;

const USAGE: &str = "usage: tungate-soak [--minutes M] [--out DIR] [VARIANT...]
  Soaks each variant (default: smoltcp lwip ipstack netstack-smoltcp system) for M minutes
  (default 30) under mixed load in throwaway namespaces; writes DIR/VARIANT.csv and
  DIR/README.md (default DIR: results/soak-<date>). Fails if a transfer fails or RSS or
  open fds grow by more than 10 % after the warm-up.";

fn run(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("({cmd}: {e})"))
}

fn main() -> ExitCode {
    let mut minutes: f64 = 30.0;
    let mut out: Option<PathBuf> = None;
    let mut variants = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--minutes" => match args.next().and_then(|m| m.parse().ok()).filter(|m: &f64| *m > 0.0) {
                Some(m) => minutes = m,
                None => {
                    eprintln!("tungate-soak: --minutes needs a positive number\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--out" => out = args.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            v if v.starts_with('-') => {
                eprintln!("tungate-soak: unknown flag {v}\n{USAGE}");
                return ExitCode::from(2);
            }
            v => variants.push(v.to_owned()),
        }
    }
    if variants.is_empty() {
        variants = ["smoltcp", "lwip", "ipstack", "netstack-smoltcp", "system"].map(String::from).to_vec();
    }
    let date = run("date", &["-u", "+%Y%m%d"]);
    let out = out.unwrap_or_else(|| PathBuf::from(format!("results/soak-{date}")));
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("tungate-soak: {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    // Recorded before the soaks: the binaries under test are the tree's at this point.
    let revision = format!(
        "{}{}",
        run("git", &["rev-parse", "--short", "HEAD"]),
        if run("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            ""
        } else {
            " (with uncommitted changes)"
        }
    );
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let mut failed = false;
    for (i, variant) in variants.iter().enumerate() {
        eprintln!("== soak {variant} ({} of {}), {minutes} min", i + 1, variants.len());
        let report = soak(&format!("tungate-{variant}"), duration, &out.join(format!("{variant}.csv")));
        let verdict = report.verdict();
        failed |= verdict.is_err();
        let load = match &report.load {
            Ok(line) => line.trim_start_matches("ok soak ").to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        let row = format!(
            "| {variant} | {} | {} → {} (peak {}) | {} → {} (peak {}) | {} | {} |",
            report.samples.len(),
            report.start.0,
            report.end.0,
            report.peak.0,
            report.start.1,
            report.end.1,
            report.peak.1,
            load.replace('|', "/"),
            match &verdict {
                Ok(()) => "flat".to_owned(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
        eprintln!("{row}");
        if let Err(e) = std::fs::write(out.join(format!("{variant}.row")), format!("{row}\n")) {
            eprintln!("tungate-soak: {}: {e}", out.display());
        }
    }
    // Every variant's row in the directory, so soaks run side by side share one table.
    let mut rows: Vec<String> = std::fs::read_dir(&out)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "row"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .map(|r| r.trim_end().to_owned())
                .collect()
        })
        .unwrap_or_default();
    rows.sort();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_default();
    let report = format!(
        "# Soak {date}\n\n\
         - machine: {cpu}, {} cores; kernel {}\n- rustc: {}\n- revision: {}\n- command: {}\n\
         - load (scripts/e2e_peer.py soak): 4 MiB echoed both ways back to back, 4 loops of short \
         connections (100 bytes echoed, 50 ms apart), a new UDP session every 100 ms on a fixed schedule (3 datagrams \
         echoed), a fake-IP DNS lookup and a connection to the fake address every 200 ms\n\
         - sampled every 10 s (DIR/VARIANT.csv); start = median of the first minute after the \
         warm-up (max(2 min, 10 %)), end = median of the last minute; flat = neither RSS nor fds \
         ended more than 10 % above the start\n\n\
         | variant | samples | RSS KiB start → end | open fds start → end | transfers (count by kind) | verdict |\n\
         |---|---|---|---|---|---|\n{}\n",
        run("nproc", &[]),
        run("uname", &["-r"]),
        run("rustc", &["--version"]),
        revision,
        std::env::args().collect::<Vec<_>>().join(" "),
        rows.join("\n")
    );
    if let Err(e) = std::fs::write(out.join("README.md"), report) {
        eprintln!("tungate-soak: {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    eprintln!("soak results in {}", out.display());
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
