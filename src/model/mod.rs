//! The HRM-Text model: its tensor layout ([`spec`], [`params`]), the recurrence of every net
//! as data ([`schedule`]), the forward and backward written once ([`net`]) against the op
//! interface of [`backend`], and the fp32 CPU backend ([`cpu`]). See `docs/model.md`.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod net;
pub mod params;
pub mod schedule;
pub mod spec;
