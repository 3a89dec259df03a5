//! A pipeline file, as `smelt validate` loads it: YAML, structure, params against the real
//! stage kinds' schemas, inputs, cycles; then its report rendered every way the CLI prints it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smelt_engine::validate::{check_bytes, LoadError};
use smelt_engine::Registry;

thread_local! {
    static REGISTRY: Registry = smelt_stages::registry();
}

fuzz_target!(|data: &[u8]| {
    REGISTRY.with(|registry| {
        let path = Path::new("/fuzz/pipeline.yaml");
        match check_bytes(path, path, data.to_vec(), &[], registry) {
            Ok(pipeline) => {
                let _ = pipeline.dag();
            }
            Err(LoadError::Invalid(report)) => {
                assert!(
                    !report.problems.is_empty(),
                    "an invalid file without a problem"
                );
                let _ = report.render_human(false);
                let _ = report.render_human(true);
                let _ = report.render_github();
                let _ = report.to_json();
            }
            Err(LoadError::Usage(_)) => {}
        }
    });
});
