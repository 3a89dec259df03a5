//! End-to-end: `smelt validate` reports every problem of a file, each at its line and column.

mod common;

use std::path::Path;

use common::{assert_has, Project};
use serde_json::Value;

/// (code, line, column, message, help) of each problem, via `--format json`.
fn problems(yaml: &str) -> Vec<(String, u64, u64, String, String)> {
    problems_of(&Project::new(yaml))
}

/// The problems `validate --format json` reports for the project's p.yaml.
fn problems_of(p: &Project) -> Vec<(String, u64, u64, String, String)> {
    reported(p, &[])
}

/// The problems `validate --data --format json` reports for the project's p.yaml.
fn problems_of_data(p: &Project) -> Vec<(String, u64, u64, String, String)> {
    reported(p, &["--data"])
}

/// The problems `validate` with `extra` arguments reports; it must exit 1.
fn reported(p: &Project, extra: &[&str]) -> Vec<(String, u64, u64, String, String)> {
    let args = [&["validate", "--format", "json", "p.yaml"][..], extra].concat();
    let run = p.smelt(&args);
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
    assert_eq!(
        msg,
        "unknown key `dpes` in `with` of `command` stage `a` (did you mean `deps`?)"
    );
    assert_eq!(help, "`with` takes: deps, env, run");
}

