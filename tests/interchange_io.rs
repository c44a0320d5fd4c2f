//! The interchange format: export -> import round trips per net, config.json keys, token
//! ids, net inference, and the errors of damaged or mismatched directories.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use half::bf16;
use hrm_cu::checkpoint::run_dir::save_in_run;
use hrm_cu::checkpoint::{load, save, TrainState};
use hrm_cu::cli::Cli;
use hrm_cu::config::{Dims, ModelConfig, NetName, TrainConfig};
use hrm_cu::interchange::{export, import, load_init, ExportDtype};
use hrm_cu::model::params::Params;
use hrm_cu::optim::{AdamAtan2, AdamCoeffs};
use hrm_cu::rng::Rng;
use serde_json::{json, Value};

const NETS: [NetName; 6] = [NetName::Hrm, NetName::Transformer, NetName::Trm, NetName::TrmMatchRecurrence, NetName::Rins, NetName::Ut];

/// A two-block model (about 430K parameters) so that each save takes milliseconds.
fn small_config(net: NetName) -> ModelConfig {
    let dims = Dims { n_layers: 2, hidden: 128, heads: 1, head_dim: 128, intermediate: 256 };
    ModelConfig { dims, net: net.default_net(), vocab: 256 }
}

/// A word-level tokenizer with the special tokens of the dataset metadata below and a pad id.
const TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null,
  "padding": {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": null, "pad_id": 5, "pad_type_id": 0, "pad_token": "<pad>"},
  "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<boq>": 1, "<eoq>": 2, "<eoa>": 3, "hello": 4, "<pad>": 5}, "unk_token": "<unk>"}
}"#;

/// A checkpoint of `net` whose EMA differs from its master weights (so the export's choice
/// shows), optionally with dataset metadata pointing at a tokenizer in `data_dir`.
fn write_checkpoint(dir: &Path, net: NetName, data_dir: Option<&Path>) -> (Params, AdamAtan2) {
    let config = small_config(net);
    let params = Params::init(config, 11);
    let mut optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&TrainConfig::default()));
    let mut rng = Rng::new(12);
    for e in optimizer.ema.iter_mut() {
        *e += rng.uniform_vec(1, 1e-2)[0];
    }
    let mut state = TrainState::new(config, TrainConfig::default());
    if let Some(data) = data_dir {
        fs::write(data.join("tok.json"), TOKENIZER).unwrap();
        state.dataset_dir = Some(data.to_path_buf());
        state.dataset_metadata = Some(json!({
            "tokenizer_info": {"vocab_size": 6, "boq": "<boq>", "eoq": "<eoq>", "eoa": "<eoa>",
                               "condition_mapping": {"direct": "<direct>", "cot": "<cot>"}, "tokenizer_path": "tok.json"},
            "max_seq_len": 2049, "total_length": 1000, "vocab_size": null
        }));
    }
    save(dir, &params, &optimizer, &state).unwrap();
    (params, optimizer)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn write_config(dir: &Path, config: &Value) {
    fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

fn assert_mentions(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "error does not mention `{w}`: {err}");
    }
}

#[test]
fn round_trip_per_net() {
    let tmp = tempfile::tempdir().unwrap();
    for net in NETS {
        let ck = tmp.path().join(format!("ck-{net:?}"));
        let (params, optimizer) = write_checkpoint(&ck, net, None);

        // fp32 keeps the EMA weights exactly.
        let out = tmp.path().join(format!("f32-{net:?}"));
        export(&ck, &out, true, ExportDtype::F32).unwrap();
        let back = import(&out).unwrap();
        assert_eq!(back.config, params.config, "{net:?}");
        assert_eq!(bits(&back.master), bits(&optimizer.ema), "{net:?}");
        assert_eq!(back.z_l_init, params.z_l_init, "{net:?}");
        assert_eq!(read_config(&out)["torch_dtype"], "float32");

        // bf16 rounds every weight to nearest even, and only that.
        let out = tmp.path().join(format!("bf16-{net:?}"));
        export(&ck, &out, false, ExportDtype::Bf16).unwrap();
        let back = import(&out).unwrap();
        let rounded: Vec<f32> = params.master.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(bits(&back.master), bits(&rounded), "{net:?}");
        assert_eq!(back.z_l_init, params.z_l_init, "{net:?}");
        for (a, b) in back.master.iter().zip(&params.master) {
            assert!((a - b).abs() <= b.abs() / 256.0, "{net:?}: {a} vs {b} is more than half a bf16 ulp apart");
        }
    }
}

