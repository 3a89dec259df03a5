//! GGUF, llama.cpp's model file (ggml's docs/gguf.md): a header, metadata as typed key/value
//! pairs, tensor descriptions, then the aligned tensor data. A Llama-family GGUF becomes what an
//! HF directory gives: a config, tensors by HF name laid out as HF stores them (dequantized to
//! f32, q/k rows put back in HF's rotary order), and a tokenizer.json.
//!
//! Readable tensor types: F32, F16, BF16, and the 32-value blocks Q8_0, Q4_0 and Q4_1 (an f16
//! scale, for Q4_1 also an f16 minimum, then the quants: byte j's low nibble is value j, its high
//! nibble value j + 16).

use std::collections::BTreeMap;
use std::path::Path;

use super::io::Tensors;
use super::llama::{LlamaConfig, Member};

/// Whether `path` names a GGUF file (rather than an HF directory).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && path.is_file()
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    /// u64 values above i64's range.
    Big(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Int(i) => u64::try_from(i).ok(),
            Value::Big(u) => Some(u),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(f) => Some(f),
            Value::Int(i) => Some(i as f64),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's description: its name, its shape as HF writes it (outermost first: ggml's
/// dimensions reversed), its ggml type, and where its bytes start in the data section.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: u32,
    offset: usize,
}

/// A GGUF file read into memory.
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

/// The ggml type ids this reader dequantizes, and their names.
const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const BF16: u32 = 30;

/// A ggml type's name, for messages.
pub fn type_name(kind: u32) -> String {
    match kind {
        F32 => "F32".into(),
        F16 => "F16".into(),
        Q4_0 => "Q4_0".into(),
        Q4_1 => "Q4_1".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        Q8_0 => "Q8_0".into(),
        10..=15 => format!("Q{}_K", kind - 8),
        BF16 => "BF16".into(),
        other => format!("ggml type {other}"),
    }
}

/// Bytes of `values` values of type `kind`, if this reader knows the type.
fn data_size(kind: u32, values: usize) -> Option<usize> {
    let blocks = || values.is_multiple_of(32).then_some(values / 32);
    match kind {
        F32 => values.checked_mul(4),
        F16 | BF16 => values.checked_mul(2),
        Q8_0 => blocks()?.checked_mul(34),
        Q4_0 => blocks()?.checked_mul(18),
        Q4_1 => blocks()?.checked_mul(20),
        _ => None,
    }
}

/// Reads the little-endian fields of a GGUF file, refusing to read past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| format!("the file ends inside a field at byte {}", self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of things each at least `least` bytes long, checked against what is left.
    fn count(&mut self, least: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) / least.max(1);
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= left)
            .ok_or_else(|| {
                format!(
                    "a count of {n} at byte {} is more than the file holds",
                    self.at
                )
            })
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.count(1)?;
        let at = self.at;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| format!("the string at byte {at} is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::Int(self.array::<1>()?[0] as i64),
            1 => Value::Int(i8::from_le_bytes(self.array()?) as i64),
            2 => Value::Int(u16::from_le_bytes(self.array()?) as i64),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(i32::from_le_bytes(self.array()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.array()?) as f64),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.count(1)?;
                let items = (0..n).map(|_| self.value(item, depth + 1));
                Value::Array(items.collect::<Result<_, _>>()?)
            }
            10 => {
                let u = self.u64()?;
                i64::try_from(u).map_or(Value::Big(u), Value::Int)
            }
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata type {other} at byte {}", self.at)),
        })
    }
}

