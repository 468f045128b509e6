//! What Tessera's vhost-user backends share: their common flags ([`cli`]),
//! the life of a backend process, from its socket and seccomp filters to
//! its exit status ([`process`]), taking requests from a guest's split
//! virtqueue without trusting the guest ([`ring`]), and logging what a
//! guest can trigger without letting it flood the log ([`ratelimit`]), and
//! the parts of a `VhostUserBackend` impl every device repeats ([`worker`]).

pub mod cli;
pub mod process;
pub mod ratelimit;
pub mod ring;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod worker;
