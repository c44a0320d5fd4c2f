//! Model sizes, nets and training hyper-parameters (SPEC §1, §3, §7).
//!
//! Everything here is plain data, serialisable with serde_json so that checkpoints and
//! exports carry the exact configuration they were trained with.

use serde::{Deserialize, Serialize};

/// The backbone sizes of SPEC §1, plus `tiny` for tests and demos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum SizeName {
    #[serde(rename = "tiny")]
    #[value(name = "tiny")]
    Tiny,
    #[value(name = "B")]
    B,
    #[value(name = "L")]
    L,
    #[value(name = "XL")]
    XL,
    #[value(name = "XXL")]
    XXL,
    #[serde(rename = "XXL_wide")]
    #[value(name = "XXL_wide")]
    XxlWide,
}

/// Backbone dimensions. `expansion = 4`, `head_dim = 128`, kv heads = heads everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dims {
    pub n_layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
}

pub const HEAD_DIM: usize = 128;
pub const NORM_EPS: f32 = 1e-6;
pub const ROPE_THETA: f32 = 10000.0;
pub const EXPANSION: f64 = 4.0;

impl SizeName {
    pub fn dims(self) -> Dims {
        let (n_layers, hidden, heads) = match self {
            SizeName::Tiny => (4, 256, 2),
            SizeName::B => (12, 1024, 8),
            SizeName::L => (24, 1280, 10),
            SizeName::XL => (32, 1536, 12),
            SizeName::XXL => (72, 1792, 14),
            SizeName::XxlWide => (32, 2560, 20),
        };
        Dims { n_layers, hidden, heads, head_dim: HEAD_DIM, intermediate: intermediate_size(hidden) }
    }
}

/// `round_up(round(expansion * hidden * 2/3), 256)` (SPEC §1).
pub fn intermediate_size(hidden: usize) -> usize {
    let raw = (EXPANSION * hidden as f64 * 2.0 / 3.0).round() as usize;
    round_up(raw, 256)
}

pub fn round_up(x: usize, multiple: usize) -> usize {
    x.div_ceil(multiple) * multiple
}

/// How blocks are wired into a recurrence (SPEC §1). The field names follow the
/// `net_config` object of the interchange format (SPEC §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "net", rename_all = "snake_case", deny_unknown_fields)]
pub enum Net {
    /// H and L modules of `n_layers/2` blocks; gradient through the last `bp_steps` passes,
    /// with `bp_steps` warming up from `bp_min_steps` to `bp_max_steps` (SPEC §3).
    Hrm {
        #[serde(rename = "H_cycles")]
        h_cycles: usize,
        #[serde(rename = "L_cycles")]
        l_cycles: usize,
        bp_min_steps: usize,
        bp_max_steps: usize,
    },
    /// One stack of `n_layers` blocks over the token embedding.
    Transformer,
    /// One module L of `n_layers` blocks used for both roles.
    Trm {
        #[serde(rename = "H_cycles")]
        h_cycles: usize,
        #[serde(rename = "L_cycles")]
        l_cycles: usize,
        #[serde(rename = "H_bp_steps")]
        h_bp_steps: usize,
        #[serde(rename = "L_bp_steps")]
        l_bp_steps: usize,
    },
    /// One module of `n_layers/2` blocks used for both roles, hrm's cycle counts.
    TrmMatchRecurrence {
        #[serde(rename = "H_cycles")]
        h_cycles: usize,
        #[serde(rename = "L_cycles")]
        l_cycles: usize,
        #[serde(rename = "H_bp_steps")]
        h_bp_steps: usize,
        #[serde(rename = "L_bp_steps")]
        l_bp_steps: usize,
    },
    /// `z_L = L(z_L, emb)` for `L_cycles` passes, then `H(z_L)` without injection.
    Rins {
        #[serde(rename = "L_cycles")]
        l_cycles: usize,
        #[serde(rename = "L_bp_cycles")]
        l_bp_cycles: usize,
    },
    /// `z = L(z, emb)` for `cycles` passes from `z_L_init`.
    Ut { cycles: usize, bp_cycles: usize },
}

