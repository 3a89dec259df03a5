//! `tokenize` with `from: tokenizer.json`: the file loaded by `tokenizers`, the encoder's fast
//! path chosen from its JSON, special and unknown tokens found, and a few texts encoded. Every
//! id must fit the vocabulary the stage records (the model's embedding is that large, and ids
//! are stored as u16 when it is at most 65536).
#![no_main]

use libfuzzer_sys::fuzz_target;

const TEXTS: [&str; 4] = [
    "Hello world! It's 2024, isn't it?  Spaces\tand\nnewlines.",
    "<|endoftext|>special<|endoftext|> tokens <unk> <s></s>",
    "Ünïcödé, 漢字, emoji 🦀, and \u{0}\u{7f} control bytes",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];

fuzz_target!(
    init: {
        // libfuzzer-sys aborts at any panic, before it unwinds; smelt catches those of
        // `tokenizers` while loading (and reports an error): let them unwind.
        let abort_at_panic = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !smelt_stages::fuzzing::panic_is_caught() {
                abort_at_panic(info);
            }
        }));
    },
    |data: &[u8]| {
        let Ok(json) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok((ids, vocab_size)) =
            smelt_stages::fuzzing::tokenizer_json(json.to_string(), "<|endoftext|>", &TEXTS)
        {
            for id in ids {
                assert!(
                    (id as usize) < vocab_size,
                    "id {id} is outside the vocabulary of {vocab_size}"
                );
            }
        }
    }
);
