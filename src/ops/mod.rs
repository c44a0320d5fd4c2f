//! Every op of the model: an fp32 CPU reference and a GPU launcher with the same argument
//! order, in one module per kernel family (`cuda/<family>.cu`).

pub mod attention;
pub mod cast;
pub mod compare;
