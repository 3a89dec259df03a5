//! A GGUF model file a user points `base:`, `from:` or `smelt generate` at: its header and
//! metadata, its tensors dequantized and named as HF names them, its tokenizer as a
//! tokenizer.json that `tokenizers` loads, and the model built with those weights.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = smelt_stages::fuzzing::gguf(data);
});
