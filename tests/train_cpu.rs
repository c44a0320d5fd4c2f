//! End-to-end training on the CPU: the demo task is learned, and a resumed run continues
//! exactly as the uninterrupted one.

use std::path::Path;

use hrm_cu::checkpoint::{self, run_dir};
use hrm_cu::config::{NetName, SizeName, TrainConfig};
use hrm_cu::data::demo::DemoConfig;
use hrm_cu::train::{self, DataSource, Device, ModelSource, TrainOptions};

fn options(run: &Path, net: NetName, demo: DemoConfig, train: TrainConfig) -> TrainOptions {
    TrainOptions {
        data: DataSource::Demo(demo),
        model: ModelSource::Fresh { size: SizeName::Tiny, net, seed: 0 },
        train,
        run_dir: run.to_path_buf(),
        resume: false,
        device: Device::Cpu,
        checkpoint_every_steps: None,
        checkpoint_every_minutes: f64::INFINITY,
        keep_last: 3,
        log_every: 10,
        eval_every: None,
        profile_step: None,
        cuda_graph: None,
        epilogue_gemms: Default::default(),
        gemm_store: None,
    }
}

/// `tiny` learns 2-digit addition: the held-out exact accuracy (whole answer right, teacher
/// forced, which equals greedy decoding's exact match) ends far above chance (about 1% for
/// guessing a 2-3 digit sum): 0.565 with these settings (deterministic on the CPU). The
/// transformer net keeps this test to a few minutes on two cores; `hrm` learns the same task
/// better (the README demo: 0.985 after 30 epochs on a GPU) at ~4x the cost per step.
#[test]
fn tiny_learns_the_demo_task() {
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoConfig { epochs: 12, ..DemoConfig::default() };
    let cfg = TrainConfig { lr: 2e-3, warmup_steps: 20, global_batch_tokens: 2048, epochs: 12, ema_decay: 0.99, ..TrainConfig::default() };
    let heldout = train::run(&options(dir.path(), NetName::Transformer, demo, cfg)).unwrap().expect("the demo has a held-out split");
    assert!(heldout.exact_accuracy > 0.2, "held-out exact accuracy {:.3} (loss {:.3})", heldout.exact_accuracy, heldout.loss);
}

/// Train 12 steps straight; train the same run, lose everything after the step-6
/// checkpoint (as a kill -9 would), resume with `--recompute` (memory and time only: the
/// command line decides on resume): the final weights and optimiser state are bit-identical.
#[test]
fn resume_continues_exactly() {
    let demo = DemoConfig { train_samples: 600, heldout_samples: 50, epochs: 2, ..DemoConfig::default() };
    let cfg = TrainConfig { lr: 1e-3, warmup_steps: 3, global_batch_tokens: 256, epochs: 2, max_steps: Some(12), ..TrainConfig::default() };
    let (straight, interrupted) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let mut opts = options(straight.path(), NetName::Hrm, demo, cfg.clone());
    opts.checkpoint_every_steps = Some(6);
    train::run(&opts).unwrap();

    let mut opts = options(interrupted.path(), NetName::Hrm, demo, cfg);
    opts.checkpoint_every_steps = Some(6);
    train::run(&opts).unwrap();
    std::fs::remove_dir_all(interrupted.path().join(run_dir::checkpoint_name(12))).unwrap();
    opts.resume = true;
    opts.train.recompute = true;
    train::run(&opts).unwrap();

    let a = checkpoint::load(&straight.path().join(run_dir::checkpoint_name(12)), None).unwrap();
    let b = checkpoint::load(&interrupted.path().join(run_dir::checkpoint_name(12)), None).unwrap();
    assert_eq!(a.state.global_step, 12);
    assert_eq!(a.state.data_position, b.state.data_position);
    assert!(!a.state.train_config.recompute && b.state.train_config.recompute, "the checkpoint records the last setting");
    assert!(a.params.master == b.params.master, "master weights differ after resume");
    assert!(a.optimizer == b.optimizer, "optimiser state differs after resume");
}

