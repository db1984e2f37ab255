//! The shared conformance suite on backend-lwip. lwIP keeps global state, so the
//! in-memory tests take turns (`[true]`: one per process).

tungate_testkit::conformance_suite!(@suite [true] [tungate_testkit::mem::Limits::NONE]
    backend_lwip::Lwip::default(), "tungate-lwip");
