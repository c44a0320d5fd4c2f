//! Reading a dataset as the companion pipeline writes it (SPEC §8), written here byte by byte
//! by a writer independent of the crate's, and every validation error of `Dataset::open`.

use std::path::Path;

use hrm_cu::data::{assemble, plan_epoch, Dataset, TokenSlice, IGNORE_LABEL};

/// A `.npy` v1 (or v2) file as numpy 1.x writes it: no growth padding, the header padded
/// with spaces to a multiple of 64 bytes and ended by a newline.
fn npy_bytes(version: u8, descr: &str, len: usize, data: &[u8]) -> Vec<u8> {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({len},), }}");
    let prefix = if version == 1 { 10 } else { 12 };
    let pad = 64 - (prefix + dict.len() + 1) % 64;
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version, 0]);
    if version == 1 {
        out.extend((header.len() as u16).to_le_bytes());
    } else {
        out.extend((header.len() as u32).to_le_bytes());
    }
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn write_i64(path: &Path, values: &[i64]) {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, npy_bytes(1, "<i8", values.len(), &data)).unwrap();
}

/// Tokens in the type SPEC §8 prescribes for the vocabulary.
fn write_tokens(path: &Path, tokens: &[u32], vocab: usize) {
    let bytes = if vocab <= 255 {
        npy_bytes(1, "|u1", tokens.len(), &tokens.iter().map(|&t| t as u8).collect::<Vec<_>>())
    } else if vocab <= 65535 {
        npy_bytes(1, "<u2", tokens.len(), &tokens.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect::<Vec<_>>())
    } else {
        npy_bytes(1, "<i4", tokens.len(), &tokens.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect::<Vec<_>>())
    };
    std::fs::write(path, bytes).unwrap();
}

/// One epoch's rows: (inst_start, inst_len, resp_start, resp_len).
type Rows = Vec<(i64, i64, i64, i64)>;

fn write_epoch(dir: &Path, e: usize, rows: &Rows) {
    let d = dir.join(format!("epoch_{e}"));
    std::fs::create_dir_all(&d).unwrap();
    write_i64(&d.join("inst_start.npy"), &rows.iter().map(|r| r.0).collect::<Vec<_>>());
    write_i64(&d.join("inst_len.npy"), &rows.iter().map(|r| r.1).collect::<Vec<_>>());
    write_i64(&d.join("resp_start.npy"), &rows.iter().map(|r| r.2).collect::<Vec<_>>());
    write_i64(&d.join("resp_len.npy"), &rows.iter().map(|r| r.3).collect::<Vec<_>>());
}

fn write_metadata(dir: &Path, vocab: usize, max_seq_len: usize, total_length: u64) {
    let meta = format!(
        r#"{{"tokenizer_info": {{"vocab_size": {vocab}, "boq": "<|im_start|>", "eoq": "<|im_end|>", "eoa": "<|box_end|>",
            "condition_mapping": {{"direct": "<|object_ref_start|>", "cot": "<|object_ref_end|>"}},
            "tokenizer_path": "/models/tok"}},
           "max_seq_len": {max_seq_len}, "total_length": {total_length}, "vocab_size": null, "sampler_version": "x"}}"#
    );
    std::fs::write(dir.join("metadata.json"), meta).unwrap();
}

/// Tokens 0..20 (ids 900 + i); epoch 0 rows A, B, C; epoch 1 rows C, A.
///   A: I = tokens[0..3],  R = tokens[3..6]     (packed 5)
///   B: I = tokens[6..8],  R = tokens[8..9]     (packed 2, causal length 0)
///   C: I = tokens[9..13], R = tokens[13..20]   (packed 10)
fn companion(dir: &Path, vocab: usize) -> (Vec<u32>, Rows, Rows) {
    let tokens: Vec<u32> = (0..20).map(|i| (vocab as u32 - 20) + i).collect();
    let (a, b, c) = ((0, 3, 3, 3), (6, 2, 8, 1), (9, 4, 13, 7));
    let (e0, e1) = (vec![a, b, c], vec![c, a]);
    write_tokens(&dir.join("tokens.npy"), &tokens, vocab);
    write_epoch(dir, 0, &e0);
    write_epoch(dir, 1, &e1);
    // (6 + 3 + 11) and (11 + 6): mean 18.5, rounded half to even: 18.
    write_metadata(dir, vocab, 11, 18);
    (tokens, e0, e1)
}

