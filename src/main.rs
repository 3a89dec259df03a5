//! `smelt`: the command line. It registers the stage kinds and calls the engine; everything it
//! prints is in `output.rs`.

mod alloc;
mod commands;
mod output;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use smelt_engine::Override;

#[derive(Parser)]
#[command(
    name = "smelt",
    version,
    about = "Declarative, cached pipelines for training language models"
)]
struct Cli {
    /// The store for artifacts and the run cache [default: .smelt next to the pipeline file]
    #[arg(long, global = true, env = "SMELT_STORE", value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check pipeline files: schema, params, references, cycles. Exit 0 valid, 1 invalid, 2
    /// usage error
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = ValidateFormat::Human)]
        format: ValidateFormat,
        /// Also check params against the input data already in the store (`seq_len` against
        /// the token splits, a model's vocabulary against the tokenizer's), and say which
        /// checks ran and which wait for an input to be built
        #[arg(long)]
        data: bool,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the pipeline JSON Schema (generated from the stage kinds' params)
    Schema,
    /// Say, per stage, whether it is cached or will run, and why; runs nothing. Exit 1 when
    /// the params of a stage to run do not fit its input data already in the store
    Plan {
        file: PathBuf,
        #[command(flatten)]
        select: Select,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Run the stages that are not cached
    Run {
        file: PathBuf,
        #[command(flatten)]
        select: Select,
        /// Stages run at once [default: number of cores]
        #[arg(short, long)]
        jobs: Option<usize>,
        /// Keep running independent stages after one fails
        #[arg(long)]
        keep_going: bool,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// What changed since the lockfile
    Status {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// A stage's artifact: directory, run record, metrics
    Show {
        file: PathBuf,
        stage: String,
        /// Print only the artifact directory's absolute path
        #[arg(long)]
        path: bool,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// The stage graph
    Dag {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Delete artifacts that no lockfile refers to
    Gc {
        /// Pipeline files whose store to clean [default store: ./.smelt]
        files: Vec<PathBuf>,
        /// List what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Also delete work dirs: the checkpoints that let failed stages resume
        #[arg(long)]
        work: bool,
    },
    /// Re-hash artifacts (every byte, no stat trusted) against their manifests and report the
    /// corrupt ones: exit 1 while any is left
    Verify {
        /// Pipeline files: check the artifacts their lockfiles name and their current plans
        /// use [default: every artifact of the store, ./.smelt]
        files: Vec<PathBuf>,
        /// Remove the corrupt artifacts and the run records that point at them, so the next
        /// run rebuilds them (refused while a run is using the store)
        #[arg(long)]
        repair: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// The stage kinds a pipeline can use
    Stages {
        /// Every kind's inputs and params (types, defaults, meaning) as Markdown tables, from the
        /// schema: the README's reference
        #[arg(long)]
        markdown: bool,
    },
    /// Write a starter pipeline (the `$schema` line, comments, a runnable example) to
    /// NAME.yaml, or smelt.yaml
    Init {
        /// The pipeline's name, also its file name
        name: Option<String>,
        /// Replace the file if it exists
        #[arg(long)]
        force: bool,
    },
    /// Sample a continuation from a model directory (or a pipeline's model stage); prints only
    /// the generated text
    Generate(GenerateArgs),
    /// Write a Llama-family model directory (a pretrain or finetune artifact, say) as a GGUF
    /// file llama.cpp runs
    Export {
        /// The model directory (config.json, model.safetensors, tokenizer.json)
        model: PathBuf,
        /// The GGUF file to write
        #[arg(long, value_name = "FILE")]
        gguf: PathBuf,
        /// How matrices are stored: f16, or q8_0 (8-bit blocks of 32, llama.cpp's)
        #[arg(long = "type", value_enum, default_value = "f16")]
        kind: ExportKind,
    },
    /// The last run as a report: stages, outcomes, durations, metrics, training curves,
    /// evaluations (markdown on stdout, HTML to a file)
    Report {
        file: PathBuf,
        /// Where to write the HTML [default: <pipeline>.report.html next to the pipeline]
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Benchmarks: `smelt bench train --config A` trains the model layer on a fixed size and
    /// prints one JSON line (tokens/s, ms per step split into forward/backward/optimizer, MFU)
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Score plain-text hypotheses against references (one segment per line), as sacrebleu does
    Metric {
        #[arg(value_enum)]
        metric: TextMetric,
        /// The system output
        #[arg(long, value_name = "FILE")]
        hyp: PathBuf,
        /// A reference file (repeatable: several references per segment)
        #[arg(long = "ref", value_name = "FILE", required = true)]
        references: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training throughput on random tokens, comparable with ../shared/bench/torch_gpt.py bench
    Train {
        /// A (vocab 512, seq 64, d 128, 4 layers, 4 heads, batch 16) or B (vocab 4096, seq
        /// 128, d 256, 6 layers, 8 heads, batch 8)
        #[arg(long, default_value = "A")]
        config: String,
        /// Timed steps (the median is reported)
        #[arg(long, default_value_t = 15)]
        steps: usize,
        /// Untimed steps first
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// CPU threads [default: all cores]
        #[arg(long)]
        threads: Option<usize>,
        /// What the linear layers' matrix multiplies compute in: f32, or bf16 (f32 sums)
        #[arg(long, default_value = "f32", value_parser = parse_precision)]
        precision: smelt_stages::model::Precision,
    },
}

fn parse_precision(name: &str) -> Result<smelt_stages::model::Precision, String> {
    serde_json::from_value(serde_json::Value::from(name))
        .map_err(|_| format!("`{name}`: use f32 or bf16"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TextMetric {
    /// BLEU (13a tokenizer, exp smoothing, corpus level)
    Bleu,
    /// chrF (character 6-grams, beta 2)
    Chrf,
    /// chrF++ (chrF plus word 1- and 2-grams)
    ChrfPlus,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportKind {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// An HF model directory: GPT-2 (a pretrain stage's artifact, say) or the Llama family
    #[arg(required_unless_present = "pipeline", conflicts_with = "pipeline")]
    pub model_dir: Option<PathBuf>,
    /// A pipeline file whose `--stage` output to use instead of a directory
    #[arg(long, requires = "stage")]
    pub pipeline: Option<PathBuf>,
    #[arg(long)]
    pub stage: Option<String>,
    #[arg(long)]
    pub prompt: String,
    /// Answer the prompt as a user's turn, rendered with the model's chat template
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 picks the most likely token every time
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub overrides: Overrides,
}

#[derive(Args, Clone, Default)]
pub struct Overrides {
    /// Override a value: vars.NAME=VALUE or stages.STAGE.with.PARAM=VALUE (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<Override>,
}

#[derive(Args, Clone, Default)]
pub struct Select {
    /// Only these stages (repeatable); their inputs must be up to date
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// This stage and everything downstream of it
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// This stage and everything upstream of it
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// Run this stage even if it is cached (repeatable)
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Run every selected stage even if cached
    #[arg(long)]
    pub force_all: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ValidateFormat {
    Human,
    Json,
    Github,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// How a command failed, mapped to the exit code.
pub enum Failure {
    /// Invalid pipeline or a failed stage: exit 1 (already reported).
    Failed,
    /// Bad command line or unusable files: exit 2, with this message.
    Usage(String),
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`smelt plan | head`), instead of failing to print.
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    alloc::keep_large_blocks();
    install_panic_hook();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SMELT_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let store = cli.store;
    let result = match cli.command {
        Command::Validate {
            files,
            format,
            data,
            overrides,
        } => commands::validate(&files, format, &overrides.set, data.then_some(store)),
        Command::Schema => commands::schema(),
        Command::Plan {
            file,
            select,
            format,
            overrides,
        } => commands::plan(&file, &select, format, &overrides.set, store),
        Command::Run {
            file,
            select,
            jobs,
            keep_going,
            overrides,
        } => commands::run(&file, &select, jobs, keep_going, &overrides.set, store),
        Command::Status {
            file,
            format,
            overrides,
        } => commands::status(&file, format, &overrides.set, store),
        Command::Show {
            file,
            stage,
            path,
            overrides,
        } => commands::show(&file, &stage, path, &overrides.set, store),
        Command::Dag {
            file,
            format,
            overrides,
        } => commands::dag(&file, format, &overrides.set),
        Command::Gc {
            files,
            dry_run,
            work,
        } => commands::gc(&files, dry_run, work, store),
        Command::Verify {
            files,
            repair,
            format,
            overrides,
        } => commands::verify(&files, repair, format, &overrides.set, store),
        Command::Stages { markdown } => commands::stages(markdown),
        Command::Init { name, force } => commands::init(name.as_deref(), force),
        Command::Generate(args) => commands::generate(&args, store),
        Command::Export { model, gguf, kind } => commands::export(&model, &gguf, kind),
        Command::Report {
            file,
            html,
            overrides,
        } => commands::report(&file, html, &overrides.set, store),
        Command::Bench(BenchCommand::Train {
            config,
            steps,
            warmup,
            threads,
            precision,
        }) => commands::bench_train(&config, steps, warmup, threads, precision),
        Command::Metric {
            metric,
            hyp,
            references,
            format,
        } => commands::metric(metric, &hyp, &references, format),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Failed) => ExitCode::from(1),
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// A panic inside a stage is reported as that stage's failure by the engine, so stage threads
/// panic quietly; anywhere else it is a bug in smelt, reported in one line without a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        if thread.name().is_some_and(|n| n.starts_with("stage:")) {
            return;
        }
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "smelt: internal error{location}: {}",
            info.payload_as_str().unwrap_or("panic")
        );
        eprintln!("This is a bug in smelt; please report it.");
    }));
}
