//! Entry points for the fuzz targets in `fuzz/`: each reader of untrusted input (a file a
//! pipeline names, a shard, a tokenizer.json, a model directory) run on bytes in memory, the
//! way the stage runs it. Not an API: errors are the expected outcome of most inputs, and
//! these only return once the reader has done everything the stage would with its result.

use std::path::Path;

use crate::collect::files::{self, Format, InvalidUtf8, ParseOptions, SplitOn};
use crate::model::{io, AdamWConfig, DeviceKind, ModelConfig, Trainer};
use crate::records::LineBlock;

/// Whether a panic on this thread now would be caught and reported as an error by smelt (see
/// `catch_panic`): a fuzz target's panic hook lets those unwind instead of aborting.
pub fn panic_is_caught() -> bool {
    crate::CATCHING_PANIC.get()
}

/// A GGUF file as `base:` and `from:` read it: the config from its metadata, every tensor
/// dequantized under its HF name, its tokenizer loaded by `tokenizers`, and the model built on
/// the CPU with those weights. Returns the tensors' names.
pub fn gguf(bytes: &[u8]) -> Result<Vec<String>, String> {
    let file = crate::model::gguf::Gguf::parse(bytes.to_vec())?;
    if let Ok(json) = file.tokenizer_json() {
        let json = json.to_string();
        let _ = crate::catch_panic(|| tokenizers::Tokenizer::from_bytes(json.as_bytes()));
    }
    let config = file.llama_config()?;
    let tensors = file.hf_tensors(&config)?;
    let optimizer = AdamWConfig::UNUSED;
    Trainer::from_tensors(config, &tensors, DeviceKind::Cpu, optimizer)?;
    Ok(tensors.into_keys().collect())
}

/// `collect` reading a file: `format`, `split_on` and the UTF-8 policy come from the bits of
/// `flags`, the document limit is `limit` bytes. Returns the texts of the documents.
pub fn collect_file(bytes: &[u8], flags: u8, limit: u64) -> Result<Vec<String>, String> {
    let format = [Format::Text, Format::Jsonl, Format::Csv][usize::from(flags & 3) % 3];
    let split_on = [
        SplitOn::File,
        SplitOn::Paragraph,
        SplitOn::Line,
        SplitOn::Chunk,
    ][usize::from((flags >> 2) & 3)];
    let invalid_utf8 = if flags & 16 == 0 {
        InvalidUtf8::Error
    } else {
        InvalidUtf8::Skip
    };
    let options = ParseOptions {
        format: Some(format),
        field: if flags & 32 == 0 { "text" } else { "content" }.into(),
        split_on,
        invalid_utf8,
        max_document_bytes: limit,
    };
    let mut texts = Vec::new();
    files::read(
        bytes,
        bytes.len() as u64,
        format,
        "input",
        &options,
        &mut |record| {
            texts.push(record.text);
            Ok(())
        },
    )?;
    Ok(texts)
}

/// A record shard read in blocks of about `target` bytes (as the data stages read shards),
/// each line parsed as a record. Returns the lines seen and the records among them.
pub fn shard_records(mut bytes: &[u8], target: usize) -> (usize, usize) {
    let name = "shard.jsonl".into();
    let (mut carry, mut lines, mut records) = (Vec::new(), 0, 0);
    while let Ok(Some(block)) = LineBlock::read(&mut bytes, &mut carry, lines + 1, target, &name) {
        for i in 0..block.lines.len() {
            records += usize::from(block.record(i).is_ok());
        }
        lines += block.lines.len();
    }
    (lines, records)
}

/// `tokenize` with `from: tokenizer.json`: see [`crate::tokenize::load_and_encode`].
pub fn tokenizer_json(
    json: String,
    eos_token: &str,
    texts: &[&str],
) -> Result<(Vec<u32>, usize), String> {
    crate::tokenize::load_and_encode(json, eos_token, texts)
}

/// A model directory as `finetune`'s `base` (or `smelt generate`) loads it: config.json, then
/// model.safetensors, then the model on the CPU. Returns the tensors' names.
pub fn model_dir(config: &str, safetensors: &[u8]) -> Result<Vec<String>, String> {
    let tensors = io::parse_safetensors(safetensors, Path::new("model.safetensors"))?;
    let (config, _eos) = ModelConfig::parse(config, Path::new("config.json"))?;
    let optimizer = AdamWConfig::UNUSED;
    Trainer::from_tensors(config, &tensors, DeviceKind::Cpu, optimizer)?;
    Ok(tensors.into_keys().collect())
}
