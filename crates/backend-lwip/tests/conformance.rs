//! The shared conformance suite on backend-lwip. lwIP keeps global state, so the
//! in-memory tests take turns (`one_per_process`).

tungate_testkit::conformance_suite!(one_per_process, backend_lwip::Lwip::default(), "tungate-lwip");