/// The net names accepted on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum NetName {
    Hrm,
    Transformer,
    Trm,
    TrmMatchRecurrence,
    Rins,
    Ut,
}

impl NetName {
    /// The recurrence parameters SPEC §1 gives each net.
    pub fn default_net(self) -> Net {
        match self {
            NetName::Hrm => Net::Hrm { h_cycles: 2, l_cycles: 3, bp_min_steps: 2, bp_max_steps: 5 },
            NetName::Transformer => Net::Transformer,
            NetName::Trm => Net::Trm { h_cycles: 2, l_cycles: 1, h_bp_steps: 1, l_bp_steps: 1 },
            NetName::TrmMatchRecurrence => {
                Net::TrmMatchRecurrence { h_cycles: 2, l_cycles: 3, h_bp_steps: 2, l_bp_steps: 3 }
            }
            NetName::Rins => Net::Rins { l_cycles: 7, l_bp_cycles: 4 },
            NetName::Ut => Net::Ut { cycles: 4, bp_cycles: 2 },
        }
    }
}

/// Which stack of blocks a tensor belongs to. `Layers` is the transformer's single stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModuleName {
    H,
    L,
    Layers,
}

impl ModuleName {
    /// The prefix of this module's blocks in the interchange format (SPEC §9).
    pub fn hf_prefix(self) -> &'static str {
        match self {
            ModuleName::H => "model.H_module.layers",
            ModuleName::L => "model.L_module.layers",
            ModuleName::Layers => "model.layers",
        }
    }
}

impl Net {
    pub fn name(&self) -> NetName {
        match self {
            Net::Hrm { .. } => NetName::Hrm,
            Net::Transformer => NetName::Transformer,
            Net::Trm { .. } => NetName::Trm,
            Net::TrmMatchRecurrence { .. } => NetName::TrmMatchRecurrence,
            Net::Rins { .. } => NetName::Rins,
            Net::Ut { .. } => NetName::Ut,
        }
    }

    /// The modules this net owns and how many blocks each has, in storage order.
    pub fn modules(&self, n_layers: usize) -> Vec<(ModuleName, usize)> {
        match self {
            Net::Hrm { .. } | Net::Rins { .. } => vec![(ModuleName::H, n_layers / 2), (ModuleName::L, n_layers / 2)],
            Net::Transformer => vec![(ModuleName::Layers, n_layers)],
            Net::Trm { .. } | Net::Ut { .. } => vec![(ModuleName::L, n_layers)],
            Net::TrmMatchRecurrence { .. } => vec![(ModuleName::L, n_layers / 2)],
        }
    }

    /// Every net but `transformer` starts its recurrence from the fixed `z_L_init` vector.
    pub fn has_z_l_init(&self) -> bool {
        !matches!(self, Net::Transformer)
    }
}

/// Everything that fixes the function the model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub dims: Dims,
    pub net: Net,
    /// Embedding and LM-head rows: the tokenizer's vocabulary rounded up to 256.
    pub vocab: usize,
}

impl ModelConfig {
    pub fn new(size: SizeName, net: NetName, tokenizer_vocab: usize) -> Self {
        ModelConfig { dims: size.dims(), net: net.default_net(), vocab: round_up(tokenizer_vocab, 256) }
    }

    /// Rows of the fused gate/query/key/value projection: `(2*heads + 2*kv_heads) * head_dim`.
    pub fn gqkv_rows(&self) -> usize {
        4 * self.dims.heads * self.dims.head_dim
    }

    /// Width of the attention output (`heads * head_dim`), the input of `W_o`.
    pub fn attn_width(&self) -> usize {
        self.dims.heads * self.dims.head_dim
    }
}

