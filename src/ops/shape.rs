//! Buffer checks shared by the CPU references and the GPU launchers.
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

/// Panics unless the device buffer starts on a 16-byte boundary: the kernels move 8 bf16 (or
/// 4 fp32) values per 16-byte access, and cuBLASLt is asked for algorithms that need 16.
#[track_caller]
pub fn expect_aligned16<T>(op: &str, arg: &str, gpu: &crate::gpu::Gpu, buf: &impl cudarc::driver::DevicePtr<T>) {
    let (ptr, _sync) = buf.device_ptr(&gpu.stream);
    if ptr % 16 != 0 {
        panic!("{op}: `{arg}` starts at {ptr:#x}, not 16-byte aligned (slice views at multiples of 8 bf16 / 4 fp32 elements)");
    }
}

/// A size passed to a kernel as a 32-bit `int`.
#[track_caller]
pub fn as_i32(op: &str, name: &str, value: usize) -> i32 {
    i32::try_from(value).unwrap_or_else(|_| panic!("{op}: {name} = {value} does not fit the kernel's 32-bit int"))
}