#[test]
fn reads_the_companion_layout_in_every_token_type() {
    for (vocab, want_u16) in [(200, false), (1000, true), (70_000, false)] {
        let dir = tempfile::tempdir().unwrap();
        let (tokens, e0, _) = companion(dir.path(), vocab);
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(matches!(ds.all_tokens(), TokenSlice::U16(_)), want_u16, "vocab {vocab}");
        assert_eq!((ds.tokenizer_vocab(), ds.vocab(), ds.context()), (vocab, vocab.div_ceil(256) * 256, 10));
        assert_eq!((ds.num_epochs(), ds.num_samples(0), ds.num_samples(1), ds.tokens_per_epoch()), (2, 3, 2, 18));
        assert_eq!(ds.metadata().raw["sampler_version"], "x", "unknown fields are kept for export");
        assert_eq!(ds.metadata().tokenizer_info.condition_mapping["cot"], "<|object_ref_end|>");
        assert_eq!(ds.tokenizer_file(), None, "/models/tok is not on this machine");
        for (r, &(is, il, rs, rl)) in e0.iter().enumerate() {
            let s = ds.sample(0, r);
            assert_eq!(s.instruction.to_vec(), tokens[is as usize..(is + il) as usize]);
            assert_eq!(s.response.to_vec(), tokens[rs as usize..(rs + rl) as usize]);
        }
        assert_eq!(ds.packed_lengths(1), vec![10, 5]);
    }
}

#[test]
fn companion_data_goes_through_the_batch_path() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _, _) = companion(dir.path(), 1000);
    let t: Vec<i32> = t.iter().map(|&x| x as i32).collect();
    let ds = Dataset::open(dir.path()).unwrap();
    // World 1, capacity 10: rows A (5) and B (2) fit, C (10) needs a step of its own.
    let plan = plan_epoch(&ds.packed_lengths(0), 10, 1);
    assert_eq!(plan.steps, vec![vec![vec![0, 1]]], "the step reaching the end (C) is dropped");
    let b = assemble(&ds, 0, plan.rows(0, 0), 10, true).unwrap();
    const X: i32 = IGNORE_LABEL;
    assert_eq!(b.inputs, [t[0], t[1], t[2], t[3], t[4], t[6], t[7], 0, 0, 0]);
    assert_eq!(b.labels, [X, X, t[3], t[4], t[5], X, t[8], X, X, X]);
    assert_eq!(b.positions, [0, 1, 2, 3, 4, 0, 1, 0, 0, 0]);
    assert_eq!((b.cu_seqlens, b.prefix_lens, b.causal_lens), (vec![0, 5, 7], vec![3, 2], vec![2, 0]));
}

/// Builds a valid companion dataset, breaks it with `f`, and returns the open error.
fn open_error(f: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    companion(dir.path(), 1000);
    f(dir.path());
    format!("{:#}", Dataset::open(dir.path()).unwrap_err())
}

