//! The HRM-Text model: its tensor layout and (with the CPU model issue) its forward and
//! backward passes.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod net;
pub mod params;
pub mod schedule;
pub mod spec;
