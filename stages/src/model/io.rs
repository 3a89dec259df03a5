//! Model directories in Hugging Face's GPT-2 layout: `config.json` and `model.safetensors`
//! (tensor names `transformer.h.0.attn.c_attn.weight`, …, Conv1D weights `(in, out)`, no
//! `lm_head.weight` when the head is tied, which transformers then ties to `wte`).

use std::collections::HashMap;
use std::path::Path;

use dfdx::prelude::*;

use super::gpt::{Gpt, ParamVisitor};
use super::kernels::Kernels;
use super::GptConfig;

/// Named f32 tensors, ready for safetensors.
pub type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Tensors read back, by name: shape and values.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Every parameter of `model` (trainable or not) by HF name, on the host. The untied head is
/// stored `(vocab, d)`, as transformers' `nn.Linear` holds it.
pub fn weights<D: Kernels>(model: &mut Gpt<D>) -> Named {
    struct Read(Named);
    impl<D: Device<f32>> ParamVisitor<D> for Read {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, f32, D>, _: bool) {
            let shape: Vec<usize> = t.shape().concrete().into_iter().collect();
            self.0.push((name.to_string(), shape, t.as_vec()));
        }
    }
    let mut read = Read(Vec::new());
    model.visit(&mut read);
    for (name, shape, data) in &mut read.0 {
        if name == "lm_head.weight" {
            *data = transpose(data, shape[0], shape[1]);
            shape.reverse();
        }
    }
    read.0
}

/// Loads `tensors` (by name) into `model`, checking every shape; names may lack the
/// `transformer.` prefix (as in the original GPT-2 files).
pub fn set_weights<D: Kernels>(model: &mut Gpt<D>, tensors: &Tensors) -> Result<(), String> {
    struct Write<'a> {
        tensors: &'a Tensors,
        problems: Vec<String>,
    }
    impl<D: Device<f32>> ParamVisitor<D> for Write<'_> {
        fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, f32, D>, _: bool) {
            let short = name.strip_prefix("transformer.").unwrap_or(name);
            let Some((shape, data)) = self.tensors.get(name).or_else(|| self.tensors.get(short))
            else {
                self.problems.push(format!("`{name}` is missing"));
                return;
            };
            let mut expected: Vec<usize> = t.shape().concrete().into_iter().collect();
            let mut data = data.clone();
            if name == "lm_head.weight" {
                expected.reverse();
            }
            if *shape != expected {
                self.problems.push(format!(
                    "`{name}` has shape {shape:?}, the model needs {expected:?}"
                ));
                return;
            }
            if name == "lm_head.weight" {
                data = transpose(&data, expected[0], expected[1]);
            }
            t.copy_from(&data);
        }
    }
    let mut write = Write {
        tensors,
        problems: Vec::new(),
    };
    model.visit(&mut write);
    if write.problems.is_empty() {
        Ok(())
    } else {
        Err(write.problems.join("; "))
    }
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
            "{}: `model_type` is {}, only gpt2 is supported",
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
