//! A model directory a user points `base:` at (or `smelt generate` opens): config.json, then
//! model.safetensors, then the model built on the CPU with those weights. The input is the
//! config's text, a NUL byte, then the safetensors file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (config, safetensors) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(config) = std::str::from_utf8(config) else {
        return;
    };
    let _ = smelt_stages::fuzzing::model_dir(config, safetensors);
});
