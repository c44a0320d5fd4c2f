//! A tokenized instruction/response dataset in the layout of SPEC §8, validated when it is
//! opened or built, so that nothing downstream (sampler, batch assembly, the GPU) ever sees
//! an out-of-range span or token id.
//!
//! ```text
//! DIR/tokens.npy                 [total_tokens] uint8 | uint16 | int32 (uint32 accepted)
//! DIR/epoch_<N>/inst_start.npy   [rows] int64   instruction = tokens[inst_start : inst_start + inst_len]
//! DIR/epoch_<N>/inst_len.npy     [rows] int64
//! DIR/epoch_<N>/resp_start.npy   [rows] int64   response    = tokens[resp_start : resp_start + resp_len]
//! DIR/epoch_<N>/resp_len.npy     [rows] int64
//! DIR/metadata.json              tokenizer_info, max_seq_len (= context + 1), total_length
//! ```
//!
//! A dataset on disk is memory-mapped and read in place; [`Dataset::from_parts`] builds the
//! same thing in memory (the demo task, `data prepare`), and [`Dataset::write`] writes
//! either kind to disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::npy::{self, DType, NpyArray, NpyData};
use crate::config::round_up;

/// The index files of one epoch, in the order they are checked and written.
pub const INDEX_COLUMNS: [&str; 4] = ["inst_start", "inst_len", "resp_start", "resp_len"];

/// `metadata.json`'s `tokenizer_info`: how the instruction/response framing was tokenized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// Size of the tokenizer's vocabulary, added tokens included; every token id is below it.
    pub vocab_size: usize,
    /// Begin-of-question token (first token of every instruction).
    pub boq: String,
    /// End-of-question token (last token of every instruction).
    pub eoq: String,
    /// End-of-answer token (last token of every untruncated response).
    pub eoa: String,
    /// Condition name (`direct`, `cot`, ...) -> the token that follows the begin-of-question token.
    pub condition_mapping: BTreeMap<String, String>,
    #[serde(default)]
    pub tokenizer_path: String,
}

/// The parsed `metadata.json`, with the raw JSON kept so that export can copy fields it
/// does not know about.
#[derive(Clone, Debug, PartialEq)]
pub struct Metadata {
    pub tokenizer_info: TokenizerInfo,
    /// The model's context plus the one token of the autoregressive shift.
    pub max_seq_len: usize,
    /// Instruction + response tokens per epoch: the rounded mean over the epochs.
    pub total_length: u64,
    /// Written as `null` by the companion pipeline; kept, not used (SPEC §3 derives the
    /// model's vocabulary from `tokenizer_info.vocab_size`).
    pub vocab_size: Option<usize>,
    pub raw: serde_json::Value,
}

/// The typed fields of `metadata.json`; unknown fields are allowed and kept in `raw`.
#[derive(Serialize, Deserialize)]
struct MetadataFields {
    tokenizer_info: TokenizerInfo,
    max_seq_len: usize,
    total_length: u64,
    #[serde(default)]
    vocab_size: Option<usize>,
}

impl Metadata {
    fn parse(text: &str) -> Result<Metadata> {
        let raw: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
        let f: MetadataFields = serde_json::from_value(raw.clone()).context("does not have the fields of SPEC §8")?;
        Ok(Metadata { tokenizer_info: f.tokenizer_info, max_seq_len: f.max_seq_len, total_length: f.total_length, vocab_size: f.vocab_size, raw })
    }

    fn new(tokenizer_info: TokenizerInfo, max_seq_len: usize, total_length: u64) -> Metadata {
        let fields = MetadataFields { tokenizer_info, max_seq_len, total_length, vocab_size: None };
        let raw = serde_json::to_value(&fields).expect("metadata fields are plain data");
        Metadata { tokenizer_info: fields.tokenizer_info, max_seq_len, total_length, vocab_size: None, raw }
    }
}

/// One epoch's index, in memory: row `i` is sample `i` of the epoch, in training order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochIndex {
    pub inst_start: Vec<i64>,
    pub inst_len: Vec<i64>,
    pub resp_start: Vec<i64>,
    pub resp_len: Vec<i64>,
}