#[test]
fn every_misspelt_param_of_a_mapping_is_reported() {
    let all = problems(&format!(
        "{HEAD}stages:\n  a:\n    uses: command\n    with: {{ run: x, dpes: [], evn: {{}} }}\n"
    ));
    let found: Vec<_> = all
        .iter()
        .map(|p| (p.0.as_str(), p.2, p.3.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "smelt::unknown-param",
                21,
                "unknown key `dpes` in `with` of `command` stage `a` (did you mean `deps`?)"
            ),
            (
                "smelt::unknown-param",
                31,
                "unknown key `evn` in `with` of `command` stage `a` (did you mean `env`?)"
            )
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
    assert_has(&run.stderr, "(did you mean `deps`?)");
    assert_has(&run.stderr, "help: `with` takes: deps, env, run");
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

/// A pretrain stage `m` reading a command stage `tok`; its `with:` lines are 11 (`model`), 12
/// (`train`) and 13 (`eval`).
fn pretrain(model: &str, train: &str, eval: &str) -> String {
    format!(
        "{HEAD}stages:\n  tok:\n    uses: command\n    with: {{ run: x }}\n  m:\n    uses: pretrain\n    inputs: {{ tokens: tok }}\n    with:\n      model: {model}\n      train: {train}\n      eval: {eval}\n"
    )
}

const MODEL: &str = "{ layers: 2, heads: 2, d_model: 16, seq_len: 8 }";
const TRAIN: &str = "{ steps: 20, warmup: 2 }";

#[test]
fn the_example_pipeline_params_are_valid() {
    let p = Project::new(&pretrain(MODEL, TRAIN, "{}"));
    p.smelt(&["validate", "p.yaml"]).ok();
}

#[test]
fn zero_layers() {
    let (code, line, col, msg, _) = one(&pretrain(
        "{ layers: 0, heads: 2, d_model: 16, seq_len: 8 }",
        TRAIN,
        "{}",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 11, 24));
    assert_eq!(
        msg,
        "`with.model.layers` of stage `m` must be at least 1; found 0"
    );
}

#[test]
fn zero_steps() {
    let (code, line, col, msg, _) = one(&pretrain(MODEL, "{ steps: 0, warmup: 0 }", "{}"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 12, 23));
    assert_eq!(
        msg,
        "`with.train.steps` of stage `m` must be at least 1; found 0"
    );
}

#[test]
fn zero_batch_size() {
    let (code, line, col, msg, _) = one(&pretrain(
        MODEL,
        "{ steps: 20, warmup: 2, batch_size: 0 }",
        "{}",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 12, 50));
    assert_eq!(
        msg,
        "`with.train.batch_size` of stage `m` must be at least 1; found 0"
    );
}

#[test]
fn zero_grad_accum() {
    let (code, line, col, msg, _) = one(&pretrain(
        MODEL,
        "{ steps: 20, warmup: 2, grad_accum: 0 }",
        "{}",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 12, 50));
    assert_eq!(
        msg,
        "`with.train.grad_accum` of stage `m` must be at least 1; found 0"
    );
}

#[test]
fn zero_eval_every() {
    let (code, line, col, msg, _) = one(&pretrain(MODEL, TRAIN, "{ every: 0 }"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 13, 22));
    assert_eq!(
        msg,
        "`with.eval.every` of stage `m` must be at least 1; found 0"
    );
}

#[test]
fn negative_learning_rate() {
    let (code, line, col, msg, _) = one(&pretrain(MODEL, "{ steps: 20, warmup: 2, lr: -1 }", "{}"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 12, 42));
    assert_eq!(
        msg,
        "`with.train.lr` of stage `m` must be above 0; found -1"
    );
}

#[test]
fn every_out_of_range_value_is_reported_at_once() {
    let all = problems(&pretrain(
        "{ layers: 0, heads: 2, d_model: 16, seq_len: 8, dropout: 1.5 }",
        "{ steps: 0, batch_size: 0, lr: 0 }",
        "{ every: 0, batches: 0 }",
    ));
    let found: Vec<_> = all.iter().map(|p| (p.1, p.2, p.0.as_str())).collect();
    assert_eq!(
        found,
        [
            (11, 24, "smelt::invalid-value"),
            (11, 71, "smelt::invalid-value"),
            (12, 23, "smelt::invalid-value"),
            (12, 38, "smelt::invalid-value"),
            (12, 45, "smelt::invalid-value"),
            (13, 22, "smelt::invalid-value"),
            (13, 34, "smelt::invalid-value"),
        ]
    );
    assert_has(
        &all[1].3,
        "`with.model.dropout` of stage `m` must be below 1; found 1.5",
    );
    assert_has(
        &all[4].3,
        "`with.train.lr` of stage `m` must be above 0; found 0",
    );
}

#[test]
fn d_model_not_divisible_by_heads() {
    let (code, line, col, msg, _) = one(&pretrain(
        "{ layers: 2, heads: 3, d_model: 16, seq_len: 8 }",
        TRAIN,
        "{}",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 11, 46));
    assert_eq!(
        msg,
        "`d_model` (16) must be divisible by `heads` (3): each head takes an equal share of it (stage `m`)"
    );
}

#[test]
fn min_lr_above_lr() {
    let (code, line, col, msg, _) = one(&pretrain(
        MODEL,
        "{ steps: 20, warmup: 2, lr: 0.001, min_lr: 0.01 }",
        "{}",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 12, 57));
    assert_eq!(
        msg,
        "`train.min_lr` (0.01) is above `train.lr` (0.001): the schedule decays from `lr` down to `min_lr` (stage `m`)"
    );
}

#[test]
fn warmup_longer_than_the_run() {
    let (code, line, col, msg, _) = one(&pretrain(MODEL, "{ steps: 20, warmup: 30 }", "{}"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 12, 35));
    assert_has(
        &msg,
        "`train.warmup` (30) is longer than `train.steps` (20)",
    );
    // The default warmup (100 steps) is not written: the steps are pointed at instead.
    let (code, line, col, msg, help) = one(&pretrain(MODEL, "{ steps: 20 }", "{}"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 12, 23));
    assert_has(
        &msg,
        "`train.warmup` (100) is longer than `train.steps` (20)",
    );
    assert_has(&help, "100 steps when not given");
}

#[test]
fn byte_level_vocabulary_of_one() {
    let (code, line, col, msg, help) = one(&format!(
        "{HEAD}stages:\n  c:\n    uses: command\n    with: {{ run: x }}\n  tok:\n    uses: tokenize\n    inputs: {{ corpus: c }}\n    with:\n      train: {{ model: byte_level_bpe, vocab_size: 1 }}\n"
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 11, 51));
    assert_eq!(
        msg,
        "`train.vocab_size` 1 is below the 256 bytes plus 3 special tokens a byte-level vocabulary starts with (stage `tok`)"
    );
    assert_eq!(help, "make it at least 259");
}

#[test]
fn misspelt_key_inside_an_optional_block() {
    let (code, line, col, msg, help) = one(&format!(
        "{HEAD}stages:\n  c:\n    uses: command\n    with: {{ run: x }}\n  tok:\n    uses: tokenize\n    inputs: {{ corpus: c }}\n    with:\n      train: {{ model: byte_level_bpe, vocab_sise: 512 }}\n"
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::unknown-param", 11, 39));
    assert_eq!(
        msg,
        "unknown key `vocab_sise` in `with.train` of `tokenize` stage `tok` (did you mean \
         `vocab_size`?)"
    );
    assert!(help.starts_with("`with.train` takes: "), "{help}");
    assert!(help.contains("vocab_size"), "{help}");
    // A value of the wrong kind for the block says what the block is.
    let (code, line, _, msg, _) = one(&format!(
        "{HEAD}stages:\n  c:\n    uses: command\n    with: {{ run: x }}\n  tok:\n    uses: tokenize\n    inputs: {{ corpus: c }}\n    with:\n      train: 512\n"
    ));
    assert_eq!((code.as_str(), line), ("smelt::type", 11));
    assert_eq!(
        msg,
        "`with.train` of stage `tok` must be mapping; found an integer"
    );
}

#[test]
fn chat_template_without_a_role() {
    let (code, line, col, msg, _) = one(&format!(
        "{HEAD}stages:\n  c:\n    uses: command\n    with: {{ run: x }}\n  tok:\n    uses: tokenize\n    inputs: {{ corpus: c }}\n    with:\n      chat_template: {{ turn_start: \"### \" }}\n"
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 11, 36));
    assert_has(
        &msg,
        "`chat_template.turn_start` (\"### \") has no `{role}`",
    );
}

/// A LoRA fine-tune `sft` of the model `base` (a command stage) on `data`; `with:` on line 12.
fn finetune(with: &str) -> String {
    format!(
        "{HEAD}stages:\n  base:\n    uses: command\n    with: {{ run: x }}\n  sft:\n    uses: finetune\n    inputs: {{ model: base, data: base }}\n    with:\n      train: {{ steps: 20, warmup: 2 }}\n      {with}\n"
    )
}

#[test]
fn unknown_lora_target() {
    let (code, line, col, msg, help) =
        one(&finetune("lora: { targets: [attn.c_attn, attn.c_atn] }"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 12, 38));
    assert_has(&msg, "`with.lora.targets.1` of stage `sft` must be one of");
    assert_eq!(help, "did you mean `attn.c_attn`?");
    let (code, line, col, msg, _) = one(&finetune("lora: { targets: [] }"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 12, 24));
    assert_eq!(
        msg,
        "`with.lora.targets` of stage `sft` must list at least 1; found none"
    );
}

#[test]
fn a_base_model_given_twice() {
    let (code, line, col, msg, _) = one(&finetune("base: models/gpt2"));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 12, 13));
    assert_eq!(
        msg,
        "both a `model` input and `base` are given: keep one (stage `sft`)"
    );
}

/// Corpus → char tokens → a pretrain with a context of `seq_len`.
fn data_pipeline(seq_len: u32) -> String {
    format!(
        "{HEAD}stages:\n  corpus:\n    uses: collect\n    with:\n      sources: [ {{ synthetic: {{ generator: stories, documents: 20 }} }} ]\n      split: {{ validation: 0.2 }}\n  tok:\n    uses: tokenize\n    inputs: {{ corpus: corpus }}\n    with: {{ train: {{ model: char }} }}\n  m:\n    uses: pretrain\n    inputs: {{ tokens: tok }}\n    with:\n      model: {{ layers: 1, heads: 2, d_model: 16, seq_len: {seq_len} }}\n      train: {{ steps: 2, warmup: 1 }}\n"
    )
}

#[test]
fn data_checks_run_once_their_inputs_are_built() {
    let p = Project::new(&data_pipeline(100_000));
    // Nothing built: the file is valid, and the data checks say they wait.
    let before = p.smelt(&["validate", "--data", "p.yaml"]).ok();
    assert_has(
        &before.stdout,
        "· m: not checked yet: input stage `tok` is not built",
    );
    assert!(!p.path(".smelt").exists(), "validate creates no store");
    p.smelt(&["run", "p.yaml", "--until", "tok"]).ok();
    // Built: seq_len is checked against the token streams, at its place.
    let run = p.smelt(&["validate", "--data", "--format", "json", "p.yaml"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let files: Value = serde_json::from_str(&run.stdout).unwrap();
    let problem = &files[0]["problems"][0];
    assert_eq!(problem["code"], "smelt::data-check");
    assert_eq!(
        (problem["line"].as_u64(), problem["column"].as_u64()),
        (Some(17), Some(59))
    );
    let message = problem["message"].as_str().unwrap();
    assert!(
        message.starts_with("the train split has ")
            && message.ends_with(
                "tokens, too few for windows of `model.seq_len` 100000 plus one target (stage `m`)"
            ),
        "{message}"
    );
    let checks = &files[0]["data_checks"];
    assert_eq!(checks[0]["stage"], "tok");
    assert_eq!(checks[0]["ran"], true);
    assert_eq!(
        (checks[1]["stage"].as_str(), checks[1]["problems"].as_u64()),
        (Some("m"), Some(2))
    );
    // `plan` says so too, and `run` stops before any stage starts.
    let plan = p.smelt(&["plan", "p.yaml"]);
    assert_eq!(plan.code, 1);
    assert_has(&plan.stderr, "[p.yaml:17:59]");
    let run = p.smelt(&["run", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stderr, "too few for windows of `model.seq_len` 100000");
    assert_has(&run.stderr, "nothing was run");
    // A context that fits passes.
    p.write("p.yaml", &data_pipeline(16));
    let fits = p.smelt(&["validate", "--data", "p.yaml"]).ok();
    assert_has(
        &fits.stdout,
        "✓ m: `model.seq_len` fits in the train and validation token streams",
    );
}

#[test]
fn data_checks_also_run_when_their_stage_starts() {
    // Nothing is built when the run starts: the check runs when `m` does, and stops it.
    let p = Project::new(&data_pipeline(100_000));
    let run = p.smelt(&["run", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stdout, "too few for windows of `model.seq_len` 100000");
    assert_has(&run.stdout, "2 ran");
}

#[test]
fn the_other_stage_kinds_refuse_bad_params_at_their_values() {
    let yaml = [
        HEAD,
        "stages:\n",
        "  c:\n",
        "    uses: collect\n",
        "    with:\n",
        "      sources:\n",
        "        - synthetic: { generator: stories, documents: 5, tasks: [repeat] }\n",
        "        - url: { href: \"http://x/a.txt\", sha256: abc }\n",
        "  c2:\n",
        "    uses: collect\n",
        "    with: { sources: [], split: { validation: 1.5 } }\n",
        "  k:\n",
        "    uses: clean\n",
        "    inputs: { corpus: c }\n",
        "    with:\n",
        "      filters:\n",
        "        - regex: { pattern: \"(\" }\n",
        "        - language: { languages: [english] }\n",
        "  k2:\n",
        "    uses: clean\n",
        "    inputs: { corpus: c }\n",
        "    with:\n",
        "      dedup: { minhash: { treshold: 0.5, permutations: 0 } }\n",
        "  t:\n",
        "    uses: tokenize\n",
        "    inputs: { corpus: k }\n",
        "    with: { train: {}, from: tok.json }\n",
        "  e:\n",
        "    uses: evaluate\n",
        "    inputs: { models: [c] }\n",
        "    with:\n",
        "      metrics: [ { exact_match: { pattern: \"[\" } } ]\n",
        "  e2:\n",
        "    uses: evaluate\n",
        "    inputs: { models: [c] }\n",
        "    with: { metrics: [] }\n",
    ]
    .concat();
    let found: Vec<_> = problems(&yaml)
        .into_iter()
        .map(|p| (p.0, p.1, p.2, p.3))
        .collect();
    let expected = [
        ("smelt::invalid-param", 8, 65, "`tasks`: the stories generator asks no questions (only chat, preferences and qa take `tasks`) (stage `c`)"),
        ("smelt::invalid-param", 9, 50, "`sha256` must be 64 hex digits, not `abc` (stage `c`)"),
        ("smelt::invalid-value", 12, 22, "`with.sources` of stage `c2` must list at least 1; found none"),
        ("smelt::invalid-value", 12, 47, "`with.split.validation` of stage `c2` must be below 1; found 1.5"),
        ("smelt::invalid-param", 18, 29, "regex filter: `(` is not a valid regex (unclosed group) (stage `k`)"),
        ("smelt::invalid-param", 19, 34, "unknown language code `english` (use ISO 639-3, e.g. eng) (stage `k`)"),
        ("smelt::unknown-param", 24, 27, "unknown key `treshold` in `with.dedup.minhash` of `clean` stage `k2` (did you mean `threshold`?)"),
        ("smelt::invalid-value", 24, 56, "`with.dedup.minhash.permutations` of stage `k2` must be at least 1; found 0"),
        ("smelt::invalid-param", 28, 30, "give either `train` or `from`, not both (stage `t`)"),
        ("smelt::invalid-param", 33, 44, "`exact_match.pattern`: `[` is not a valid regex (unclosed character class) (stage `e`)"),
        ("smelt::invalid-value", 37, 22, "`with.metrics` of stage `e2` must list at least 1; found none"),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(c, l, col, m)| (c.to_string(), *l, *col, m.to_string()))
        .collect();
    assert_eq!(found, expected);
}

#[test]
fn params_that_do_not_go_together_are_reported_with_the_values_out_of_range() {
    // Out of range (`dropout`), unknown (`bias_`) and not divisible (`d_model` by `heads`),
    // `min_lr` above `lr` and a warmup longer than the run: all in one pass.
    let found: Vec<_> = problems(&pretrain(
        "{ layers: 2, heads: 3, d_model: 16, seq_len: 8, dropout: 1.5, bias_: true }",
        "{ steps: 10, warmup: 20, lr: 0.001, min_lr: 0.01 }",
        "{}",
    ))
    .into_iter()
    .map(|p| (p.0, p.1, p.2))
    .collect();
    let expected = [
        ("smelt::invalid-param", 11, 46),
        ("smelt::invalid-value", 11, 71),
        ("smelt::unknown-param", 11, 76),
        ("smelt::invalid-param", 12, 35),
        ("smelt::invalid-param", 12, 58),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(c, l, col)| (c.to_string(), *l, *col))
        .collect();
    assert_eq!(found, expected);
    // A check on a value already refused is not reported twice: `heads: 0` is out of range,
    // so `d_model` is not also said to be indivisible by it.
    let (code, line, col, _, _) = one(&pretrain(
        "{ layers: 2, heads: 0, d_model: 16, seq_len: 8 }",
        TRAIN,
        "{}",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-value", 11, 34));
}

/// A corpus `c` and a tokenize stage `t` with `with` written on line 10.
fn tokenize(with: &str) -> String {
    format!(
        "{HEAD}stages:\n  c:\n    uses: collect\n    with:\n      sources: [ {{ synthetic: {{ generator: stories, documents: 20 }} }} ]\n  t:\n    uses: tokenize\n    inputs: {{ corpus: c }}\n    with: {with}\n"
    )
}

#[test]
fn an_eos_token_the_vocabulary_would_not_have() {
    let (code, line, col, msg, help) = one(&tokenize(
        "{ train: { model: bpe, special_tokens: [\"<s>\"] } }",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 11, 50));
    assert_eq!(
        msg,
        "`eos_token` `<|endoftext|>` is not one of `train.special_tokens`, so the trained \
         vocabulary would not have it (stage `t`)"
    );
    assert_eq!(
        help,
        "add it to `train.special_tokens`, or name one of those"
    );
    // Named among them, it is fine; so is one character of a `char` vocabulary.
    let p = Project::new(&tokenize(
        "{ train: { model: bpe, special_tokens: [\"<s>\"] }, eos_token: \"<s>\" }",
    ));
    p.smelt(&["validate", "p.yaml"]).ok();
    let p = Project::new(&tokenize(
        "{ train: { model: char, special_tokens: [] }, eos_token: \"\\n\" }",
    ));
    p.smelt(&["validate", "p.yaml"]).ok();
}

#[test]
fn a_tokenizer_file_is_checked_by_validate() {
    let p = Project::new(&tokenize("{ from: tok.json, eos_token: \"</s>\" }"));
    // Not there: validate leaves it to the plan, which blocks the stage.
    p.smelt(&["validate", "p.yaml"]).ok();
    // Not a tokenizer.json: refused at `from`, before anything runs.
    p.write("tok.json", "{ \"version\": ");
    let (code, line, col, msg, _) = problems_of(&p).remove(0);
    assert_eq!((code.as_str(), line, col), ("smelt::file-check", 11, 19));
    assert_has(&msg, "tok.json: not a tokenizer.json `tokenizers` can load");
    // A tokenizer without the end-of-text token: refused at `eos_token`, naming its specials.
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{ "id": 0, "content": "<unk>", "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true }],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": { "<unk>": 0, "a": 1 }, "unk_token": "<unk>" }
    });
    p.write("tok.json", &tokenizer.to_string());
    let (code, line, col, msg, help) = problems_of(&p).remove(0);
    assert_eq!((code.as_str(), line, col), ("smelt::file-check", 11, 40));
    assert_eq!(
        msg,
        "the tokenizer has no `</s>` token to end documents with (stage `t`)"
    );
    assert_eq!(
        help,
        "set `eos_token` to one of its special tokens: `<unk>`"
    );
    let run = p.smelt(&["run", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stderr, "nothing was run");
}

#[test]
fn question_files_are_checked_by_validate() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  m:\n    uses: command\n    with: {{ run: x }}\n  e:\n    uses: evaluate\n    inputs: {{ models: [m] }}\n    with:\n      metrics:\n        - multiple_choice: {{ file: mc.jsonl }}\n        - bleu: {{ file: refs.jsonl }}\n"
    ));
    p.write(
        "mc.jsonl",
        "{\"question\": \"2+2\", \"choices\": [\"4\", \"5\"], \"answer\": 0}\n\n{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 2}\n",
    );
    p.write("refs.jsonl", "{\"prompt\": \"hi\"}\n");
    let found: Vec<_> = problems_of(&p)
        .into_iter()
        .map(|p| (p.0, p.1, p.2, p.3))
        .collect();
    let expected = [
        (
            "smelt::file-check",
            12,
            36,
            "mc.jsonl:3: `answer` must be the index of a choice (stage `e`)",
        ),
        (
            "smelt::file-check",
            13,
            25,
            "refs.jsonl:1: needs `prompt` and `reference` strings (stage `e`)",
        ),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(c, l, col, m)| (c.to_string(), *l, *col, m.to_string()))
        .collect();
    assert_eq!(found, expected);
    p.write("refs.jsonl", "\n");
    p.write(
        "mc.jsonl",
        "{\"question\": \"2+2\", \"choices\": [\"4\", \"5\"], \"answer\": 1}\n",
    );
    let found = problems_of(&p);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].3, "refs.jsonl: no questions (stage `e`)");
}

#[test]
fn a_base_model_config_is_checked_by_validate() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  d:\n    uses: command\n    with: {{ run: x }}\n  sft:\n    uses: finetune\n    inputs: {{ data: d }}\n    with:\n      base: models/m\n      train: {{ steps: 20, warmup: 2 }}\n"
    ));
    p.write("models/m/config.json", "{\"model_type\": \"bert\"}");
    let (code, line, col, msg, _) = problems_of(&p).remove(0);
    assert_eq!((code.as_str(), line, col), ("smelt::file-check", 11, 13));
    assert_has(&msg, "models/m/config.json: `model_type` is \"bert\"");
}