impl Gguf {
    pub fn read(path: &Path) -> Result<Gguf, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Gguf::parse(bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Gguf, String> {
        let mut cursor = Cursor {
            bytes: &bytes,
            at: 0,
        };
        if cursor.take(4).ok() != Some(b"GGUF") {
            return Err("not a GGUF file (no `GGUF` magic)".into());
        }
        let version = cursor.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version}: versions 2 and 3 are read"));
        }
        let tensor_count = cursor.count(24)?;
        let kv_count = cursor.count(12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = cursor.string()?;
            let kind = cursor.u32()?;
            metadata.insert(key, cursor.value(kind, 0)?);
        }
        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = cursor.string()?;
            let dims = cursor.u32()? as usize;
            if dims > 4 {
                return Err(format!("tensor `{name}` has {dims} dimensions (at most 4)"));
            }
            let mut shape = (0..dims)
                .map(|_| {
                    cursor
                        .u64()
                        .map(|d| usize::try_from(d).unwrap_or(usize::MAX))
                })
                .collect::<Result<Vec<_>, _>>()?;
            shape.reverse();
            let kind = cursor.u32()?;
            let offset = usize::try_from(cursor.u64()?).unwrap_or(usize::MAX);
            tensors.push(TensorInfo {
                name,
                shape,
                kind,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .and_then(|a| usize::try_from(a).ok())
                .filter(|a| a.is_power_of_two())
                .ok_or("`general.alignment` is not a power of two")?,
        };
        let data_start = cursor.at.next_multiple_of(alignment);
        Ok(Gguf {
            version,
            metadata,
            tensors,
            bytes,
            data_start,
        })
    }

