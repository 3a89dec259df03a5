//! A record shard (JSON lines) read in blocks, as the data stages read their input shards,
//! each line parsed as a record. The first byte sets the block size, small enough that lines
//! cross block boundaries.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [size, bytes @ ..] = data else {
        return;
    };
    let target = usize::from(*size).max(1);
    let (lines, records) = smelt_stages::fuzzing::shard_records(bytes, target);
    // Every newline ends a line; text after the last one is a line too.
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
    let expected = newlines + usize::from(bytes.last().is_some_and(|&b| b != b'\n'));
    assert_eq!(lines, expected);
    assert!(records <= lines);
});