#[test]
fn vocabularies_below_the_corpus_alphabet_are_refused_before_they_train() {
    for model in ["bpe", "wordpiece", "unigram"] {
        let p = Project::new(&tokenize(&format!(
            "{{ train: {{ model: {model}, vocab_size: 12 }} }}"
        )));
        p.smelt(&["run", "p.yaml", "--until", "c"]).ok();
        let (code, line, col, msg, _) = problems_of_data(&p).remove(0);
        let col_of_size = 43 + model.len() as u64;
        assert_eq!(
            (code.as_str(), line, col),
            ("smelt::data-check", 11, col_of_size)
        );
        assert_has(
            &msg,
            "`train.vocab_size` 12 is below what the corpus needs: its ",
        );
        // The run refuses it before the stage starts, and the stage itself agrees.
        let run = p.smelt(&["run", "p.yaml"]);
        assert_eq!(run.code, 1, "{model}");
        assert_has(&run.stderr, "nothing was run");
    }
}

#[test]
fn a_missing_split_points_at_the_input() {
    // No validation split: the pretrain's check points at `tokens: tok`, the input at fault.
    let yaml = data_pipeline(16).replace("      split: { validation: 0.2 }\n", "");
    let p = Project::new(&yaml);
    p.smelt(&["run", "p.yaml", "--until", "tok"]).ok();
    let (code, line, col, msg, _) = problems_of_data(&p).remove(0);
    assert_eq!((code.as_str(), line, col), ("smelt::data-check", 14, 23));
    assert_has(&msg, "the tokens input has no validation documents");
}

