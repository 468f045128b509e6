//! The library side of Tessera's jailer: what other crates need to talk to
//! it. [`launch`] is the protocol between a jailed VMM and the jailer's
//! backend launcher; [`backend_flags`] the backend flags the launcher
//! passes on; [`id`] is the instance id rule the jailer enforces.

pub mod backend_flags;
pub mod id;
pub mod launch;