    fn number(&self, key: &str) -> Result<usize, String> {
        self.metadata
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("no whole number `{key}` in the metadata"))
    }

    fn text(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }

    /// The values of a tensor as f32, in its HF layout (row-major, outermost dimension first).
    pub fn dequantize(&self, tensor: &TensorInfo) -> Result<Vec<f32>, String> {
        let values = tensor
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor `{}` is too large", tensor.name))?;
        let unsupported = || {
            format!(
                "tensor `{}` is {}: this reader dequantizes F32, F16, BF16, Q8_0, Q4_0 and Q4_1",
                tensor.name,
                type_name(tensor.kind)
            )
        };
        let size = data_size(tensor.kind, values).ok_or_else(unsupported)?;
        let start = self.data_start.checked_add(tensor.offset);
        let bytes = start
            .and_then(|s| self.bytes.get(s..s.checked_add(size)?))
            .ok_or_else(|| format!("tensor `{}` lies beyond the end of the file", tensor.name))?;
        let half = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        Ok(match tensor.kind {
            F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            F16 => bytes.chunks_exact(2).map(half).collect(),
            BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Q8_0 => bytes
                .chunks_exact(34)
                .flat_map(|block| {
                    let d = half(block);
                    block[2..].iter().map(move |&q| q as i8 as f32 * d)
                })
                .collect(),
            Q4_0 | Q4_1 => {
                let (scales, offset_of) = if tensor.kind == Q4_0 {
                    (2, None)
                } else {
                    (4, Some(2))
                };
                let block_size = scales + 16;
                let mut out = Vec::with_capacity(values);
                for block in bytes.chunks_exact(block_size) {
                    let d = half(block);
                    let (m, zero) = match offset_of {
                        Some(at) => (half(&block[at..]), 0.0),
                        None => (0.0, 8.0),
                    };
                    let quants = &block[scales..];
                    let value = |q: u8| (q as f32 - zero) * d + m;
                    out.extend(quants.iter().map(|&q| value(q & 0x0F)));
                    out.extend(quants.iter().map(|&q| value(q >> 4)));
                }
                out
            }
            _ => return Err(unsupported()),
        })
    }

    /// The model's config, from the `<arch>.*` metadata (architectures `llama` and `qwen2`).
    pub fn llama_config(&self) -> Result<LlamaConfig, String> {
        let arch = self.text("general.architecture").unwrap_or("(none)");
        let member = match arch {
            "llama" => Member::Llama,
            "qwen2" => Member::Qwen2,
            other => {
                return Err(format!(
                    "`general.architecture` is `{other}`: GGUF files of `llama` and `qwen2` load"
                ))
            }
        };
        let key = |name: &str| format!("{arch}.{name}");
        let heads = self.number(&key("attention.head_count"))?;
        let hidden_size = self.number(&key("embedding_length"))?;
        let embedding = self.tensor("token_embd.weight")?;
        let vocab_size = match self.number(&key("vocab_size")) {
            Ok(n) => n,
            Err(_) => embedding.shape.first().copied().unwrap_or(0),
        };
        let float = |name: &str, default: f64| {
            self.metadata
                .get(&key(name))
                .and_then(Value::as_f64)
                .unwrap_or(default)
        };
        let head_dim = match self.number(&key("rope.dimension_count")) {
            Ok(d) => d,
            Err(_) => hidden_size / heads.max(1),
        };
        Ok(LlamaConfig {
            member,
            vocab_size,
            hidden_size,
            intermediate_size: self.number(&key("feed_forward_length"))?,
            layers: self.number(&key("block_count"))?,
            heads,
            kv_heads: self
                .number(&key("attention.head_count_kv"))
                .unwrap_or(heads),
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: float("rope.freq_base", 10000.0),
            rope_scaling: None,
            attention_bias: self.has("blk.0.attn_q.bias"),
            output_bias: self.has("blk.0.attn_output.bias"),
            mlp_bias: self.has("blk.0.ffn_up.bias"),
            tie_word_embeddings: !self.has("output.weight"),
            max_position_embeddings: self.number(&key("context_length"))?,
            sliding_window: None,
            first_window_layer: 0,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }

    fn tensor(&self, name: &str) -> Result<&TensorInfo, String> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format!("no tensor `{name}`"))
    }

    /// Every tensor by its HF name, dequantized, in HF's layout: llama.cpp's `llama`
    /// architecture runs rotary positions on adjacent pairs, so its converter permuted the q
    /// and k rows of each head; they are put back in HF's order (`rotate_half` pairs j with
    /// j + head_dim/2). Without that, the model runs and answers nonsense.
    pub fn hf_tensors(&self, config: &LlamaConfig) -> Result<Tensors, String> {
        let mut tensors = Tensors::new();
        for tensor in &self.tensors {
            let name = hf_name(&tensor.name)
                .ok_or_else(|| format!("tensor `{}` has no HF counterpart", tensor.name))?;
            let mut values = self.dequantize(tensor)?;
            let heads = match tensor.name.rsplit('.').nth(1) {
                Some("attn_q") => Some(config.heads),
                Some("attn_k") => Some(config.kv_heads),
                _ => None,
            };
            if let Some(heads) = heads.filter(|_| config.member == Member::Llama) {
                values = unpermute_rows(&values, &tensor.shape, heads).ok_or_else(|| {
                    format!("tensor `{}` does not split into {heads} heads", tensor.name)
                })?;
            }
            tensors.insert(name, (tensor.shape.clone(), values));
        }
        Ok(tensors)
    }

    /// The tokenizer as a tokenizer.json `tokenizers` loads: byte-level BPE from
    /// `tokenizer.ggml.tokens` and `.merges`, control tokens as special added tokens, and the
    /// pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
    pub fn tokenizer_json(&self) -> Result<serde_json::Value, String> {
        let model = self.text("tokenizer.ggml.model").unwrap_or("(none)");
        if model != "gpt2" {
            return Err(format!(
                "`tokenizer.ggml.model` is `{model}`: byte-level BPE (`gpt2`) tokenizers load"
            ));
        }
        let strings = |key: &str| -> Result<Vec<&str>, String> {
            match self.metadata.get(key) {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .ok_or_else(|| format!("`{key}` holds a non-string"))
                    })
                    .collect(),
                _ => Err(format!("no `{key}` list in the metadata")),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Int(i) => *i,
                    _ => 1,
                })
                .collect(),
            _ => Vec::new(),
        };
        let digits = match self.text("tokenizer.ggml.pre").unwrap_or("default") {
            "smollm" => true,
            "default" | "gpt-2" | "gpt2" => false,
            other => {
                return Err(format!(
                    "the `{other}` pre-tokenizer (`tokenizer.ggml.pre`) is not supported: \
                     `smollm`, `gpt-2` and `default` are"
                ))
            }
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.to_string(), id.into()))
            .collect();
        // Token type 3 is a control token: added, special, never split.
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|&(_, &kind)| kind == 3)
            .filter_map(|(id, _)| Some((id, *tokens.get(id)?)))
            .map(|(id, content)| {
                serde_json::json!({ "id": id, "content": content, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true })
            })
            .collect();
        let byte_level = serde_json::json!({ "type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true });
        let pre_tokenizer = match digits {
            true => serde_json::json!({ "type": "Sequence", "pretokenizers": [
                { "type": "Digits", "individual_digits": true }, byte_level ] }),
            false => byte_level.clone(),
        };
        Ok(serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        }))
    }

    /// `tokenizer.chat_template`, when the file carries one.
    pub fn chat_template(&self) -> Option<&str> {
        self.text("tokenizer.chat_template")
    }

    /// The special tokens by the names chat templates give them (`bos_token`, `eos_token`,
    /// `unk_token`, `pad_token`), from `tokenizer.ggml.*_token_id`.
    pub fn special_tokens(&self) -> Vec<(String, String)> {
        let Some(Value::Array(tokens)) = self.metadata.get("tokenizer.ggml.tokens") else {
            return Vec::new();
        };
        [
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ]
        .into_iter()
        .filter_map(|(name, key)| {
            let id = self.number(&format!("tokenizer.ggml.{key}")).ok()?;
            let token = tokens.get(id)?.as_str()?;
            Some((name.to_string(), token.to_string()))
        })
        .collect()
    }

    /// `tokenizer.ggml.eos_token_id`.
    pub fn eos_id(&self) -> Option<u32> {
        self.number("tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|id| u32::try_from(id).ok())
    }
}

