//! Checkpoints: bitwise round trip, every corruption case, interrupted saves, run
//! directories.

use std::fs;
use std::path::{Path, PathBuf};

use hrm_cu::checkpoint::manifest::Manifest;
use hrm_cu::checkpoint::run_dir::{find_resume, list_checkpoints, save_in_run, LATEST_FILE};
use hrm_cu::checkpoint::tensors::{MappedFile, TensorData};
use hrm_cu::checkpoint::{self, load, load_weights, save, Checkpoint, DataPosition, GemmAlgorithms, TrainState, Weights};
use hrm_cu::config::{Dims, ModelConfig, NetName, TrainConfig};
use hrm_cu::model::params::Params;
use hrm_cu::ops::gemm::{GemmChoice, GemmOp};
use hrm_cu::optim::{AdamAtan2, AdamCoeffs};
use hrm_cu::rng::Rng;
use safetensors::tensor::Dtype;

/// A two-block model (about 430K parameters) so that each save takes milliseconds.
fn small_config(net: NetName) -> ModelConfig {
    let dims = Dims { n_layers: 2, hidden: 128, heads: 1, head_dim: 128, intermediate: 256 };
    ModelConfig { dims, net: net.default_net(), vocab: 256 }
}

/// A checkpoint after two optimiser steps, the first without a gradient for the embedding,
/// so moments, EMA and per-tensor step counts are all non-trivial.
fn trained(seed: u64) -> Checkpoint {
    let config = small_config(NetName::Hrm);
    let train_config = TrainConfig { seed, ..TrainConfig::default() };
    let mut params = Params::init(config, seed);
    let mut optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&train_config));
    let mut rng = Rng::new(seed + 1);
    let n = optimizer.steps.len();
    let mut flags = vec![true; n];
    flags[0] = false;
    for step_flags in [flags, vec![true; n]] {
        let grads = rng.uniform_vec(params.layout.master_len, 1.0);
        optimizer.step(&mut params, &grads, &step_flags, 1e-3);
    }
    let mut state = TrainState::new(config, train_config);
    state.global_step = 2;
    state.data_position = DataPosition { epoch: 1, step: 7 };
    state.tokens_seen = 123_456;
    state.rng.next_u64();
    state.dataset_metadata = Some(serde_json::json!({"max_seq_len": 65, "tokenizer_info": {"vocab_size": 200}}));
    state.dataset_dir = Some(PathBuf::from("/data/set"));
    let choices = vec![
        GemmChoice { op: GemmOp::Forward, t: 12_288, n: 6_144, k: 1_536, algorithm: 3 },
        GemmChoice { op: GemmOp::BackwardWeight, t: 12_288, n: 1_536, k: 4_096, algorithm: 0 },
    ];
    state.gemm_algorithms = GemmAlgorithms { device: "NVIDIA H200, cuBLASLt 130000".into(), choices };
    Checkpoint { params, optimizer, state }
}

fn save_ck(dir: &Path, ck: &Checkpoint) {
    save(dir, &ck.params, &ck.optimizer, &ck.state).unwrap();
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_bitwise_equal(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(bits(&a.params.master), bits(&b.params.master));
    assert_eq!(a.params.z_l_init, b.params.z_l_init);
    assert_eq!(bits(&a.optimizer.m), bits(&b.optimizer.m));
    assert_eq!(bits(&a.optimizer.v), bits(&b.optimizer.v));
    assert_eq!(bits(&a.optimizer.ema), bits(&b.optimizer.ema));
    assert_eq!(a, b);
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load(dir, None).unwrap_err())
}

fn assert_mentions(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "error does not mention `{w}`: {err}");
    }
}

