//! `config.json` of the interchange format (SPEC §9): written from a [`ModelConfig`], read
//! back into one.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::checkpoint::tensors::net_name;
use crate::config::{Dims, ModelConfig, Net, NetName, NORM_EPS, ROPE_THETA};
use crate::interchange::ExportDtype;

pub const MODEL_TYPE: &str = "hrm_text";
pub const ARCHITECTURE: &str = "HrmTextForCausalLM";
/// `max_position_embeddings` when the checkpoint does not know its dataset's `max_seq_len`:
/// the longest context SPEC §10 evaluates with.
pub const DEFAULT_MAX_POSITIONS: u64 = 4096;

/// Token ids written to `config.json`; `None` is written as `null` (unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenIds {
    pub pad: u32,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// The reference layout's recurrence keys: `(H_cycles, L_cycles, L_bp_steps)`, where
/// `L_bp_steps[i]` counts the L passes of H cycle `i` that carry gradient once the bp
/// warm-up is over. With SPEC §3, `H_bp = min(H_cycles, bp - 1)`, `L_bp = bp - H_bp`, and L
/// pass `k` (counted over all cycles) carries gradient iff `k >= H_cycles * L_cycles - L_bp`.
/// Nets without an H/L recurrence report one outer cycle: `rins` and `ut` their L passes,
/// `transformer` none.
pub fn reference_cycles(net: &Net) -> (usize, usize, Vec<usize>) {
    let per_cycle = |h: usize, l: usize, l_bp: usize| -> Vec<usize> {
        let first_with_grad = (h * l).saturating_sub(l_bp);
        (0..h).map(|i| ((i + 1) * l).saturating_sub(first_with_grad.max(i * l))).collect()
    };
    match *net {
        Net::Hrm { h_cycles, l_cycles, bp_max_steps, .. } => {
            let h_bp = h_cycles.min(bp_max_steps.saturating_sub(1));
            (h_cycles, l_cycles, per_cycle(h_cycles, l_cycles, bp_max_steps - h_bp))
        }
        Net::Trm { h_cycles, l_cycles, l_bp_steps, .. } | Net::TrmMatchRecurrence { h_cycles, l_cycles, l_bp_steps, .. } => {
            (h_cycles, l_cycles, per_cycle(h_cycles, l_cycles, l_bp_steps))
        }
        Net::Rins { l_cycles, l_bp_cycles } => (1, l_cycles, vec![l_bp_cycles.min(l_cycles)]),
        Net::Ut { cycles, bp_cycles } => (1, cycles, vec![bp_cycles.min(cycles)]),
        Net::Transformer => (1, 0, vec![0]),
    }
}

/// An f32 constant as the shortest decimal that reads back to it (1e-6, not 9.99999997e-7).
fn json_f32(x: f32) -> Value {
    json!(x.to_string().parse::<f64>().expect("an f32 prints as a number"))
}

/// `net_config`: the net's recurrence parameters with their SPEC §1 names, without the `net` tag.
fn net_config(net: &Net) -> Value {
    let mut v = serde_json::to_value(net).expect("Net serialises");
    v.as_object_mut().expect("Net serialises as an object").remove("net");
    v
}

/// Every key of SPEC §9 for a model of `cfg`.
pub fn to_json(cfg: &ModelConfig, tokens: &TokenIds, max_positions: u64, dtype: ExportDtype) -> Value {
    let d = &cfg.dims;
    let (h_cycles, l_cycles, l_bp_steps) = reference_cycles(&cfg.net);
    json!({
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": cfg.vocab,
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.n_layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.heads,
        "head_dim": d.head_dim,
        "H_cycles": h_cycles,
        "L_cycles": l_cycles,
        "L_bp_steps": l_bp_steps,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": json_f32(NORM_EPS),
        "rope_theta": json_f32(ROPE_THETA),
        "tie_word_embeddings": false,
        // lecun_normal: every weight but W_down has std 1/sqrt(hidden) (SPEC §6).
        "initializer_range": 1.0 / (d.hidden as f64).sqrt(),
        "embedding_scale": (d.hidden as f64).sqrt(),
        "prefix_lm": true,
        "pad_token_id": tokens.pad,
        "bos_token_id": tokens.bos,
        "eos_token_id": tokens.eos,
        "torch_dtype": match dtype { ExportDtype::Bf16 => "bfloat16", ExportDtype::F32 => "float32" },
        "net": net_name(cfg.net.name()),
        "net_config": net_config(&cfg.net),
    })
}

fn get_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) => Ok(Some(x as usize)),
            None => bail!("`{key}` is {v}, expected a non-negative integer"),
        },
    }
}

fn require_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    get_usize(obj, key)?.with_context(|| format!("the key `{key}` is missing"))
}

