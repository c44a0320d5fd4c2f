//! CUDA graphs of the training step (on by default on the GPU; `--cuda-graph off`): each
//! schedule's step is captured once and replayed for every later step with that schedule.
//!
//! A step launches hundreds of kernels and GEMMs (tiny hrm: ~400) to thousands (XL hrm at
//! bp_steps 5: ~3,100; a block is ~12 launches forward and ~19 backward, hrm runs 8 passes of
//! its modules forward and up to 5 backward). Launched one by one, each costs the host a few
//! microseconds, and the GPU waits whenever its kernels are shorter than that (small models,
//! small batches). A graph replays the whole step with one launch.
//!
//! What makes the step capturable (each point lives in the code it concerns):
//!
//! - Every buffer the step touches exists before the capture and keeps its address: the
//!   model's workspace with the batch in it (`net.rs`, `DeviceBatch`), the backend's scratch
//!   (`cuda.rs`: GEMM workspace, LM-head logits, attention tables, the embedding backward's
//!   order, tickets and partial rows), the engine's state (`gpu.rs`).
//! - Every value that changes from step to step is read from device memory, written before
//!   the launch by stream-ordered copies: the batch, its gradient scale and the embedding
//!   backward's token order (`Model::stage_step`), the learning rate and per-tensor gradient flags
//!   (`AdamDeviceTable::set_step`). The optimiser's step counts and the loss guard are
//!   updated on the device by the step itself.
//! - The host values left in launch arguments are fixed for a schedule and a batch shape:
//!   sizes, pointers, the sample table's capacity (padded with empty samples).
//! - Nothing in the step synchronises with the host or reads its events (profiling runs
//!   eagerly).
//!
//! When to capture. The first step with a schedule runs eagerly, and so does any step after
//! the backend allocated (a new batch shape, a deeper schedule, a larger sample table): that
//! run allocates what the schedule needs, builds the GEMM plans and loads the kernels. The
//! next step with the schedule is captured if the backend's allocation count is still the one
//! that eager run ended with, which shows the step allocates nothing; the graph is replayed
//! while the count stays the same (a changed count drops every graph: their buffers may have
//! moved). A capture that fails leaves its schedule eager, with one message saying why.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};

use crate::model::schedule::Schedule;

/// Where one schedule stands.
enum State {
    /// Ran eagerly; the backend had made this many allocations when it finished.
    Warm(u64),
    /// Captured when the backend had made this many allocations.
    Captured(u64, CudaGraph),
    /// The capture failed: runs eagerly from now on.
    Eager,
}

/// What to do for one step.
pub enum Plan<'a> {
    /// Launch this graph.
    Replay(&'a CudaGraph),
    /// Capture the step (it is known to allocate nothing), keep the graph, launch it.
    Capture,
    /// Enqueue the step op by op.
    Eager,
}

/// The captured steps of one engine, by schedule.
pub struct StepGraphs {
    enabled: bool,
    /// A run has a handful of schedules (hrm's bp_steps warm-up): a list is enough.
    schedules: Vec<(Schedule, State)>,
}

impl StepGraphs {
    pub fn new(enabled: bool) -> StepGraphs {
        StepGraphs { enabled, schedules: Vec::new() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns capture on or off; off drops every graph.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.schedules.clear();
        }
    }

    /// Schedules with a graph ready to replay.
    pub fn captured(&self) -> usize {
        self.schedules.iter().filter(|(_, s)| matches!(s, State::Captured(..))).count()
    }

