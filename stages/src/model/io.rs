//! Model directories in Hugging Face's GPT-2 layout: `config.json` and `model.safetensors`
//! (tensor names `transformer.h.0.attn.c_attn.weight`, …, Conv1D weights `(in, out)`, no
//! `lm_head.weight` when the head is tied, which transformers then ties to `wte`).

use std::collections::HashMap;
use std::path::Path;

use dfdx::prelude::*;

use super::kernels::Kernels;
use super::layers::{ParamVisitor, Visit};
use super::llama::{LlamaConfig, Member, RopeScaling};
use super::GptConfig;

/// Named f32 tensors, ready for safetensors.
pub type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Tensors read back, by name: shape and values.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Every parameter of `model` (trainable or not) by HF name, on the host, laid out as HF
/// stores it (an `nn.Linear` weight `(out, in)`).
pub fn weights<D: Kernels, M: Visit<D>>(model: &mut M) -> Named {
    struct Read(Named);
    impl<D: Device<f32>> ParamVisitor<D> for Read {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, f32, D>, _: bool) {
            let shape: Vec<usize> = t.shape().concrete().into_iter().collect();
            self.0.push((name.to_string(), shape, t.as_vec()));
        }
    }
    let mut read = Read(Vec::new());
    model.visit(&mut read);
    let transposed = model.hf_transposed();
    for (name, shape, data) in &mut read.0 {
        if transposed(name) {
            *data = transpose(data, shape[0], shape[1]);
            shape.reverse();
        }
    }
    read.0
}

/// Loads `tensors` (by name, laid out as HF stores them) into `model`, checking every shape;
/// names may lack the `transformer.` prefix (as in the original GPT-2 files).
pub fn set_weights<D: Kernels, M: Visit<D>>(
    model: &mut M,
    tensors: &Tensors,
) -> Result<(), String> {
    struct Write<'a> {
        tensors: &'a Tensors,
        problems: Vec<String>,
        transposed: fn(&str) -> bool,
        /// The names found, as the file has them.
        used: std::collections::HashSet<String>,
    }
    impl<D: Device<f32>> ParamVisitor<D> for Write<'_> {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, f32, D>, _: bool) {
            let short = name.strip_prefix("transformer.").unwrap_or(name);
            let found = [name, short]
                .into_iter()
                .find_map(|n| Some((n, self.tensors.get(n)?)));
            let Some((found, (shape, data))) = found else {
                self.problems.push(format!("`{name}` is missing"));
                return;
            };
            self.used.insert(found.to_string());
            let mut expected: Vec<usize> = t.shape().concrete().into_iter().collect();
            let mut data = data.clone();
            let transposed = (self.transposed)(name);
            if transposed {
                expected.reverse();
            }
            if *shape != expected {
                self.problems.push(format!(
                    "`{name}` has shape {shape:?}, the model needs {expected:?}"
                ));
                return;
            }
            if transposed {
                data = transpose(&data, expected[0], expected[1]);
            }
            t.copy_from(&data);
        }
    }
    let mut write = Write {
        tensors,
        problems: Vec::new(),
        transposed: model.hf_transposed(),
        used: Default::default(),
    };
    model.visit(&mut write);
    // A tensor the model has no place for means the file is not the model its config says.
    let mut unused: Vec<&String> = tensors
        .keys()
        .filter(|name| !is_buffer(name) && !write.used.contains(name.as_str()))
        .collect();
    unused.sort();
    if let Some(name) = unused.first() {
        write.problems.push(format!(
            "`{name}` is not a tensor of this model{}",
            match unused.len() {
                1 => String::new(),
                n => format!(" (nor are {} others)", n - 1),
            }
        ));
    }
    if write.problems.is_empty() {
        Ok(())
    } else {
        Err(write.problems.join("; "))
    }
}

