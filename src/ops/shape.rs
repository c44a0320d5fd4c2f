//! Buffer-length checks shared by the CPU references and the GPU launchers.
//!
//! A length that disagrees with the sizes passed alongside it is a bug in the caller (the
//! model derives every buffer from the spec table), so it panics with a message naming the
//! op, the argument and the expected shape rather than reading out of bounds.

/// Panics unless `len` equals the product of `dims`, e.g. `expect_len("gate_fwd", "out",
/// out.len(), &[("T*C", n)])`.
#[track_caller]
pub fn expect_len(op: &str, arg: &str, len: usize, dims: &[(&str, usize)]) {
    let want: usize = dims.iter().map(|(_, d)| d).product();
    if len != want {
        let shape: Vec<String> = dims.iter().map(|(name, d)| format!("{name}={d}")).collect();
        panic!("{op}: `{arg}` has {len} elements, expected [{}] = {want}", shape.join(", "));
    }
}
