//! `collect` reading a local file: plain text (whole, paragraphs, lines, chunks), JSON lines
//! and CSV. The first byte picks the format and the options, the second the document limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [flags, limit, bytes @ ..] = data else {
        return;
    };
    // Small limits too, so that the too-long paths are reached on short inputs.
    let limit = u64::from(*limit) * 16;
    // Text cut into chunks of about 4 KB of whole lines: each line is held to the limit, not
    // the chunk.
    let chunks = (flags & 3) % 3 == 0 && (flags >> 2) & 3 == 3;
    if let Ok(texts) = smelt_stages::fuzzing::collect_file(bytes, *flags, limit) {
        for text in texts {
            assert!(
                chunks || text.len() as u64 <= limit,
                "a document over the limit"
            );
            assert!(!text.trim().is_empty(), "an empty document");
        }
    }
});
