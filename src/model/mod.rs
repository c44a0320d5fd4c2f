//! The HRM-Text model: its tensor layout and (with the CPU model issue) its forward and
//! backward passes.

pub mod params;
pub mod spec;