#[test]
fn llama_params_are_checked_for_their_architecture() {
    let found: Vec<_> = problems(&pretrain(
        "{ architecture: llama, layers: 2, heads: 4, kv_heads: 3, d_model: 24, seq_len: 8, dropout: 0.1 }",
        TRAIN,
        "{}",
    ))
    .into_iter()
    .map(|p| (p.1, p.2, p.3))
    .collect();
    let expected = [
        (
            11,
            68,
            "`kv_heads` (3) must divide `heads` (4): each serves as many query heads (stage `m`)",
        ),
        (
            11,
            105,
            "the Llama architecture has no dropout: leave `dropout` out (stage `m`)",
        ),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(l, c, m)| (*l, *c, m.to_string()))
        .collect();
    assert_eq!(found, expected);
    let (code, line, col, msg, help) = one(&pretrain(
        "{ layers: 2, heads: 4, kv_heads: 2, d_model: 24, seq_len: 8 }",
        TRAIN,
        "{}",
    ));
    assert_eq!((code.as_str(), line, col), ("smelt::invalid-param", 11, 47));
    assert_eq!(
        msg,
        "`kv_heads` is a Llama param: a GPT-2 has none (stage `m`)"
    );
    assert_eq!(help, "add `architecture: llama`, or leave it out");
}

