//! The lab: a fabric namespace with a bridge, one namespace per node wired to
//! it by a veth, and the API server process, all recorded under one runtime
//! directory.
//!
//! [`topology`] plans it (pure), [`netns`] and [`control`] build it,
//! [`lifecycle`] sequences `up`/`down`, [`status`] reports on it.

pub mod client;
pub mod control;
pub mod lifecycle;
pub mod netns;
pub mod preflight;
pub mod state;
pub mod status;
pub mod topology;
