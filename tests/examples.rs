//! The example pipelines in `pipelines/` validate, match the published schema, and run.

mod common;

use std::path::Path;

use common::{assert_has, Run};

fn examples() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

fn smelt(args: &[&str], dir: &Path) -> Run {
    std::process::Command::new(common::smelt_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("SMELT_STORE")
        .output()
        .unwrap()
        .into()
}

/// A temporary copy of an example pipeline and its data; also returns the `pipelines/` folder.
fn example_copy(pipeline: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    std::fs::create_dir_all(work.path().join("data")).unwrap();
    std::fs::copy(source.join(pipeline), work.path().join(pipeline)).unwrap();
    std::fs::copy(
        source.join("data/sample.txt"),
        work.path().join("data/sample.txt"),
    )
    .unwrap();
    (work, source)
}

/// The artifact directory of a stage, via `smelt show --path`.
fn artifact_dir(pipeline: &str, stage: &str, dir: &Path) -> std::path::PathBuf {
    std::path::PathBuf::from(
        smelt(&["show", pipeline, stage, "--path"], dir)
            .ok()
            .stdout
            .trim(),
    )
}

#[test]
fn the_committed_schema_is_what_smelt_schema_prints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let printed = smelt(&["schema"], root).ok().stdout;
    let committed = std::fs::read_to_string(root.join("schemas/pipeline.schema.json")).unwrap();
    assert!(
        printed == committed,
        "schemas/pipeline.schema.json is stale: run `cargo run -- schema > schemas/pipeline.schema.json`"
    );
}

#[test]
fn examples_start_with_the_schema_line_and_validate() {
    for file in examples() {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../schemas/pipeline.schema.json\n"),
            "{} lacks the schema line",
            file.display()
        );
        smelt(&["validate", file.to_str().unwrap()], Path::new(".")).ok();
    }
}

#[test]
fn examples_satisfy_the_published_schema_as_an_editor_sees_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("schemas/pipeline.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for file in examples() {
        let yaml: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&yaml)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
    }
    // And the schema does catch a mistake.
    let bad: serde_json::Value = serde_yaml::from_str(
        "smelt: 1\nstages:\n  a: { uses: command, with: { run: x, dpes: [] } }\n",
    )
    .unwrap();
    assert!(!validator.is_valid(&bad));
}

#[test]
fn wordcount_runs_and_reruns_only_what_a_var_touches() {
    let (work, source) = example_copy("wordcount.yaml");
    let run = smelt(&["run", "wordcount.yaml"], work.path()).ok();
    assert_has(&run.stdout, "3 ran");
    let dir = artifact_dir("wordcount.yaml", "counts", work.path());
    let top = std::fs::read_to_string(dir.as_path().join("top.txt")).unwrap();
    let first = top
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>();
    let text = std::fs::read_to_string(source.join("data/sample.txt")).unwrap();
    let the = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| w.eq_ignore_ascii_case("the"))
        .count();
    assert_eq!(first, [the.to_string().as_str(), "the"]);
    assert_eq!(top.lines().count(), 10);
    let run = smelt(
        &["run", "wordcount.yaml", "--set", "vars.top=3"],
        work.path(),
    )
    .ok();
    assert_has(&run.stdout, "1 ran, 2 cached");
}

