//! The demo task: multi-digit addition as instruction/response samples, small enough that a
//! tiny model learns it on a CPU in minutes.
//!
//! ```text
//! instruction  <boq><direct>47+385<eoq>
//! response     432<eoa>
//! ```
//!
//! Operands are uniform in `0..10^digits`. A held-out set of problems is drawn first and the
//! training problems never repeat one of them, so held-out accuracy measures generalisation.
//! Both sets are ordinary in-memory [`Dataset`]s, so the trainer runs them through the same
//! sampler, batch assembly and loader as a dataset on disk.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, ensure, Result};

use super::dataset::{Dataset, EpochIndex, TokenizerInfo};
use super::shuffle;
use crate::rng::Rng;

/// Padding (never inside a sample; the value padding slots of a batch hold).
pub const PAD: u32 = 0;
pub const BOQ: u32 = 1;
pub const EOQ: u32 = 2;
pub const EOA: u32 = 3;
/// The `direct` condition: answer without a chain of thought.
pub const DIRECT: u32 = 4;
/// Digits `0..=9` are ids `DIGIT0..DIGIT0 + 10`.
pub const DIGIT0: u32 = 5;
pub const PLUS: u32 = 15;
pub const VOCAB_SIZE: usize = 16;

/// The spelling of each non-digit token.
const SPECIALS: [(u32, &str); 6] = [(PAD, "<pad>"), (BOQ, "<boq>"), (EOQ, "<eoq>"), (EOA, "<eoa>"), (DIRECT, "<direct>"), (PLUS, "+")];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoConfig {
    /// Largest operand has this many digits (1..=9).
    pub digits: usize,
    /// Distinct training problems.
    pub train_samples: usize,
    /// Distinct held-out problems, none of them in the training set.
    pub heldout_samples: usize,
    /// Epochs of the training set, each a fresh shuffle of the same problems.
    pub epochs: usize,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig { digits: 2, train_samples: 4000, heldout_samples: 200, epochs: 4, seed: 0 }
    }
}

/// The character tokenizer of the demo task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DemoTokenizer;

impl DemoTokenizer {
    pub fn vocab_size(&self) -> usize {
        VOCAB_SIZE
    }

    /// Text of a run of ids; ids outside the vocabulary (a model may emit any id below the
    /// rounded-up vocabulary) print as `<?id>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        for &id in ids {
            match id {
                d if (DIGIT0..DIGIT0 + 10).contains(&d) => out.push(char::from(b'0' + (d - DIGIT0) as u8)),
                _ => match SPECIALS.iter().find(|(s, _)| *s == id) {
                    Some((_, text)) => out.push_str(text),
                    None => out.push_str(&format!("<?{id}>")),
                },
            }
        }
        out
    }

    /// Ids of a text made of digits, `+` and the bracketed special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if let Some(d) = c.to_digit(10) {
                ids.push(DIGIT0 + d);
                rest = &rest[1..];
            } else if let Some((id, text)) = SPECIALS.iter().find(|(_, t)| rest.starts_with(t)) {
                ids.push(*id);
                rest = &rest[text.len()..];
            } else {
                bail!("the demo tokenizer has no token for {:?} in {text:?} (it knows digits, + and <boq> <eoq> <eoa> <direct> <pad>)", c);
            }
        }
        Ok(ids)
    }

    /// The instruction and response of `a + b`.
    pub fn problem(&self, a: u64, b: u64) -> (Vec<u32>, Vec<u32>) {
        let digits = |n: u64| n.to_string().bytes().map(|c| DIGIT0 + (c - b'0') as u32).collect::<Vec<_>>();
        let mut inst = vec![BOQ, DIRECT];
        inst.extend(digits(a));
        inst.push(PLUS);
        inst.extend(digits(b));
        inst.push(EOQ);
        let mut resp = digits(a + b);
        resp.push(EOA);
        (inst, resp)
    }
}

/// The demo's training and held-out datasets and the tokenizer that decodes them.
#[derive(Debug)]
pub struct Demo {
    pub train: Dataset,
    /// One epoch of problems disjoint from `train`.
    pub heldout: Dataset,
    pub tokenizer: DemoTokenizer,
}