#[test]
fn adapters_a_base_model_does_not_have_are_refused_by_validate() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  d:\n    uses: command\n    with: {{ run: x }}\n  sft:\n    uses: finetune\n    inputs: {{ data: d }}\n    with:\n      base: models/m\n      lora: {{ targets: [attn.c_attn] }}\n      train: {{ steps: 20, warmup: 2 }}\n"
    ));
    let config = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-gqa-tied/config.json"),
    )
    .unwrap();
    p.write("models/m/config.json", &config);
    let (code, line, col, msg, _) = problems_of(&p).remove(0);
    assert_eq!((code.as_str(), line, col), ("smelt::file-check", 12, 24));
    assert_eq!(
        msg,
        "the base is a Llama-family model, which has no `attn.c_attn` layers to adapt: its \
         targets are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (stage `sft`)"
    );
    // Its own projections are fine.
    p.edit("targets: [attn.c_attn]", "targets: [q_proj, down_proj]");
    p.smelt(&["validate", "p.yaml"]).ok();
}

#[test]
fn a_base_in_the_hugging_face_cache_is_found_or_said_missing() {
    let p = Project::new(&format!(
        "{HEAD}stages:\n  d:\n    uses: command\n    with: {{ run: x }}\n  sft:\n    uses: finetune\n    inputs: {{ data: d }}\n    with:\n      base: hf://smelt-test/tiny-llama\n      lora: {{ targets: [attn.c_attn] }}\n      train: {{ steps: 20, warmup: 2 }}\n"
    ));
    let validate = |home: &Path| first_problem_with_hf_home(&p, home);
    let home = p.path("hf");
    let message = validate(&home);
    assert!(
        message.contains("`hf://smelt-test/tiny-llama` is not in the Hugging Face cache"),
        "{message}"
    );
    assert!(
        message.contains("`hf download smelt-test/tiny-llama`"),
        "{message}"
    );
    // Downloaded (laid out as the hub client does): its config is read from the snapshot.
    let repo = home.join("hub/models--smelt-test--tiny-llama");
    let snapshot = repo.join("snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(
        repo.join("refs/main"),
        "0123456789abcdef0123456789abcdef01234567",
    )
    .unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-gqa-tied");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), snapshot.join(file)).unwrap();
    }
    let message = validate(&home);
    assert!(
        message.contains("the base is a Llama-family model, which has no `attn.c_attn`"),
        "{message}"
    );
}