/// How `smelt export --gguf` stores the matrices (norms and biases stay F32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportType {
    F16,
    Q8_0,
}

/// A Llama-family model as a GGUF v3 file llama.cpp runs: the `llama` (or `qwen2`) metadata,
/// its tokenizer (a byte-level BPE tokenizer.json) as `tokenizer.ggml.*`, and every tensor
/// under its llama.cpp name. q/k rows are permuted into llama.cpp's rotary order for `llama`,
/// and `output.weight` is written even when the head is tied (llama.cpp wants it).
pub fn write(
    path: &Path,
    config: &LlamaConfig,
    tensors: &Tensors,
    tokenizer: &serde_json::Value,
    chat_template: Option<&str>,
    eos: u32,
    kind: ExportType,
) -> Result<(), String> {
    let arch = match config.member {
        Member::Qwen2 => "qwen2",
        _ => "llama",
    };
    let mut metadata = vec![
        ("general.architecture".to_string(), Value::Str(arch.into())),
        ("general.alignment".to_string(), Value::Int(32)),
    ];
    let number = |key: &str, n: usize| (format!("{arch}.{key}"), Value::Int(n as i64));
    metadata.extend([
        number("context_length", config.max_position_embeddings),
        number("embedding_length", config.hidden_size),
        number("block_count", config.layers),
        number("feed_forward_length", config.intermediate_size),
        number("attention.head_count", config.heads),
        number("attention.head_count_kv", config.kv_heads),
        number("rope.dimension_count", config.head_dim),
        number("vocab_size", config.vocab_size),
        (
            format!("{arch}.rope.freq_base"),
            Value::Float(config.rope_theta),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::Float(config.rms_norm_eps),
        ),
    ]);
    metadata.extend(tokenizer_metadata(tokenizer, eos)?);
    if let Some(template) = chat_template {
        metadata.push((
            "tokenizer.chat_template".into(),
            Value::Str(template.into()),
        ));
    }
    let mut names: Vec<(String, &str)> = tensors
        .keys()
        .map(|hf| gguf_name(hf).map(|g| (g, hf.as_str())))
        .collect::<Result<_, _>>()?;
    if config.tie_word_embeddings {
        names.push(("output.weight".into(), "model.embed_tokens.weight"));
    }
    names.sort();
    let mut infos = Vec::new();
    for (name, hf) in &names {
        let (shape, values) = &tensors[*hf];
        let heads = match name.rsplit('.').nth(1) {
            Some("attn_q") => Some(config.heads),
            Some("attn_k") => Some(config.kv_heads),
            _ => None,
        };
        let values = match heads.filter(|_| config.member == Member::Llama) {
            Some(heads) => permute_rows(values, shape, heads)
                .ok_or_else(|| format!("`{hf}` does not split into {heads} heads"))?,
            None => values.clone(),
        };
        let matrix = shape.len() == 2;
        let quantize = matrix && kind == ExportType::Q8_0 && shape[1].is_multiple_of(32);
        let (ggml, bytes) = match (matrix, quantize) {
            (true, true) => (Q8_0, quantize_q8_0(&values)),
            (true, false) => (
                F16,
                values
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
            ),
            (false, _) => (F32, values.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        infos.push((name.clone(), shape.clone(), ggml, bytes));
    }
    let bytes = encode(&metadata, &infos);
    let tmp = path.with_extension("gguf.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// ggml's reference Q8_0 quantizer: per 32 values, `d = max|x| / 127`, `q = round(x / d)`.
fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let max = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let d = max / 127.0;
        let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|x| (x * inverse).round() as i8 as u8));
    }
    out
}

