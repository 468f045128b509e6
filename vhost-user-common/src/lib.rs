//! What Tessera's vhost-user backends share: their common flags ([`cli`]),
//! the life of a backend process, from its socket and seccomp filters to
//! its exit status ([`process`]), the one `VhostUserBackend` every device
//! is served by ([`device`]), taking requests from a guest's split
//! virtqueue without trusting the guest ([`ring`]), the helpers of a
//! device's workers ([`worker`]), and logging what a guest can trigger
//! without letting it flood the log ([`ratelimit`]).

pub mod cli;
pub mod device;
pub mod process;
pub mod ratelimit;
pub mod ring;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod worker;
