//! A throwaway project directory with a pipeline file, and a way to run `smelt` in it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "smelt failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub fn smelt_bin() -> &'static str {
    env!("CARGO_BIN_EXE_smelt")
}

impl Project {
    pub fn new(pipeline: &str) -> Self {
        let project = Project {
            dir: tempfile::tempdir().unwrap(),
        };
        project.write("p.yaml", pipeline);
        project
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Replaces text in the pipeline file.
    pub fn edit(&self, old: &str, new: &str) {
        let text = self.read("p.yaml");
        assert!(text.contains(old), "{old:?} is not in the pipeline");
        self.write("p.yaml", &text.replace(old, new));
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(smelt_bin());
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("SMELT_STORE")
            .env("NO_COLOR", "1");
        cmd
    }

    pub fn smelt(&self, args: &[&str]) -> Run {
        self.command(args).output().unwrap().into()
    }

    /// The stages that executed, one line each in `log`, since the last call.
    pub fn executed(&self) -> Vec<String> {
        let log = self.read("log");
        let _ = std::fs::remove_file(self.path("log"));
        log.lines().map(str::to_string).collect()
    }

    pub fn artifact(&self, stage: &str) -> PathBuf {
        self.artifact_with(stage, &[])
    }

    /// The artifact directory of `stage` with extra arguments (`--set …`).
    pub fn artifact_with(&self, stage: &str, extra: &[&str]) -> PathBuf {
        let mut args = vec!["show", "p.yaml", stage, "--path"];
        args.extend_from_slice(extra);
        PathBuf::from(self.smelt(&args).ok().stdout.trim())
    }
}

/// A stage that logs its name when it runs and writes `text` to `$SMELT_OUT/out`.
pub fn logging_stage(name: &str, inputs: &str, text: &str) -> String {
    format!(
        "  {name}:\n    uses: command\n    inputs: {{ {inputs} }}\n    with:\n      run: \"echo {name} >> log; echo '{text}' > $SMELT_OUT/out; for d in $(echo $SMELT_IN_IN | tr ':' ' '); do cat $d/out >> $SMELT_OUT/out; done\"\n"
    )
}

/// Asserts that `text` contains `needle`, showing `text` when it does not.
#[track_caller]
pub fn assert_has(text: &str, needle: &str) {
    assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
}
