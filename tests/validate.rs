//! End-to-end: `smelt validate` reports every problem of a file, each at its line and column.

mod common;

use common::{assert_has, Project};
use serde_json::Value;

/// (code, line, column, message, help) of each problem, via `--format json`.
fn problems(yaml: &str) -> Vec<(String, u64, u64, String, String)> {
    let p = Project::new(yaml);
    let run = p.smelt(&["validate", "--format", "json", "p.yaml"]);
    assert_eq!(
        run.code, 1,
        "expected invalid:\n{}{}",
        run.stdout, run.stderr
    );
    let files: Value = serde_json::from_str(&run.stdout).unwrap();
    files[0]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["code"].as_str().unwrap().to_string(),
                p["line"].as_u64().unwrap(),
                p["column"].as_u64().unwrap(),
                p["message"].as_str().unwrap().to_string(),
                p["help"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn one(yaml: &str) -> (String, u64, u64, String, String) {
    let mut all = problems(yaml);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

const HEAD: &str = "smelt: 1\nname: t\n";

#[test]
fn a_valid_file_exits_zero() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: \"true\" }}\n"
    ));
    let run = p.smelt(&["validate", "p.yaml"]).ok();
    assert_has(&run.stdout, "valid (1 stages)");
}

#[test]
fn unknown_stage_kind_suggests_the_closest() {
    let (code, line, col, _, help) = one(&format!("{HEAD}stages:\n  a:\n    uses: comand\n"));
    assert_eq!((code.as_str(), line, col), ("smelt::unknown-kind", 5, 11));
    assert_eq!(help, "did you mean `command`?");
}

#[test]
fn misspelt_param_points_at_the_key_with_did_you_mean() {
    let (code, line, col, msg, help) = one(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with:\n      run: x\n      dpes: [f]\n"
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::unknown-param", 8, 7));
    assert!(msg.contains("`dpes`"), "{msg}");
    assert_eq!(help, "did you mean `deps`?");
}

#[test]
fn every_misspelt_param_of_a_mapping_is_reported() {
    let all = problems(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: x, dpes: [], evn: {{}} }}\n"
    ));
    let found: Vec<_> = all
        .iter()
        .map(|p| (p.0.as_str(), p.2, p.4.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("smelt::unknown-param", 21, "did you mean `deps`?"),
            ("smelt::unknown-param", 31, "did you mean `env`?")
        ]
    );
}

#[test]
fn wrong_type_and_missing_param() {
    let all = problems(&format!("{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: [1] }}\n  b:\n    uses: command\n    with: {{ deps: [] }}\n"));
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(
        (all[0].0.as_str(), all[0].1, all[0].2),
        ("smelt::type", 6, 18)
    );
    assert_has(&all[0].3, "must be string; found a list");
    assert_eq!((all[1].0.as_str(), all[1].1), ("smelt::missing-param", 9));
    assert_has(&all[1].3, "`run`");
}

#[test]
fn input_naming_a_missing_stage() {
    let (code, line, col, _, help) = one(&format!("{HEAD}stages:\n  base:\n    uses: command\n    with: {{ run: x }}\n  b:\n    uses: command\n    inputs: {{ m: bsae }}\n    with: {{ run: x }}\n"));
    assert_eq!((code.as_str(), line, col), ("smelt::unknown-stage", 9, 18));
    assert_eq!(help, "did you mean `base`?");
}

#[test]
fn input_wired_to_itself() {
    let (code, line, _, _, _) = one(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    inputs: {{ x: a }}\n    with: {{ run: x }}\n"
    ));
    assert_eq!((code.as_str(), line), ("smelt::self-input", 6));
}

#[test]
fn cycles_name_their_stages() {
    let mut yaml = format!("{HEAD}stages:\n");
    for (name, input) in [("a", "c"), ("b", "a"), ("c", "b")] {
        yaml += &format!(
            "  {name}:\n    uses: command\n    inputs: {{ x: {input} }}\n    with: {{ run: x }}\n"
        );
    }
    let (code, line, _, msg, _) = one(&yaml);
    assert_eq!(code, "smelt::cycle");
    assert_eq!(msg, "the stages form a cycle: a → b → c → a");
    assert_eq!(line, 10, "points at b's reference to a");
}

#[test]
fn duplicate_keys() {
    let (code, line, col, msg, _) = one(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: x, run: y }}\n"
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::duplicate-key", 6, 21));
    assert!(msg.contains("first defined on line 6"), "{msg}");
}

#[test]
fn undefined_variable() {
    let (code, line, col, _, help) = one(&format!("{HEAD}vars: {{ seed: 1 }}\nstages:\n  a:\n    uses: command\n    with: {{ run: \"echo ${{vars.sede}}\" }}\n"));
    assert_eq!((code.as_str(), line, col), ("smelt::undefined-var", 7, 18));
    assert_eq!(help, "did you mean `seed`?");
}

#[test]
fn variables_keep_their_type_when_they_are_the_whole_value() {
    // A number variable where a string is expected is a type error at the use site.
    let (code, line, _, msg, _) = one(&format!("{HEAD}vars: {{ n: 3 }}\nstages:\n  a:\n    uses: command\n    with: {{ run: \"${{vars.n}}\" }}\n"));
    assert_eq!((code.as_str(), line), ("smelt::type", 7));
    assert!(msg.contains("found an integer"), "{msg}");
}