/// Tensors some files hold that are not weights: GPT-2's causal-mask buffers, old rotary
/// frequency tables.
fn is_buffer(name: &str) -> bool {
    [".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// The weights of an HF model directory: model.safetensors, or every shard that
/// model.safetensors.index.json maps a tensor to.
pub fn read_model_weights(dir: &Path) -> Result<Tensors, String> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() || !index.is_file() {
        return read_safetensors(&single);
    }
    let text = std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
    let map = value["weight_map"]
        .as_object()
        .ok_or_else(|| format!("{}: no `weight_map`", index.display()))?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut tensors = Tensors::new();
    for shard in shards {
        if shard.contains('/') || shard.contains('\\') {
            return Err(format!(
                "{}: shard `{shard}` is not a file name",
                index.display()
            ));
        }
        tensors.extend(read_safetensors(&dir.join(shard))?);
    }
    Ok(tensors)
}

/// Writes f32 tensors as a safetensors file, atomically (temp file, then rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &Named,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), String> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), bytes)| {
            ::safetensors::tensor::TensorView::new(::safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| format!("{name}: {e:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tmp = path.with_extension("tmp");
    ::safetensors::serialize_to_file(views, &metadata, &tmp)
        .map_err(|e| format!("{}: {e:?}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads every tensor of a safetensors file as f32 (F32, F16 and BF16 are accepted).
pub fn read_safetensors(path: &Path) -> Result<Tensors, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_safetensors(&bytes, path)
}

/// [`read_safetensors`] on the file's bytes; `path` names it in errors.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Tensors, String> {
    let file = ::safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("{}: not a safetensors file: {e:?}", path.display()))?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            ::safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            ::safetensors::Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            ::safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(format!(
                    "{}: `{name}` is {other:?}; f32, f16 or bf16 expected",
                    path.display()
                ))
            }
        };
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    Ok(tensors)
}

/// The end-of-text id a config.json names: `eos_token_id`, or the first of a list (Llama 3
/// lists several).
pub fn eos_id(value: &serde_json::Value) -> Option<u32> {
    eos_ids(value).first().copied()
}

/// Every id `eos_token_id` names (config.json or generation_config.json): one, or a list.
pub fn eos_ids(value: &serde_json::Value) -> Vec<u32> {
    let ids = match &value["eos_token_id"] {
        serde_json::Value::Array(ids) => ids.iter().filter_map(|id| id.as_u64()).collect(),
        id => id.as_u64().into_iter().collect::<Vec<_>>(),
    };
    ids.into_iter()
        .filter_map(|id| u32::try_from(id).ok())
        .collect()
}

/// `config.json` for transformers' `LlamaForCausalLM`, in the keys transformers 4 writes (5
/// reads them too): `rope_theta` and `rope_scaling` at the top level.
pub fn llama_hf_config(config: &LlamaConfig, eos_id: u32) -> serde_json::Value {
    let rope_scaling = match &config.rope_scaling {
        None => serde_json::Value::Null,
        Some(RopeScaling::Linear { factor }) => {
            serde_json::json!({ "rope_type": "linear", "factor": factor })
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": *original_max_position_embeddings as u64,
        }),
    };
    let qwen2 = config.member == Member::Qwen2;
    let (model_type, architecture) = config.member.names();
    let mut value = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    });
    if let Some(window) = config.sliding_window {
        value["sliding_window"] = window.into();
        if qwen2 {
            value["use_sliding_window"] = true.into();
            value["max_window_layers"] = config.first_window_layer.into();
        }
    }
    value
}

