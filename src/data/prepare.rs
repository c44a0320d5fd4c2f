//! `hrm-cu data prepare`: instruction/response JSONL -> a tokenized, sampled dataset in the
//! layout of SPEC §8, without Python.
//!
//! ```text
//! 1. list the input files (directories: every *.jsonl below them, sorted)
//! 2. pick each file's rule: the first whose `prefix` starts its relative path, else the default
//! 3. tokenize every row, in parallel      (rows that fail are counted with file and line)
//!      instruction = boq, one token per condition, text, eoq;   response = text, eoa
//!      long_context truncate: resp_len = min(resp_len, context - inst_len); drop if inst_len >= context
//!      long_context drop:     drop if inst_len + resp_len > context
//!      drop if resp_len < min_resp_length
//! 4. per epoch, each file contributes min(rows, max_per_file) rows, `repeat` times each, read
//!    from a per-file shuffled order whose cursor carries over between epochs (so every row is
//!    used once before any row is used twice); the epoch is then shuffled as a whole
//! 5. write tokens.npy (each used sample once), epoch_<N>/*.npy, metadata.json, tokenizer.json
//!    and coverage.md
//! ```
//!
//! Every random choice draws from a generator seeded by `(seed, what)`, so a file's sample
//! does not change when other files are added.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::dataset::{Dataset, EpochIndex, TokenizerInfo};
use super::shuffle;
use crate::rng::Rng;

/// The companion pipeline's special tokens and condition tokens.
pub const DEFAULT_BOQ: &str = "<|im_start|>";
pub const DEFAULT_EOQ: &str = "<|im_end|>";
pub const DEFAULT_EOA: &str = "<|box_end|>";
pub const DEFAULT_CONDITIONS: &str = "direct=<|object_ref_start|>,cot=<|object_ref_end|>,noisy=<|quad_start|>,synth=<|quad_end|>";

/// Rows whose parse errors are listed in the coverage report, per file (the rest are counted).
const LISTED_ERRORS: usize = 20;
/// Lines tokenized in parallel at a time: enough to keep every core busy, bounded memory.
const CHUNK_LINES: usize = 4096;

/// What to do with a sample longer than the context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongContext {
    /// Cut the response to fit (it then lacks its end-of-answer token).
    #[default]
    Truncate,
    /// Leave the sample out.
    Drop,
}

/// Sampling rule of the files whose relative path starts with `prefix`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub prefix: String,
    /// Distinct rows a file contributes per epoch (default: all).
    #[serde(default)]
    pub max_per_file: Option<usize>,
    /// How many times each of those rows appears in an epoch (0 leaves the file out).
    #[serde(default = "one")]
    pub repeat: usize,
    #[serde(default)]
    pub long_context: LongContext,
}

fn one() -> usize {
    1
}

impl Rule {
    /// The rule of files no prefix matches.
    pub fn default_rule() -> Rule {
        Rule { prefix: String::new(), max_per_file: None, repeat: 1, long_context: LongContext::Truncate }
    }
}

/// The `--config` file: `{"rules": [{"prefix": "math/", "max_per_file": 1000, "repeat": 2,
/// "long_context": "drop"}, ...]}`; the first rule whose prefix matches wins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl SamplingConfig {
    pub fn load(path: &Path) -> Result<SamplingConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected JSON like {{\"rules\": [{{\"prefix\": \"math/\", \"max_per_file\": 1000, \"repeat\": 2, \"long_context\": \"truncate\"}}]}}",
                path.display()
            )
        })
    }

    /// Index of the first rule matching `rel` (None: the default rule).
    fn rule_for(&self, rel: &str) -> Option<usize> {
        self.rules.iter().position(|r| rel.starts_with(&r.prefix))
    }
}

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// JSONL files, or directories searched recursively for `*.jsonl`.
    pub inputs: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub epochs: usize,
    /// `max_seq_len`: the model's context plus one (4097 for a 4096-token model).
    pub context: usize,
    pub config: SamplingConfig,
    pub min_resp_length: usize,
    pub seed: u64,
    pub boq: String,
    pub eoq: String,
    pub eoa: String,
    /// Condition name -> token, e.g. `("cot", "<|object_ref_end|>")`.
    pub conditions: Vec<(String, String)>,
}

