//! What Tessera's vhost-user backends share: taking requests from a guest's
//! split virtqueue without trusting the guest ([`ring`]), and logging what a
//! guest can trigger without letting it flood the log ([`ratelimit`]).

pub mod ratelimit;
pub mod ring;