/// A Llama-family config.json (`model_type` llama, mistral, qwen2), in the form transformers 4
/// writes (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`); `path` names it in errors.
pub fn parse_llama_config(value: &serde_json::Value, path: &Path) -> Result<LlamaConfig, String> {
    let at = |key: &str| format!("{}: `{key}`", path.display());
    let number = |key: &str| -> Result<usize, String> {
        value[key]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("{} is missing or not a whole number", at(key)))
    };
    let flag = |key: &str| value[key].as_bool().unwrap_or(false);
    let member = match value["model_type"].as_str() {
        Some("llama") => Member::Llama,
        Some("mistral") => Member::Mistral,
        Some("qwen2") => Member::Qwen2,
        other => {
            return Err(format!(
                "{}: `model_type` {} is not one of the Llama family's (llama, mistral, qwen2)",
                path.display(),
                other.unwrap_or("(none)")
            ))
        }
    };
    let (hidden_size, heads) = (number("hidden_size")?, number("num_attention_heads")?);
    let kv_heads = match value.get("num_key_value_heads") {
        Some(v) if !v.is_null() => number("num_key_value_heads")?,
        _ => heads,
    };
    let head_dim = match value.get("head_dim") {
        Some(v) if !v.is_null() => number("head_dim")?,
        _ => hidden_size / heads.max(1),
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
        return Err(format!(
            "{}: {heads} attention heads, {kv_heads} key/value heads and a head_dim of \
             {head_dim}: the heads must be a multiple of the key/value heads, head_dim even",
            path.display()
        ));
    }
    // transformers 5 keeps the rope settings in `rope_parameters`; 4 at the top level.
    let rope = match value.get("rope_parameters") {
        Some(p) if p.is_object() => p.clone(),
        _ => {
            let mut p = value["rope_scaling"].clone();
            if !p.is_object() {
                p = serde_json::json!({});
            }
            p["rope_theta"] = value.get("rope_theta").cloned().unwrap_or(10000.0.into());
            p
        }
    };
    let rope_number = |key: &str| {
        rope[key]
            .as_f64()
            .ok_or_else(|| format!("{}: the rope settings have no `{key}`", path.display()))
    };
    let rope_type = rope["rope_type"]
        .as_str()
        .or(rope["type"].as_str())
        .unwrap_or("default");
    let rope_scaling = match rope_type {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: rope_number("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: rope_number("factor")?,
            low_freq_factor: rope_number("low_freq_factor")?,
            high_freq_factor: rope_number("high_freq_factor")?,
            original_max_position_embeddings: rope_number("original_max_position_embeddings")?,
        }),
        other => {
            return Err(format!(
                "{}: rope scaling `{other}` is not supported (default, linear and llama3 are)",
                path.display()
            ))
        }
    };
    // Qwen2 slides its window only with `use_sliding_window`, from `max_window_layers` on.
    let qwen2 = member == Member::Qwen2;
    let sliding_window = value["sliding_window"]
        .as_u64()
        .map(|w| w as usize)
        .filter(|_| !qwen2 || flag("use_sliding_window"));
    let first_window_layer = if qwen2 {
        number("max_window_layers").unwrap_or(0)
    } else {
        0
    };
    Ok(LlamaConfig {
        member,
        vocab_size: number("vocab_size")?,
        hidden_size,
        intermediate_size: number("intermediate_size")?,
        layers: number("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim,
        rms_norm_eps: value["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        rope_theta: rope_number("rope_theta")?,
        rope_scaling,
        // Qwen2's q/k/v always have biases; its config does not say so.
        attention_bias: flag("attention_bias") || qwen2,
        output_bias: flag("attention_bias") && !qwen2,
        mlp_bias: flag("mlp_bias"),
        tie_word_embeddings: flag("tie_word_embeddings"),
        max_position_embeddings: number("max_position_embeddings")?,
        sliding_window,
        first_window_layer,
    })
}

/// `config.json` for transformers' `GPT2LMHeadModel`.
pub fn hf_config(config: &GptConfig, eos_id: u32) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.seq_len,
        "n_ctx": config.seq_len,
        "n_embd": config.d_model,
        "n_layer": config.layers,
        "n_head": config.heads,
        "n_inner": null,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "tie_word_embeddings": config.tied_head,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "smelt_bias": config.bias,
    })
}

/// The model sizes from a `config.json` (ours or transformers').
pub fn read_hf_config(dir: &Path) -> Result<(GptConfig, Option<u32>), String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_hf_config(&text, &path)
}

/// [`read_hf_config`] on the text of `path`.
pub fn parse_hf_config(text: &str, path: &Path) -> Result<(GptConfig, Option<u32>), String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    let number = |key: &str| {
        value[key]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| format!("{}: no `{key}`", path.display()))
    };
    if value["model_type"] != "gpt2" {
        return Err(format!(
            "{}: `model_type` is {}: gpt2, llama, mistral and qwen2 load",
            path.display(),
            value["model_type"]
        ));
    }
    let config = GptConfig {
        vocab_size: number("vocab_size")?,
        seq_len: number("n_positions")?,
        d_model: number("n_embd")?,
        layers: number("n_layer")?,
        heads: number("n_head")?,
        dropout: 0.0,
        bias: value["smelt_bias"].as_bool().unwrap_or(true),
        tied_head: value["tie_word_embeddings"].as_bool().unwrap_or(true),
    };
    config.check()?;
    let eos = value["eos_token_id"].as_u64().map(|id| id as u32);
    Ok((config, eos))
}
