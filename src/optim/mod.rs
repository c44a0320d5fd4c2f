//! The optimiser and the learning-rate schedule (SPEC §7).
//!
//! - [`adam_atan2`]: the AdamATan2 update, its CPU reference and its fused GPU kernel
//! - [`AdamAtan2`]: the optimiser state over the master buffer (moments, EMA, step counts)
//! - [`schedule`]: linear warm-up then cosine decay

pub mod adam_atan2;
pub mod optimizer;
pub mod schedule;

pub use adam_atan2::{AdamCoeffs, AdamHyper};
pub use optimizer::AdamAtan2;
pub use schedule::LrSchedule;