/// `tokenizer.ggml.*` for a byte-level BPE tokenizer.json: tokens by id, merges, special tokens
/// as control tokens (type 3), and the end-of-text id.
fn tokenizer_metadata(
    tokenizer: &serde_json::Value,
    eos: u32,
) -> Result<Vec<(String, Value)>, String> {
    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        return Err(
            "the tokenizer is not byte-level BPE: llama.cpp's `gpt2` tokenizer needs it".into(),
        );
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or("the tokenizer has no vocabulary")?;
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|id| usize::try_from(id).ok())
            .filter(|&id| id < tokens.len());
        tokens[id.ok_or_else(|| format!("token `{token}` has an id beyond the vocabulary"))?] =
            token.clone();
    }
    let mut types = vec![Value::Int(1); tokens.len()];
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        let id = id as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, String::new());
            types.resize(id + 1, Value::Int(1));
        }
        tokens[id] = content.to_string();
        if added["special"] == true {
            types[id] = Value::Int(3);
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::Array(pair) => Value::Str(format!(
                "{} {}",
                pair.first().and_then(|p| p.as_str()).unwrap_or_default(),
                pair.get(1).and_then(|p| p.as_str()).unwrap_or_default()
            )),
            other => Value::Str(other.as_str().unwrap_or_default().to_string()),
        })
        .collect();
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    // llama.cpp names pre-tokenizers: SmolLM2's splits digits one by one before GPT-2's.
    let digits = tokenizer["pre_tokenizer"]["pretokenizers"]
        .as_array()
        .is_some_and(|p| {
            p.iter()
                .any(|p| p["type"] == "Digits" && p["individual_digits"] == true)
        });
    // llama.cpp knows GPT-2's as `gpt-2` (it refuses `gpt2`, found by llama-cpp-python).
    let pre = if digits { "smollm" } else { "gpt-2" };
    Ok(vec![
        (key("model"), Value::Str("gpt2".into())),
        (key("pre"), Value::Str(pre.into())),
        (
            key("tokens"),
            Value::Array(tokens.into_iter().map(Value::Str).collect()),
        ),
        (key("token_type"), Value::Array(types)),
        (key("merges"), Value::Array(merges)),
        (key("bos_token_id"), Value::Int(eos as i64)),
        (key("eos_token_id"), Value::Int(eos as i64)),
        (key("add_bos_token"), Value::Bool(false)),
    ])
}

