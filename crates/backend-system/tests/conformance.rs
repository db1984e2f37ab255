//! The shared conformance suite, instantiated for backend-system.
//!
//! The system stack's TCP is the kernel's own, listening on the TUN's address, so it has
//! no in-memory form: the suite's in-memory half cannot apply. Its namespace half runs
//! twice — with TUN offload (64 KiB super-packets rewritten whole) and without.

tungate_testkit::conformance_suite!(netns_only conformance_netns_offload, "tungate-system --offload on");
tungate_testkit::conformance_suite!(netns_only conformance_netns_plain, "tungate-system --offload off");
