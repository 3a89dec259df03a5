//! `clean`: normalises text, runs an ordered list of filters, and removes exact and near
//! duplicates, writing the kept documents as shards again plus `stats.json`.
//!
//! Documents stream through in chunks: each chunk is normalised, filtered and MinHashed in
//! parallel (rayon), then admitted to the dedup index one by one in corpus order, so the output
//! is the same for any thread count and memory does not grow with the corpus (only the dedup
//! index does: a few hashes per kept document). Train is processed before validation with one
//! index, so a validation document that duplicates a training one is dropped (no leakage).

mod dedup;
mod filters;
mod gopher;
mod tape;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{Metrics, ParamProblem, Port, Ports, Stage, StageContext, StageError};

pub use dedup::{DedupParams, MinHashParams};
pub use filters::{Filter, Unicode};

use crate::records::{shards, LineBlock, Record, ShardLines, ShardWriter, SplitSummary};
use tape::ScoreTape;

/// Characters of each sampled dropped document kept in stats.json.
const SAMPLE_CHARS: usize = 300;

pub struct Clean;

/// Params of a `clean` stage.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanParams {
    /// Unicode normal form: `none`, `nfc` or `nfkc`. Whitespace and control characters are
    /// always tidied.
    #[serde(default)]
    pub normalize: Unicode,
    #[serde(default)]
    pub lowercase: bool,
    /// Remove HTML tags and decode the common entities.
    #[serde(default)]
    pub strip_html: bool,
    /// Applied in order; a document dropped by one is not seen by the next.
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub dedup: DedupParams,
    /// Whether chat and preference records go through the filters and dedup too (their fields
    /// are always normalised). Off by default: short turns would fail document-level filters.
    #[serde(default)]
    pub filter_structured: bool,
    /// Dropped documents kept as examples per reason in stats.json.
    #[serde(default = "default_samples")]
    pub samples_per_reason: usize,
    /// Documents per output shard.
    #[serde(default = "default_shard_documents")]
    pub shard_documents: u64,
}

fn default_samples() -> usize {
    3
}

fn default_shard_documents() -> u64 {
    100_000
}

/// One document's scores, per filter (`None`: not a scoring filter, or not reached).
type DocScores = Vec<Option<filters::Scores>>;

/// Kept documents of a chunk on their way to the shard writer: the chunk's input block, and
/// per document its JSON line and text bytes.
struct Batch {
    block: Arc<LineBlock>,
    kept: Vec<(Json, usize)>,
}

/// A kept document's output line.
enum Json {
    /// Cleaning changed nothing: the input line, as a range of the chunk's block (shards are
    /// always written by smelt's serialiser, so re-serialising would give the same bytes).
    AsRead(Range<usize>),
    Rewritten(String),
}

/// A dropped document shown in stats.json.
#[derive(Debug, Serialize)]
struct Sample {
    id: String,
    text: String,
}

#[derive(Debug, Default, Serialize)]
struct Stats {
    documents_in: u64,
    documents_out: u64,
    /// Reason → documents dropped for it.
    dropped: BTreeMap<String, u64>,
    samples: BTreeMap<String, Vec<Sample>>,
    exact_duplicates: u64,
    near_duplicates: u64,
    /// Kept documents that near-duplicates were folded into.
    near_duplicate_clusters: u64,
    train: SplitSummary,
    validation: SplitSummary,
}

impl Stats {
    fn drop(&mut self, reason: &str, record: &Record, samples: usize) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
        let kept = self.samples.entry(reason.to_string()).or_default();
        if kept.len() < samples {
            kept.push(Sample {
                id: record.id.clone(),
                text: record.text.chars().take(SAMPLE_CHARS).collect(),
            });
        }
    }
}