/// A learning rate of f32::MAX overflows step 1's update (its step size `lr / (1 - beta1)` is
/// infinite), so step 2's loss is not finite. The loss is read only when the run logs (every 5
/// steps here): the run stops at step 5's read with an error naming step 2, and checkpoints the
/// weights before step 2, as step 1.
#[test]
fn a_non_finite_loss_stops_the_run_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoConfig { train_samples: 400, heldout_samples: 20, epochs: 1, ..DemoConfig::default() };
    let cfg = TrainConfig { lr: f32::MAX, warmup_steps: 0, global_batch_tokens: 256, epochs: 1, max_steps: Some(8), ..TrainConfig::default() };
    let mut opts = options(dir.path(), NetName::Transformer, demo, cfg);
    opts.log_every = 5;
    let err = format!("{:#}", train::run(&opts).unwrap_err());
    assert!(err.contains("step 2: training stopped") && err.contains("not finite"), "{err}");
    let saved: Vec<u64> = run_dir::list_checkpoints(dir.path()).unwrap().into_iter().map(|(step, _)| step).collect();
    assert_eq!(saved, [1]);
    let ckpt = checkpoint::load(&dir.path().join(run_dir::checkpoint_name(1)), None).unwrap();
    assert_eq!(ckpt.state.global_step, 1);
    assert!(ckpt.optimizer.steps.iter().all(|&s| s == 1), "only step 1's update was applied: {:?}", ckpt.optimizer.steps);
}

/// Gradient accumulation (`--micro-batches 2`): the loss goes down, every step's metrics count
/// both micro-batches, resuming with another K is refused, and resuming with the run's K
/// continues bit-exactly.
#[test]
fn micro_batches_train_and_resume_exactly() {
    let demo = DemoConfig { train_samples: 600, heldout_samples: 50, epochs: 2, ..DemoConfig::default() };
    let cfg = TrainConfig { lr: 1e-3, warmup_steps: 3, global_batch_tokens: 512, epochs: 2, max_steps: Some(12), micro_batches: 2, ..TrainConfig::default() };
    let (straight, interrupted) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let mut opts = options(straight.path(), NetName::Transformer, demo, cfg.clone());
    opts.checkpoint_every_steps = Some(6);
    opts.log_every = 1;
    train::run(&opts).unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(straight.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|r: &serde_json::Value| r["split"] == "train")
        .collect();
    assert_eq!(records.len(), 12);
    let loss = |r: &serde_json::Value| r["loss"].as_f64().unwrap();
    let (first, last) = (records[..3].iter().map(loss).sum::<f64>(), records[9..].iter().map(loss).sum::<f64>());
    assert!(last < 0.8 * first, "mean loss of steps 1-3 {:.3}, of steps 10-12 {:.3}", first / 3.0, last / 3.0);
    // Two micro-batches of 256 slots: more tokens than one of them holds.
    assert!(records.iter().all(|r| (257..=512).contains(&r["tokens"].as_u64().unwrap())), "tokens per step: {records:?}");

    let mut opts = options(interrupted.path(), NetName::Transformer, demo, cfg);
    opts.checkpoint_every_steps = Some(6);
    train::run(&opts).unwrap();
    std::fs::remove_dir_all(interrupted.path().join(run_dir::checkpoint_name(12))).unwrap();
    opts.resume = true;
    opts.train.micro_batches = 1;
    let err = format!("{:#}", train::run(&opts).unwrap_err());
    assert!(err.contains("trained with --micro-batches 2, this command asks for 1"), "{err}");
    opts.train.micro_batches = 2;
    train::run(&opts).unwrap();

    let a = checkpoint::load(&straight.path().join(run_dir::checkpoint_name(12)), None).unwrap();
    let b = checkpoint::load(&interrupted.path().join(run_dir::checkpoint_name(12)), None).unwrap();
    assert_eq!(a.state.train_config.micro_batches, 2, "the checkpoint records K");
    assert_eq!(a.state.data_position, b.state.data_position);
    assert!(a.params.master == b.params.master, "master weights differ after resume");
    assert!(a.optimizer == b.optimizer, "optimiser state differs after resume");
}