/// Training hyper-parameters with the SPEC §7 defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lr: f32,
    pub lr_min_ratio: f32,
    pub warmup_steps: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    pub ema_decay: f32,
    pub global_batch_tokens: usize,
    pub epochs: usize,
    /// `false` for fine-tuning: `bp_steps` stays at its maximum from the first step.
    pub bp_warmup: bool,
    /// Labels only on the response (SPEC §4).
    pub target_only: bool,
    pub seed: u64,
    /// Stop after this many optimiser steps; also the schedule's `total_steps` when set
    /// (otherwise the data's estimate, SPEC §7).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Train with this fixed `bp_steps` instead of the warm-up (hrm only).
    #[serde(default)]
    pub fixed_bp_steps: Option<usize>,
    /// Recompute the activations of each pass with gradient just before its backward instead
    /// of keeping them from the forward (`--recompute`, `docs/model.md` §4): less memory, more
    /// time, the same results. A resumed run takes it from its command line.
    #[serde(default)]
    pub recompute: bool,
    /// Micro-batches per optimiser step (`--micro-batches K`, gradient accumulation): each
    /// rank trains a step as K virtual ranks of `global_batch_tokens / world / K` tokens whose
    /// gradients are summed before one update (`src/data/loader.rs`). Less memory, the same
    /// optimiser steps as K times the GPUs; it changes the data plan, so a run keeps its K.
    #[serde(default = "one_micro_batch")]
    pub micro_batches: usize,
}

/// Run configurations written before gradient accumulation trained whole batches.
fn one_micro_batch() -> usize {
    1
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2.2e-4,
            lr_min_ratio: 1.0,
            warmup_steps: 2000,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            ema_decay: 0.9999,
            global_batch_tokens: 196_608,
            epochs: 4,
            bp_warmup: true,
            target_only: true,
            seed: 0,
            max_steps: None,
            fixed_bp_steps: None,
            recompute: false,
            micro_batches: 1,
        }
    }
}

impl TrainConfig {
    /// The SPEC §7 fine-tuning recipe (start from EMA weights, fresh optimiser).
    pub fn sft() -> Self {
        TrainConfig {
            lr: 3e-5,
            lr_min_ratio: 0.1,
            warmup_steps: 0,
            ema_decay: 0.999,
            global_batch_tokens: 32_768,
            epochs: 5,
            bp_warmup: false,
            ..TrainConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediate_sizes_match_spec() {
        assert_eq!(SizeName::XL.dims().intermediate, 4096);
        assert_eq!(SizeName::L.dims().intermediate, 3584);
        assert_eq!(SizeName::B.dims().intermediate, 2816);
    }

    #[test]
    fn net_config_serialises_with_spec_names() {
        let json = serde_json::to_value(NetName::Hrm.default_net()).unwrap();
        assert_eq!(json["net"], "hrm");
        assert_eq!(json["H_cycles"], 2);
        assert_eq!(json["L_cycles"], 3);
        assert_eq!(json["bp_max_steps"], 5);
        let ut = serde_json::to_value(NetName::Ut.default_net()).unwrap();
        assert_eq!(ut["cycles"], 4);
        assert_eq!(ut["bp_cycles"], 2);
        let back: Net = serde_json::from_value(json).unwrap();
        assert_eq!(back, NetName::Hrm.default_net());
    }

    #[test]
    fn run_configs_from_before_recompute_and_micro_batches_load() {
        let mut json = serde_json::to_value(TrainConfig::default()).unwrap();
        json.as_object_mut().unwrap().remove("recompute");
        json.as_object_mut().unwrap().remove("micro_batches");
        let old: TrainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old, TrainConfig::default());
    }

    #[test]
    fn vocab_rounds_up_to_256() {
        assert_eq!(ModelConfig::new(SizeName::Tiny, NetName::Hrm, 20).vocab, 256);
        assert_eq!(ModelConfig::new(SizeName::Tiny, NetName::Hrm, 257).vocab, 512);
    }
}