/// Builds the demo task. Deterministic in `cfg.seed`.
pub fn build(cfg: &DemoConfig) -> Result<Demo> {
    ensure!((1..=9).contains(&cfg.digits), "demo digits must be 1..=9, got {}", cfg.digits);
    ensure!(cfg.epochs >= 1 && cfg.train_samples >= 1, "the demo needs at least one epoch and one training sample");
    let side = 10u64.pow(cfg.digits as u32);
    let pairs = side * side;
    let wanted = (cfg.train_samples + cfg.heldout_samples) as u64;
    ensure!(
        wanted <= pairs,
        "{} training + {} held-out problems, but {}-digit addition has only {pairs} distinct problems",
        cfg.train_samples,
        cfg.heldout_samples,
        cfg.digits
    );
    let mut rng = Rng::new(cfg.seed);
    let mut problems = sample_distinct(&mut rng, pairs, wanted as usize);
    shuffle(&mut rng, &mut problems);
    let (heldout, train) = problems.split_at(cfg.heldout_samples);
    let as_pair = |p: u64| (p / side, p % side);
    let tokenizer = DemoTokenizer;

    // The longest sample: <boq><direct> d + d <eoq> then d+1 digits <eoa>, minus the shift.
    let longest = (2 * cfg.digits + 4) + (cfg.digits + 2) - 1;
    let max_seq_len = longest.next_multiple_of(16) + 1;
    let info = TokenizerInfo {
        vocab_size: VOCAB_SIZE,
        boq: "<boq>".into(),
        eoq: "<eoq>".into(),
        eoa: "<eoa>".into(),
        condition_mapping: BTreeMap::from([("direct".to_string(), "<direct>".to_string())]),
        tokenizer_path: "demo:addition".into(),
    };

    let dataset = |set: &[u64], epochs: usize, rng: &mut Rng| -> Result<Dataset> {
        let mut tokens = Vec::new();
        let mut spans = Vec::with_capacity(set.len());
        for &p in set {
            let (a, b) = as_pair(p);
            let (inst, resp) = tokenizer.problem(a, b);
            spans.push((tokens.len(), inst.len(), tokens.len() + inst.len(), resp.len()));
            tokens.extend(inst);
            tokens.extend(resp);
        }
        let mut index = Vec::with_capacity(epochs);
        for _ in 0..epochs {
            let mut order: Vec<usize> = (0..spans.len()).collect();
            shuffle(rng, &mut order);
            let mut e = EpochIndex::default();
            for i in order {
                let (is, il, rs, rl) = spans[i];
                e.push(is, il, rs, rl);
            }
            index.push(e);
        }
        Dataset::from_parts(info.clone(), max_seq_len, tokens, index)
    };
    let train = dataset(train, cfg.epochs, &mut rng)?;
    let heldout = dataset(heldout, 1, &mut rng)?;
    Ok(Demo { train, heldout, tokenizer })
}

