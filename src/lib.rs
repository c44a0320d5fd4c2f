//! hrm-cu: a from-scratch, CUDA-native trainer for the HRM-Text model family.
//!
//! The crate is a library (`tests/`, `benches/` and `tools/` link against it) and the
//! `hrm-cu` binary (`src/main.rs`). Module map:
//!
//! - [`config`]: sizes, nets and hyper-parameters (SPEC §1, §7)
//! - [`model`]: the tensor spec table and the model itself
//! - [`ops`]: every op with its fp32 CPU reference and its GPU launcher side by side
//! - [`gpu`]: driver context, stream, device properties, embedded kernels
//! - [`selftest`]: the registry of GPU-vs-CPU checks behind `hrm-cu selftest`
//! - [`optim`]: the AdamATan2 optimiser and the learning-rate schedule
//! - [`checkpoint`]: atomic, verified checkpoints and run directories
//! - [`interchange`]: the Hugging Face-style export and import (SPEC §9)
//! - [`rng`]: the deterministic random number generator
//! - [`cli`]: the command line

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod gpu;
pub mod interchange;
pub mod model;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod selftest;
pub mod train;