impl EpochIndex {
    pub fn push(&mut self, inst_start: usize, inst_len: usize, resp_start: usize, resp_len: usize) {
        self.inst_start.push(inst_start as i64);
        self.inst_len.push(inst_len as i64);
        self.resp_start.push(resp_start as i64);
        self.resp_len.push(resp_len as i64);
    }

    pub fn len(&self) -> usize {
        self.inst_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inst_start.is_empty()
    }
}

/// One index column, mapped from disk or owned.
#[derive(Debug)]
enum Column {
    Mapped(NpyArray),
    Owned(Vec<i64>),
}

impl Column {
    fn as_slice(&self) -> &[i64] {
        match self {
            // `Dataset::open` only keeps int64 columns.
            Column::Mapped(a) => a.as_i64().expect("validated on open"),
            Column::Owned(v) => v,
        }
    }
}

#[derive(Debug)]
struct Epoch {
    inst_start: Column,
    inst_len: Column,
    resp_start: Column,
    resp_len: Column,
}

impl Epoch {
    fn columns(&self) -> [&[i64]; 4] {
        [self.inst_start.as_slice(), self.inst_len.as_slice(), self.resp_start.as_slice(), self.resp_len.as_slice()]
    }
}

#[derive(Debug)]
enum TokenStore {
    Mapped(NpyArray),
    Owned(Vec<u32>),
}