/// `k` distinct integers of `0..n`, uniformly (Floyd's algorithm: O(k) draws, no retries).
fn sample_distinct(rng: &mut Rng, n: u64, k: usize) -> Vec<u64> {
    let mut chosen = HashSet::with_capacity(k);
    let mut out = Vec::with_capacity(k);
    for j in n - k as u64..n {
        let t = rng.below(j + 1);
        let pick = if chosen.contains(&t) { j } else { t };
        chosen.insert(pick);
        out.push(pick);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::data::{assemble, plan_epoch, DataPosition, Loader, LoaderConfig};

    #[test]
    fn problems_tokenize_and_decode() {
        let t = DemoTokenizer;
        let (inst, resp) = t.problem(47, 385);
        assert_eq!(t.decode(&inst), "<boq><direct>47+385<eoq>");
        assert_eq!(t.decode(&resp), "432<eoa>");
        assert_eq!(t.encode("<boq><direct>47+385<eoq>").unwrap(), inst);
        assert_eq!(t.decode(&[200]), "<?200>");
        assert!(t.encode("4*5").is_err());
    }

    #[test]
    fn heldout_is_disjoint_and_everything_is_a_real_dataset() {
        let cfg = DemoConfig { digits: 2, train_samples: 500, heldout_samples: 100, epochs: 2, seed: 3 };
        let demo = build(&cfg).unwrap();
        let text = |ds: &Dataset, e: usize, r: usize| {
            let s = ds.sample(e, r);
            demo.tokenizer.decode(&s.instruction.to_vec())
        };
        let train: HashSet<String> = (0..500).map(|r| text(&demo.train, 0, r)).collect();
        let heldout: HashSet<String> = (0..100).map(|r| text(&demo.heldout, 0, r)).collect();
        assert_eq!((train.len(), heldout.len()), (500, 100), "problems are distinct");
        assert!(train.is_disjoint(&heldout));
        let epoch1: HashSet<String> = (0..500).map(|r| text(&demo.train, 1, r)).collect();
        assert_eq!(epoch1, train, "every epoch is a shuffle of the same problems");

        // Every sample's response is the sum of its operands.
        for r in 0..100 {
            let s = demo.heldout.sample(0, r);
            let inst = demo.tokenizer.decode(&s.instruction.to_vec());
            let sum: u64 = inst.trim_start_matches("<boq><direct>").trim_end_matches("<eoq>").split('+').map(|x| x.parse::<u64>().unwrap()).sum();
            assert_eq!(demo.tokenizer.decode(&s.response.to_vec()), format!("{sum}<eoa>"));
        }
        assert_eq!((demo.train.vocab(), demo.train.context()), (256, 16));
        assert_eq!(demo.train.max_sample_len(), 11);

        let plan = plan_epoch(&demo.train.packed_lengths(0), 64, 2);
        let b = assemble(&demo.train, 0, plan.rows(0, 1), 64, true).unwrap();
        assert!(b.num_samples() >= 5 && b.num_labels() > 0);
    }

    #[test]
    fn the_demo_runs_through_the_loader_like_any_dataset() {
        let demo = build(&DemoConfig { train_samples: 200, heldout_samples: 20, epochs: 2, ..DemoConfig::default() }).unwrap();
        let t = demo.tokenizer;
        let cfg = LoaderConfig { rank: 0, world: 1, batch_tokens: 64, micro_batches: 1, target_only: true, epochs: 2, prefetch: 2 };
        let mut samples = 0;
        for item in Loader::new(Arc::new(demo.train), cfg, DataPosition::default()).unwrap() {
            let (_, micro_batches) = item.unwrap();
            let [b] = &micro_batches[..] else { panic!("one micro-batch per step") };
            for i in 0..b.num_samples() {
                let (start, end) = (b.cu_seqlens[i] as usize, b.cu_seqlens[i + 1] as usize);
                let p = b.prefix_lens[i] as usize;
                let ids = |v: &[i32]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
                // The instruction's operands, and the labels from its last token on: the sum.
                let inst = t.decode(&ids(&b.inputs[start..start + p]));
                let sum: u64 = inst.trim_start_matches("<boq><direct>").trim_end_matches("<eoq>").split('+').map(|x| x.parse::<u64>().unwrap()).sum();
                assert_eq!(t.decode(&ids(&b.labels[start + p - 1..end])), format!("{sum}<eoa>"));
                samples += 1;
            }
        }
        assert!(samples > 350, "two epochs of 200 samples, less the dropped tails: {samples}");
    }

    #[test]
    fn same_seed_same_task_and_impossible_requests_fail() {
        let cfg = DemoConfig { digits: 1, train_samples: 90, heldout_samples: 10, epochs: 1, seed: 1 };
        let (a, b) = (build(&cfg).unwrap(), build(&cfg).unwrap());
        for r in 0..90 {
            assert_eq!(a.train.sample(0, r).instruction.to_vec(), b.train.sample(0, r).instruction.to_vec());
        }
        assert_eq!(a.heldout.sample(0, 3).response.to_vec(), b.heldout.sample(0, 3).response.to_vec());
        assert!(build(&DemoConfig { train_samples: 91, ..cfg }).is_err());
        assert!(build(&DemoConfig { digits: 10, ..cfg }).is_err());
    }
}