#[test]
fn corpus_collects_offline_and_reruns_nothing_the_second_time() {
    let (work, source) = example_copy("corpus.yaml");
    let run = smelt(&["run", "corpus.yaml"], work.path()).ok();
    assert_has(&run.stdout, "6 ran");
    let dir = artifact_dir("corpus.yaml", "corpus", work.path());
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.as_path().join("manifest.json")).unwrap(),
    )
    .unwrap();
    let lines = std::fs::read_to_string(source.join("data/sample.txt"))
        .unwrap()
        .lines()
        .count() as u64;
    let total = manifest["train"]["documents"].as_u64().unwrap()
        + manifest["validation"]["documents"].as_u64().unwrap();
    assert_eq!(total, 4000 + lines);
    let dir = artifact_dir("corpus.yaml", "cleaned", work.path());
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.as_path().join("stats.json")).unwrap())
            .unwrap();
    assert_eq!(stats["documents_in"].as_u64().unwrap(), total);
    assert!(
        stats["exact_duplicates"].as_u64().unwrap() > 0,
        "arithmetic repeats itself: {stats:#}"
    );
    let tokens = artifact_dir("corpus.yaml", "tokens", work.path());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tokens.join("meta.json")).unwrap()).unwrap();
    // The stories' grammar is small: BPE runs out of pairs to merge before 1024 tokens.
    let vocab = meta["vocab_size"].as_u64().unwrap();
    assert!((300..=1024).contains(&vocab), "{vocab}");
    assert_eq!(meta["stats"]["documents"], stats["documents_out"]);
    let chat_tokens = artifact_dir("corpus.yaml", "chat_tokens", work.path());
    let chat_meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chat_tokens.join("meta.json")).unwrap())
            .unwrap();
    assert_eq!(chat_meta["tokenizer_hash"], meta["tokenizer_hash"]);
    assert_eq!(chat_meta["stats"]["conversations"], 500);
    assert_eq!(chat_meta["stats"]["preference_pairs"], 500);
    let run = smelt(&["run", "corpus.yaml"], work.path()).ok();
    assert_has(&run.stdout, "0 ran, 6 cached");
    // A new seed changes the generated corpus and its vocabulary, not the chat data.
    let run = smelt(&["run", "corpus.yaml", "--set", "vars.seed=8"], work.path()).ok();
    assert_has(&run.stdout, "5 ran");
}

/// The shakespeare-char example, shortened, on ../shared's text: it trains, a run killed after a
/// checkpoint resumes to the same weights as an uninterrupted one, and `smelt generate` samples
/// from it.
#[test]
fn shakespeare_char_resumes_after_a_kill_and_generates() {
    let (_keep, text) = shakespeare_text();
    let sets = [
        format!("vars.text={}", text.display()),
        "vars.steps=60".to_string(),
        // Shortened runs warm up for less than the whole run (`warmup` ≤ `steps`).
        "stages.model.with.train.warmup=10".to_string(),
        "stages.model.with.train.checkpoint_every=10".to_string(),
        "stages.model.with.eval.every=30".to_string(),
        "stages.model.with.model.layers=2".to_string(),
    ];
    let args = |command: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        for set in &sets {
            args.extend(["--set".to_string(), set.clone()]);
        }
        args
    };
    let run = |dir: &Path, command: &[&str]| {
        let args = args(command);
        smelt(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir)
    };
    // Uninterrupted.
    let (whole, _) = example_copy("shakespeare-char.yaml");
    run(whole.path(), &["run", "shakespeare-char.yaml"]).ok();
    // Killed once the first checkpoint exists, then rerun.
    let (killed, _) = example_copy("shakespeare-char.yaml");
    let mut child = std::process::Command::new(common::smelt_bin())
        .args(args(&["run", "shakespeare-char.yaml"]))
        .current_dir(killed.path())
        .env_remove("SMELT_STORE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let work = killed.path().join(".smelt/work");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let checkpointed = || {
        std::fs::read_dir(&work)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("checkpoint.safetensors").exists())
    };
    while !checkpointed() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let rerun = run(killed.path(), &["run", "shakespeare-char.yaml"]).ok();
    assert_has(&rerun.stdout, "ran   model");
    let show = run(killed.path(), &["show", "shakespeare-char.yaml", "model"]).ok();
    assert!(
        !show.stdout.contains("resumed_from_step: 0"),
        "{}",
        show.stdout
    );
    let weights = |dir: &Path| {
        let path = run(dir, &["show", "shakespeare-char.yaml", "model", "--path"])
            .ok()
            .stdout;
        std::fs::read(Path::new(path.trim()).join("model.safetensors")).unwrap()
    };
    assert_eq!(
        weights(whole.path()),
        weights(killed.path()),
        "resumed to the same weights"
    );
    // It learnt something: well below the uniform loss, ln(~68) ≈ 4.2.
    assert_has(&show.stdout, "val_loss: ");
    let val: f64 = show
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("val_loss: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(val < 3.4, "val_loss {val}");
    let generate = |seed: &str| {
        run(
            killed.path(),
            &[
                "generate",
                "--pipeline",
                "shakespeare-char.yaml",
                "--stage",
                "model",
                "--prompt",
                "ROMEO:",
                "--max-tokens",
                "30",
                "--seed",
                seed,
            ],
        )
        .ok()
        .stdout
    };
    let eval = run(
        killed.path(),
        &["show", "shakespeare-char.yaml", "eval", "--path"],
    )
    .ok()
    .stdout;
    let report = std::fs::read_to_string(Path::new(eval.trim()).join("report.md")).unwrap();
    assert_has(&report, "| bits_per_byte |");
    let report = run(killed.path(), &["report", "shakespeare-char.yaml"])
        .ok()
        .stdout;
    assert_has(&report, "| model | pretrain | ran |");
    let html = std::fs::read_to_string(killed.path().join("shakespeare-char.report.html")).unwrap();
    assert!(html.contains("model — training") && html.contains("eval — evaluation"));
    let sample = generate("1");
    assert!(
        sample.trim_end_matches('\n').chars().count() > 5,
        "{sample:?}"
    );
    assert_eq!(sample, generate("1"), "the same seed, the same text");
}