/// Parses `name=token,name=token` (the `--conditions` flag).
pub fn parse_conditions(spec: &str) -> Result<Vec<(String, String)>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, token)) if !name.trim().is_empty() && !token.is_empty() => Ok((name.trim().to_string(), token.to_string())),
            _ => bail!("condition {pair:?} is not name=token (e.g. cot=<|object_ref_end|>)"),
        })
        .collect()
}

/// One JSONL row.
#[derive(Deserialize)]
struct Row {
    condition: String,
    instruction: String,
    response: String,
}

/// What happened to one input file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileReport {
    pub path: PathBuf,
    /// Path relative to the input it was found under: what rules match and seeds derive from.
    pub rel: String,
    /// The matching rule's prefix, or None for the default rule.
    pub rule: Option<String>,
    /// Non-blank lines.
    pub rows: usize,
    pub parse_errors: usize,
    /// The first few: (line number from 1, message).
    pub error_examples: Vec<(usize, String)>,
    pub dropped_long: usize,
    pub dropped_short: usize,
    pub truncated: usize,
    /// Rows kept after the filters.
    pub usable: usize,
    /// Samples it contributes to each epoch (rows x repeat).
    pub per_epoch: usize,
    /// Distinct rows used in at least one epoch.
    pub unique_used: usize,
    /// Instruction + response tokens of its samples in epoch 0.
    pub tokens_epoch0: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PrepareReport {
    pub files: Vec<FileReport>,
    /// Per epoch: (samples, instruction + response tokens).
    pub epochs: Vec<(usize, u64)>,
    pub tokens_written: usize,
    pub vocab_size: usize,
    pub options_summary: String,
}

impl PrepareReport {
    pub fn parse_errors(&self) -> usize {
        self.files.iter().map(|f| f.parse_errors).sum()
    }
}

/// One file's usable rows, tokenized: `tokens` holds each row's instruction then response.
#[derive(Default)]
struct Tokenized {
    tokens: Vec<u32>,
    /// [rows] (start in `tokens`, instruction length, response length after truncation)
    rows: Vec<(usize, usize, usize)>,
}

/// Special-token ids the framing uses.
struct Framing {
    boq: u32,
    eoq: u32,
    eoa: u32,
    conditions: BTreeMap<String, u32>,
}