#[test]
fn config_json_has_every_spec_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir(&data).unwrap();
    let ck = tmp.path().join("ck");
    write_checkpoint(&ck, NetName::Hrm, Some(&data));
    let out = tmp.path().join("out");
    let summary = export(&ck, &out, true, ExportDtype::Bf16).unwrap();
    assert_eq!(summary.notes, Vec::<String>::new());
    assert_eq!(fs::read_to_string(out.join("tokenizer.json")).unwrap(), TOKENIZER);

    let c = read_config(&out);
    let want = json!({
        "model_type": "hrm_text", "architectures": ["HrmTextForCausalLM"], "vocab_size": 256,
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 1,
        "num_key_value_heads": 1, "head_dim": 128, "H_cycles": 2, "L_cycles": 3, "L_bp_steps": [0, 3],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "prefix_lm": true, "pad_token_id": 5, "bos_token_id": 1, "eos_token_id": 3, "torch_dtype": "bfloat16",
        "net": "hrm", "net_config": {"H_cycles": 2, "L_cycles": 3, "bp_min_steps": 2, "bp_max_steps": 5},
    });
    for (key, value) in want.as_object().unwrap() {
        assert_eq!(&c[key], value, "config.json key {key}");
    }
    let hidden = 128f64;
    assert!((c["initializer_range"].as_f64().unwrap() - 1.0 / hidden.sqrt()).abs() < 1e-12);
    assert!((c["embedding_scale"].as_f64().unwrap() - hidden.sqrt()).abs() < 1e-12);

    // The safetensors metadata Hugging Face loaders require.
    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");

    // Without dataset metadata: documented defaults, each noted.
    let ck2 = tmp.path().join("ck2");
    write_checkpoint(&ck2, NetName::Ut, None);
    let out2 = tmp.path().join("out2");
    let summary = export(&ck2, &out2, true, ExportDtype::Bf16).unwrap();
    assert_eq!(summary.notes.len(), 2, "{:?}", summary.notes);
    let c = read_config(&out2);
    assert_eq!((c["pad_token_id"].clone(), c["bos_token_id"].clone(), c["eos_token_id"].clone()), (json!(0), Value::Null, Value::Null));
    assert_eq!(c["max_position_embeddings"], 4096);
    assert_eq!(c["net_config"], json!({"cycles": 4, "bp_cycles": 2}));
    assert!(!out2.join("tokenizer.json").exists());
}

#[test]
fn net_is_inferred_when_absent() {
    let tmp = tempfile::tempdir().unwrap();
    for (net, infers) in [(NetName::Hrm, true), (NetName::Transformer, true), (NetName::Ut, false)] {
        let ck = tmp.path().join(format!("ck-{net:?}"));
        let (params, _) = write_checkpoint(&ck, net, None);
        let out = tmp.path().join(format!("out-{net:?}"));
        export(&ck, &out, true, ExportDtype::Bf16).unwrap();
        let mut c = read_config(&out);
        c.as_object_mut().unwrap().remove("net");
        c.as_object_mut().unwrap().remove("net_config");
        write_config(&out, &c);
        if infers {
            assert_eq!(import(&out).unwrap().config, params.config, "{net:?}");
        } else {
            assert_mentions(&err_of(import(&out)), &["`net` is missing", "add \"net\""]);
        }
    }
}

/// A fresh bf16 export of an hrm checkpoint, to damage.
fn exported(tmp: &Path, name: &str) -> PathBuf {
    let ck = tmp.join(format!("ck-{name}"));
    write_checkpoint(&ck, NetName::Hrm, None);
    let out = tmp.join(name);
    export(&ck, &out, true, ExportDtype::Bf16).unwrap();
    out
}

