//! The Weft node agent.
//!
//! Functional core: [`annotations`] (what a node publishes, and the strict
//! parser for what others publish), [`model`] (the planner's plain-data
//! input and output) and [`planner`] (`plan(snapshot, local)`, pure).

pub mod annotations;
pub mod model;
pub mod planner;