/// Runs the whole pipeline and writes `opts.out`. Returns what happened, file by file.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    ensure!(opts.epochs >= 1, "--epochs must be at least 1");
    ensure!(opts.context >= 3, "--context {} is too small (it is max_seq_len: the model's context plus one)", opts.context);
    if opts.out.exists() && std::fs::read_dir(&opts.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty: remove it or choose another --out", opts.out.display());
    }
    let tokenizer = Tokenizer::from_file(&opts.tokenizer).map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("loading the tokenizer {}", opts.tokenizer.display()))?;
    let id = |token: &str, flag: &str| {
        tokenizer.token_to_id(token).with_context(|| {
            format!("the special token {token:?} ({flag}) is not in the vocabulary of {}; pass the tokenizer's own token with {flag}", opts.tokenizer.display())
        })
    };
    let mut conditions = BTreeMap::new();
    for (name, token) in &opts.conditions {
        conditions.insert(name.clone(), id(token, "--conditions")?);
    }
    let framing = Framing { boq: id(&opts.boq, "--boq")?, eoq: id(&opts.eoq, "--eoq")?, eoa: id(&opts.eoa, "--eoa")?, conditions };
    let vocab_size = tokenizer.get_vocab_size(true);

    let files = list_inputs(&opts.inputs)?;
    let total_bytes: u64 = files.iter().map(|(p, _)| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(ProgressStyle::with_template("tokenizing {bar:40} {bytes}/{total_bytes} ({eta})").expect("a valid template"));
    let done = AtomicU64::new(0);
    let rule_index: Vec<Option<usize>> = files.iter().map(|(_, rel)| opts.config.rule_for(rel)).collect();
    let rules: Vec<Rule> = rule_index.iter().map(|i| i.map_or_else(Rule::default_rule, |i| opts.config.rules[i].clone())).collect();
    let results: Vec<(FileReport, Tokenized)> = files
        .par_iter()
        .zip(&rules)
        .zip(&rule_index)
        .map(|(((path, rel), rule), index)| {
            let mut report = FileReport { path: path.clone(), rel: rel.clone(), rule: index.map(|_| rule.prefix.clone()), ..Default::default() };
            let data = tokenize_file(path, &tokenizer, &framing, rule, opts, &mut report, &|bytes| {
                done.fetch_add(bytes, Ordering::Relaxed);
                bar.set_position(done.load(Ordering::Relaxed));
            })?;
            Ok((report, data))
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let (mut reports, data): (Vec<FileReport>, Vec<Tokenized>) = results.into_iter().unzip();
    if data.iter().all(|d| d.rows.is_empty()) {
        let first = reports.iter().find_map(|r| r.error_examples.first().map(|(line, msg)| format!("; e.g. {}:{line}: {msg}", r.path.display())));
        bail!(
            "no usable rows in {} file(s): {} rows, {} failed to parse, {} too long, {} with a short response{}",
            reports.len(),
            reports.iter().map(|r| r.rows).sum::<usize>(),
            reports.iter().map(|r| r.parse_errors).sum::<usize>(),
            reports.iter().map(|r| r.dropped_long).sum::<usize>(),
            reports.iter().map(|r| r.dropped_short).sum::<usize>(),
            first.unwrap_or_default()
        );
    }

    let epoch_rows = sample_epochs(&data, &rules, &mut reports, opts);
    let (tokens, index, epochs) = lay_out(&data, &epoch_rows, &mut reports);

    let tokenizer_path = std::fs::canonicalize(&opts.tokenizer).unwrap_or_else(|_| opts.tokenizer.clone());
    let info = TokenizerInfo {
        vocab_size,
        boq: opts.boq.clone(),
        eoq: opts.eoq.clone(),
        eoa: opts.eoa.clone(),
        condition_mapping: opts.conditions.iter().cloned().collect(),
        tokenizer_path: tokenizer_path.display().to_string(),
    };
    let tokens_written = tokens.len();
    let dataset = Dataset::from_parts(info, opts.context, tokens, index).context("the prepared dataset failed validation (a bug in prepare)")?;
    dataset.write(&opts.out)?;
    std::fs::copy(&opts.tokenizer, opts.out.join("tokenizer.json")).with_context(|| format!("copying {} into {}", opts.tokenizer.display(), opts.out.display()))?;

    let options_summary = format!(
        "{} input file(s), {} epoch(s), max_seq_len {}, min_resp_length {}, seed {}, tokenizer {} ({} tokens), boq {:?}, eoq {:?}, eoa {:?}",
        reports.len(),
        opts.epochs,
        opts.context,
        opts.min_resp_length,
        opts.seed,
        tokenizer_path.display(),
        vocab_size,
        opts.boq,
        opts.eoq,
        opts.eoa
    );
    let report = PrepareReport { files: reports, epochs, tokens_written, vocab_size, options_summary };
    let md = opts.out.join("coverage.md");
    std::fs::write(&md, coverage_markdown(&report)).with_context(|| format!("writing {}", md.display()))?;
    Ok(report)
}

/// Step 4: the (file, row) pairs of each epoch, shuffled. Per file, `min(rows, max_per_file)`
/// rows `repeat` times each, read from a shuffled order whose cursor carries over between
/// epochs. Fills each report's `per_epoch`.
fn sample_epochs(data: &[Tokenized], rules: &[Rule], reports: &mut [FileReport], opts: &PrepareOptions) -> Vec<Vec<(usize, usize)>> {
    let mut cursors: Vec<(Vec<usize>, usize)> = reports
        .iter()
        .zip(data)
        .map(|(r, d)| {
            let mut order: Vec<usize> = (0..d.rows.len()).collect();
            shuffle(&mut Rng::new(seed_for(opts.seed, &format!("file:{}", r.rel))), &mut order);
            (order, 0)
        })
        .collect();
    let mut epochs = Vec::with_capacity(opts.epochs);
    for e in 0..opts.epochs {
        let mut rows = Vec::new();
        for (f, (report, rule)) in reports.iter_mut().zip(rules).enumerate() {
            let (order, cursor) = &mut cursors[f];
            let n = order.len();
            // repeat 0 leaves the file out entirely.
            let take = if rule.repeat == 0 { 0 } else { rule.max_per_file.unwrap_or(n).min(n) };
            for j in 0..take {
                let row = order[(*cursor + j) % n];
                rows.extend(std::iter::repeat_n((f, row), rule.repeat));
            }
            *cursor = (*cursor + take) % n.max(1);
            report.per_epoch = take * rule.repeat;
        }
        shuffle(&mut Rng::new(seed_for(opts.seed, &format!("epoch:{e}"))), &mut rows);
        epochs.push(rows);
    }
    epochs
}

/// Step 5: the tokens of every row some epoch uses, once each, in file and row order, and
/// each epoch's index into them. Fills each report's `unique_used` and `tokens_epoch0`.
/// Returns (tokens, epoch indices, per epoch (samples, tokens)).
fn lay_out(data: &[Tokenized], epoch_rows: &[Vec<(usize, usize)>], reports: &mut [FileReport]) -> (Vec<u32>, Vec<EpochIndex>, Vec<(usize, u64)>) {
    const UNUSED: usize = usize::MAX;
    let mut start_of: Vec<Vec<usize>> = data.iter().map(|d| vec![UNUSED; d.rows.len()]).collect();
    for &(f, row) in epoch_rows.iter().flatten() {
        start_of[f][row] = 0;
    }
    let mut tokens = Vec::new();
    for (f, d) in data.iter().enumerate() {
        for (row, &(start, il, rl)) in d.rows.iter().enumerate() {
            if start_of[f][row] != UNUSED {
                start_of[f][row] = tokens.len();
                tokens.extend_from_slice(&d.tokens[start..start + il + rl]);
            }
        }
        reports[f].unique_used = start_of[f].iter().filter(|&&s| s != UNUSED).count();
    }
    let mut index = Vec::with_capacity(epoch_rows.len());
    let mut epochs = Vec::with_capacity(epoch_rows.len());
    for (e, rows) in epoch_rows.iter().enumerate() {
        let mut idx = EpochIndex::default();
        let mut epoch_tokens = 0u64;
        for &(f, row) in rows {
            let (_, il, rl) = data[f].rows[row];
            let s = start_of[f][row];
            idx.push(s, il, s + il, rl);
            epoch_tokens += (il + rl) as u64;
            if e == 0 {
                reports[f].tokens_epoch0 += (il + rl) as u64;
            }
        }
        epochs.push((rows.len(), epoch_tokens));
        index.push(idx);
    }
    (tokens, index, epochs)
}

/// Input files with their paths relative to the argument they came from, sorted.
fn list_inputs(inputs: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    ensure!(!inputs.is_empty(), "no --input given");
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).with_context(|| format!("reading --input {}", input.display()))?;
        if meta.is_file() {
            refuse_parquet(input)?;
            let name = input.file_name().map_or_else(|| input.display().to_string(), |n| n.to_string_lossy().into_owned());
            files.push((input.clone(), name));
            continue;
        }
        let mut found = Vec::new();
        walk(input, &mut found)?;
        found.sort();
        ensure!(!found.is_empty(), "--input {} holds no .jsonl file", input.display());
        for path in found {
            let rel = path.strip_prefix(input).unwrap_or(&path).components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            files.push((path, rel));
        }
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            out.push(path);
        } else {
            refuse_parquet(&path)?;
        }
    }
    Ok(())
}

