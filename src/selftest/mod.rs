//! `hrm-cu selftest`: every GPU kernel checked against its CPU reference on the device.
//!
//! Each op family exposes `selftests() -> Vec<Check>`; [`registry`] lists the families.
//! A check draws fresh random inputs (the seed is printed so a failure can be replayed),
//! poisons its outputs with NaN before the launch so unwritten elements are caught, and
//! returns one [`Row`] per shape it tried.

use crate::gpu::{Gpu, GpuError};
use crate::ops::compare::{Comparison, Tolerance};
use crate::rng::Rng;

/// One registered check: a name and the function that runs it.
pub struct Check {
    pub name: &'static str,
    pub run: fn(&Gpu, &mut Rng) -> Result<Vec<Row>, GpuError>,
}

/// One line of the selftest table.
#[derive(Clone, Debug)]
pub struct Row {
    pub check: String,
    pub shape: String,
    pub tolerance: Tolerance,
    pub comparison: Comparison,
}

impl Row {
    pub fn new(check: impl Into<String>, shape: impl Into<String>, tolerance: Tolerance, comparison: Comparison) -> Row {
        Row { check: check.into(), shape: shape.into(), tolerance, comparison }
    }
}

/// Every kernel family's checks, in dependency order.
pub fn registry() -> Vec<Check> {
    let mut checks = Vec::new();
    checks.extend(crate::ops::cast::selftests());
    checks.extend(crate::ops::gemm::selftests());
    checks.extend(crate::ops::gemm_sm90::selftests());
    checks.extend(crate::ops::rmsnorm::selftests());
    checks.extend(crate::ops::rope::selftests());
    checks.extend(crate::ops::swiglu::selftests());
    checks.extend(crate::ops::embedding::selftests());
    checks.extend(crate::ops::cross_entropy::selftests());
    checks.extend(crate::ops::attention::selftests());
    checks.extend(crate::ops::elementwise::selftests());
    checks.extend(crate::optim::adam_atan2::selftests());
    checks.extend(crate::train::gpu::selftests());
    checks
}

/// Runs the checks whose name contains `filter` (all when `None`), prints the table and
/// returns how many rows failed.
pub fn run(gpu: &Gpu, filter: Option<&str>, seed: u64) -> Result<usize, GpuError> {
    let p = &gpu.props;
    println!(
        "hrm-cu selftest on GPU {} ({}, sm_{}{}, {} SMs, {:.1} GiB), seed {seed}",
        p.ordinal, p.name, p.major, p.minor, p.sm_count, p.total_mem_bytes as f64 / (1u64 << 30) as f64
    );
    println!("{:<28} {:<24} {:>11} {:>11} {:>18} {:>6}", "check", "shape", "max abs err", "max rel err", "tolerance", "result");
    let mut rng = Rng::new(seed);
    let mut failed = 0;
    for check in registry().iter().filter(|c| filter.is_none_or(|f| c.name.contains(f))) {
        let rows = match (check.run)(gpu, &mut rng) {
            Ok(rows) => rows,
            Err(e) => {
                println!("{:<28} {:<24} error: {e}", check.name, "");
                failed += 1;
                continue;
            }
        };
        for row in rows {
            let c = &row.comparison;
            let verdict = if c.passed() { "pass" } else { "FAIL" };
            failed += usize::from(!c.passed());
            let mut line = format!(
                "{:<28} {:<24} {:>11.3e} {:>11.3e} {:>18} {:>6}",
                row.check, row.shape, c.max_abs_err, c.max_rel_err, row.tolerance.to_string(), verdict
            );
            if c.non_finite > 0 {
                line.push_str(&format!("  ({} non-finite outputs)", c.non_finite));
            }
            println!("{line}");
        }
    }
    Ok(failed)
}