#[test]
fn round_trip_is_bitwise_and_replacing_is_safe() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let ck = trained(1);
    assert_eq!(ck.optimizer.steps[0], 1, "the embedding skipped one step");
    save_ck(&dir, &ck);
    let back = load(&dir, Some(&ck.params.config)).unwrap();
    assert_bitwise_equal(&ck, &back);

    // Saving over an existing checkpoint replaces it and leaves nothing beside it.
    let ck2 = trained(2);
    save_ck(&dir, &ck2);
    assert_bitwise_equal(&ck2, &load(&dir, None).unwrap());
    let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["ck"], "nothing is left beside the checkpoint");

    // A directory that is not a checkpoint is never replaced.
    let other = tmp.path().join("notes");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("todo.txt"), "keep me").unwrap();
    let err = format!("{:#}", save(&other, &ck.params, &ck.optimizer, &ck.state).unwrap_err());
    assert_mentions(&err, &["is not an hrm-cu checkpoint; refusing to replace it"]);
    assert_eq!(fs::read_to_string(other.join("todo.txt")).unwrap(), "keep me");

    let (ema, state) = load_weights(&dir, Weights::Ema).unwrap();
    assert_eq!(bits(&ema.master), bits(&ck2.optimizer.ema));
    assert_eq!(ema.z_l_init, ck2.params.z_l_init);
    assert_eq!(state, ck2.state);
}

#[test]
fn damaged_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = trained(3);
    let fresh = |name: &str| {
        let dir = tmp.path().join(name);
        save_ck(&dir, &ck);
        dir
    };

    let dir = fresh("missing");
    fs::remove_file(dir.join("ema.safetensors")).unwrap();
    assert_mentions(&load_err(&dir), &["ema.safetensors is missing", "earlier checkpoint"]);

    let dir = fresh("truncated");
    let f = fs::OpenOptions::new().write(true).open(dir.join("model.safetensors")).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100).unwrap();
    assert_mentions(&load_err(&dir), &["model.safetensors is truncated", &format!("says {len}")]);

    let dir = fresh("flipped");
    let path = dir.join("optimizer.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&path, bytes).unwrap();
    assert_mentions(&load_err(&dir), &["optimizer.safetensors fails its checksum"]);

    let dir = fresh("no_manifest");
    fs::remove_file(dir.join("manifest.json")).unwrap();
    assert_mentions(&load_err(&dir), &["not a complete checkpoint", "manifest.json is missing"]);

    let dir = fresh("bad_state");
    fs::write(dir.join("train_state.json"), "{\"global_step\": 1}").unwrap();
    rebuild_manifest(&dir);
    assert_mentions(&load_err(&dir), &["parsing", "train_state.json"]);

    assert_mentions(&load_err(&tmp.path().join("nowhere")), &["nowhere does not exist"]);
}

/// Rewrites the manifest so that only the content checks can catch a change.
fn rebuild_manifest(dir: &Path) {
    let files = ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "train_state.json"];
    let manifest = Manifest::build(dir, &files).unwrap();
    fs::write(dir.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
}

/// Rewrites `file` of a checkpoint with `edit` applied to its tensors, and fixes the manifest.
fn rewrite(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<(String, TensorData<'static>)>)) {
    let path = dir.join(file);
    let mut tensors: Vec<(String, TensorData<'static>)> = {
        let mapped = MappedFile::open(&path).unwrap();
        let st = mapped.tensors().unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, v)| (name, TensorData { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec().into() }))
            .collect()
    };
    edit(&mut tensors);
    fs::remove_file(&path).unwrap();
    hrm_cu::checkpoint::tensors::write(&path, tensors, None).unwrap();
    rebuild_manifest(dir);
}

