//! `collect`: gathers documents from local files, pinned URLs and built-in generators into JSONL
//! shards, split deterministically into train and validation.
//!
//! Output: `train-00000.jsonl`, … and `validation-00000.jsonl`, … (one record per line: `id`,
//! `text`, `source`, and `messages` or `prompt`/`chosen`/`rejected` for chat and preference
//! data), and `manifest.json` with counts, bytes, per-source skips and the shard names.

pub(crate) mod files;
pub(crate) mod synthetic;
mod url;

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{Dep, Metrics, ParamProblem, Ports, Stage, StageContext, StageError};

pub use files::{Format, InvalidUtf8, SplitOn};
pub use synthetic::{Generator, TaskKind};

use crate::params::{non_empty, non_empty_schema, Fraction};
use crate::records::{Record, ShardWriter, SplitSummary};

pub struct Collect;

/// Params of a `collect` stage.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectParams {
    /// Where documents come from, in order (at least one).
    #[serde(deserialize_with = "non_empty")]
    #[schemars(schema_with = "non_empty_schema::<Source>")]
    pub sources: Vec<Source>,
    /// The train/validation split.
    #[serde(default)]
    pub split: Split,
    /// Bytes that are not UTF-8: `error` (default) or `skip` (counted in the manifest).
    #[serde(default)]
    pub invalid_utf8: InvalidUtf8,
    /// Documents (or lines) longer than this are skipped and counted, never loaded.
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: u64,
    /// Documents per shard file.
    #[serde(default = "default_shard_documents")]
    pub shard_documents: u64,
}

fn default_max_document_bytes() -> u64 {
    16 << 20
}

fn default_shard_documents() -> u64 {
    100_000
}

/// One source of documents.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    Files(FilesSource),
    Url(UrlSource),
    Synthetic(SyntheticSource),
}

/// Local files matching a glob.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesSource {
    /// Relative to the pipeline file, e.g. `data/*.txt`; must match at least one file.
    pub glob: String,
    /// `text`, `jsonl` or `csv` [default: from the extension: .jsonl/.json → jsonl, .csv → csv].
    #[serde(default)]
    pub format: Option<Format>,
    /// The JSON field or CSV column holding the text.
    #[serde(default = "default_field")]
    pub field: String,
    /// For text: one document per `file`, `paragraph` or `line`.
    #[serde(default)]
    pub split_on: SplitOn,
}

/// A file downloaded over HTTP(S), pinned by its SHA-256. (`format`, `field` and `split_on`
/// repeat `FilesSource`'s: serde cannot flatten a shared struct into `deny_unknown_fields` ones.)
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UrlSource {
    pub href: String,
    /// Hex SHA-256 of the file; a download with other content is an error.
    pub sha256: String,
    /// As for files [default: from the URL's extension].
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default = "default_field")]
    pub field: String,
    #[serde(default)]
    pub split_on: SplitOn,
}

/// Documents from a built-in generator.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSource {
    pub generator: Generator,
    pub documents: u64,
    #[serde(default)]
    pub seed: u64,
    /// Which questions `chat`, `preferences` and `qa` ask, drawn evenly [default: all].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskKind>>,
}

fn default_field() -> String {
    "text".into()
}

/// Which documents go to validation: decided by a hash of the text and the seed, so a document
/// lands in the same split whatever else the corpus holds — or, with `tail`, the last ones.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Fraction of documents for validation, at least 0 and below 1.
    #[serde(default = "no_validation")]
    pub validation: Fraction,
    #[serde(default)]
    pub seed: u64,
    /// Take the last documents in corpus order instead of hashing (as nanoGPT holds out the end
    /// of its text); the sources are read twice, once to count.
    #[serde(default)]
    pub tail: bool,
}

fn no_validation() -> Fraction {
    Fraction::of(0.0)
}

impl Default for Split {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

impl Split {
    /// Whether document `index` (0-based, in corpus order) of `total` goes to validation.
    fn is_validation(&self, record: &Record, index: u64, total: u64) -> bool {
        if self.tail {
            let held_out = (total as f64 * self.validation.get()).round() as u64;
            return index >= total - held_out;
        }
        self.hashes_to_validation(record)
    }

    fn hashes_to_validation(&self, record: &Record) -> bool {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.seed.to_le_bytes());
        hasher.update(record.text.as_bytes());
        let h = u64::from_le_bytes(
            hasher.finalize().as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
        (h as f64) < self.validation.get() * 2f64.powi(64)
    }
}

/// What one source contributed, for the manifest.
#[derive(Debug, Serialize)]
struct SourceReport {
    source: String,
    documents: u64,
    skipped: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Manifest {
    train: SplitSummary,
    validation: SplitSummary,
    sources: Vec<SourceReport>,
}

impl Stage for Collect {
    type Params = CollectParams;
    const KIND: &'static str = "collect";
    // 2: the last-word task, a larger word list for the copying tasks.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "Gather documents from files, pinned URLs and built-in generators into JSONL shards";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![])
    }