/// The bytes of a GGUF v3 file: header, metadata, tensor infos, then each tensor's data, every
/// part aligned to 32 bytes.
fn encode(metadata: &[(String, Value)], tensors: &[(String, Vec<usize>, u32, Vec<u8>)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn value(out: &mut Vec<u8>, v: &Value, typed: bool) {
        let (kind, bytes): (u32, Vec<u8>) = match v {
            Value::Int(i) => match u32::try_from(*i) {
                Ok(u) => (4, u.to_le_bytes().to_vec()),
                Err(_) => (11, i.to_le_bytes().to_vec()),
            },
            Value::Big(u) => (10, u.to_le_bytes().to_vec()),
            Value::Float(f) => (6, (*f as f32).to_le_bytes().to_vec()),
            Value::Bool(b) => (7, vec![u8::from(*b)]),
            Value::Str(s) => {
                if typed {
                    out.extend(8u32.to_le_bytes());
                }
                string(out, s);
                return;
            }
            Value::Array(items) => {
                out.extend(9u32.to_le_bytes());
                let item = match items.first() {
                    Some(Value::Str(_)) | None => 8u32,
                    Some(_) => 5u32,
                };
                out.extend(item.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    match item {
                        Value::Str(s) => string(out, s),
                        Value::Int(i) => out.extend((*i as i32).to_le_bytes()),
                        _ => {}
                    }
                }
                return;
            }
        };
        if typed {
            out.extend(kind.to_le_bytes());
        }
        out.extend(bytes);
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key);
        value(&mut out, v, true);
    }
    let mut offset = 0usize;
    for (name, shape, kind, bytes) in tensors {
        string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(kind.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += bytes.len().next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    out
}

/// Whole tensors, HF's name then llama.cpp's.
const TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// A layer's modules, HF's name (under `model.layers.N.`) then llama.cpp's (under `blk.N.`).
const MODULES: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// `name` in the other naming: llama.cpp's for HF's (`to_gguf`), or HF's for llama.cpp's.
fn rename(name: &str, to_gguf: bool) -> Option<String> {
    let pick = |&(hf, gguf): &(&'static str, &'static str)| match to_gguf {
        true => (hf, gguf),
        false => (gguf, hf),
    };
    if let Some((_, to)) = TENSORS.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (prefix, new_prefix) = pick(&("model.layers.", "blk."));
    let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, module) = MODULES.iter().map(pick).find(|(from, _)| *from == module)?;
    Some(format!("{new_prefix}{layer}.{module}.{kind}"))
}

/// The llama.cpp name of an HF tensor name.
fn gguf_name(hf: &str) -> Result<String, String> {
    rename(hf, true).ok_or_else(|| format!("`{hf}` has no llama.cpp name"))
}

/// HF's q/k row order to llama.cpp's (the inverse of [`unpermute_rows`]).
pub fn permute_rows(values: &[f32], shape: &[usize], heads: usize) -> Option<Vec<f32>> {
    reorder_rows(values, shape, heads, true)
}

/// The HF name of a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, false)
}

/// llama.cpp's q/k row order back to HF's. Works on a weight `(rows, cols)` and on a bias
/// `(rows,)`.
pub fn unpermute_rows(values: &[f32], shape: &[usize], heads: usize) -> Option<Vec<f32>> {
    reorder_rows(values, shape, heads, false)
}