/// One document after the parallel part.
enum Processed {
    Kept(Kept),
    Dropped(Record, &'static str),
}

/// A document that passed the filters, ready for dedup and writing.
struct Kept {
    record: Record,
    /// The record as its output JSON line.
    json: Json,
    exact: dedup::ExactHash,
    signature: Option<dedup::Signature>,
    /// Structured records skip dedup unless `filter_structured`.
    dedupable: bool,
}

impl Kept {
    fn new(
        record: Record,
        json: Option<Json>,
        signature: Option<dedup::Signature>,
        dedupable: bool,
    ) -> Self {
        let json = json.unwrap_or_else(|| {
            Json::Rewritten(serde_json::to_string(&record).expect("records serialise"))
        });
        let exact = dedup::ExactHash::of(&record.all_text());
        Kept {
            record,
            json,
            exact,
            signature,
            dedupable,
        }
    }
}

impl Stage for Clean {
    type Params = CleanParams;
    const KIND: &'static str = "clean";
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "Normalise, filter (Gopher, C4, language, PII, regex) and deduplicate documents";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![Port {
            name: "corpus",
            required: true,
            many: false,
            doc: "a collect or clean stage",
        }])
    }

    fn check(&self, params: &CleanParams, _wired: &[&str]) -> Vec<ParamProblem> {
        // The filters that compile something (a regex, language codes) refuse bad values here.
        let mut problems = Vec::new();
        for (i, filter) in params.filters.iter().enumerate() {
            if let Err(message) = filter.prepare() {
                let at = match filter {
                    Filter::Language(_) => format!("filters.{i}.language.languages"),
                    Filter::Regex(_) => format!("filters.{i}.regex.pattern"),
                    _ => format!("filters.{i}"),
                };
                problems.push(ParamProblem::new(&at, message));
            }
        }
        problems
    }

    fn run(&self, params: &CleanParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        let input = ctx.input("corpus").ok_or("no `corpus` input")?;
        let filters = params
            .filters
            .iter()
            .map(Filter::prepare)
            .collect::<Result<Vec<_>, _>>()?;
        let normalization = filters::Normalization {
            unicode: params.normalize,
            lowercase: params.lowercase,
            strip_html: params.strip_html,
        };
        let mut index = dedup::Index::new(&params.dedup);
        let mut stats = Stats::default();
        let mut tape = ScoreTape::open(ctx, params, input)?;
        // A fact about this run (the memo was there), not about the output: a run record's
        // metric, never part of the artifact.
        let scores_from_memo = tape.replaying();
        let cleaner = Cleaner {
            params,
            normalization,
            filters,
        };
        for split in ["train", "validation"] {
            // Shards are written by their own thread while the next chunk is cleaned.
            let summary = std::thread::scope(|scope| -> Result<SplitSummary, String> {
                let (sink, batches) = std::sync::mpsc::sync_channel::<Batch>(2);
                let mut writer = ShardWriter::new(&ctx.out_dir, split, params.shard_documents);
                let writing = scope.spawn(move || -> std::io::Result<SplitSummary> {
                    for batch in batches {
                        for (json, text_bytes) in batch.kept {
                            let line = match &json {
                                Json::AsRead(range) => &batch.block.bytes[range.clone()],
                                Json::Rewritten(json) => json.as_bytes(),
                            };
                            writer.write_line(line, text_bytes)?;
                        }
                    }
                    writer.finish()
                });
                let mut cleaned = Ok(());
                for shard in shards(input, split)? {
                    cleaned = cleaner.clean_shard(&shard, &mut index, &sink, &mut tape, &mut stats);
                    if cleaned.is_err() {
                        break;
                    }
                    ctx.report(stats.documents_in, None, "documents");
                }
                drop(sink);
                let written = writing
                    .join()
                    .map_err(|_| "the shard writer failed".to_string())?;
                let summary = written.map_err(|e| format!("writing shards: {e}"))?;
                cleaned.map(|()| summary)
            })?;
            stats.documents_out += summary.documents;
            if split == "train" {
                stats.train = summary
            } else {
                stats.validation = summary
            }
        }
        stats.near_duplicate_clusters = index.clusters.len() as u64;
        tape.finish()?;
        std::fs::write(
            ctx.out_dir.join("stats.json"),
            serde_json::to_vec_pretty(&stats)?,
        )?;
        if stats.train.documents == 0 {
            return Err(format!(
                "no documents left after cleaning ({} in; dropped: {:?})",
                stats.documents_in, stats.dropped
            )
            .into());
        }
        Ok(Metrics::from([
            ("documents_in".to_string(), stats.documents_in.into()),
            ("documents_out".to_string(), stats.documents_out.into()),
            (
                "exact_duplicates".to_string(),
                stats.exact_duplicates.into(),
            ),
            ("near_duplicates".to_string(), stats.near_duplicates.into()),
            ("scores_from_memo".to_string(), scores_from_memo.into()),
        ]))
    }
}

struct Cleaner<'a> {
    params: &'a CleanParams,
    normalization: filters::Normalization,
    filters: Vec<filters::Prepared>,
}