fn refuse_parquet(path: &Path) -> Result<()> {
    ensure!(
        path.extension().is_none_or(|e| e != "parquet"),
        "{} is Parquet, which `data prepare` does not read: convert it to JSONL first \
         (e.g. pandas.read_parquet(path).to_json(out, orient='records', lines=True))",
        path.display()
    );
    Ok(())
}

/// Tokenizes one file, filling `report`'s counters; `progress` gets the bytes read.
fn tokenize_file(
    path: &Path,
    tokenizer: &Tokenizer,
    framing: &Framing,
    rule: &Rule,
    opts: &PrepareOptions,
    report: &mut FileReport,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Tokenized> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut out = Tokenized::default();
    let mut line_no = 0;
    let mut eof = false;
    while !eof {
        // Read a chunk of (line number, line) pairs; blank lines are skipped, not errors.
        let mut chunk: Vec<(usize, Vec<u8>)> = Vec::with_capacity(CHUNK_LINES);
        let mut bytes = 0;
        while chunk.len() < CHUNK_LINES {
            let mut line = Vec::new();
            let n = reader.read_until(b'\n', &mut line).with_context(|| format!("reading {} after line {line_no}", path.display()))?;
            if n == 0 {
                eof = true;
                break;
            }
            bytes += n as u64;
            line_no += 1;
            if !line.iter().all(u8::is_ascii_whitespace) {
                chunk.push((line_no, line));
            }
        }
        let rows: Vec<_> = chunk.par_iter().map(|(_, line)| tokenize_row(line, tokenizer, framing)).collect();
        for ((line, _), row) in chunk.iter().zip(rows) {
            report.rows += 1;
            let (inst, mut resp) = match row {
                Ok(r) => r,
                Err(msg) => {
                    report.parse_errors += 1;
                    if report.error_examples.len() < LISTED_ERRORS {
                        report.error_examples.push((*line, msg));
                    }
                    continue;
                }
            };
            let (il, rl) = (inst.len(), resp.len());
            match rule.long_context {
                LongContext::Truncate if il >= opts.context => {
                    report.dropped_long += 1;
                    continue;
                }
                LongContext::Truncate if il + rl > opts.context => {
                    resp.truncate(opts.context - il);
                    report.truncated += 1;
                }
                LongContext::Drop if il + rl > opts.context => {
                    report.dropped_long += 1;
                    continue;
                }
                _ => {}
            }
            if resp.len() < opts.min_resp_length.max(1) {
                report.dropped_short += 1;
                continue;
            }
            out.rows.push((out.tokens.len(), il, resp.len()));
            out.tokens.extend(inst);
            out.tokens.extend(resp);
        }
        progress(bytes);
    }
    report.usable = out.rows.len();
    Ok(out)
}