/// In each head's `d` rows, HF's row `p·d/2 + j` is llama.cpp's row `2j + p`: rows move from
/// one order to the other (`to_llama_cpp` says which way).
fn reorder_rows(
    values: &[f32],
    shape: &[usize],
    heads: usize,
    to_llama_cpp: bool,
) -> Option<Vec<f32>> {
    let rows = *shape.first()?;
    let cols = values.len() / rows.max(1);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let (d, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for j in 0..half {
            for p in 0..2 {
                let (hf, llama_cpp) = ((h * d + p * half + j) * cols, (h * d + 2 * j + p) * cols);
                let (from, to) = if to_llama_cpp {
                    (hf, llama_cpp)
                } else {
                    (llama_cpp, hf)
                };
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file: the given metadata and tensors (name, HF shape, ggml type, raw bytes),
    /// written as the exporter writes files.
    fn build(metadata: &[(&str, Value)], tensors: &[(&str, &[usize], u32, Vec<u8>)]) -> Vec<u8> {
        let metadata: Vec<(String, Value)> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)> = tensors
            .iter()
            .map(|(name, shape, kind, bytes)| {
                (name.to_string(), shape.to_vec(), *kind, bytes.clone())
            })
            .collect();
        encode(&metadata, &tensors)
    }

    fn f16(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    fn values_of(kind: u32, bytes: Vec<u8>, n: usize) -> Result<Vec<f32>, String> {
        let file = Gguf::parse(build(&[], &[("t", &[n], kind, bytes)]))?;
        file.dequantize(&file.tensors[0])
    }

    #[test]
    fn every_block_type_dequantizes_as_ggml_defines_it() {
        // Quants 0..16 in order: byte j holds value j (low nibble) and value j + 16 (high).
        let nibbles: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let low: Vec<f32> = (0..16).map(|j| j as f32).collect();
        let high: Vec<f32> = (0..16).map(|j| (15 - j) as f32).collect();
        let q4_0 = [&f16(0.5)[..], &nibbles].concat();
        let expected: Vec<f32> = low.iter().chain(&high).map(|q| (q - 8.0) * 0.5).collect();
        assert_eq!(values_of(Q4_0, q4_0, 32).unwrap(), expected);
        let q4_1 = [&f16(0.25)[..], &f16(-1.0), &nibbles].concat();
        let expected: Vec<f32> = low.iter().chain(&high).map(|q| q * 0.25 - 1.0).collect();
        assert_eq!(values_of(Q4_1, q4_1, 32).unwrap(), expected);
        let quants: Vec<u8> = (0..32).map(|i| (i as i8 - 16) as u8).collect();
        let q8_0 = [&f16(2.0)[..], &quants].concat();
        let expected: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 2.0).collect();
        assert_eq!(values_of(Q8_0, q8_0, 32).unwrap(), expected);
        let halves = [f16(1.5), f16(-0.25)].concat();
        assert_eq!(values_of(F16, halves, 2).unwrap(), [1.5, -0.25]);
        let brains = [
            half::bf16::from_f32(3.0).to_le_bytes(),
            half::bf16::from_f32(-2.0).to_le_bytes(),
        ]
        .concat();
        assert_eq!(values_of(BF16, brains, 2).unwrap(), [3.0, -2.0]);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        assert_eq!(
            Gguf::parse(b"GGML\x03\0\0\0".to_vec()).err().unwrap(),
            "not a GGUF file (no `GGUF` magic)"
        );
        let whole = build(&[("general.name", Value::Str("x".into()))], &[]);
        let err = Gguf::parse(whole[..whole.len() - 20].to_vec())
            .err()
            .unwrap();
        assert!(
            err.contains("more than the file holds") || err.contains("ends inside"),
            "{err}"
        );
        // A type it does not read is named with its tensor.
        let err = values_of(6, vec![0; 22], 32).unwrap_err();
        assert_eq!(
            err,
            "tensor `t` is Q5_0: this reader dequantizes F32, F16, BF16, Q8_0, Q4_0 and Q4_1"
        );
        // Data that would lie past the end of the file.
        let mut file = Gguf::parse(build(&[], &[("t", &[8], F32, vec![0; 32])])).unwrap();
        file.tensors[0].shape = vec![1 << 20];
        let err = file.dequantize(&file.tensors[0].clone()).unwrap_err();
        assert_eq!(err, "tensor `t` lies beyond the end of the file");
        // A count far beyond the file's size is refused before anything is allocated for it.
        let mut huge = b"GGUF".to_vec();
        huge.extend(3u32.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        assert!(Gguf::parse(huge)
            .err()
            .unwrap()
            .contains("more than the file holds"));
    }

    /// The fuzz seeds reach every step the stage takes: two tiny models (Q8_0, Q4_1, Q4_0,
    /// F16 and F32 tensors; `llama` with its q/k permutation, `qwen2` without) load whole.
    #[test]
    fn the_fuzz_seeds_load_as_models() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf");
        for seed in ["tiny-llama", "tiny-qwen2"] {
            let bytes = std::fs::read(seeds.join(seed)).unwrap();
            let names = crate::fuzzing::gguf(&bytes).unwrap();
            assert_eq!(names.len(), 20, "{seed}");
            let json = Gguf::parse(bytes)
                .unwrap()
                .tokenizer_json()
                .unwrap()
                .to_string();
            let tokenizer = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
            let ids = tokenizer
                .encode("ab a12", false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(ids, [4, 5, 6, 7], "{seed}");
        }
    }
}