#[test]
fn every_error_of_a_file_is_reported_at_once() {
    let yaml = format!(
        "{HEAD}stages:\n  a:\n    uses: comand\n  b:\n    uses: command\n    inputs: {{ x: zz }}\n    with: {{ run: x, bogus: 1 }}\n  c:\n    use: command\n"
    );
    let codes: Vec<String> = problems(&yaml).into_iter().map(|p| p.0).collect();
    assert_eq!(
        codes,
        [
            "smelt::unknown-kind",
            "smelt::unknown-stage",
            "smelt::unknown-param",
            "smelt::missing-uses",
            "smelt::unknown-key"
        ]
    );
}

#[test]
fn structural_mistakes() {
    assert_eq!(
        one("name: t\nstages:\n  a: { uses: command, with: { run: x } }\n").0,
        "smelt::format"
    );
    assert_eq!(one("smelt: 1\nstages: {}\n").0, "smelt::structure");
    assert_eq!(one("smelt: 1\n").0, "smelt::structure");
    assert_eq!(one("- just\n- a list\n").0, "smelt::structure");
    let typo = problems("smelt: 1\nstagse: {}\n");
    assert_eq!(typo[0].0, "smelt::structure", "no stages: {typo:#?}");
    assert_eq!(
        (typo[1].0.as_str(), typo[1].4.as_str()),
        ("smelt::unknown-key", "did you mean `stages`?")
    );
    assert_eq!(one("smelt: 1\nstages:\n  a: [1\n").0, "smelt::yaml");
}

#[test]
fn alias_bombs_and_bad_bytes_are_refused_cleanly() {
    let mut bomb = String::from("smelt: 1\na0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        bomb += &format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 9].join(", ")
        );
    }
    bomb += "stages: {}\n";
    let (code, _, _, msg, _) = one(&bomb);
    assert_eq!(code, "smelt::yaml");
    assert!(msg.contains("expands to more than"), "{msg}");

    let p = Project::new("");
    std::fs::write(p.path("p.yaml"), b"smelt: 1\nname: \xff\xfe\n").unwrap();
    let run = p.smelt(&["validate", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stderr, "not valid UTF-8");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn huge_files_are_refused_without_reading_them_as_yaml() {
    let p = Project::new(&format!(
        "smelt: 1\n# {}\nstages: {{}}\n",
        "x".repeat(9 << 20)
    ));
    let run = p.smelt(&["validate", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("a pipeline file may be at most"),
        "{}",
        run.stderr.len()
    );
    assert!(
        run.stderr.len() < 1000,
        "the report does not quote the file"
    );
}

#[test]
fn usage_errors_exit_two() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: x }}\n"
    ));
    assert_eq!(p.smelt(&["validate", "missing.yaml"]).code, 2);
    assert_eq!(p.smelt(&["validate"]).code, 2);
    assert_eq!(
        p.smelt(&["validate", "p.yaml", "--set", "nonsense"]).code,
        2
    );
    assert_eq!(p.smelt(&["validate", "p.yaml", "--format", "xml"]).code, 2);
}

#[test]
fn github_format_prints_annotations() {
    let p = Project::new(&format!("{HEAD}stages:\n  a:\n    uses: comand\n"));
    let run = p.smelt(&["validate", "--format", "github", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stdout,
        "::error file=p.yaml,line=5,col=11,title=smelt%3A%3Aunknown-kind::unknown stage kind `comand` — did you mean `command`?\n"
    );
}

#[test]
fn human_format_draws_the_source() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: x, dpes: [] }}\n"
    ));
    let run = p.smelt(&["validate", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stderr, "[p.yaml:6:21]");
    assert_has(&run.stderr, "help: did you mean `deps`?");
}

#[test]
fn run_refuses_an_invalid_pipeline_before_doing_anything() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: \"echo a >> log\", x: 1 }}\n"
    ));
    let run = p.smelt(&["run", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stderr, "nothing was run");
    assert!(p.executed().is_empty());
}

#[test]
fn enum_variants_are_explained_inside_lists() {
    let yaml = format!(
        "{HEAD}stages:\n  c:\n    uses: collect\n    with:\n      sources:\n        - synthetc: {{ generator: stories, documents: 1 }}\n        - synthetic: {{ generator: storeis, documents: 1 }}\n        - files: {{ glob: x, format: txt }}\n"
    );
    let found: Vec<_> = problems(&yaml)
        .into_iter()
        .map(|p| (p.0, p.1, p.2, p.4))
        .collect();
    assert_eq!(
        found,
        [
            (
                "smelt::unknown-variant".to_string(),
                8,
                11,
                "did you mean `synthetic`?".to_string()
            ),
            (
                "smelt::invalid-value".to_string(),
                9,
                35,
                "did you mean `stories`?".to_string()
            ),
            (
                "smelt::invalid-value".to_string(),
                10,
                37,
                "did you mean `text`?".to_string()
            ),
        ]
    );
}

#[test]
fn a_glob_that_matches_nothing_blocks_the_stage_with_a_clear_reason() {
    let p = Project::new(&format!("{HEAD}stages:\n  c:\n    uses: collect\n    with:\n      sources: [ {{ files: {{ glob: \"data/*.txt\" }} }} ]\n"));
    let run = p.smelt(&["run", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stdout, "glob `data/*.txt` matches no file");
}