    /// What to do for a step with `schedule`, the backend having made `allocations`
    /// allocations so far (after staging the step's batch).
    pub fn plan(&mut self, schedule: &Schedule, allocations: u64) -> Plan<'_> {
        if !self.enabled {
            return Plan::Eager;
        }
        // Buffers may have moved since a graph was captured: forget its schedule, which warms
        // up again.
        self.schedules.retain(|(_, state)| !matches!(state, State::Captured(at, _) if *at != allocations));
        match self.schedules.iter().find(|(s, _)| s == schedule).map(|(_, state)| state) {
            Some(State::Captured(_, graph)) => Plan::Replay(graph),
            Some(State::Warm(at)) if *at == allocations => Plan::Capture,
            _ => Plan::Eager,
        }
    }

    /// Records that `schedule` ran eagerly, leaving the backend at `allocations` allocations.
    pub fn ran_eagerly(&mut self, schedule: &Schedule, allocations: u64) {
        if self.enabled {
            self.set(schedule, |state| match state {
                Some(State::Eager) => State::Eager,
                _ => State::Warm(allocations),
            });
        }
    }

    /// Keeps the graph captured for `schedule` at `allocations` allocations.
    pub fn keep(&mut self, schedule: &Schedule, allocations: u64, graph: CudaGraph) {
        self.set(schedule, |_| State::Captured(allocations, graph));
    }

    /// Records a failed capture of `schedule`: it runs eagerly from now on. Says why on
    /// standard error, once per engine.
    pub fn failed(&mut self, schedule: &Schedule, why: &anyhow::Error) {
        if !self.schedules.iter().any(|(_, s)| matches!(s, State::Eager)) {
            eprintln!("--cuda-graph: capturing the training step failed, so it runs without a graph: {why:#}");
        }
        self.set(schedule, |_| State::Eager);
    }

    fn set(&mut self, schedule: &Schedule, next: impl FnOnce(Option<State>) -> State) {
        match self.schedules.iter().position(|(s, _)| s == schedule) {
            Some(i) => {
                let old = std::mem::replace(&mut self.schedules[i].1, State::Eager);
                self.schedules[i].1 = next(Some(old));
            }
            None => self.schedules.push((schedule.clone(), next(None))),
        }
    }
}

/// Captures the work `enqueue` queues on `stream` into a graph, ready to launch (nothing runs
/// during the capture). Thread-local capture mode: a call that would synchronise (a blocking
/// copy or allocation, an event query) fails and invalidates the capture instead of
/// misbehaving. The stream always leaves capture mode, whatever happens.
pub fn capture(stream: &Arc<CudaStream>, enqueue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| anyhow!("beginning the capture: {e}"))?;
    let queued = enqueue();
    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
    queued?;
    let graph = ended.map_err(|e| anyhow!("ending the capture and instantiating the graph: {e}"))?.ok_or_else(|| anyhow!("the capture recorded no work"))?;
    // Uploads the graph now, so that its first launch costs no more than the others.
    graph.upload().map_err(|e| anyhow!("uploading the graph: {e}"))?;
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetName, ModelConfig, SizeName};

    fn schedules() -> (Schedule, Schedule) {
        let net = ModelConfig::new(SizeName::Tiny, NetName::Hrm, 256).net;
        (Schedule::for_training(&net, 2), Schedule::for_training(&net, 5))
    }

    fn is_capture(p: Plan) -> bool {
        matches!(p, Plan::Capture)
    }

    fn is_eager(p: Plan) -> bool {
        matches!(p, Plan::Eager)
    }

    #[test]
    fn a_schedule_is_captured_after_one_eager_run_without_allocations() {
        let (a, b) = schedules();
        let mut g = StepGraphs::new(true);
        assert!(is_eager(g.plan(&a, 10)), "first run of a schedule: eager");
        g.ran_eagerly(&a, 12); // that run allocated
        assert!(is_capture(g.plan(&a, 12)), "nothing allocated since: capture");
        assert!(is_eager(g.plan(&b, 12)), "another schedule warms up on its own");
        g.ran_eagerly(&b, 14); // b allocated (a deeper schedule)
        assert!(is_eager(g.plan(&a, 14)), "a's warm run is stale after b allocated");
        g.ran_eagerly(&a, 14);
        assert!(is_capture(g.plan(&a, 14)));
    }

    #[test]
    fn disabled_graphs_and_failed_captures_run_eagerly() {
        let (a, _) = schedules();
        let mut g = StepGraphs::new(false);
        g.ran_eagerly(&a, 1);
        assert!(is_eager(g.plan(&a, 1)));
        let mut g = StepGraphs::new(true);
        g.ran_eagerly(&a, 1);
        g.failed(&a, &anyhow!("test"));
        g.ran_eagerly(&a, 1);
        assert!(is_eager(g.plan(&a, 1)), "a failed schedule stays eager");
        assert_eq!(g.captured(), 0);
    }
}