    fn external_deps(
        &self,
        params: &CollectParams,
        pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String> {
        let mut deps = Vec::new();
        for source in &params.sources {
            if let Source::Files(files) = source {
                deps.extend(
                    files::expand_glob(pipeline_dir, &files.glob)?
                        .into_iter()
                        .map(Dep::from),
                );
            }
        }
        Ok(deps)
    }

    fn check(&self, params: &CollectParams, _wired: &[&str]) -> Vec<ParamProblem> {
        let mut problems = Vec::new();
        for (i, source) in params.sources.iter().enumerate() {
            match source {
                Source::Synthetic(synthetic) => problems.extend(synthetic.problems(i)),
                Source::Url(u) => {
                    problems.extend(url::sha256_problem(&u.sha256).map(|message| {
                        ParamProblem::new(&format!("sources.{i}.url.sha256"), message)
                    }))
                }
                Source::Files(_) => {}
            }
        }
        problems
    }

    fn run(&self, params: &CollectParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        let mut train = ShardWriter::new(&ctx.out_dir, "train", params.shard_documents);
        let mut validation = ShardWriter::new(&ctx.out_dir, "validation", params.shard_documents);
        let mut reports = Vec::new();
        let total = if params.split.tail {
            count_documents(params, ctx)?
        } else {
            0
        };
        let mut index = 0;
        for source in &params.sources {
            let mut documents = 0;
            let mut emit = |record: Record| {
                documents += 1;
                index += 1;
                if params.split.is_validation(&record, index - 1, total) {
                    validation.write(&record)
                } else {
                    train.write(&record)
                }
            };
            let (name, skipped) = read_source(source, params, ctx, &mut emit)?;
            ctx.report(
                reports.len() as u64 + 1,
                Some(params.sources.len() as u64),
                &name,
            );
            reports.push(SourceReport {
                source: name,
                documents,
                skipped,
            });
        }
        let manifest = Manifest {
            train: train.finish()?,
            validation: validation.finish()?,
            sources: reports,
        };
        check_splits(&manifest, params)?;
        std::fs::write(
            ctx.out_dir.join("manifest.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        let skipped: u64 = manifest
            .sources
            .iter()
            .flat_map(|s| s.skipped.values())
            .sum();
        Ok(Metrics::from([
            (
                "train_documents".to_string(),
                manifest.train.documents.into(),
            ),
            (
                "validation_documents".to_string(),
                manifest.validation.documents.into(),
            ),
            (
                "text_bytes".to_string(),
                (manifest.train.text_bytes + manifest.validation.text_bytes).into(),
            ),
            ("skipped_documents".to_string(), skipped.into()),
        ]))
    }
}

/// Documents the sources produce (a first pass for `split.tail`).
fn count_documents(params: &CollectParams, ctx: &StageContext) -> Result<u64, String> {
    let mut total = 0;
    for source in &params.sources {
        read_source(source, params, ctx, &mut |_| {
            total += 1;
            Ok(())
        })?;
    }
    Ok(total)
}

impl SyntheticSource {
    /// `tasks` against the generator; `index` is the source's place in `sources`.
    fn problems(&self, index: usize) -> Option<ParamProblem> {
        let at = format!("sources.{index}.synthetic.tasks");
        let asks = matches!(
            self.generator,
            Generator::Chat | Generator::Preferences | Generator::Qa
        );
        match &self.tasks {
            Some(_) if !asks => Some(ParamProblem::new(
                &at,
                format!(
                    "`tasks`: the {} generator asks no questions (only chat, preferences and qa \
                     take `tasks`)",
                    self.generator.name()
                ),
            )),
            Some(tasks) if tasks.is_empty() => Some(ParamProblem::new(
                &at,
                "`tasks` is empty: name at least one task, or leave it out for all",
            )),
            _ => None,
        }
    }
}

/// An empty split is an error, not a surprise three stages later.
fn check_splits(manifest: &Manifest, params: &CollectParams) -> Result<(), String> {
    let total = manifest.train.documents + manifest.validation.documents;
    let skipped: u64 = manifest
        .sources
        .iter()
        .flat_map(|s| s.skipped.values())
        .sum();
    if manifest.train.documents == 0 {
        return Err(format!(
            "no training documents ({total} collected, {skipped} skipped)"
        ));
    }
    if params.split.validation.get() > 0.0 && manifest.validation.documents == 0 {
        return Err(format!(
            "the validation split is empty: {total} documents at fraction {}; raise it or add data",
            params.split.validation
        ));
    }
    Ok(())
}

/// Reads one source through `emit`; returns how it is named in the manifest and its skips.
fn read_source(
    source: &Source,
    params: &CollectParams,
    ctx: &StageContext,
    emit: &mut dyn FnMut(Record) -> std::io::Result<()>,
) -> Result<(String, files::Skips), String> {
    let options = |format, field: &str, split_on| files::ParseOptions {
        format,
        field: field.to_string(),
        split_on,
        invalid_utf8: params.invalid_utf8,
        max_document_bytes: params.max_document_bytes,
    };
    match source {
        Source::Files(f) => {
            let parse = options(f.format, &f.field, f.split_on);
            let mut skipped = files::Skips::new();
            for rel in files::expand_glob(&ctx.pipeline_dir, &f.glob)? {
                let name = rel.display().to_string();
                for (reason, n) in
                    files::read_file(&ctx.pipeline_dir.join(&rel), &name, &parse, emit)?
                {
                    *skipped.entry(reason).or_default() += n;
                }
            }
            Ok((format!("files:{}", f.glob), skipped))
        }
        Source::Url(u) => {
            let memo =
                ctx.memo_file(&serde_json::json!({ "download": u.sha256.to_ascii_lowercase() }));
            let path = url::fetch(&u.href, &u.sha256, &memo)?;
            let format = u
                .format
                .unwrap_or_else(|| files::infer_format(Path::new(&u.href)));
            let skipped = files::read_file(
                &path,
                &u.href,
                &options(Some(format), &u.field, u.split_on),
                emit,
            )?;
            Ok((u.href.clone(), skipped))
        }
        Source::Synthetic(s) => {
            let tasks = s.tasks.as_deref().unwrap_or(&TaskKind::ALL);
            for record in synthetic::generate_with(s.generator, s.documents, s.seed, tasks) {
                emit(record).map_err(|e| format!("writing documents: {e}"))?;
            }
            Ok((
                format!("synthetic:{}:seed{}", s.generator.name(), s.seed),
                files::Skips::new(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::synthetic::{generate, Generator};
    use smelt_engine::stage::NoProgress;
    use std::sync::Arc;

    fn run(
        yaml_sources: serde_json::Value,
        dir: &Path,
    ) -> Result<(Metrics, serde_json::Value), String> {
        let params: CollectParams =
            serde_json::from_value(yaml_sources).map_err(|e| e.to_string())?;
        let out = dir.join("out");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let ctx = StageContext {
            stage: "corpus".into(),
            pipeline_dir: dir.to_path_buf(),
            out_dir: out.clone(),
            work_dir: dir.join("work"),
            inputs: BTreeMap::new(),
            threads: 1,
            progress: Arc::new(NoProgress),
            key_lock_fd: -1,
            memo_dir: dir.join("memo"),
        };
        let params = serde_json::to_value(&params).unwrap();
        let metrics =
            smelt_engine::DynStage::run(&Collect, &params, &ctx).map_err(|e| e.to_string())?;
        let manifest =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        Ok((metrics, manifest))
    }

    fn lines(dir: &Path, shard: &str) -> Vec<Record> {
        std::fs::read_to_string(dir.join("out").join(shard))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn files_and_generators_become_split_shards() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("data/a.txt"),
            "first paragraph\n\nsecond paragraph\n",
        )
        .unwrap();
        let params = serde_json::json!({
            "sources": [
                { "files": { "glob": "data/*.txt", "split_on": "paragraph" } },
                { "synthetic": { "generator": "arithmetic", "documents": 1000, "seed": 1 } }
            ],
            "split": { "validation": 0.1, "seed": 3 }
        });
        let (metrics, manifest) = run(params, dir.path()).unwrap();
        let (train, validation) = (
            metrics["train_documents"].as_u64().unwrap(),
            metrics["validation_documents"].as_u64().unwrap(),
        );
        assert_eq!(train + validation, 1002);
        assert!(
            (60..140).contains(&validation),
            "{validation} of 1002 for 10%"
        );
        assert_eq!(manifest["sources"][0]["documents"], 2);
        let all: Vec<Record> = lines(dir.path(), "train-00000.jsonl")
            .into_iter()
            .chain(lines(dir.path(), "validation-00000.jsonl"))
            .collect();
        assert!(all
            .iter()
            .any(|r| r.id == "data/a.txt#p2" && r.text == "second paragraph"));
        // The split is a function of the text: the same document, the same side.
        let validation_texts: Vec<String> = lines(dir.path(), "validation-00000.jsonl")
            .into_iter()
            .map(|r| r.text)
            .collect();
        let split = Split {
            validation: Fraction::of(0.1),
            seed: 3,
            tail: false,
        };
        assert!(validation_texts
            .iter()
            .all(|t| split.hashes_to_validation(&Record::text(String::new(), t.clone(), ""))));
    }

    #[test]
    fn a_tail_split_holds_out_the_last_documents() {
        let dir = tempfile::tempdir().unwrap();
        let params = serde_json::json!({
            "sources": [ { "synthetic": { "generator": "arithmetic", "documents": 40, "seed": 1 } } ],
            "split": { "validation": 0.1, "tail": true }
        });
        run(params, dir.path()).unwrap();
        let all: Vec<Record> = generate(Generator::Arithmetic, 40, 1).collect();
        let ids = |file: &str| {
            lines(dir.path(), file)
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        };
        let expected = |range: std::ops::Range<usize>| {
            all[range].iter().map(|r| r.id.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ids("validation-00000.jsonl"), expected(36..40));
        assert_eq!(ids("train-00000.jsonl").len(), 36);
    }

    #[test]
    fn url_sources_are_downloaded_and_verified() {
        let body: &'static [u8] = b"{\"text\": \"from the web\"}\n";
        let href = url::tests::serve(body);
        let dir = tempfile::tempdir().unwrap();
        let sha = url::tests::sha(body);
        let params = serde_json::json!({ "sources": [ { "url": { "href": href.replace(".txt", ".jsonl"), "sha256": sha } } ] });
        let (metrics, _) = run(params, dir.path()).unwrap();
        assert_eq!(metrics["train_documents"], 1);
        assert_eq!(
            lines(dir.path(), "train-00000.jsonl")[0].text,
            "from the web"
        );
        let wrong = serde_json::json!({ "sources": [ { "url": { "href": href, "sha256": url::tests::sha(b"x") } } ] });
        assert!(run(wrong, dir.path())
            .unwrap_err()
            .contains("sha256 mismatch"));
    }

    #[test]
    fn empty_results_and_empty_splits_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.txt"), "").unwrap();
        let params = serde_json::json!({ "sources": [ { "files": { "glob": "empty.txt" } } ] });
        assert!(run(params, dir.path())
            .unwrap_err()
            .starts_with("no training documents (0 collected, 1 skipped)"));
        let tiny = serde_json::json!({
            "sources": [ { "synthetic": { "generator": "stories", "documents": 2 } } ],
            "split": { "validation": 0.01 }
        });
        assert!(run(tiny, dir.path())
            .unwrap_err()
            .contains("validation split is empty"));
    }

    #[test]
    fn chat_and_preference_generators_keep_their_fields() {
        let dir = tempfile::tempdir().unwrap();
        let params = serde_json::json!({ "sources": [
            { "synthetic": { "generator": "chat", "documents": 5, "seed": 1 } },
            { "synthetic": { "generator": "preferences", "documents": 5, "seed": 1 } }
        ] });
        run(params, dir.path()).unwrap();
        let records = lines(dir.path(), "train-00000.jsonl");
        assert_eq!(records.iter().filter(|r| r.messages.is_some()).count(), 5);
        assert_eq!(
            records
                .iter()
                .filter(|r| r.chosen.is_some() && r.rejected.is_some())
                .count(),
            5
        );
    }

    #[test]
    fn tasks_choose_which_questions_are_asked() {
        let dir = tempfile::tempdir().unwrap();
        let params = serde_json::json!({ "sources": [
            { "synthetic": { "generator": "chat", "documents": 60, "seed": 1, "tasks": ["last_word"] } },
            { "synthetic": { "generator": "qa", "documents": 60, "seed": 1, "tasks": ["repeat", "opposite"] } }
        ] });
        run(params, dir.path()).unwrap();
        let records = lines(dir.path(), "train-00000.jsonl");
        let (chats, qa): (Vec<&Record>, Vec<&Record>) =
            records.iter().partition(|r| r.messages.is_some());
        assert_eq!((chats.len(), qa.len()), (60, 60));
        assert!(chats.iter().all(|r| r.messages.as_ref().unwrap()[0]
            .content
            .starts_with("What is the last word of: ")));
        let repeats = qa
            .iter()
            .filter(|r| r.text.contains("Repeat the word"))
            .count();
        let opposites = qa
            .iter()
            .filter(|r| r.text.contains("the opposite of"))
            .count();
        assert_eq!(repeats + opposites, 60);
        assert!(repeats > 10 && opposites > 10, "{repeats} / {opposites}");
        for (tasks, generator, error) in [
            (serde_json::json!([]), "chat", "is empty"),
            (
                serde_json::json!(["repeat"]),
                "stories",
                "the stories generator asks no questions",
            ),
        ] {
            let params = serde_json::json!({ "sources": [
                { "synthetic": { "generator": generator, "documents": 5, "tasks": tasks } }
            ] });
            let err = run(params, dir.path()).unwrap_err();
            assert!(err.contains(error), "{err}");
        }
    }
}