/// A borrowed run of token ids in whatever type `tokens.npy` stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSlice<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
    I32(&'a [i32]),
    U32(&'a [u32]),
}

impl<'a> TokenSlice<'a> {
    pub fn len(&self) -> usize {
        match self {
            TokenSlice::U8(x) => x.len(),
            TokenSlice::U16(x) => x.len(),
            TokenSlice::I32(x) => x.len(),
            TokenSlice::U32(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i`. Ids were checked against the vocabulary, so they are non-negative.
    pub fn get(&self, i: usize) -> u32 {
        match self {
            TokenSlice::U8(x) => x[i] as u32,
            TokenSlice::U16(x) => x[i] as u32,
            TokenSlice::I32(x) => x[i] as u32,
            TokenSlice::U32(x) => x[i],
        }
    }

    pub fn slice(&self, range: std::ops::Range<usize>) -> TokenSlice<'a> {
        match *self {
            TokenSlice::U8(x) => TokenSlice::U8(&x[range]),
            TokenSlice::U16(x) => TokenSlice::U16(&x[range]),
            TokenSlice::I32(x) => TokenSlice::I32(&x[range]),
            TokenSlice::U32(x) => TokenSlice::U32(&x[range]),
        }
    }

    /// Writes the ids into `out` (same length) as the i32 the model's inputs use. The type
    /// is matched once, outside the loop, so each arm is a plain widening copy.
    pub fn copy_to_i32(&self, out: &mut [i32]) {
        assert_eq!(out.len(), self.len(), "copy_to_i32: length mismatch");
        match self {
            TokenSlice::U8(x) => out.iter_mut().zip(x.iter()).for_each(|(o, &t)| *o = t as i32),
            TokenSlice::U16(x) => out.iter_mut().zip(x.iter()).for_each(|(o, &t)| *o = t as i32),
            TokenSlice::I32(x) => out.copy_from_slice(x),
            TokenSlice::U32(x) => out.iter_mut().zip(x.iter()).for_each(|(o, &t)| *o = t as i32),
        }
    }

    pub fn to_vec(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// One sample: its instruction (prefix) and response tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample<'a> {
    pub instruction: TokenSlice<'a>,
    pub response: TokenSlice<'a>,
}

impl Sample<'_> {
    /// Slots the sample takes in a packed batch: `len(I) + len(R) - 1` (SPEC §4, §8).
    pub fn packed_len(&self) -> usize {
        self.instruction.len() + self.response.len() - 1
    }
}

/// A validated dataset: every span lies inside `tokens`, every id is below the tokenizer's
/// vocabulary, every sample has an instruction and a response and fits the context.
#[derive(Debug)]
pub struct Dataset {
    /// The directory it was opened from; `None` when built in memory.
    dir: Option<PathBuf>,
    metadata: Metadata,
    tokens: TokenStore,
    epochs: Vec<Epoch>,
    /// Largest packed length over every epoch: a local batch must hold at least this much.
    max_sample_len: usize,
}

impl Dataset {
    /// Opens and validates a dataset directory (SPEC §8). Every problem is an error naming
    /// the file, the row and the fix.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let meta_path = dir.join("metadata.json");
        let text = std::fs::read_to_string(&meta_path)
            .with_context(|| format!("reading {} (is {} a dataset directory written by `hrm-cu data prepare`?)", meta_path.display(), dir.display()))?;
        let metadata = Metadata::parse(&text).with_context(|| format!("{}", meta_path.display()))?;

        let tokens = NpyArray::open(&dir.join("tokens.npy"))?;
        if tokens.dtype() == DType::I64 {
            bail!("{} holds int64; token ids must be uint8, uint16 or int32 (SPEC §8): write tokens.astype(numpy.int32)", tokens.path().display());
        }

        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let name = entry?.file_name();
            if let Some(n) = name.to_str().and_then(|s| s.strip_prefix("epoch_")).and_then(|s| s.parse::<usize>().ok()) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        ensure!(!numbers.is_empty(), "{} has no epoch_0 directory: a dataset needs at least one epoch of index files (SPEC §8)", dir.display());
        if let Some(missing) = (0..).zip(&numbers).find(|(want, have)| *want != **have).map(|(want, _)| want) {
            bail!(
                "{} has epoch directories {numbers:?} but no epoch_{missing}: epochs are numbered from 0 without gaps; \
                 prepare the dataset again or rename the directories",
                dir.display()
            );
        }

        let mut epochs = Vec::new();
        for e in numbers {
            let open = |col: &str| -> Result<Column> {
                let a = NpyArray::open(&dir.join(format!("epoch_{e}/{col}.npy")))?;
                a.as_i64()?;
                Ok(Column::Mapped(a))
            };
            epochs.push(Epoch { inst_start: open("inst_start")?, inst_len: open("inst_len")?, resp_start: open("resp_start")?, resp_len: open("resp_len")? });
        }
        Dataset::validated(Some(dir.to_path_buf()), metadata, TokenStore::Mapped(tokens), epochs)
    }

    /// Builds a dataset in memory. `max_seq_len` is the context plus one (SPEC §8);
    /// `total_length` is computed from the epochs as `data prepare` computes it.
    pub fn from_parts(tokenizer_info: TokenizerInfo, max_seq_len: usize, tokens: Vec<u32>, epochs: Vec<EpochIndex>) -> Result<Dataset> {
        let total_length = mean_tokens_per_epoch(&epochs);
        let metadata = Metadata::new(tokenizer_info, max_seq_len, total_length);
        let epochs = epochs
            .into_iter()
            .map(|e| Epoch {
                inst_start: Column::Owned(e.inst_start),
                inst_len: Column::Owned(e.inst_len),
                resp_start: Column::Owned(e.resp_start),
                resp_len: Column::Owned(e.resp_len),
            })
            .collect();
        Dataset::validated(None, metadata, TokenStore::Owned(tokens), epochs)
    }

    fn validated(dir: Option<PathBuf>, metadata: Metadata, tokens: TokenStore, epochs: Vec<Epoch>) -> Result<Dataset> {
        let mut ds = Dataset { dir, metadata, tokens, epochs, max_sample_len: 0 };
        let meta_name = ds.file_name("metadata.json");
        let info = &ds.metadata.tokenizer_info;
        ensure!(info.vocab_size > 0, "{meta_name}: tokenizer_info.vocab_size is 0; set it to the tokenizer's vocabulary size (added tokens included)");
        ensure!(
            ds.metadata.max_seq_len >= 2,
            "{meta_name}: max_seq_len is {}; it is the context plus one and must be at least 2",
            ds.metadata.max_seq_len
        );
        ds.check_token_ids()?;
        for e in 0..ds.epochs.len() {
            let longest = ds.check_epoch(e)?;
            ds.max_sample_len = ds.max_sample_len.max(longest);
        }
        Ok(ds)
    }

    /// How a file of this dataset is named in messages.
    fn file_name(&self, file: &str) -> String {
        match &self.dir {
            Some(dir) => dir.join(file).display().to_string(),
            None => format!("{file} (in memory)"),
        }
    }

    /// Every id below `tokenizer_info.vocab_size`, none negative. Skipped when the storage
    /// type cannot hold an id that large; otherwise a parallel scan of the whole array.
    fn check_token_ids(&self) -> Result<()> {
        let vocab = self.metadata.tokenizer_info.vocab_size as i64;
        let all = self.all_tokens();
        let bad = match all {
            TokenSlice::U8(x) if vocab <= u8::MAX as i64 => first_outside(x, vocab),
            TokenSlice::U16(x) if vocab <= u16::MAX as i64 => first_outside(x, vocab),
            TokenSlice::I32(x) => first_outside(x, vocab),
            TokenSlice::U32(x) => first_outside(x, vocab),
            _ => None,
        };
        if let Some(i) = bad {
            let id = match all {
                TokenSlice::I32(x) => x[i] as i64,
                other => other.get(i) as i64,
            };
            bail!(
                "{}[{i}] is token id {id}, outside the vocabulary 0..{vocab} of {} (tokenizer_info.vocab_size): \
                 the tokens were written with another tokenizer; fix vocab_size or prepare the dataset again",
                self.file_name("tokens.npy"),
                self.file_name("metadata.json")
            );
        }
        Ok(())
    }

    /// Checks every row of epoch `e`; returns the largest packed length.
    fn check_epoch(&self, e: usize) -> Result<usize> {
        let name = |col: &str| self.file_name(&format!("epoch_{e}/{col}.npy"));
        let cols = self.epochs[e].columns();
        for (c, col) in cols.iter().enumerate().skip(1) {
            ensure!(
                col.len() == cols[0].len(),
                "{} has {} rows but {} has {}: the four index files of an epoch must have one row per sample; prepare the dataset again",
                name(INDEX_COLUMNS[c]),
                col.len(),
                name(INDEX_COLUMNS[0]),
                cols[0].len()
            );
        }
        let n_tokens = self.all_tokens().len() as i64;
        let context = self.context();
        let mut longest = 0;
        for row in 0..cols[0].len() {
            let [is, il, rs, rl] = cols.map(|c| c[row]);
            for (c, v) in [is, il, rs, rl].into_iter().enumerate() {
                ensure!(v >= 0, "{} row {row}: {} = {v} is negative; prepare the dataset again", name(INDEX_COLUMNS[c]), INDEX_COLUMNS[c]);
            }
            ensure!(
                il >= 1,
                "{} row {row}: the instruction is empty; every instruction holds at least its begin- and end-of-question tokens: drop the row",
                name("inst_len")
            );
            ensure!(rl >= 1, "{} row {row}: the response is empty; every response holds at least one token: drop the row", name("resp_len"));
            for (what, start, len, file) in [("instruction", is, il, "inst_start"), ("response", rs, rl, "resp_start")] {
                ensure!(
                    start.checked_add(len).is_some_and(|end| end <= n_tokens),
                    "{} row {row}: the {what} tokens[{start}..{start}+{len}] end past {}, which holds {n_tokens} tokens: \
                     these index files do not belong to this tokens.npy; prepare the dataset again",
                    name(file),
                    self.file_name("tokens.npy")
                );
            }
            let packed = (il + rl - 1) as usize;
            ensure!(
                packed <= context,
                "{} row {row}: inst_len {il} + resp_len {rl} - 1 = {packed} tokens exceed the context {context} \
                 (max_seq_len {} in metadata.json, minus 1): truncate the response to max_seq_len - inst_len tokens, drop the row, \
                 or raise max_seq_len",
                name("inst_len"),
                self.metadata.max_seq_len
            );
            longest = longest.max(packed);
        }
        Ok(longest)
    }

    /// Errors unless the dataset has at least `epochs` epochs (the training configuration's).
    pub fn require_epochs(&self, epochs: usize) -> Result<()> {
        ensure!(
            epochs <= self.num_epochs(),
            "training runs {epochs} epochs but {} holds {} (epoch_0..epoch_{}): prepare it with `--epochs {epochs}` or train fewer epochs",
            self.dir.as_ref().map_or("the in-memory dataset".to_string(), |d| d.display().to_string()),
            self.num_epochs(),
            self.num_epochs().saturating_sub(1)
        );
        Ok(())
    }

    /// The directory it was opened from; `None` when built in memory.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The tokenizer the dataset was made with, if it is on this machine: `tokenizer.json`
    /// next to the data (`data prepare` copies it there), else `tokenizer_info.tokenizer_path`
    /// (a tokenizer.json, or a directory holding one).
    pub fn tokenizer_file(&self) -> Option<PathBuf> {
        let beside = self.dir.as_ref().map(|d| d.join("tokenizer.json"));
        let recorded = PathBuf::from(&self.metadata.tokenizer_info.tokenizer_path);
        let candidates = [beside, Some(recorded.join("tokenizer.json")), Some(recorded)];
        candidates.into_iter().flatten().find(|p| p.is_file())
    }

    /// The tokenizer's vocabulary, added tokens included (metadata `tokenizer_info.vocab_size`).
    pub fn tokenizer_vocab(&self) -> usize {
        self.metadata.tokenizer_info.vocab_size
    }

    /// Rows of the embedding and LM head: the tokenizer's vocabulary rounded up to 256 (SPEC §3).
    pub fn vocab(&self) -> usize {
        round_up(self.tokenizer_vocab(), 256)
    }

    /// The model's context: `max_seq_len - 1` (SPEC §8).
    pub fn context(&self) -> usize {
        self.metadata.max_seq_len - 1
    }

    pub fn num_epochs(&self) -> usize {
        self.epochs.len()
    }

    /// Samples (rows) of epoch `epoch`.
    pub fn num_samples(&self, epoch: usize) -> usize {
        self.epochs[epoch].inst_start.as_slice().len()
    }

    /// Instruction + response tokens per epoch (metadata `total_length`), the basis of the
    /// total-step estimate (SPEC §7).
    pub fn tokens_per_epoch(&self) -> u64 {
        self.metadata.total_length
    }

    /// The largest packed length (`inst_len + resp_len - 1`) over all epochs.
    pub fn max_sample_len(&self) -> usize {
        self.max_sample_len
    }

    /// Sample `row` of epoch `epoch`. Panics if either is out of range, like slice indexing.
    pub fn sample(&self, epoch: usize, row: usize) -> Sample<'_> {
        let [is, il, rs, rl] = self.epochs[epoch].columns().map(|c| c[row] as usize);
        let all = self.all_tokens();
        Sample { instruction: all.slice(is..is + il), response: all.slice(rs..rs + rl) }
    }

    /// Packed lengths `inst_len + resp_len - 1` of every row of an epoch, in row order:
    /// the multipack sampler's input.
    pub fn packed_lengths(&self, epoch: usize) -> Vec<usize> {
        let [_, il, _, rl] = self.epochs[epoch].columns();
        il.iter().zip(rl).map(|(&i, &r)| (i + r - 1) as usize).collect()
    }

    /// The whole `tokens` array.
    pub fn all_tokens(&self) -> TokenSlice<'_> {
        match &self.tokens {
            TokenStore::Owned(v) => TokenSlice::U32(v),
            TokenStore::Mapped(a) => match a.data() {
                NpyData::U8(x) => TokenSlice::U8(x),
                NpyData::U16(x) => TokenSlice::U16(x),
                NpyData::I32(x) => TokenSlice::I32(x),
                NpyData::U32(x) => TokenSlice::U32(x),
                // `open` refuses int64 tokens.
                NpyData::I64(_) => unreachable!("int64 tokens are refused on open"),
            },
        }
    }

    /// Writes the SPEC §8 layout into `dir` (created if missing): `tokens.npy` as uint8 when
    /// the vocabulary is <= 255, uint16 when <= 65535, else int32; int64 index files;
    /// `metadata.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let all = self.all_tokens();
        let ids = (0..all.len()).map(|i| all.get(i));
        let path = dir.join("tokens.npy");
        match self.tokenizer_vocab() {
            v if v <= 255 => npy::write(&path, NpyData::U8(&ids.map(|t| t as u8).collect::<Vec<_>>()))?,
            v if v <= 65535 => npy::write(&path, NpyData::U16(&ids.map(|t| t as u16).collect::<Vec<_>>()))?,
            _ => npy::write(&path, NpyData::I32(&ids.map(|t| t as i32).collect::<Vec<_>>()))?,
        }
        for (e, epoch) in self.epochs.iter().enumerate() {
            let epoch_dir = dir.join(format!("epoch_{e}"));
            std::fs::create_dir_all(&epoch_dir).with_context(|| format!("creating {}", epoch_dir.display()))?;
            for (col, values) in INDEX_COLUMNS.iter().zip(epoch.columns()) {
                npy::write(&epoch_dir.join(format!("{col}.npy")), NpyData::I64(values))?;
            }
        }
        let meta = serde_json::to_string_pretty(&self.metadata.raw)?;
        let meta_path = dir.join("metadata.json");
        std::fs::write(&meta_path, meta + "\n").with_context(|| format!("writing {}", meta_path.display()))
    }
}

/// Index of the first id outside `0..vocab`. Chunks are scanned in parallel with a
/// branch-free fold (it vectorises; a per-element `position_first` is 50x slower), and only
/// the first bad chunk is searched element by element.
fn first_outside<T: Copy + Into<i64> + Sync>(ids: &[T], vocab: i64) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    let outside = |t: T| {
        let t: i64 = t.into();
        (t < 0) | (t >= vocab)
    };
    let chunk = ids.par_chunks(CHUNK).position_first(|c| c.iter().fold(false, |bad, &t| bad | outside(t)))?;
    let start = chunk * CHUNK;
    ids[start..].iter().position(|&t| outside(t)).map(|i| start + i)
}

/// `total_length` of SPEC §8: instruction + response tokens summed over all epochs, divided
/// by the number of epochs and rounded half to even, as Python's `round` does.
pub fn mean_tokens_per_epoch(epochs: &[EpochIndex]) -> u64 {
    if epochs.is_empty() {
        return 0;
    }
    let total: u128 = epochs.iter().flat_map(|e| e.inst_len.iter().chain(&e.resp_len)).map(|&x| x.max(0) as u128).sum();
    let n = epochs.len() as u128;
    let (q, r) = (total / n, total % n);
    let round_up = 2 * r > n || (2 * r == n && q % 2 == 1);
    (q + round_up as u128) as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn info(vocab_size: usize) -> TokenizerInfo {
        TokenizerInfo {
            vocab_size,
            boq: "<boq>".into(),
            eoq: "<eoq>".into(),
            eoa: "<eoa>".into(),
            condition_mapping: BTreeMap::from([("direct".to_string(), "<direct>".to_string())]),
            tokenizer_path: String::new(),
        }
    }

    /// Three samples over tokens 0..12: (I 0..3, R 3..5), (I 5..7, R 7..10), (I 10..11, R 11..12).
    fn epoch() -> EpochIndex {
        let mut e = EpochIndex::default();
        e.push(0, 3, 3, 2);
        e.push(5, 2, 7, 3);
        e.push(10, 1, 11, 1);
        e
    }

    fn err(r: Result<Dataset>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn in_memory_dataset_gives_samples_and_sizes() {
        let ds = Dataset::from_parts(info(300), 9, (0..12).collect(), vec![epoch(), epoch()]).unwrap();
        assert_eq!((ds.tokenizer_vocab(), ds.vocab(), ds.context(), ds.num_epochs(), ds.num_samples(1)), (300, 512, 8, 2, 3));
        let s = ds.sample(0, 1);
        assert_eq!((s.instruction.to_vec(), s.response.to_vec()), (vec![5, 6], vec![7, 8, 9]));
        assert_eq!(ds.packed_lengths(0), vec![4, 4, 1]);
        assert_eq!(ds.max_sample_len(), 4);
        assert_eq!(ds.tokens_per_epoch(), 12);
        ds.require_epochs(2).unwrap();
        assert!(format!("{:#}", ds.require_epochs(3).unwrap_err()).contains("prepare it with `--epochs 3`"));
    }

    #[test]
    fn every_row_problem_is_an_error_naming_file_and_row() {
        let build = |f: &dyn Fn(&mut EpochIndex)| {
            let mut e = epoch();
            f(&mut e);
            Dataset::from_parts(info(300), 9, (0..12).collect(), vec![epoch(), e])
        };
        let e = err(build(&|e| e.resp_len.truncate(2)));
        assert!(e.contains("epoch_1/resp_len.npy (in memory) has 2 rows but epoch_1/inst_start.npy (in memory) has 3"), "{e}");
        let e = err(build(&|e| e.resp_start[2] = -1));
        assert!(e.contains("epoch_1/resp_start.npy (in memory) row 2: resp_start = -1 is negative"), "{e}");
        let e = err(build(&|e| e.inst_len[1] = 0));
        assert!(e.contains("epoch_1/inst_len.npy (in memory) row 1: the instruction is empty"), "{e}");
        let e = err(build(&|e| e.resp_len[0] = 0));
        assert!(e.contains("epoch_1/resp_len.npy (in memory) row 0: the response is empty"), "{e}");
        let e = err(build(&|e| e.inst_start[2] = 12));
        assert!(e.contains("epoch_1/inst_start.npy (in memory) row 2: the instruction tokens[12..12+1] end past"), "{e}");
        let e = err(build(&|e| e.resp_start[1] = i64::MAX));
        assert!(e.contains("epoch_1/resp_start.npy (in memory) row 1: the response"), "{e}");
        let e = err(build(&|e| {
            e.resp_start[1] = 0;
            e.resp_len[1] = 8;
        }));
        assert!(e.contains("epoch_1/inst_len.npy (in memory) row 1: inst_len 2 + resp_len 8 - 1 = 9 tokens exceed the context 8"), "{e}");
    }

    #[test]
    fn out_of_vocabulary_tokens_and_bad_metadata_are_errors() {
        let mut tokens: Vec<u32> = (0..12).collect();
        tokens[7] = 300;
        let e = err(Dataset::from_parts(info(300), 9, tokens, vec![epoch()]));
        assert!(e.contains("tokens.npy (in memory)[7] is token id 300, outside the vocabulary 0..300"), "{e}");
        let e = err(Dataset::from_parts(info(0), 9, (0..12).collect(), vec![epoch()]));
        assert!(e.contains("vocab_size is 0"), "{e}");
        let e = err(Dataset::from_parts(info(300), 1, (0..12).collect(), vec![epoch()]));
        assert!(e.contains("max_seq_len is 1"), "{e}");
    }

    #[test]
    fn the_first_out_of_vocabulary_id_is_found_in_any_chunk() {
        let mut ids = vec![5i32; 200_000];
        assert_eq!(first_outside(&ids, 6), None);
        ids[190_000] = 6;
        ids[150_001] = -1;
        assert_eq!(first_outside(&ids, 6), Some(150_001));
        assert_eq!(first_outside(&[0u16, 7, 9], 8), Some(2));
    }

    #[test]
    fn total_length_rounds_half_to_even() {
        let one = |n: i64| EpochIndex { inst_start: vec![0], inst_len: vec![1], resp_start: vec![0], resp_len: vec![n - 1] };
        assert_eq!(mean_tokens_per_epoch(&[one(4), one(5)]), 4); // 4.5 -> 4
        assert_eq!(mean_tokens_per_epoch(&[one(5), one(6)]), 6); // 5.5 -> 6
        assert_eq!(mean_tokens_per_epoch(&[one(5), one(5), one(6)]), 5); // 5.33 -> 5
    }

    #[test]
    fn written_dataset_reopens_identically() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::from_parts(info(300), 9, (0..12).collect(), vec![epoch(), epoch()]).unwrap();
        ds.write(dir.path()).unwrap();
        let back = Dataset::open(dir.path()).unwrap();
        assert_eq!(back.metadata(), ds.metadata());
        assert!(matches!(back.all_tokens(), TokenSlice::U16(_)), "vocab 300 is stored as uint16");
        for e in 0..2 {
            assert_eq!(back.packed_lengths(e), ds.packed_lengths(e));
            for r in 0..3 {
                assert_eq!(back.sample(e, r).response.to_vec(), ds.sample(e, r).response.to_vec());
                assert_eq!(back.sample(e, r).instruction.to_vec(), ds.sample(e, r).instruction.to_vec());
            }
        }
    }
}
