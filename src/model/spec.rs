//! The one table of tensor specs that drives allocation, initialisation, sharding,
//! checkpoints, export and the tests.
//!
//! Trainable tensors live in one flat fp32 master buffer, laid out in this order:
//!
//! ```text
//! embed            [vocab, hidden]
//! for each module (storage order of Net::modules), for each block i:   <- one bucket per block
//!     gqkv         [4*heads*128, hidden]   rows: gate heads, query heads, key heads, value heads
//!     o            [hidden, heads*128]
//!     gate_up      [2*intermediate, hidden] first half gate, second half up
//!     down         [hidden, intermediate]
//! lm_head          [vocab, hidden]
//! ```
//!
//! Every tensor starts at a multiple of [`ALIGN`] elements so that a sharded optimiser can
//! split buckets on aligned boundaries. `z_L_init` ([hidden], bf16, never trained) is a buffer
//! outside the master: it has `offset = None`.

use crate::config::{ModelConfig, ModuleName};

/// Start of every tensor in the master buffer, in elements (256 bytes of fp32).
pub const ALIGN: usize = 64;

/// What a tensor is for; decides its initialisation and its interchange name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Embedding,
    LmHead,
    Gqkv { module: ModuleName, layer: usize },
    AttnOut { module: ModuleName, layer: usize },
    GateUp { module: ModuleName, layer: usize },
    Down { module: ModuleName, layer: usize },
    ZLInit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Interchange name (SPEC §9), also the checkpoint key.
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    /// Storage precision: master weights are fp32; `z_L_init` is bf16.
    pub dtype: DType,
    /// Element offset into the master buffer; `None` for untrained buffers.
    pub offset: Option<usize>,
    /// Standard deviation of the truncated normal it starts from (SPEC §6).
    pub init_std: f32,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element range of this tensor in the master buffer.
    pub fn range(&self) -> Option<std::ops::Range<usize>> {
        self.offset.map(|o| o..o + self.numel())
    }
}

/// A contiguous group of tensors reduced and sharded together: the embedding, each block,
/// the LM head.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    pub name: String,
    /// Element range in the master buffer.
    pub range: std::ops::Range<usize>,
}

/// Appends fp32 master tensors at aligned offsets.
#[derive(Default)]
struct LayoutBuilder {
    tensors: Vec<TensorSpec>,
    cursor: usize,
}

impl LayoutBuilder {
    fn push(&mut self, name: String, shape: Vec<usize>, role: Role, init_std: f32) -> std::ops::Range<usize> {
        let start = self.cursor.div_ceil(ALIGN) * ALIGN;
        let numel: usize = shape.iter().product();
        self.tensors.push(TensorSpec { name, shape, role, dtype: DType::F32, offset: Some(start), init_std });
        self.cursor = start + numel;
        start..self.cursor
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub buckets: Vec<Bucket>,
    /// Length of the flat master buffer, in elements.
    pub master_len: usize,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = &cfg.dims;
        let hidden_std = 1.0 / (d.hidden as f32).sqrt();
        let down_std = 1.0 / (d.intermediate as f32).sqrt();
        let mut b = LayoutBuilder::default();
        let mut buckets = Vec::new();

        let embed = b.push("model.embed_tokens.weight".into(), vec![cfg.vocab, d.hidden], Role::Embedding, hidden_std);
        buckets.push(Bucket { name: "embed".into(), range: embed });
        for (module, n_blocks) in cfg.net.modules(d.n_layers) {
            for layer in 0..n_blocks {
                let p = format!("{}.{layer}", module.hf_prefix());
                let first = b.push(format!("{p}.attn.gqkv_proj.weight"), vec![cfg.gqkv_rows(), d.hidden], Role::Gqkv { module, layer }, hidden_std);
                b.push(format!("{p}.attn.o_proj.weight"), vec![d.hidden, cfg.attn_width()], Role::AttnOut { module, layer }, hidden_std);
                b.push(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * d.intermediate, d.hidden], Role::GateUp { module, layer }, hidden_std);
                let last = b.push(format!("{p}.mlp.down_proj.weight"), vec![d.hidden, d.intermediate], Role::Down { module, layer }, down_std);
                buckets.push(Bucket { name: p, range: first.start..last.end });
            }
        }
        let head = b.push("lm_head.weight".into(), vec![cfg.vocab, d.hidden], Role::LmHead, hidden_std);
        buckets.push(Bucket { name: "lm_head".into(), range: head.clone() });
        let master_len = head.end.div_ceil(ALIGN) * ALIGN;

        let mut tensors = b.tensors;
        if cfg.net.has_z_l_init() {
            tensors.push(TensorSpec {
                name: "model.z_L_init".into(),
                shape: vec![d.hidden],
                role: Role::ZLInit,
                dtype: DType::BF16,
                offset: None,
                init_std: 1.0,
            });
        }
        ParamLayout { tensors, buckets, master_len }
    }

    pub fn get(&self, role: Role) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.role == role)
    }

    pub fn by_name(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Trainable tensors (those in the master buffer).
    pub fn trainable(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| t.offset.is_some())
    }

    /// Number of trainable parameters (padding excluded).
    pub fn num_params(&self) -> usize {
        self.trainable().map(TensorSpec::numel).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetName, SizeName};

    #[test]
    fn xl_hrm_has_about_one_billion_parameters() {
        let cfg = ModelConfig::new(SizeName::XL, NetName::Hrm, 65_536);
        let layout = ParamLayout::new(&cfg);
        // 32 blocks * (4*1536*1536 + 1536*1536 + 2*4096*1536 + 1536*4096) + 2 * 65536*1536
        let block = 4 * 1536 * 1536 + 1536 * 1536 + 3 * 4096 * 1536;
        assert_eq!(layout.num_params(), 32 * block + 2 * 65_536 * 1536);
        assert_eq!(layout.buckets.len(), 32 + 2);
    }

    #[test]
    fn tensors_are_aligned_disjoint_and_bucketed() {
        for net in [NetName::Hrm, NetName::Transformer, NetName::Trm, NetName::TrmMatchRecurrence, NetName::Rins, NetName::Ut] {
            let cfg = ModelConfig::new(SizeName::Tiny, net, 300);
            let layout = ParamLayout::new(&cfg);
            let mut ranges: Vec<_> = layout.trainable().map(|t| t.range().unwrap()).collect();
            ranges.sort_by_key(|r| r.start);
            for w in ranges.windows(2) {
                assert!(w[0].end <= w[1].start, "{net:?}: overlapping tensors");
            }
            for t in layout.trainable() {
                assert_eq!(t.offset.unwrap() % ALIGN, 0);
                let r = t.range().unwrap();
                assert_eq!(layout.buckets.iter().filter(|b| b.range.start <= r.start && r.end <= b.range.end).count(), 1, "{}", t.name);
            }
            assert!(ranges.last().unwrap().end <= layout.master_len);
            assert_eq!(layout.by_name("model.z_L_init").is_some(), net != NetName::Transformer);
        }
    }

    #[test]
    fn interchange_names_follow_spec() {
        let cfg = ModelConfig::new(SizeName::Tiny, NetName::Transformer, 256);
        let layout = ParamLayout::new(&cfg);
        assert!(layout.by_name("model.layers.3.mlp.down_proj.weight").is_some());
        let cfg = ModelConfig::new(SizeName::Tiny, NetName::Ut, 256);
        let layout = ParamLayout::new(&cfg);
        assert!(layout.by_name("model.L_module.layers.3.attn.gqkv_proj.weight").is_some());
    }
}