/// The model config a `config.json` describes. `tensor_names` (of `model.safetensors`)
/// decide the net when `net` is absent: `model.H_module.*` means hrm (with the file's
/// `H_cycles`/`L_cycles` and SPEC §3's bp steps), `model.layers.*` means transformer.
pub fn from_json(json: &Value, tensor_names: &[&str]) -> Result<ModelConfig> {
    let Some(obj) = json.as_object() else { bail!("the top level is not a JSON object") };
    if let Some(t) = obj.get("model_type") {
        if t != MODEL_TYPE {
            bail!("`model_type` is {t}, expected \"{MODEL_TYPE}\"");
        }
    }
    if obj.get("tie_word_embeddings") == Some(&Value::Bool(true)) {
        bail!("`tie_word_embeddings` is true; HRM-Text models have an untied LM head (SPEC §3)");
    }
    let hidden = require_usize(obj, "hidden_size")?;
    let heads = require_usize(obj, "num_attention_heads")?;
    let kv_heads = get_usize(obj, "num_key_value_heads")?.unwrap_or(heads);
    if kv_heads != heads {
        bail!("`num_key_value_heads` = {kv_heads} differs from `num_attention_heads` = {heads}; HRM-Text has no GQA");
    }
    let head_dim = match get_usize(obj, "head_dim")? {
        Some(h) => h,
        None if heads > 0 && hidden % heads == 0 => hidden / heads,
        None => bail!("`head_dim` is missing and `hidden_size` {hidden} is not a multiple of `num_attention_heads` {heads}"),
    };
    let dims = Dims {
        n_layers: require_usize(obj, "num_hidden_layers")?,
        hidden,
        heads,
        head_dim,
        intermediate: require_usize(obj, "intermediate_size")?,
    };
    let vocab = require_usize(obj, "vocab_size")?;

    let net = match obj.get("net") {
        Some(name) => {
            let known: NetName = serde_json::from_value(name.clone()).with_context(|| format!("`net` is {name}, not a known net"))?;
            match obj.get("net_config") {
                None | Some(Value::Null) => known.default_net(),
                Some(Value::Object(c)) => {
                    let mut tagged = c.clone();
                    tagged.insert("net".into(), name.clone());
                    serde_json::from_value(Value::Object(tagged))
                        .with_context(|| format!("`net_config` {} does not fit net {name} (see SPEC §1 for its parameters)", obj["net_config"]))?
                }
                Some(other) => bail!("`net_config` is {other}, expected an object"),
            }
        }
        None if tensor_names.iter().any(|n| n.starts_with("model.H_module.")) => {
            let Net::Hrm { h_cycles, l_cycles, bp_min_steps, bp_max_steps } = NetName::Hrm.default_net() else {
                unreachable!("the default hrm net is Net::Hrm")
            };
            Net::Hrm {
                h_cycles: get_usize(obj, "H_cycles")?.unwrap_or(h_cycles),
                l_cycles: get_usize(obj, "L_cycles")?.unwrap_or(l_cycles),
                bp_min_steps,
                bp_max_steps,
            }
        }
        None if tensor_names.iter().any(|n| n.starts_with("model.layers.")) => Net::Transformer,
        None => bail!(
            "`net` is missing and the tensor names are neither hrm's (model.H_module.*) nor transformer's (model.layers.*); \
             add \"net\" (and \"net_config\") to config.json"
        ),
    };
    Ok(ModelConfig { dims, net, vocab })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l_bp_steps_follow_the_recurrence() {
        // hrm, bp 5: H_bp = 2, L_bp = 3: L passes 3, 4, 5 (all in H cycle 1).
        assert_eq!(reference_cycles(&NetName::Hrm.default_net()), (2, 3, vec![0, 3]));
        // bp 2: H_bp = 1, L_bp = 1: only L pass 5.
        let hrm2 = Net::Hrm { h_cycles: 2, l_cycles: 3, bp_min_steps: 2, bp_max_steps: 2 };
        assert_eq!(reference_cycles(&hrm2).2, vec![0, 1]);
        // bp 8: H_bp = 2, L_bp = 6: every L pass.
        let hrm8 = Net::Hrm { h_cycles: 2, l_cycles: 3, bp_min_steps: 2, bp_max_steps: 8 };
        assert_eq!(reference_cycles(&hrm8).2, vec![3, 3]);
        assert_eq!(reference_cycles(&NetName::Trm.default_net()), (2, 1, vec![0, 1]));
        assert_eq!(reference_cycles(&NetName::TrmMatchRecurrence.default_net()), (2, 3, vec![0, 3]));
        assert_eq!(reference_cycles(&NetName::Rins.default_net()), (1, 7, vec![4]));
        assert_eq!(reference_cycles(&NetName::Ut.default_net()), (1, 4, vec![2]));
        assert_eq!(reference_cycles(&Net::Transformer), (1, 0, vec![0]));
    }

    #[test]
    fn constants_print_as_written() {
        assert_eq!(json_f32(NORM_EPS).to_string(), "1e-6");
        assert_eq!(json_f32(ROPE_THETA).to_string(), "10000.0");
    }
}
