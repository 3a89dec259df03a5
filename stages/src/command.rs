//! `command`: any shell command as a stage, as in DVC.
//!
//! It runs `sh -c RUN` in the pipeline file's directory with `SMELT_OUT` (its empty output dir),
//! `SMELT_WORK` (its resumable work dir) and `SMELT_IN_<PORT>` (each input's artifact dir; several
//! joined with `:`). Files listed in `deps` are hashed into the stage key.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{Dep, Metrics, Ports, Stage, StageContext, StageError};

/// Lines of stderr shown when the command fails.
const STDERR_TAIL: usize = 20;

pub struct Command;

/// Params of a `command` stage.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// The shell command, run with `sh -c` from the pipeline file's directory.
    pub run: String,
    /// Files and directories it reads, relative to the pipeline file; their contents are hashed
    /// into the stage key, so changing one reruns the stage.
    #[serde(default)]
    pub deps: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl Stage for Command {
    type Params = CommandParams;
    const KIND: &'static str = "command";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Run a shell command that writes its output to $SMELT_OUT";

    fn ports(&self) -> Ports {
        Ports::Any
    }

    fn external_deps(
        &self,
        params: &CommandParams,
        _pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String> {
        Ok(params
            .deps
            .iter()
            .map(|d| Dep::from(PathBuf::from(d)))
            .collect())
    }

    fn run(&self, params: &CommandParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        let mut process = Process::new("sh");
        process
            .arg("-c")
            .arg(&params.run)
            .current_dir(&ctx.pipeline_dir)
            .envs(&params.env)
            .env("SMELT_OUT", &ctx.out_dir)
            .env("SMELT_WORK", &ctx.work_dir)
            .env("SMELT_STAGE", &ctx.stage)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (port, dirs) in &ctx.inputs {
            let joined = std::env::join_paths(dirs)?;
            process.env(format!("SMELT_IN_{}", env_name(port)), joined);
        }
        die_with_parent(&mut process, ctx.key_lock_fd);
        let mut child = process
            .spawn()
            .map_err(|e| format!("cannot start `sh`: {e}"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let status = std::thread::scope(|scope| {
            scope.spawn(|| forward(stdout, ctx, None));
            scope.spawn(|| forward(stderr, ctx, Some(&tail)));
            child.wait()
        })?;
        if !status.success() {
            let tail: Vec<String> = tail.lock().expect("tail lock").drain(..).collect();
            let mut message = match status.code() {
                Some(code) => format!("`{}` exited with status {code}", params.run),
                None => format!("`{}` was killed by a signal", params.run),
            };
            if !tail.is_empty() {
                message.push_str("; the end of its stderr:\n");
                message.push_str(&tail.join("\n"));
            }
            return Err(message.into());
        }
        Ok(Metrics::new())
    }
}

/// Passes a child's output on line by line; keeps the last lines of stderr for error messages.
fn forward(stream: impl Read, ctx: &StageContext, tail: Option<&Mutex<VecDeque<String>>>) {
    for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
        let line = String::from_utf8_lossy(&line).into_owned();
        ctx.progress.line(&ctx.stage, &line);
        if let Some(tail) = tail {
            let mut tail = tail.lock().expect("tail lock");
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// `train-data` → `TRAIN_DATA`: port names as environment variable names.
pub fn env_name(port: &str) -> String {
    port.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Asks Linux to kill the shell if smelt dies (kill -9 included), and passes the stage key's
/// lock down to every process the command starts: processes that outlive the shell keep the key
/// locked, so a rerun waits for them rather than resuming alongside them.
fn die_with_parent(process: &mut Process, key_lock_fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl and fcntl are async-signal-safe and touch no memory of the parent; the
    // descriptor flag changes in the child's descriptor table only.
    unsafe {
        process.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::fcntl(key_lock_fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::stage::NoProgress;

    fn context(dir: &std::path::Path) -> StageContext {
        std::fs::create_dir_all(dir.join("out")).unwrap();
        std::fs::create_dir_all(dir.join("in")).unwrap();
        StageContext {
            stage: "s".into(),
            pipeline_dir: dir.to_path_buf(),
            out_dir: dir.join("out"),
            work_dir: dir.join("work"),
            inputs: BTreeMap::from([("raw-data".to_string(), vec![dir.join("in")])]),
            threads: 1,
            progress: Arc::new(NoProgress),
            key_lock_fd: std::os::fd::IntoRawFd::into_raw_fd(
                std::fs::File::create(dir.join("lock")).unwrap(),
            ),
            memo_dir: dir.join("memo"),
        }
    }

    fn params(run: &str) -> CommandParams {
        CommandParams {
            run: run.into(),
            deps: vec![],
            env: BTreeMap::from([("GREETING".into(), "hi".into())]),
        }
    }

    #[test]
    fn sees_its_environment_and_writes_output() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        Command
            .run(
                &params("echo $GREETING $SMELT_IN_RAW_DATA > $SMELT_OUT/o; pwd >> $SMELT_OUT/o"),
                &ctx,
            )
            .unwrap();
        let out = std::fs::read_to_string(dir.path().join("out/o")).unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        assert_eq!(
            out,
            format!(
                "hi {}\n{}\n",
                dir.path().join("in").display(),
                canonical.display()
            )
        );
    }

    #[test]
    fn failure_shows_the_tail_of_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let err = Command
            .run(
                &params("echo first >&2; echo boom >&2; exit 3"),
                &context(dir.path()),
            )
            .unwrap_err();
        let err = err.to_string();
        assert!(err.contains("exited with status 3"), "{err}");
        assert!(err.ends_with("first\nboom"), "{err}");
    }

    #[test]
    fn port_names_become_env_names() {
        assert_eq!(env_name("train-data.v2"), "TRAIN_DATA_V2");
    }
}