#[test]
fn every_validation_error_names_the_file_the_row_and_the_fix() {
    type Breakage = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(Breakage, &str)> = vec![
        (Box::new(|d| std::fs::remove_file(d.join("metadata.json")).unwrap()), "metadata.json (is "),
        (Box::new(|d| std::fs::write(d.join("metadata.json"), r#"{"tokenizer_info": {}, "max_seq_len": 5}"#).unwrap()), "does not have the fields of SPEC §8"),
        (Box::new(|d| std::fs::write(d.join("metadata.json"), "{").unwrap()), "metadata.json: not valid JSON"),
        (Box::new(|d| write_metadata(d, 1000, 1, 0)), "max_seq_len is 1"),
        (Box::new(|d| std::fs::remove_file(d.join("tokens.npy")).unwrap()), "opening"),
        (Box::new(|d| write_i64(&d.join("tokens.npy"), &[1, 2, 3])), "tokens.npy holds int64"),
        (Box::new(|d| write_metadata(d, 990, 11, 18)), "tokens.npy[10] is token id 990, outside the vocabulary 0..990"),
        (
            Box::new(|d| {
                let bytes = std::fs::read(d.join("tokens.npy")).unwrap();
                std::fs::write(d.join("tokens.npy"), &bytes[..bytes.len() - 1]).unwrap();
            }),
            "the file is truncated",
        ),
        (Box::new(|d| std::fs::rename(d.join("epoch_0"), d.join("old")).unwrap()), "has epoch directories [1] but no epoch_0"),
        (Box::new(|d| std::fs::remove_dir_all(d.join("epoch_1")).and_then(|_| std::fs::remove_dir_all(d.join("epoch_0"))).unwrap()), "no epoch_0 directory"),
        (Box::new(|d| write_epoch(d, 3, &vec![(0, 3, 3, 3)])), "has epoch directories [0, 1, 3] but no epoch_2"),
        (Box::new(|d| std::fs::remove_file(d.join("epoch_1/resp_len.npy")).unwrap()), "epoch_1/resp_len.npy"),
        (
            Box::new(|d| std::fs::write(d.join("epoch_1/inst_len.npy"), npy_bytes(1, "<i4", 2, &[0; 8])).unwrap()),
            "epoch_1/inst_len.npy holds int32 but must hold int64",
        ),
        (Box::new(|d| write_i64(&d.join("epoch_1/resp_start.npy"), &[13])), "epoch_1/resp_start.npy has 1 rows but"),
        (Box::new(|d| write_i64(&d.join("epoch_1/resp_start.npy"), &[13, 18])), "epoch_1/resp_start.npy row 1: the response tokens[18..18+3] end past"),
        (Box::new(|d| write_i64(&d.join("epoch_0/inst_start.npy"), &[0, 6, -9])), "epoch_0/inst_start.npy row 2: inst_start = -9 is negative"),
        (Box::new(|d| write_i64(&d.join("epoch_0/resp_len.npy"), &[3, 0, 7])), "epoch_0/resp_len.npy row 1: the response is empty"),
        (Box::new(|d| write_i64(&d.join("epoch_0/inst_len.npy"), &[3, 2, 5])), "epoch_0/inst_len.npy row 2: inst_len 5 + resp_len 7 - 1 = 11 tokens exceed the context 10"),
    ];
    for (breakage, want) in cases {
        let e = open_error(breakage);
        assert!(e.contains(want), "expected {want:?} in: {e}");
    }
    // A message that points at a row also says how to fix it.
    let e = open_error(|d| write_i64(&d.join("epoch_0/inst_len.npy"), &[3, 2, 5]));
    assert!(e.contains("truncate the response"), "{e}");
}

#[test]
fn training_more_epochs_than_prepared_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    companion(dir.path(), 1000);
    let ds = Dataset::open(dir.path()).unwrap();
    ds.require_epochs(2).unwrap();
    let e = format!("{:#}", ds.require_epochs(4).unwrap_err());
    assert!(e.contains("training runs 4 epochs but") && e.contains("holds 2 (epoch_0..epoch_1)") && e.contains("--epochs 4"), "{e}");
}

#[test]
fn a_version_2_header_reads_like_version_1() {
    let dir = tempfile::tempdir().unwrap();
    companion(dir.path(), 1000);
    let data: Vec<u8> = [9i64, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("epoch_1/inst_start.npy"), npy_bytes(2, "<i8", 2, &data)).unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.sample(1, 1).instruction.len(), 3);
}