#[test]
fn a_tokenizer_from_the_hugging_face_cache_is_found_or_said_missing() {
    let p = Project::new(&tokenize(
        "{ from: \"hf://smelt-test/tiny\", eos_token: \"</s>\" }",
    ));
    let home = p.path("hf");
    let validate = || first_problem_with_hf_home(&p, &home);
    assert!(validate().contains("`hf://smelt-test/tiny` is not in the Hugging Face cache"));
    // In the cache: its tokenizer.json is read (and found to lack the eos token).
    let snapshot = home.join("hub/models--smelt-test--tiny/snapshots/abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(home.join("hub/models--smelt-test--tiny/refs")).unwrap();
    std::fs::write(home.join("hub/models--smelt-test--tiny/refs/main"), "abc").unwrap();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": { "<unk>": 0, "a": 1 }, "unk_token": "<unk>" }
    });
    std::fs::write(snapshot.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let message = validate();
    assert!(
        message.contains("the tokenizer has no `</s>` token"),
        "{message}"
    );
}

/// The first problem `validate` reports with the Hugging Face cache under `home`.
fn first_problem_with_hf_home(p: &Project, home: &Path) -> String {
    let out = p
        .command(&["validate", "--format", "json", "p.yaml"])
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let files: Value = serde_json::from_slice(&out.stdout).unwrap();
    files[0]["problems"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