impl Cleaner<'_> {
    fn clean_shard(
        &self,
        shard: &Path,
        index: &mut dedup::Index,
        sink: &std::sync::mpsc::SyncSender<Batch>,
        tape: &mut ScoreTape,
        stats: &mut Stats,
    ) -> Result<(), String> {
        let mut input = ShardLines::open(shard)?;
        let mut read_block = || input.next_block();
        let mut next = read_block()?;
        while let Some(block) = next.take() {
            let block = Arc::new(block);
            stats.documents_in += block.lines.len() as u64;
            let hasher = index.hasher();
            let cached: Vec<Option<DocScores>> = match tape.replay(block.lines.len())? {
                Some(scores) => scores.into_iter().map(Some).collect(),
                None => vec![None; block.lines.len()],
            };
            // Read the next block while this one is processed.
            let (processed, read) = rayon::join(
                || {
                    block
                        .lines
                        .par_iter()
                        .enumerate()
                        .zip(cached)
                        .map(|((i, range), cached)| {
                            let record = block.record(i)?;
                            Ok(self.process(record, range.clone(), hasher, cached))
                        })
                        .collect::<Vec<Result<(Processed, DocScores), String>>>()
                },
                &mut read_block,
            );
            next = read?;
            let mut kept = Vec::with_capacity(processed.len());
            let mut scores = Vec::with_capacity(processed.len());
            for item in processed {
                let (mut item, doc_scores) = item?;
                scores.push(doc_scores);
                kept.extend(self.admit(&mut item, index, stats));
            }
            tape.record(&scores)?;
            sink.send(Batch { block, kept })
                .map_err(|_| "the shard writer stopped".to_string())?;
        }
        Ok(())
    }

    /// The parallel part: normalise, filter, sign.
    /// `line` is where the record's input JSON is in its block: written back as it is when
    /// cleaning changed nothing.
    fn process(
        &self,
        mut record: Record,
        line: Range<usize>,
        hasher: Option<&dedup::MinHasher>,
        cached: Option<DocScores>,
    ) -> (Processed, DocScores) {
        let structured = record.messages.is_some() || record.prompt.is_some();
        let normalized = self.normalize_fields(&mut record);
        let original_text = (!self.filters.is_empty()).then(|| record.text.clone());
        let unchanged = |r: &Record| {
            (!normalized && original_text.as_ref().is_none_or(|t| *t == r.text))
                .then_some(Json::AsRead(line))
        };
        if structured && !self.params.filter_structured {
            let json = unchanged(&record);
            return (
                Processed::Kept(Kept::new(record, json, None, false)),
                DocScores::new(),
            );
        }
        if structured {
            return (self.filter_fields(record, hasher), DocScores::new());
        }
        let (text, scores, dropped) = self.filter(std::mem::take(&mut record.text), cached);
        if let Some((reason, text)) = dropped {
            record.text = text;
            return (Processed::Dropped(record, reason), scores);
        }
        record.text = text;
        if record.text.is_empty() {
            return (Processed::Dropped(record, "empty"), scores);
        }
        let signature = hasher.and_then(|h| h.signature(&record.text));
        let json = unchanged(&record);
        (
            Processed::Kept(Kept::new(record, json, signature, true)),
            scores,
        )
    }

    /// Filters a chat or preference record field by field: rewriting filters (PII, C4) apply
    /// to every turn, prompt and answer, and the record goes if one of its fields would; judging
    /// filters look at the whole record as text. Dedup compares all its fields.
    fn filter_fields(&self, mut record: Record, hasher: Option<&dedup::MinHasher>) -> Processed {
        for filter in &self.filters {
            if filter.is_scoring() || matches!(filter, filters::Prepared::Regex(..)) {
                if let Err((reason, _)) = filter.apply(record.all_text().into_owned()) {
                    return Processed::Dropped(record, reason);
                }
                continue;
            }
            let mut fields: Vec<&mut String> = record
                .messages
                .iter_mut()
                .flatten()
                .map(|m| &mut m.content)
                .collect();
            fields.extend(
                [&mut record.prompt, &mut record.chosen, &mut record.rejected]
                    .into_iter()
                    .flatten(),
            );
            for field in fields {
                match filter.apply(std::mem::take(field)) {
                    Ok(kept) => *field = kept,
                    Err((reason, _)) => return Processed::Dropped(record, reason),
                }
            }
            record.render_text();
        }
        let signature = hasher.and_then(|h| h.signature(&record.all_text()));
        Processed::Kept(Kept::new(record, None, signature, true))
    }

    /// Runs the filters in order. Scoring filters take their scores from `cached` when given;
    /// otherwise every scoring filter measures the document, even after an earlier one dropped
    /// it, so that the scores serve any later thresholds. Returns the final text, the scores, and
    /// the first drop (reason and the text at that point).
    #[allow(clippy::type_complexity)]
    fn filter(
        &self,
        mut text: String,
        cached: Option<DocScores>,
    ) -> (String, DocScores, Option<(&'static str, String)>) {
        let replay = cached.is_some();
        let mut scores: DocScores = cached.unwrap_or_else(|| vec![None; self.filters.len()]);
        scores.resize(self.filters.len(), None);
        let mut dropped = None;
        for (i, filter) in self.filters.iter().enumerate() {
            if filter.is_scoring() {
                if scores[i].is_none() {
                    scores[i] = filter.measure(&text);
                }
                let verdict = scores[i].as_ref().and_then(|s| filter.judge(s));
                if let (None, Some(reason)) = (&dropped, verdict) {
                    dropped = Some((reason, text.clone()));
                    if replay {
                        break;
                    }
                }
            } else if dropped.is_some() && replay {
                break;
            } else {
                match filter.apply(text) {
                    Ok(kept) => text = kept,
                    Err((reason, at_drop)) => {
                        dropped = dropped.or(Some((reason, at_drop)));
                        text = String::new();
                        break;
                    }
                }
            }
        }
        (text, scores, dropped)
    }

    /// Normalises every text field; says whether anything changed.
    fn normalize_fields(&self, record: &mut Record) -> bool {
        let n = &self.normalization;
        let mut changed = false;
        let mut fix = |value: &mut String| {
            if let Some(new) = n.rewrite(value) {
                *value = new;
                changed = true;
            }
        };
        fix(&mut record.text);
        for message in record.messages.iter_mut().flatten() {
            fix(&mut message.content);
        }
        for value in [&mut record.prompt, &mut record.chosen, &mut record.rejected]
            .into_iter()
            .flatten()
        {
            fix(value);
        }
        changed
    }

    /// The sequential part, in corpus order: dedup, then write.
    /// Returns the JSON line to write, if the document is kept.
    fn admit(
        &self,
        item: &mut Processed,
        index: &mut dedup::Index,
        stats: &mut Stats,
    ) -> Option<(Json, usize)> {
        let samples = self.params.samples_per_reason;
        match item {
            Processed::Dropped(record, reason) => stats.drop(reason, record, samples),
            Processed::Kept(kept) => {
                let verdict = if kept.dedupable {
                    index.admit(kept.exact, kept.signature.as_ref())
                } else {
                    Ok(())
                };
                match verdict {
                    Ok(()) => {
                        let json = std::mem::replace(&mut kept.json, Json::AsRead(0..0));
                        return Some((json, kept.record.text.len()));
                    }
                    Err(dedup::Duplicate::Exact) => {
                        stats.exact_duplicates += 1;
                        stats.drop("dedup.exact", &kept.record, samples);
                    }
                    Err(dedup::Duplicate::Near) => {
                        stats.near_duplicates += 1;
                        stats.drop("dedup.minhash", &kept.record, samples);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Message;
    use crate::testing::{context, write_corpus};
    use std::path::PathBuf;

    /// A two-turn conversation with id `c`.
    fn chat(user: &str, assistant: &str) -> Record {
        let turn = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        Record::chat(
            "c".into(),
            vec![turn("user", user), turn("assistant", assistant)],
            "t",
        )
    }

    /// A temporary directory and an empty input folder inside it.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        (dir, input)
    }

    fn run(
        params: serde_json::Value,
        input: &Path,
        out: &Path,
    ) -> Result<serde_json::Value, String> {
        let params: CleanParams = serde_json::from_value(params).map_err(|e| e.to_string())?;
        let ctx = context("clean", &[("corpus", input)], out);
        let metrics = Clean.run(&params, &ctx).map_err(|e| e.to_string())?;
        let mut stats: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("stats.json")).unwrap()).unwrap();
        stats["metrics"] = serde_json::to_value(metrics).unwrap();
        Ok(stats)
    }

    fn output(out: &Path, split: &str) -> Vec<Record> {
        shards(out, split)
            .unwrap()
            .iter()
            .flat_map(|s| {
                std::fs::read_to_string(s)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<Record>>()
            })
            .collect()
    }

    fn doc(i: usize, text: &str) -> Record {
        Record::text(format!("d{i}"), text.to_string(), "test")
    }

    /// Twelve varied sentences of plain English: passes the Gopher filters.
    fn prose(seed: usize) -> String {
        use rand::{seq::IndexedRandom, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64);
        let subjects = [
            "The farmer",
            "A child",
            "The old sailor",
            "Her brother",
            "The teacher",
            "A stranger",
            "My aunt",
            "The baker",
            "Our neighbour",
            "The captain",
        ];
        let verbs = [
            "carried", "painted", "found", "repaired", "sold", "watched", "borrowed", "cleaned",
            "measured", "hid",
        ];
        let objects = [
            "the wooden boat",
            "a basket of apples",
            "the broken gate",
            "an old map",
            "the red kite",
            "a heavy trunk",
            "the silver bell",
            "some warm bread",
            "a box of letters",
            "the garden fence",
        ];
        let places = [
            "near the river",
            "in the village",
            "behind the barn",
            "at the market",
            "on the hill",
            "by the harbour",
            "under the bridge",
            "in the cellar",
        ];
        let mut endings = vec![
            "before the sun went down",
            "while the rain kept falling",
            "and nobody noticed",
            "to everyone's surprise",
            "for the first time in years",
            "as the bells rang",
            "without saying a word",
            "and then went home",
            "despite the cold wind",
            "long after midnight",
            "with great care",
            "just in time",
        ];
        rand::seq::SliceRandom::shuffle(endings.as_mut_slice(), &mut rng);
        endings
            .iter()
            .map(|ending| {
                let pick = |words: &[&'static str], rng: &mut rand_chacha::ChaCha8Rng| {
                    *words.choose(rng).unwrap()
                };
                format!(
                    "{} {} {} {} {ending}.",
                    pick(&subjects, &mut rng),
                    pick(&verbs, &mut rng),
                    pick(&objects, &mut rng),
                    pick(&places, &mut rng)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn filters_dedup_and_stats() {
        let (dir, input) = scratch();
        let good: Vec<String> = (0..6).map(prose).collect();
        let train = vec![
            doc(0, &good[0]),
            doc(1, "too short"),
            doc(2, &good[1]),
            doc(3, &format!("  {}  ", good[0])),
            doc(4, &good[2].replacen("farmer", "fisher", 1)),
            doc(5, &good[3]),
        ];
        let validation = vec![doc(6, &good[1]), doc(7, &good[4])];
        write_corpus(&input, &train, &validation);
        let params = serde_json::json!({
            "filters": [ { "gopher_quality": {} }, { "gopher_repetition": {} } ],
            "dedup": { "exact": true, "minhash": {} }
        });
        let out = dir.path().join("out");
        let stats = run(params, &input, &out).unwrap();
        assert_eq!(stats["documents_in"], 8);
        assert_eq!(stats["dropped"]["gopher_quality.min_words"], 1);
        assert_eq!(
            stats["exact_duplicates"], 2,
            "the padded copy in train, the copy in validation: {stats:#}"
        );
        let kept: Vec<String> = output(&out, "train").into_iter().map(|r| r.id).collect();
        assert!(kept.contains(&"d0".to_string()) && !kept.contains(&"d3".to_string()));
        assert_eq!(output(&out, "validation").len(), 1);
        assert_eq!(stats["samples"]["gopher_quality.min_words"][0]["id"], "d1");
    }

    #[test]
    fn output_does_not_depend_on_the_thread_count() {
        let (dir, input) = scratch();
        let train: Vec<Record> = (0..300).map(|i| doc(i, &prose(i % 40))).collect();
        write_corpus(&input, &train, &[]);
        let params = serde_json::json!({ "filters": [ { "gopher_repetition": {} } ], "dedup": { "minhash": { "threshold": 0.7 } } });
        let mut outputs = Vec::new();
        for threads in [1, 2] {
            let out = dir.path().join(format!("out{threads}"));
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run(params.clone(), &input, &out)).unwrap();
            let bytes: Vec<Vec<u8>> = shards(&out, "train")
                .unwrap()
                .iter()
                .map(|s| std::fs::read(s).unwrap())
                .collect();
            outputs.push(bytes);
        }
        assert_eq!(outputs[0], outputs[1]);
        assert!(!outputs[0].is_empty());
    }

    #[test]
    fn structured_records_are_normalised_but_not_filtered_by_default() {
        let (dir, input) = scratch();
        let conversation = chat("What is  2+2?", "4");
        write_corpus(&input, &[conversation, doc(1, &prose(1))], &[]);
        let params = serde_json::json!({ "filters": [ { "gopher_quality": {} } ] });
        let out = dir.path().join("out");
        run(params.clone(), &input, &out).unwrap();
        let kept = output(&out, "train");
        assert_eq!(
            kept[0].messages.as_ref().unwrap()[0].content,
            "What is 2+2?"
        );
        let strict = serde_json::json!({ "filters": [ { "gopher_quality": {} } ], "filter_structured": true });
        let stats = run(strict, &input, &out).unwrap();
        assert_eq!(stats["dropped"]["gopher_quality.min_words"], 1);
    }

    #[test]
    fn changing_only_thresholds_replays_the_scores_and_gives_the_same_result() {
        let (dir, input) = scratch();
        let mut train: Vec<Record> = (0..40).map(|i| doc(i, &prose(i))).collect();
        train.extend((0..10).map(|i| {
            doc(
                100 + i,
                &prose(i).split(". ").take(4).collect::<Vec<_>>().join(". "),
            )
        }));
        write_corpus(&input, &train, &[]);
        let with = |min_words: u64| {
            serde_json::json!({
                "filters": [ { "pii": {} }, { "gopher_quality": { "min_words": min_words } }, { "gopher_repetition": {} } ],
                "dedup": { "exact": false }
            })
        };
        let first = run(with(50), &input, &dir.path().join("a")).unwrap();
        assert_eq!(first["metrics"]["scores_from_memo"], false);
        let replayed = run(with(60), &input, &dir.path().join("b")).unwrap();
        assert_eq!(replayed["metrics"]["scores_from_memo"], true);
        assert_ne!(
            first["documents_out"], replayed["documents_out"],
            "the new threshold matters"
        );
        std::fs::remove_dir_all(dir.path().join("memo")).unwrap();
        let fresh = run(with(60), &input, &dir.path().join("c")).unwrap();
        assert_eq!(fresh["metrics"]["scores_from_memo"], false);
        // Whether the memo was there is the run's business: the artifact is the same (a run
        // killed after writing the memo, then rerun, must give the uninterrupted run's id).
        let stats = |d: &str| std::fs::read(dir.path().join(d).join("stats.json")).unwrap();
        assert_eq!(stats("b"), stats("c"));
        let read = |d: &str| {
            shards(&dir.path().join(d), "train")
                .unwrap()
                .iter()
                .map(|s| std::fs::read(s).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(read("b"), read("c"));
        assert_eq!(fresh["dropped"], replayed["dropped"]);
    }

    #[test]
    fn structured_records_are_filtered_field_by_field_when_asked() {
        let (dir, input) = scratch();
        let conversation = chat("Mail me at a@b.com please", "Sure");
        let pair = |id: &str, chosen: &str| {
            Record::preference(
                id.into(),
                "Same prompt?".into(),
                chosen.into(),
                "No".into(),
                "t",
            )
        };
        write_corpus(
            &input,
            &[
                conversation,
                pair("p1", "Yes"),
                pair("p2", "Maybe"),
                pair("p3", "Yes"),
            ],
            &[],
        );
        let params = serde_json::json!({ "filters": [ { "pii": {} } ], "filter_structured": true, "dedup": { "exact": true } });
        let out = dir.path().join("out");
        let stats = run(params, &input, &out).unwrap();
        let kept = output(&out, "train");
        assert_eq!(
            kept[0].messages.as_ref().unwrap()[0].content,
            "Mail me at <EMAIL> please"
        );
        assert!(kept[0].text.contains("<EMAIL>"));
        let ids: Vec<&str> = kept.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["c", "p1", "p2"],
            "pairs differ by their answers; p3 repeats p1"
        );
        assert_eq!(stats["exact_duplicates"], 1);
    }

    #[test]
    fn dropping_everything_is_an_error() {
        let (dir, input) = scratch();
        write_corpus(&input, &[doc(0, "short")], &[]);
        let err = run(
            serde_json::json!({ "filters": [ { "gopher_quality": {} } ] }),
            &input,
            &dir.path().join("out"),
        )
        .unwrap_err();
        assert!(err.contains("no documents left"), "{err}");
    }
}
