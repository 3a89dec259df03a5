//! `smelt metric`: sacrebleu's scores from plain-text files.

mod common;

use std::path::Path;

#[test]
fn metric_scores_files_like_sacrebleu() {
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sacrebleu.json"))
            .unwrap(),
    )
    .unwrap();
    let case = &fixture["cases"][1]; // two references
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: &serde_json::Value| {
        let text: String = lines
            .as_array()
            .unwrap()
            .iter()
            .map(|l| format!("{}\n", l.as_str().unwrap()))
            .collect();
        std::fs::write(dir.path().join(name), text).unwrap();
    };
    write("hyp.txt", &case["hyps"]);
    write("ref1.txt", &case["refs"][0]);
    write("ref2.txt", &case["refs"][1]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::smelt_bin())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (code, stdout, _) = run(&[
        "metric", "bleu", "--hyp", "hyp.txt", "--ref", "ref1.txt", "--ref", "ref2.txt", "--format",
        "json",
    ]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!((json["score"].as_f64().unwrap() - case["bleu"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(json["signature"], case["bleu_signature"]);
    let (_, stdout, _) = run(&[
        "metric", "chrf", "--hyp", "hyp.txt", "--ref", "ref1.txt", "--ref", "ref2.txt",
    ]);
    let expected = format!(
        "chrF2|{} = {:.1}",
        case["chrf_signature"].as_str().unwrap(),
        case["chrf"].as_f64().unwrap()
    );
    assert_eq!(stdout.trim(), expected);
    std::fs::write(dir.path().join("short.txt"), "one line\n").unwrap();
    let (code, _, stderr) = run(&["metric", "bleu", "--hyp", "hyp.txt", "--ref", "short.txt"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("reference set 1 has 1 segments, the hypotheses 2"),
        "{stderr}"
    );
}
