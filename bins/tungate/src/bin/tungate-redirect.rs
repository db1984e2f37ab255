//! `tungate-redirect`: the no-TUN baseline. The kernel captures TCP connections with an
//! nftables REDIRECT rule; this program serves them with the same handler as the TUN
//! variants. See `backend_redirect` for the rule.

fn main() -> std::process::ExitCode {
    tungate::redirect::main()
}
