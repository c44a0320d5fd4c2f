//! Training: the loop that drives an [`engine::Engine`] over the data loader.

pub mod engine;
pub mod gpu;