/// The Llama example, shortened: a Llama pretrained, fine-tuned with QLoRA on every projection,
/// aligned with LoRA DPO and evaluated; its model directories say what transformers loads them
/// as, its adapters what peft needs.
#[test]
fn the_llama_example_writes_llama_checkpoints_and_peft_adapters() {
    let (work, _) = example_copy("llama.yaml");
    let sets = tiny("llama.yaml", Path::new(""));
    let mut args: Vec<&str> = vec!["run", "llama.yaml"];
    args.extend(sets.iter().map(String::as_str));
    assert_has(&smelt(&args, work.path()).ok().stdout, "6 ran");
    let artifact = |stage: &str| {
        let mut args: Vec<&str> = vec!["show", "llama.yaml", stage, "--path"];
        args.extend(sets.iter().map(String::as_str));
        std::path::PathBuf::from(smelt(&args, work.path()).ok().stdout.trim())
    };
    let json = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    for stage in ["base", "sft", "aligned"] {
        let config = json(artifact(stage).join("config.json"));
        assert_eq!(config["architectures"][0], "LlamaForCausalLM", "{stage}");
        assert_eq!(
            (
                config["num_attention_heads"].as_u64(),
                config["num_key_value_heads"].as_u64()
            ),
            (Some(4), Some(2)),
            "{stage}"
        );
    }
    let adapter = json(artifact("sft").join("adapter/adapter_config.json"));
    assert_eq!(
        adapter["target_modules"],
        serde_json::json!([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ])
    );
    assert_eq!(adapter["fan_in_fan_out"], false);
    let dpo_adapter = json(artifact("aligned").join("adapter/adapter_config.json"));
    assert_eq!(
        dpo_adapter["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"]),
        "the Llama default targets"
    );
    let report = json(artifact("eval").join("metrics.json"));
    assert_eq!(report["models"].as_array().unwrap().len(), 3);
    // Exported as GGUF (as llama.cpp runs it), the model generates what it did as a directory.
    let generate = |model: &Path| {
        let args = [
            "generate",
            model.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
        ];
        let args = [&args[..], &["--temperature", "0", "--max-tokens", "12"]].concat();
        smelt(&args, work.path()).ok().stdout
    };
    let base = artifact("base");
    let expected = generate(&base);
    for kind in ["f16", "q8_0"] {
        let file = work.path().join(format!("base-{kind}.gguf"));
        let args = [
            "export",
            base.to_str().unwrap(),
            "--gguf",
            file.to_str().unwrap(),
        ];
        smelt(&[&args[..], &["--type", kind]].concat(), work.path()).ok();
        assert_eq!(generate(&file), expected, "{kind}");
    }
}

