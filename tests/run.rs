//! End-to-end: `smelt run` on pipelines of `command` stages, counting what really executed.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assert_has, logging_stage, Project};

/// a → b, a → c, (b, c) → d; b's text comes from `vars.b`.
fn diamond() -> Project {
    let mut yaml = String::from("smelt: 1\nname: diamond\nvars: { b: B }\nstages:\n");
    yaml += &logging_stage("a", "", "A");
    yaml += &logging_stage("b", "in: [a]", "${vars.b}");
    yaml += &logging_stage("c", "in: [a]", "C");
    yaml += &logging_stage("d", "in: [b, c]", "D");
    Project::new(&yaml)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn first_run_runs_everything_and_second_run_nothing() {
    let p = diamond();
    let run = p.smelt(&["run", "p.yaml"]).ok();
    assert_has(&run.stdout, "summary: 4 ran, 0 cached");
    assert_eq!(sorted(p.executed()), ["a", "b", "c", "d"]);
    assert_eq!(
        std::fs::read_to_string(p.artifact("d").join("out")).unwrap(),
        "D\nB\nA\nC\nA\n"
    );
    let run = p.smelt(&["run", "p.yaml"]).ok();
    assert_has(&run.stdout, "summary: 0 ran, 4 cached");
    assert!(p.executed().is_empty());
    assert!(p.path("p.lock").exists());
}

#[test]
fn param_change_reruns_that_stage_and_its_descendants() {
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.executed();
    p.edit("vars: { b: B }", "vars: { b: B2 }");
    let plan = p.smelt(&["plan", "p.yaml"]).ok();
    assert_has(&plan.stdout, "params: run");
    assert_has(&plan.stdout, "input in will be rebuilt (stage b)");
    p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(p.executed(), ["b", "d"]);
}

#[test]
fn unchanged_output_stops_the_rerun_early() {
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.executed();
    // A different command producing the same bytes: `a` reruns, b, c and d are cut off.
    p.edit("echo a >> log;", "echo a >> log; true;");
    let plan = p.smelt(&["plan", "p.yaml", "--format", "json"]).ok();
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let b = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "b")
        .unwrap();
    assert_eq!(b["decision"], "run");
    assert_eq!(b["may_cut_off"], true);
    let run = p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(p.executed(), ["a"]);
    assert_has(&run.stdout, "cut off");
    assert_has(&run.stdout, "summary: 1 ran, 3 cached");
}

#[test]
fn set_overrides_vars_and_params() {
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.executed();
    p.smelt(&["run", "p.yaml", "--set", "vars.b=other"]).ok();
    assert_eq!(p.executed(), ["b", "d"]);
    assert!(
        std::fs::read_to_string(p.artifact("d").join("out"))
            .unwrap()
            .contains("B\n"),
        "show without --set is the file's value"
    );
    p.smelt(&[
        "run",
        "p.yaml",
        "--set",
        "stages.c.with.run=echo c >> log; echo X > $SMELT_OUT/out",
    ])
    .ok();
    assert_eq!(
        p.executed(),
        ["c", "d"],
        "b is back to the file's value (restored from the run cache), c is overridden"
    );
    let bad = p.smelt(&["run", "p.yaml", "--set", "stages.cc.with.run=x"]);
    assert_eq!(bad.code, 2);
    assert_has(&bad.stderr, "did you mean `c`");
}

#[test]
fn going_back_to_earlier_params_restores_from_the_run_cache() {
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.smelt(&["run", "p.yaml", "--set", "vars.b=two"]).ok();
    p.executed();
    let run = p.smelt(&["run", "p.yaml"]).ok();
    assert!(p.executed().is_empty(), "{}", run.stdout);
    assert_has(&run.stdout, "summary: 0 ran, 4 cached");
}