#[test]
fn damaged_or_mismatched_directories_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    let dir = exported(t, "no_config");
    fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(&err_of(import(&dir)), &["config.json is missing"]);

    let dir = exported(t, "no_model");
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_mentions(&err_of(import(&dir)), &["model.safetensors is missing"]);

    let dir = exported(t, "truncated");
    let f = fs::OpenOptions::new().write(true).open(dir.join("model.safetensors")).unwrap();
    f.set_len(f.metadata().unwrap().len() - 10).unwrap();
    assert_mentions(&err_of(import(&dir)), &["model.safetensors is not a valid safetensors file"]);

    let dir = exported(t, "hidden");
    let mut c = read_config(&dir);
    c["intermediate_size"] = json!(512);
    write_config(&dir, &c);
    assert_mentions(
        &err_of(import(&dir)),
        &["model.safetensors does not match config.json", "intermediate 512", "model.H_module.layers.0.mlp.gate_up_proj.weight", "expected [1024, 128]"],
    );

    let dir = exported(t, "layers");
    let mut c = read_config(&dir);
    c["num_hidden_layers"] = json!(4);
    write_config(&dir, &c);
    assert_mentions(&err_of(import(&dir)), &["`model.H_module.layers.1.attn.gqkv_proj.weight` is missing"]);

    let dir = exported(t, "fewer_layers");
    let mut c = read_config(&dir);
    c["num_hidden_layers"] = json!(0);
    write_config(&dir, &c);
    assert_mentions(&err_of(import(&dir)), &["unexpected tensor `model.H_module.layers.0"]);

    let dir = exported(t, "keys");
    let mut c = read_config(&dir);
    c.as_object_mut().unwrap().remove("hidden_size");
    write_config(&dir, &c);
    assert_mentions(&err_of(import(&dir)), &["config.json", "`hidden_size` is missing"]);

    let dir = exported(t, "net_config");
    let mut c = read_config(&dir);
    c["net_config"] = json!({"cycles": 4});
    write_config(&dir, &c);
    assert_mentions(&err_of(import(&dir)), &["does not fit net \"hrm\""]);
    c["net"] = json!("lstm");
    write_config(&dir, &c);
    assert_mentions(&err_of(import(&dir)), &["`net` is \"lstm\", not a known net"]);

    let dir = exported(t, "gqa");
    let mut c = read_config(&dir);
    c["num_key_value_heads"] = json!(2);
    c["num_attention_heads"] = json!(1);
    write_config(&dir, &c);
    assert_mentions(&err_of(import(&dir)), &["no GQA"]);
    c["tie_word_embeddings"] = json!(true);
    write_config(&dir, &c);
    assert_mentions(&err_of(import(&dir)), &["untied"]);
}

#[test]
fn load_init_and_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ck = t.join("ck");
    let (params, optimizer) = write_checkpoint(&ck, NetName::Trm, None);
    let ema = Params { master: optimizer.ema.clone(), ..params.clone() };
    assert_eq!(load_init(&ck).unwrap(), ema, "a checkpoint gives its EMA weights");

    let run = t.join("run");
    let state = load(&ck, None).unwrap().state;
    save_in_run(&run, &params, &optimizer, &state, 1).unwrap();
    assert_eq!(load_init(&run).unwrap(), ema, "a run directory gives its latest checkpoint's EMA");

    // export (f32, from the run directory) -> import -> a checkpoint usable as --init.
    let hf = t.join("hf");
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let cli = |args: &[String]| hrm_cu::cli::run(Cli::parse_from(std::iter::once("hrm-cu".to_string()).chain(args.iter().cloned())));
    cli(&["export".into(), "--checkpoint".into(), arg(&run), "--out".into(), arg(&hf), "--dtype".into(), "f32".into()]).unwrap();
    assert_eq!(load_init(&hf).unwrap(), ema, "an interchange directory gives its weights");
    let imported = t.join("imported");
    cli(&["import".into(), "--model".into(), arg(&hf), "--out".into(), arg(&imported)]).unwrap();
    let fresh = load(&imported, Some(&params.config)).unwrap();
    assert_eq!(fresh.params, ema);
    assert_eq!(fresh.optimizer.ema, ema.master, "the EMA of an import is its weights");
    assert!(fresh.optimizer.steps.iter().all(|&s| s == 0) && fresh.optimizer.m.iter().all(|&x| x == 0.0));
    assert_eq!(fresh.state.global_step, 0);

    let empty = t.join("empty");
    fs::create_dir(&empty).unwrap();
    assert_mentions(&err_of(load_init(&empty)), &["neither a checkpoint"]);
}