#[test]
fn wrong_tensors_and_configs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = trained(4);
    let fresh = |name: &str| {
        let dir = tmp.path().join(name);
        save_ck(&dir, &ck);
        dir
    };
    let head = "lm_head.weight";

    let dir = fresh("shape");
    rewrite(&dir, "model.safetensors", |ts| {
        let t = ts.iter_mut().find(|(n, _)| n == head).unwrap();
        t.1.shape = vec![128, 256];
    });
    assert_mentions(&load_err(&dir), &["model.safetensors", head, "shape [128, 256], expected [256, 128]"]);

    let dir = fresh("dtype");
    rewrite(&dir, "ema.safetensors", |ts| {
        let t = ts.iter_mut().find(|(n, _)| n == head).unwrap();
        let halves: Vec<u8> = t.1.data.chunks_exact(4).flat_map(|b| [b[2], b[3]]).collect();
        t.1 = TensorData { dtype: Dtype::BF16, shape: t.1.shape.clone(), data: halves.into() };
    });
    assert_mentions(&load_err(&dir), &["ema.safetensors", head, "is BF16, expected F32"]);

    let dir = fresh("missing_tensor");
    rewrite(&dir, "model.safetensors", |ts| ts.retain(|(n, _)| n != "model.z_L_init"));
    assert_mentions(&load_err(&dir), &["model.safetensors", "`model.z_L_init` is missing"]);

    let dir = fresh("missing_moment");
    rewrite(&dir, "optimizer.safetensors", |ts| ts.retain(|(n, _)| n != "lm_head.weight.v"));
    assert_mentions(&load_err(&dir), &["optimizer.safetensors", "`lm_head.weight.v` is missing"]);

    let dir = fresh("extra_tensor");
    rewrite(&dir, "model.safetensors", |ts| ts.push(("model.norm.weight".into(), TensorData::i64(&[1], &[0]))));
    assert_mentions(&load_err(&dir), &["unexpected tensor `model.norm.weight`"]);

    let dir = fresh("config");
    let other = small_config(NetName::Transformer);
    let err = format!("{:#}", load(&dir, Some(&other)).unwrap_err());
    assert_mentions(&err, &["train_state.json", "net hrm", "asks for net transformer", "--init"]);
}

#[test]
fn interrupted_saves_leave_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let ck = trained(5);
    save_ck(&dir, &ck);

    // Killed while writing the new files: a partial directory with a truncated model.
    let partial = tmp.path().join(".ck.partial");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("model.safetensors"), b"12345678").unwrap();
    assert_bitwise_equal(&ck, &load(&dir, None).unwrap());

    // Killed between the two renames: the previous checkpoint is only at .ck.old.
    fs::rename(&dir, tmp.path().join(".ck.old")).unwrap();
    assert_bitwise_equal(&ck, &load(&dir, None).unwrap());

    // The next save cleans up and succeeds.
    let ck2 = trained(6);
    save_ck(&dir, &ck2);
    assert!(!partial.exists());
    assert_bitwise_equal(&ck2, &load(&dir, None).unwrap());
}

#[test]
fn run_directory_rotates_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    assert_eq!(find_resume(&run).unwrap(), None);
    let mut ck = trained(7);
    for step in [100, 200, 300, 400] {
        ck.state.global_step = step;
        let dir = save_in_run(&run, &ck.params, &ck.optimizer, &ck.state, 2).unwrap();
        assert_eq!(dir, run.join(format!("ckpt-{step}")));
    }
    let steps: Vec<u64> = list_checkpoints(&run).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [300, 400]);
    assert_eq!(fs::read_to_string(run.join(LATEST_FILE)).unwrap(), "ckpt-400\n");
    assert_eq!(find_resume(&run).unwrap(), Some(run.join("ckpt-400")));
    assert_eq!(load(&run.join("ckpt-400"), None).unwrap().state.global_step, 400);

    // The newest is incomplete: resume from the one before.
    fs::remove_file(run.join("ckpt-400/manifest.json")).unwrap();
    assert_eq!(find_resume(&run).unwrap(), Some(run.join("ckpt-300")));
    fs::remove_file(run.join(LATEST_FILE)).unwrap();
    assert_eq!(find_resume(&run).unwrap(), Some(run.join("ckpt-300")));
    assert!(checkpoint::is_checkpoint(&run.join("ckpt-300")));
    assert!(save_in_run(&run, &ck.params, &ck.optimizer, &ck.state, 0).is_err());
}

/// A checkpoint written before the GEMM algorithms were recorded (its train_state.json has no
/// `gemm_algorithms`) loads, with none recorded.
#[test]
fn a_state_without_gemm_algorithms_loads_with_none() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let ck = trained(5);
    save_ck(&dir, &ck);
    let path = dir.join("train_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert!(state.as_object_mut().unwrap().remove("gemm_algorithms").is_some());
    fs::write(&path, serde_json::to_string(&state).unwrap()).unwrap();
    rebuild_manifest(&dir);
    let back = load(&dir, None).unwrap();
    assert_eq!(back.state.gemm_algorithms, GemmAlgorithms::default());
    assert_eq!(back.state, TrainState { gemm_algorithms: GemmAlgorithms::default(), ..ck.state });
}