#[test]
fn dependency_files_are_hashed_and_touching_them_reruns_nothing() {
    let p = Project::new(
        "smelt: 1\nstages:\n  read:\n    uses: command\n    with:\n      run: \"echo read >> log; cat data/in.txt > $SMELT_OUT/out\"\n      deps: [data]\n",
    );
    p.write("data/in.txt", "one");
    p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(p.executed(), ["read"]);
    // Same bytes, new mtime: rehashed, not rerun.
    std::thread::sleep(Duration::from_millis(20));
    p.write("data/in.txt", "one");
    p.smelt(&["run", "p.yaml"]).ok();
    assert!(p.executed().is_empty());
    p.write("data/in.txt", "two");
    let plan = p.smelt(&["plan", "p.yaml"]).ok();
    assert_has(&plan.stdout, "file data changed");
    p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(p.executed(), ["read"]);
    p.write("data/new.txt", "x");
    p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(
        p.executed(),
        ["read"],
        "a new file in a dependency directory reruns"
    );
    std::fs::remove_dir_all(p.path("data")).unwrap();
    let run = p.smelt(&["run", "p.yaml"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stdout, "dependency data");
}

#[test]
fn a_failing_stage_shows_its_stderr_and_publishes_nothing() {
    let mut yaml = String::from("smelt: 1\nstages:\n");
    yaml += "  bad:\n    uses: command\n    with: { run: \"echo partial > $SMELT_OUT/x; echo 'it broke' >&2; exit 3\" }\n";
    yaml += "  after:\n    uses: command\n    inputs: { x: bad }\n    with: { run: \"echo after >> log\" }\n";
    yaml += &logging_stage("other", "", "O");
    let p = Project::new(&yaml);
    let run = p.smelt(&["run", "p.yaml", "-j", "1"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stdout, "exited with status 3");
    assert_has(&run.stdout, "it broke");
    assert_has(&run.stdout, "skip    after");
    assert_eq!(
        std::fs::read_dir(p.path(".smelt/artifacts"))
            .unwrap()
            .count(),
        0,
        "nothing published"
    );
    assert_eq!(
        std::fs::read_dir(p.path(".smelt/tmp")).unwrap().count(),
        0,
        "no partial output left"
    );
    let run = p.smelt(&["run", "p.yaml", "--keep-going"]);
    assert_eq!(run.code, 1);
    assert_has(&run.stdout, "1 failed");
}

#[test]
fn a_rerun_that_builds_another_artifact_is_warned_about_naming_the_files() {
    let p = Project::new(
        "smelt: 1\nstages:\n  stamped:\n    uses: command\n    with:\n      run: \"echo same > $SMELT_OUT/same.txt; date +%s%N > $SMELT_OUT/stamp.txt\"\n  steady:\n    uses: command\n    with: { run: \"echo same > $SMELT_OUT/same.txt\" }\n",
    );
    let first = p.smelt(&["run", "p.yaml"]).ok();
    assert!(!first.stdout.contains("warning"), "{}", first.stdout);
    let forced = p
        .smelt(&["run", "p.yaml", "--force", "stamped", "--force", "steady"])
        .ok();
    assert_has(
        &forced.stdout,
        "warning: stamped was built from the same inputs before",
    );
    assert_has(&forced.stdout, "Files that differ: stamp.txt.");
    // The deterministic stage rebuilt the same artifact: no warning about it.
    assert!(
        !forced.stdout.contains("warning: steady"),
        "{}",
        forced.stdout
    );
}

#[test]
fn a_corrupt_artifact_is_detected_and_rebuilt() {
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.executed();
    let file = p.artifact("c").join("out");
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    assert!(perms.readonly(), "published files are read-only");
    let dir = std::fs::metadata(p.artifact("c")).unwrap().permissions();
    assert!(dir.readonly(), "and so are their directories");
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    std::fs::write(&file, "tampered").unwrap();
    let plan = p.smelt(&["plan", "p.yaml"]).ok();
    assert_has(&plan.stdout, "output corrupt (out changed)");
    p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(
        p.executed(),
        ["c"],
        "d is cut off: c's rebuilt output is the same"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "C\nA\n");
}

#[test]
fn selection_flags_pick_stages() {
    let p = diamond();
    let run = p.smelt(&["run", "p.yaml", "--until", "b"]).ok();
    assert_eq!(sorted(p.executed()), ["a", "b"], "{}", run.stdout);
    p.smelt(&["run", "p.yaml", "--only", "c"]).ok();
    assert_eq!(p.executed(), ["c"]);
    p.smelt(&["run", "p.yaml", "--force", "b", "--from", "b"])
        .ok();
    assert_eq!(sorted(p.executed()), ["b", "d"]);
    p.smelt(&["run", "p.yaml", "--force-all"]).ok();
    assert_eq!(sorted(p.executed()), ["a", "b", "c", "d"]);
    let run = p.smelt(&["run", "p.yaml", "--only", "nope"]);
    assert_eq!(run.code, 2);
}

#[test]
fn only_refuses_a_stage_whose_input_was_never_built() {
    let p = diamond();
    let run = p.smelt(&["run", "p.yaml", "--only", "d"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_has(&run.stdout, "has no up-to-date output");
    assert!(p.executed().is_empty());
}

/// Starts `smelt run`, waits until the stage logged "started", and kills smelt with SIGKILL.
fn kill_once_started(p: &Project) {
    let mut child = p
        .command(&["run", "p.yaml"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.read("log").contains("started") {
        assert!(Instant::now() < deadline, "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn kill_during_a_stage_then_rerun_resumes_and_completes() {
    let p = Project::new(
        "smelt: 1\nstages:\n  slow:\n    uses: command\n    with:\n      run: \"if [ -f $SMELT_WORK/ckpt ]; then echo resumed >> log; else touch $SMELT_WORK/ckpt; echo started >> log; exec sleep 30; fi; echo done > $SMELT_OUT/x\"\n",
    );
    kill_once_started(&p);
    assert_eq!(
        std::fs::read_dir(p.path(".smelt/artifacts"))
            .unwrap()
            .count(),
        0,
        "nothing published"
    );
    p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(p.executed(), ["started", "resumed"]);
    assert_eq!(
        std::fs::read_to_string(p.artifact("slow").join("x")).unwrap(),
        "done\n"
    );
    assert_eq!(
        std::fs::read_dir(p.path(".smelt/tmp")).unwrap().count(),
        0,
        "the killed run's temp dir is gone"
    );
    assert_eq!(
        std::fs::read_dir(p.path(".smelt/work")).unwrap().count(),
        0,
        "work dir removed on success"
    );
}

#[test]
fn a_rerun_waits_for_processes_a_killed_run_left_behind() {
    // The subshell outlives the killed smelt and its shell; it holds the key's lock until done.
    let p = Project::new(
        "smelt: 1\nstages:\n  slow:\n    uses: command\n    with:\n      run: \"if [ -f $SMELT_WORK/ckpt ]; then echo resumed >> log; else touch $SMELT_WORK/ckpt; echo started >> log; (sleep 2; echo orphan-done >> log) & wait; fi; echo done > $SMELT_OUT/x\"\n",
    );
    kill_once_started(&p);
    let run = p.smelt(&["run", "p.yaml"]).ok();
    assert_has(&run.stdout, "wait    slow");
    assert_eq!(p.executed(), ["started", "orphan-done", "resumed"]);
}

#[test]
fn two_concurrent_runs_share_the_store_and_never_do_work_twice() {
    let mut yaml = String::from("smelt: 1\nstages:\n");
    for name in ["x", "y"] {
        yaml += &format!("  {name}:\n    uses: command\n    with: {{ run: \"echo {name} >> log; sleep 1; echo {name} > $SMELT_OUT/out\" }}\n");
    }
    yaml += &logging_stage("z", "in: [x, y]", "Z");
    let p = Project::new(&yaml);
    let a = p
        .command(&["run", "p.yaml"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let b = p
        .command(&["run", "p.yaml"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(a.wait_with_output().unwrap().status.success());
    assert!(b.wait_with_output().unwrap().status.success());
    assert_eq!(sorted(p.executed()), ["x", "y", "z"]);
    assert_eq!(
        std::fs::read_to_string(p.artifact("z").join("out")).unwrap(),
        "Z\nx\ny\n"
    );
}

#[test]
fn status_show_and_dag_describe_the_pipeline() {
    let p = diamond();
    let status = p.smelt(&["status", "p.yaml"]).ok();
    assert_has(&status.stdout, "new");
    p.smelt(&["run", "p.yaml"]).ok();
    let status = p.smelt(&["status", "p.yaml"]).ok();
    assert_has(&status.stdout, "0 of 4 stages differ");
    let status = p.smelt(&["status", "p.yaml", "--set", "vars.b=Q"]).ok();
    assert_has(&status.stdout, "changed  b");
    let show = p.smelt(&["show", "p.yaml", "d"]).ok();
    assert_has(&show.stdout, "kind:      command");
    assert_has(&show.stdout, "out  (10 bytes)");
    let dot = p.smelt(&["dag", "p.yaml", "--format", "dot"]).ok();
    assert_has(&dot.stdout, "\"b\" -> \"d\";");
    let mermaid = p.smelt(&["dag", "p.yaml", "--format", "mermaid"]).ok();
    assert_has(&mermaid.stdout, "s_a --> s_c");
    let text = p.smelt(&["dag", "p.yaml"]).ok();
    assert_has(&text.stdout, "d  (command)  ← in: b, c");
}

/// The decision `smelt plan` makes for `stage`.
fn decision(p: &Project, stage: &str) -> String {
    let plan = p.smelt(&["plan", "p.yaml", "--format", "json"]).ok();
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let found = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage);
    found.unwrap()["decision"].as_str().unwrap().to_string()
}

#[test]
fn verify_reads_every_byte_and_repair_makes_the_next_run_rebuild() {
    use std::os::unix::fs::MetadataExt;
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.executed();
    p.smelt(&["verify"]).ok();
    // Rot c's file the way a disk does: new bytes, and a stat the manifest agrees with.
    let dir = p.artifact("c");
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let file = dir.join("out");
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    std::fs::write(&file, "C\nB\n").unwrap();
    let manifest = dir.with_file_name(format!("{id}.json"));
    let mut entries: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let meta = std::fs::metadata(&file).unwrap();
    entries[0]["stat"] = serde_json::json!({
        "size": meta.len(),
        "mtime_ns": meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        "ctime_ns": meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        "inode": meta.ino(),
    });
    std::fs::write(&manifest, entries.to_string()).unwrap();
    assert_eq!(decision(&p, "c"), "cached", "planning trusts the stat");

    let check = p.smelt(&["verify"]);
    assert_eq!(check.code, 1, "{}", check.stdout);
    assert_has(&check.stdout, &format!("✗ corrupt  c {}", &id[..12]));
    assert_has(&check.stdout, "changed: out");
    assert_has(
        &check.stdout,
        "4 artifact(s) checked: 3 intact, 1 corrupt, 0 missing",
    );
    // Through the pipeline file, as JSON: the same finding.
    let check = p.smelt(&["verify", "p.yaml", "--format", "json"]);
    assert_eq!(check.code, 1);
    let report: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    let artifacts = report[0]["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 4);
    let bad: Vec<_> = artifacts
        .iter()
        .filter(|a| a["state"] != "intact")
        .collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["artifact"], id.as_str());
    assert_eq!(bad[0]["stages"], serde_json::json!(["c"]));
    assert_eq!(bad[0]["damage"]["changed"], serde_json::json!(["out"]));
    assert_eq!(bad[0]["removed"], false);

    let repair = p.smelt(&["verify", "--repair"]).ok();
    assert_has(&repair.stdout, "removed, with 1 run record(s)");
    assert!(!dir.exists() && !manifest.exists());
    p.smelt(&["verify"]).ok();
    assert_eq!(decision(&p, "c"), "run");
    p.smelt(&["run", "p.yaml"]).ok();
    assert_eq!(p.executed(), ["c"], "d is cut off: c is rebuilt as it was");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "C\nA\n");
    p.smelt(&["verify"]).ok();
}

#[test]
fn verify_repair_waits_for_no_run_and_a_missing_store_is_a_usage_error() {
    let p = diamond();
    assert_eq!(p.smelt(&["verify"]).code, 2);
    p.smelt(&["run", "p.yaml"]).ok();
    // A run holds the store: repair refuses rather than delete under it.
    let store = std::fs::File::open(p.path(".smelt/store.lock")).unwrap();
    store.lock_shared().unwrap();
    p.smelt(&["verify"]).ok();
    let dir = p.artifact("a");
    let file = dir.join("out");
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    std::fs::write(&file, "tampered").unwrap();
    let repair = p.smelt(&["verify", "--repair"]);
    assert_eq!(repair.code, 2, "{}", repair.stdout);
    assert_has(&repair.stderr, "another smelt run is using this store");
    assert!(dir.exists());
    drop(store);
    p.smelt(&["verify", "--repair"]).ok();
    assert!(!dir.exists());
}

#[test]
fn gc_deletes_only_what_no_lockfile_names() {
    let p = diamond();
    p.smelt(&["run", "p.yaml", "--set", "vars.b=old"]).ok();
    let old_b = p.artifact_with("b", &["--set", "vars.b=old"]);
    p.smelt(&["run", "p.yaml"]).ok();
    let current = ["a", "b", "c", "d"].map(|s| p.artifact(s));
    let dry = p.smelt(&["gc", "p.yaml", "--dry-run"]).ok();
    assert_has(&dry.stdout, &old_b.display().to_string());
    assert!(old_b.exists());
    p.smelt(&["gc", "p.yaml"]).ok();
    assert!(!old_b.exists());
    assert!(current.iter().all(|d| d.exists()));
    p.executed();
    p.smelt(&["run", "p.yaml"]).ok();
    assert!(
        p.executed().is_empty(),
        "what the lockfile names is still cached"
    );
}

#[test]
fn an_unselected_stage_with_a_missing_dependency_does_not_stop_the_run() {
    let mut yaml = String::from("smelt: 1\nstages:\n");
    yaml += "  a:\n    uses: command\n    with: { run: \"cat raw.csv > $SMELT_OUT/x\", deps: [raw.csv] }\n";
    yaml += &logging_stage("b", "", "B");
    let p = Project::new(&yaml);
    let run = p.smelt(&["run", "p.yaml", "--only", "b"]).ok();
    assert_has(&run.stdout, "skip    a  not selected");
    assert_eq!(p.executed(), ["b"]);
    let run = p.smelt(&["run", "p.yaml"]);
    assert_eq!(run.code, 1, "selected, the missing file is an error");
    assert_has(&run.stdout, "dependency raw.csv");
}

#[test]
fn a_stage_whose_key_waits_on_a_rebuilt_input_is_planned_as_may_be_cut_off() {
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.smelt(&["run", "p.yaml", "--set", "vars.b=two"]).ok();
    p.executed();
    // Back to B while `a` is forced: b's params differ from the lockfile, but its key (known
    // only after `a` reruns) is in the run cache.
    let plan = p
        .smelt(&["plan", "p.yaml", "--force", "a", "--format", "json"])
        .ok();
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let b = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "b")
        .unwrap();
    assert_eq!(
        (b["decision"].as_str(), b["may_cut_off"].as_bool()),
        (Some("run"), Some(true))
    );
    let run = p.smelt(&["run", "p.yaml", "--force", "a"]).ok();
    assert_eq!(p.executed(), ["a"]);
    assert_has(&run.stdout, "cached  b");
}

#[test]
fn only_refuses_an_out_of_date_input() {
    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.executed();
    let run = p.smelt(&["run", "p.yaml", "--only", "d", "--set", "vars.b=changed"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_has(&run.stdout, "input stage b has no up-to-date output");
    assert!(p.executed().is_empty());
}

#[test]
fn concurrent_runs_of_different_stages_both_land_in_the_lockfile() {
    let mut yaml = String::from("smelt: 1\nstages:\n");
    for name in ["x", "y"] {
        yaml += &format!("  {name}:\n    uses: command\n    with: {{ run: \"sleep 0.5; echo {name} > $SMELT_OUT/out\" }}\n");
    }
    let p = Project::new(&yaml);
    let a = p
        .command(&["run", "p.yaml", "--only", "x"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let b = p
        .command(&["run", "p.yaml", "--only", "y"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(a.wait_with_output().unwrap().status.success());
    assert!(b.wait_with_output().unwrap().status.success());
    let status = p.smelt(&["status", "p.yaml"]).ok();
    assert_has(&status.stdout, "0 of 2 stages differ");
}

#[test]
fn gc_keeps_checkpoints_unless_asked_and_refuses_an_unreadable_lockfile() {
    let p = Project::new("smelt: 1\nstages:\n  f:\n    uses: command\n    with: { run: \"touch $SMELT_WORK/ckpt; exit 1\" }\n");
    assert_eq!(p.smelt(&["run", "p.yaml"]).code, 1);
    assert_eq!(std::fs::read_dir(p.path(".smelt/work")).unwrap().count(), 1);
    p.smelt(&["gc", "p.yaml"]).ok();
    assert_eq!(
        std::fs::read_dir(p.path(".smelt/work")).unwrap().count(),
        1,
        "checkpoints kept"
    );
    p.smelt(&["gc", "p.yaml", "--work"]).ok();
    assert_eq!(std::fs::read_dir(p.path(".smelt/work")).unwrap().count(), 0);

    let p = diamond();
    p.smelt(&["run", "p.yaml"]).ok();
    p.write("p.lock", "<<<<<<< HEAD\nnot: [a lockfile\n");
    let gc = p.smelt(&["gc", "p.yaml"]);
    assert_eq!(gc.code, 2);
    assert_has(&gc.stderr, "nothing deleted");
    assert_eq!(
        std::fs::read_dir(p.path(".smelt/artifacts"))
            .unwrap()
            .count(),
        8,
        "4 artifacts and their manifests"
    );
}

#[test]
fn a_closed_output_pipe_ends_smelt_quietly() {
    let p = diamond();
    let mut child = p
        .command(&["dag", "p.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("internal error"));
}

#[test]
fn two_clean_stages_that_differ_only_in_thresholds_share_one_score_memo() {
    let p = Project::new(
        "smelt: 1\nstages:\n  corpus:\n    uses: collect\n    with: { sources: [ { synthetic: { generator: stories, documents: 300 } } ] }\n  a:\n    uses: clean\n    inputs: { corpus: corpus }\n    with: { filters: [ { gopher_quality: { min_words: 40 } } ] }\n  b:\n    uses: clean\n    inputs: { corpus: corpus }\n    with: { filters: [ { gopher_quality: { min_words: 60 } } ] }\n",
    );
    p.smelt(&["run", "p.yaml", "-j", "2"]).ok();
    let memos: Vec<_> = std::fs::read_dir(p.path(".smelt/memo"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(memos.len(), 1, "one memo, no leftovers: {memos:?}");
    let stats = |s: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.artifact(s).join("stats.json")).unwrap())
            .unwrap()
    };
    assert_ne!(stats("a")["documents_out"], stats("b")["documents_out"]);
}