/// The finetune-lora example, shortened: pretrain → LoRA SFT → LoRA DPO → evaluate, with a
/// PEFT adapter and a merged model from each fine-tune; a change to DPO's beta reruns DPO and
/// the evaluation only.
#[test]
fn finetune_lora_runs_sft_then_dpo_and_compares_the_models() {
    let (work, _) = example_copy("finetune-lora.yaml");
    let small = [
        "--set",
        "vars.examples=300",
        "--set",
        "vars.pretrain_steps=30",
        "--set",
        "stages.base.with.train.warmup=10",
        "--set",
        "vars.sft_steps=20",
        "--set",
        "vars.dpo_steps=10",
    ];
    let mut args = vec!["run", "finetune-lora.yaml"];
    args.extend(small);
    let run = smelt(&args, work.path()).ok();
    assert_has(&run.stdout, "6 ran");
    let artifact = |stage: &str| {
        let mut args = vec!["show", "finetune-lora.yaml", stage, "--path"];
        args.extend(small);
        std::path::PathBuf::from(smelt(&args, work.path()).ok().stdout.trim())
    };
    for stage in ["sft", "aligned"] {
        let dir = artifact(stage);
        for file in [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "metrics.jsonl",
        ] {
            assert!(dir.join(file).exists(), "{stage}: {file}");
        }
    }
    let aligned = artifact("aligned");
    let log = std::fs::read_to_string(aligned.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(last["val_rewards/accuracy"].is_number(), "{last}");
    let eval = artifact("eval");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(report["models"].as_array().unwrap().len(), 3);
    let mut args = vec![
        "run",
        "finetune-lora.yaml",
        "--set",
        "stages.aligned.with.beta=0.2",
    ];
    args.extend(small);
    let rerun = smelt(&args, work.path()).ok();
    assert_has(&rerun.stdout, "2 ran, 4 cached");
}

/// The example that fine-tunes a real 135M-parameter model: four runs of it would take most of
/// CI's time. tests/models.rs runs its stages on SmolLM2 at small sizes, and whole (ignored:
/// `cargo test --release --test models -- --ignored`).
const REAL_MODEL: &str = "smollm2-lora.yaml";

/// Small sizes of each example, so that all of them run in a test.
fn tiny(example: &str, text: &Path) -> Vec<String> {
    let sets: &[&str] = match example {
        "quickstart.yaml" => &[
            "vars.examples=300",
            "vars.pretrain_steps=40",
            "vars.sft_steps=20",
            "vars.dpo_steps=10",
        ],
        "finetune-lora.yaml" | "llama.yaml" => &[
            "vars.examples=300",
            "vars.pretrain_steps=40",
            "vars.sft_steps=20",
            "vars.dpo_steps=10",
        ],
        "shakespeare-char.yaml" => &[
            "vars.steps=20",
            "stages.model.with.model.layers=1",
            "stages.model.with.train.warmup=10",
            "stages.model.with.eval.every=10",
        ],
        "corpus.yaml" | "wordcount.yaml" => &[],
        other => panic!("{other}: give the new example small sizes here"),
    };
    let mut args: Vec<String> = sets
        .iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect();
    if example == "shakespeare-char.yaml" {
        args.extend(["--set".into(), format!("vars.text={}", text.display())]);
    }
    args
}

/// The artifact id of every stage, from the lockfile a run wrote.
fn artifact_ids(lockfile: &Path) -> std::collections::BTreeMap<String, String> {
    let lock: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(lockfile).unwrap()).unwrap();
    lock["stages"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(stage, entry)| {
            (
                stage.as_str().unwrap().to_string(),
                entry["artifact"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A text for the shakespeare example: ../shared's where it is beside the checkout (as in
/// CI), else the examples' sample repeated (kept alive by the returned directory).
fn shakespeare_text() -> (tempfile::TempDir, std::path::PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fallback = tempfile::tempdir().unwrap();
    let text = root
        .join("../shared/data/tinyshakespeare.txt")
        .canonicalize()
        .unwrap_or_else(|_| {
            let sample = std::fs::read_to_string(root.join("pipelines/data/sample.txt")).unwrap();
            let path = fallback.path().join("text.txt");
            std::fs::write(&path, sample.repeat(300)).unwrap();
            path
        });
    (fallback, text)
}

/// An artifact is a function of its stage key: every example, run in two fresh stores at two
/// paths of different depth, one on 1 thread and one on 2, gives the same id for every stage.
#[test]
fn every_example_gives_the_same_ids_in_two_stores_at_two_paths_on_1_and_2_threads() {
    let (_keep, text) = shakespeare_text();
    for file in examples() {
        let example = file.file_name().unwrap().to_str().unwrap().to_string();
        if example == REAL_MODEL {
            continue;
        }
        let sets = tiny(&example, &text);
        let ids = |depth: &str, threads: &str| {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join(depth);
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
            std::fs::create_dir_all(dir.join("data")).unwrap();
            std::fs::copy(source.join(&example), dir.join(&example)).unwrap();
            std::fs::copy(source.join("data/sample.txt"), dir.join("data/sample.txt")).unwrap();
            let mut args = vec!["run".to_string(), example.clone()];
            args.extend(sets.iter().cloned());
            let run: Run = std::process::Command::new(common::smelt_bin())
                .args(&args)
                .current_dir(&dir)
                .env_remove("SMELT_STORE")
                .env("RAYON_NUM_THREADS", threads)
                .output()
                .unwrap()
                .into();
            run.ok();
            artifact_ids(&dir.join(example.replace(".yaml", ".lock")))
        };
        let two = ids("a", "2");
        let one = ids("b/c/d", "1");
        assert!(!two.is_empty());
        assert_eq!(
            two, one,
            "{example}: ids differ between stores, paths or threads"
        );
    }
}

/// A stage forced to rerun with nothing changed rebuilds the same artifact, so nothing
/// downstream reruns (early cutoff), and nothing is warned about.
#[test]
fn forcing_tokens_or_base_to_rerun_cuts_off_everything_downstream() {
    let (work, _) = example_copy("quickstart.yaml");
    let sets = tiny("quickstart.yaml", Path::new(""));
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = vec!["run", "quickstart.yaml"];
        args.extend(sets.iter().map(String::as_str));
        args.extend(extra);
        smelt(&args, work.path()).ok().stdout
    };
    assert_has(&run(&[]), "7 ran");
    for (stage, downstream) in [
        ("tokens", &["base", "sft", "aligned", "eval"][..]),
        ("base", &["sft", "aligned", "eval"][..]),
    ] {
        let out = run(&["--force", stage]);
        assert_has(&out, "summary: 1 ran, 6 cached");
        for after in downstream {
            assert_has(&out, &format!("cached  {after}"));
        }
        assert_has(&out, "(cut off: its inputs were rebuilt unchanged)");
        assert!(!out.contains("warning"), "{out}");
    }
}

const PARAMS_BEGIN: &str =
    "<!-- stage reference: generated by `smelt stages --markdown`; do not edit -->\n";
const PARAMS_END: &str = "<!-- end of stage reference -->\n";

#[test]
fn the_readme_stage_reference_is_what_smelt_stages_markdown_prints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let printed = smelt(&["stages", "--markdown"], root).ok().stdout;
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find(PARAMS_BEGIN)
        .expect("README has the begin marker")
        + PARAMS_BEGIN.len();
    let end = readme.find(PARAMS_END).expect("README has the end marker");
    assert!(
        readme[start..end] == printed,
        "the README's stage reference is stale: replace the text between its markers with \
         the output of `cargo run -- stages --markdown`"
    );
    // Every stage kind has its heading and every kind's params appear.
    for kind in [
        "collect", "clean", "tokenize", "pretrain", "finetune", "dpo", "evaluate", "command",
    ] {
        assert!(printed.contains(&format!("#### `{kind}`")), "{kind}");
    }
    assert!(printed.contains("| `lora.targets` | non-empty list of `attn.c_attn`"));
    assert!(printed.contains("| `train.lr` | number > 0 | `0.001` |"));
    assert!(printed.contains("| `model.dropout` | number in [0, 1) | `0` |"));
    assert!(printed.contains("| `sources` | non-empty list of `files`, `url`, `synthetic` |"));
}

#[test]
fn smelt_init_writes_a_starter_pipeline_that_validates_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = smelt(&["init", "demo"], dir.path()).ok().stdout;
    assert_has(&out, "wrote demo.yaml and smelt.schema.json");
    let text = std::fs::read_to_string(dir.path().join("demo.yaml")).unwrap();
    assert!(text.starts_with("# yaml-language-server: $schema=smelt.schema.json\n"));
    assert!(text.contains("name: demo\n"));
    let schema = std::fs::read_to_string(dir.path().join("smelt.schema.json")).unwrap();
    let printed = smelt(&["schema"], dir.path()).ok().stdout;
    assert_eq!(schema, printed);
    smelt(&["validate", "demo.yaml"], dir.path()).ok();
    // A second init does not overwrite what the user may have edited.
    let refused = smelt(&["init", "demo"], dir.path());
    assert_eq!(refused.code, 2);
    assert_has(&refused.stderr, "demo.yaml exists; pass --force");
    let bad = smelt(&["init", "../up"], dir.path());
    assert_eq!(bad.code, 2);
    // Shortened below its warmup, it is refused where the warmup is written.
    let short = smelt(
        &["validate", "demo.yaml", "--set", "vars.steps=20"],
        dir.path(),
    );
    assert_eq!(short.code, 1);
    assert_has(
        &short.stderr,
        "`train.warmup` (30) is longer than `train.steps` (20)",
    );
    // It runs (shortened) and says what it did.
    let shortened = [
        "--set",
        "vars.steps=20",
        "--set",
        "stages.model.with.train.warmup=5",
    ];
    let run = smelt(
        &[&["run", "demo.yaml"][..], &shortened].concat(),
        dir.path(),
    )
    .ok();
    assert_has(&run.stdout, "5 ran");
    let report = smelt(
        &[&["report", "demo.yaml"][..], &shortened].concat(),
        dir.path(),
    )
    .ok();
    assert_has(&report.stdout, "perplexity");
}

/// Issue-level quality on a tiny run: SFT answers more held-out questions exactly than the base
/// model, and DPO prefers the right answer of more held-out pairs than SFT. Measured over three
/// seeds when the recipe was chosen: exact match 0.00–0.07 → 0.22–0.32, preference accuracy
/// 0.45–0.65 → 0.67–0.80.
#[test]
fn sft_beats_the_base_model_and_dpo_beats_sft_on_held_out_data() {
    let work = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quality-tiny.yaml");
    std::fs::copy(fixture, work.path().join("quality.yaml")).unwrap();
    smelt(&["run", "quality.yaml"], work.path()).ok();
    let eval = artifact_dir("quality.yaml", "eval", work.path());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap()).unwrap();
    let value = |metric: &str, model: u64| -> f64 {
        report["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["metric"] == metric && r["model"] == model)
            .unwrap_or_else(|| panic!("no {metric} for model {model}"))["value"]
            .as_f64()
            .unwrap()
    };
    let (base, sft, dpo) = (0, 1, 2);
    let exact = |m| value("exact_match", m);
    let preferred = |m| value("preference_accuracy", m);
    assert!(
        exact(sft) >= exact(base) + 0.1,
        "exact match: base {} sft {}",
        exact(base),
        exact(sft)
    );
    assert!(
        preferred(dpo) >= preferred(sft) + 0.05,
        "preference accuracy: sft {} dpo {}",
        preferred(sft),
        preferred(dpo)
    );
    // The scores are backed by the graded answers, one line per model and question.
    let answers = std::fs::read_to_string(eval.join("answers.jsonl")).unwrap();
    let right = |m: u64| {
        answers
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|a| a["model"] == m && a["correct"] == true)
            .count()
    };
    assert!(right(sft) > right(base));
}

/// The quickstart, shortened: all seven stage kinds run, and a second run is fully cached and
/// fast. (Its full-size gains are the quality test's, measured in the README.)
#[test]
fn the_quickstart_runs_every_stage_kind_then_is_cached() {
    let (work, _) = example_copy("quickstart.yaml");
    let small = [
        "--set",
        "vars.examples=300",
        "--set",
        "vars.d_model=32",
        "--set",
        "vars.pretrain_steps=20",
        "--set",
        "vars.sft_steps=10",
        "--set",
        "vars.dpo_steps=5",
        // Shortened runs warm up for less than the whole run (`warmup` ≤ `steps`).
        "--set",
        "stages.base.with.train.warmup=5",
        "--set",
        "stages.sft.with.train.warmup=2",
        "--set",
        "stages.aligned.with.train.warmup=1",
    ];
    let with = |command: &str| {
        let mut args = vec![command, "quickstart.yaml"];
        args.extend(small);
        smelt(&args, work.path()).ok()
    };
    let first = with("run");
    assert_has(&first.stdout, "7 ran, 0 cached");
    let kinds: Vec<&str> = [
        "collect", "clean", "tokenize", "pretrain", "finetune", "dpo", "evaluate",
    ]
    .to_vec();
    let text = std::fs::read_to_string(work.path().join("quickstart.yaml")).unwrap();
    for kind in kinds {
        assert!(text.contains(&format!("uses: {kind}\n")), "{kind}");
    }
    let started = std::time::Instant::now();
    let second = with("run");
    assert_has(&second.stdout, "0 ran, 7 cached");
    assert!(
        started.elapsed().as_secs_f64() < 5.0,
        "a cached run took {:?}",
        started.elapsed()
    );
    let report = with("report");
    // The evaluation table names each model by the stage that built it, and so does the stage
    // table: no raw `metric.i` keys.
    assert_has(&report.stdout, "## eval — evaluation");
    assert_has(&report.stdout, "| metric | `base` | `sft` | `aligned` |");
    for metric in [
        "| perplexity |",
        "| exact_match |",
        "| preference_accuracy |",
    ] {
        assert_has(&report.stdout, metric);
    }
    assert!(
        !report.stdout.contains("exact_match.1"),
        "{}",
        report.stdout
    );
    // The measurements the artifacts no longer hold come from the run records.
    assert_has(
        &report.stdout,
        "| stage | steps | loss | validation loss | tokens/s | MFU | built on |",
    );
    for (stage, steps) in [("base", 20), ("sft", 10), ("aligned", 5)] {
        let row = report
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {stage} | {steps} | ")))
            .unwrap_or_else(|| panic!("no training row for {stage}:\n{}", report.stdout));
        assert!(row.contains("% | ") && row.contains(" threads) |"), "{row}");
    }
    let html = std::fs::read_to_string(work.path().join("quickstart.report.html")).unwrap();
    for stage in ["base", "sft", "aligned"] {
        assert_has(&html, &format!("<h2>{stage} — training</h2>"));
        assert_has(&html, &format!("<th>{stage}</th>"));
    }
    assert_has(&html, "validation loss");
    assert_has(&html, "tokens/s, MFU");
    assert!(
        !html.contains("model 0 ("),
        "the page names models by stage"
    );
}
