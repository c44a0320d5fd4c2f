//! End to end: `hrm-cu data prepare` on a small JSONL corpus with a BPE tokenizer trained
//! here (no downloads), then `data batches` and `data inspect` on the result.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hrm_cu::data::{plan_epoch, Dataset};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer, TokenizerBuilder};

const SPECIALS: [&str; 7] = ["<|im_start|>", "<|im_end|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|quad_start|>", "<|quad_end|>"];

/// A byte-level BPE of ~300 tokens trained on `text`, with the companion's special tokens.
fn train_tokenizer(text: &[String], path: &Path) {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(300)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::default())))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .build()
        .unwrap();
    tok.train(&mut trainer, text.iter()).unwrap();
    tok.save(path, false).unwrap();
}

fn row(condition: &str, i: usize, words: usize) -> String {
    let instruction = format!("What is {i} plus {}?", i * 3);
    let response = format!("The answer is {}.{}", i * 4, " Let me think again.".repeat(words));
    serde_json::json!({"condition": condition, "instruction": instruction, "response": response}).to_string()
}

fn hrm(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_hrm-cu")).args(args).output().unwrap();
    assert!(out.status.success(), "hrm-cu {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

struct Corpus {
    _dir: tempfile::TempDir,
    root: PathBuf,
    tokenizer: PathBuf,
}

/// corpus/math/gsm.jsonl (40 rows + 2 bad), corpus/chat.jsonl (30 rows, one very long, one
/// blank line, one unknown condition), rules.json limiting math to 10 rows x 2 per epoch.
fn corpus() -> Corpus {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("corpus");
    std::fs::create_dir_all(root.join("math")).unwrap();
    let mut math: Vec<String> = (0..40).map(|i| row("synth,cot", i, i % 3)).collect();
    math.insert(5, "{not json".into());
    math.insert(9, r#"{"condition": "cot", "instruction": "missing the response"}"#.into());
    let mut chat: Vec<String> = (100..130).map(|i| row("direct", i, 1)).collect();
    chat[3] = row("direct", 103, 400); // far longer than the context: truncated
    chat.insert(7, String::new());
    chat.insert(8, row("sarcastic", 1, 1));
    std::fs::write(root.join("math/gsm.jsonl"), math.join("\n") + "\n").unwrap();
    std::fs::write(root.join("chat.jsonl"), chat.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("rules.json"),
        r#"{"rules": [{"prefix": "math/", "max_per_file": 10, "repeat": 2}, {"prefix": "", "long_context": "truncate"}]}"#,
    )
    .unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    train_tokenizer(&[math.join(" "), chat.join(" ")], &tokenizer);
    Corpus { root, tokenizer, _dir: dir }
}

fn prepare(c: &Corpus, out: &Path) -> Output {
    let rules = c.root.parent().unwrap().join("rules.json");
    hrm(&[
        "data", "prepare", "--input", c.root.to_str().unwrap(), "--tokenizer", c.tokenizer.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--epochs", "3", "--context", "129", "--config", rules.to_str().unwrap(), "--seed", "7",
    ])
}

#[test]
fn prepare_then_batches_and_inspect() {
    let c = corpus();
    let out = c.root.parent().unwrap().join("ds");
    let stderr = String::from_utf8(prepare(&c, &out).stderr).unwrap();
    assert!(stderr.contains("3 failed to parse"), "{stderr}");
    assert!(stderr.contains("gsm.jsonl failed to parse, e.g. line 6"), "{stderr}");

    // The layout and its content.
    let ds = Dataset::open(&out).unwrap();
    let tok = Tokenizer::from_file(&c.tokenizer).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!((ds.num_epochs(), ds.context(), ds.tokenizer_vocab()), (3, 128, tok.get_vocab_size(true)));
    // Per epoch: 10 math rows x 2 + 30 usable chat rows.
    for e in 0..3 {
        assert_eq!(ds.num_samples(e), 50);
    }
    let mut math_rows = HashSet::new();
    let mut truncated = 0;
    for e in 0..3 {
        for r in 0..ds.num_samples(e) {
            let s = ds.sample(e, r);
            let (inst, resp) = (s.instruction.to_vec(), s.response.to_vec());
            assert_eq!(inst[0], id("<|im_start|>"));
            assert_eq!(*inst.last().unwrap(), id("<|im_end|>"));
            assert!(inst.len() + resp.len() <= 129);
            let text = tok.decode(&inst, false).unwrap();
            if inst[1] == id("<|quad_end|>") {
                assert_eq!(inst[2], id("<|object_ref_end|>"), "synth,cot: one token per condition, in order");
                math_rows.insert((e, text));
            } else {
                assert_eq!(inst[1], id("<|object_ref_start|>"), "{text}");
            }
            if *resp.last().unwrap() != id("<|box_end|>") {
                truncated += 1;
                assert_eq!(inst.len() + resp.len(), 129, "only truncation removes the end-of-answer token");
            }
        }
    }
    assert_eq!(truncated, 3, "the long chat row, once per epoch");
    // 10 distinct math rows per epoch, and the cursor moves on: 30 distinct over 3 epochs.
    let distinct: HashSet<&String> = math_rows.iter().map(|(_, t)| t).collect();
    assert_eq!(distinct.len(), 30);

    let coverage = std::fs::read_to_string(out.join("coverage.md")).unwrap();
    assert!(coverage.contains("| math/gsm.jsonl | `math/` | 42 | 2 | 0 | 0 | 0 | 40 | 20 | 30 | 75.0% |"), "{coverage}");
    assert!(coverage.contains("| chat.jsonl | `` | 31 | 1 | 0 | 0 | 1 | 30 |"), "{coverage}");
    assert!(coverage.contains("gsm.jsonl:6`: not an instruction/response row"), "{coverage}");
    assert!(coverage.contains("chat.jsonl:9`: unknown condition \"sarcastic\""), "{coverage}");
    assert_eq!(ds.tokenizer_file(), Some(out.join("tokenizer.json")));

    // Same seed, same dataset, byte for byte.
    let again = c.root.parent().unwrap().join("ds2");
    prepare(&c, &again);
    for f in ["tokens.npy", "epoch_2/resp_start.npy", "metadata.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap(), "{f}");
    }

    // `data batches`: both ranks' schedules partition a prefix of the epoch, as planned.
    let plan = plan_epoch(&ds.packed_lengths(1), 256, 2);
    let mut seen = Vec::new();
    for rank in 0..2 {
        let rank_str = rank.to_string();
        let out = hrm(&["data", "batches", "--data", out.to_str().unwrap(), "--world", "2", "--rank", &rank_str, "--batch-tokens", "256", "--epoch", "1"]);
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), plan.steps.len());
        for (k, line) in lines.iter().enumerate() {
            assert_eq!(line["step"], k);
            let rows: Vec<usize> = serde_json::from_value(line["samples"].clone()).unwrap();
            assert_eq!(rows, plan.rows(k, rank));
            seen.extend(rows);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..plan.packed_rows).collect::<Vec<_>>());

    // With 2 micro-batches, world 1's step is the bins of virtual ranks 0 and 1 of the same plan.
    let out_micro = hrm(&["data", "batches", "--data", out.to_str().unwrap(), "--world", "1", "--rank", "0", "--batch-tokens", "512", "--micro-batches", "2", "--epoch", "1"]);
    let lines: Vec<serde_json::Value> = String::from_utf8(out_micro.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 * plan.steps.len());
    for (i, line) in lines.iter().enumerate() {
        let (step, micro) = (i / 2, i % 2);
        assert_eq!((line["step"].clone(), line["micro_batch"].clone()), (step.into(), micro.into()));
        let rows: Vec<usize> = serde_json::from_value(line["samples"].clone()).unwrap();
        assert_eq!(rows, plan.rows(step, micro));
    }

    let out = hrm(&["data", "inspect", "--data", out.to_str().unwrap(), "--batch-tokens", "256", "--world", "2"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("context     128 tokens"), "{text}");
    assert!(text.contains(&format!("{:>5} {:>10}", 0, 50)), "{text}");
    assert!(text.contains("assembly of one local batch (256 tokens)"), "{text}");
}

#[test]
fn prepare_refuses_a_missing_special_token_and_a_used_output() {
    let c = corpus();
    let out = c.root.parent().unwrap().join("ds");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["data", "prepare", "--input", c.root.to_str().unwrap(), "--tokenizer", c.tokenizer.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_hrm-cu")).args(&args).output().unwrap()
    };
    let o = run(&out, &["--eoa", "<|endoftext|>"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("the special token \"<|endoftext|>\" (--eoa) is not in the vocabulary"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let o = run(&out, &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists and is not empty"));
    let bad = c.root.parent().unwrap().join("bad.jsonl");
    std::fs::write(&bad, "{\"instruction\": \"no condition\", \"response\": \"x\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_hrm-cu"))
        .args(["data", "prepare", "--input", bad.to_str().unwrap(), "--tokenizer", c.tokenizer.to_str().unwrap(), "--out", "unused"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no usable rows in 1 file(s): 1 rows, 1 failed to parse") && e.contains("bad.jsonl:1: not an instruction/response row: missing field `condition`"), "{e}");
    std::fs::write(c.root.join("table.parquet"), "PAR1").unwrap();
    let o = run(&c.root.parent().unwrap().join("other"), &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is Parquet"), "{}", String::from_utf8_lossy(&o.stderr));
}