/// One JSONL line -> (instruction tokens, response tokens), or why it cannot be used.
fn tokenize_row(line: &[u8], tokenizer: &Tokenizer, framing: &Framing) -> Result<(Vec<u32>, Vec<u32>), String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
    let row: Row = serde_json::from_str(text).map_err(|e| format!("not an instruction/response row: {e}"))?;
    let encode = |s: &str| tokenizer.encode(s, false).map(|e| e.get_ids().to_vec()).map_err(|e| format!("tokenizer: {e}"));
    let mut inst = vec![framing.boq];
    for name in row.condition.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let known = || framing.conditions.keys().cloned().collect::<Vec<_>>().join(", ");
        inst.push(*framing.conditions.get(name).ok_or_else(|| format!("unknown condition {name:?} (known: {}; add it with --conditions)", known()))?);
    }
    inst.extend(encode(&row.instruction)?);
    inst.push(framing.eoq);
    let mut resp = encode(&row.response)?;
    resp.push(framing.eoa);
    Ok((inst, resp))
}

/// A 64-bit seed for one purpose: the first 8 bytes of sha256(seed, what).
fn seed_for(seed: u64, what: &str) -> u64 {
    let digest = Sha256::new().chain_update(seed.to_le_bytes()).chain_update(what.as_bytes()).finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// The Markdown coverage report written next to the dataset.
pub fn coverage_markdown(r: &PrepareReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Coverage report\n\nWritten by `hrm-cu data prepare`: {}.\n", r.options_summary);
    let samples: usize = r.epochs.iter().map(|e| e.0).sum();
    let _ = writeln!(s, "{} tokens written to tokens.npy; {samples} samples over {} epochs.\n", r.tokens_written, r.epochs.len());
    let _ = writeln!(s, "## Files\n");
    let _ = writeln!(
        s,
        "| file | rule | rows | parse errors | dropped (too long) | dropped (short response) | truncated | usable | per epoch | distinct used | coverage | tokens (epoch 0) |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for f in &r.files {
        let coverage = if f.usable == 0 { 0.0 } else { 100.0 * f.unique_used as f64 / f.usable as f64 };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {coverage:.1}% | {} |",
            f.rel,
            f.rule.as_deref().map_or("default".to_string(), |p| format!("`{p}`")),
            f.rows,
            f.parse_errors,
            f.dropped_long,
            f.dropped_short,
            f.truncated,
            f.usable,
            f.per_epoch,
            f.unique_used,
            f.tokens_epoch0
        );
    }
    let _ = writeln!(s, "\n## Epochs\n\n| epoch | samples | tokens |\n|--:|--:|--:|");
    for (e, (n, t)) in r.epochs.iter().enumerate() {
        let _ = writeln!(s, "| {e} | {n} | {t} |");
    }
    if r.parse_errors() > 0 {
        let _ = writeln!(s, "\n## Rows that failed\n");
        for f in r.files.iter().filter(|f| f.parse_errors > 0) {
            for (line, msg) in &f.error_examples {
                let _ = writeln!(s, "- `{}:{line}`: {msg}", f.path.display());
            }
            if f.parse_errors > f.error_examples.len() {
                let _ = writeln!(s, "- `{}`: and {} more", f.path.display(), f.parse_errors - f.error_examples.len());
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_and_rules_parse() {
        let c = parse_conditions(DEFAULT_CONDITIONS).unwrap();
        assert_eq!(c[1], ("cot".to_string(), "<|object_ref_end|>".to_string()));
        assert_eq!(c.len(), 4);
        assert!(parse_conditions("cot").is_err());

        let cfg: SamplingConfig = serde_json::from_str(r#"{"rules": [{"prefix": "math/", "max_per_file": 3, "repeat": 2, "long_context": "drop"}, {"prefix": "math/gsm"}]}"#).unwrap();
        assert_eq!(cfg.rule_for("math/gsm8k.jsonl"), Some(0), "the first matching prefix wins");
        assert_eq!(cfg.rule_for("code.jsonl"), None);
        assert_eq!(cfg.rules[1], Rule { prefix: "math/gsm".into(), ..Rule::default_rule() });
        assert!(serde_json::from_str::<SamplingConfig>(r#"{"rules": [{"prefix": "a", "max_per_fle": 3}]}"#).is_err(), "typos are errors");
    }

    #[test]
    fn seeds_depend_on_purpose() {
        assert_eq!(seed_for(1, "file:a"), seed_for(1, "file:a"));
        assert_ne!(seed_for(1, "file:a"), seed_for(1, "file:b"));
        assert_ne!(seed_for(1, "file:a"), seed_for(2, "file:a"));
    }
}
