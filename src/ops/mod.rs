//! Every op of the model: an fp32 CPU reference and a GPU launcher with the same argument
//! order, in one module per kernel family (`cuda/<family>.cu`).

pub mod attention;
pub mod cast;
pub mod check;
pub mod compare;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gate;
pub mod gemm;
pub mod gemm_sm90;
#[cfg(test)]
pub mod gradcheck;
pub mod rmsnorm;
pub mod rope;
pub mod shape;
pub mod swiglu;
