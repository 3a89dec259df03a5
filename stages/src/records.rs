//! Document records, the data model shared by the data stages: JSON lines with `id`, `text` and
//! `source`, plus `messages` for chat data and `prompt`/`chosen`/`rejected` for preference pairs.
//! Records are written to shards, `<split>-00000.jsonl`, with train and validation kept apart.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Stable identifier: where the document came from and its position there.
    pub id: String,
    /// The text (for chat records, the conversation rendered as plain text).
    pub text: String,
    /// Provenance: the source that produced it (a path, a URL, a generator).
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Record {
    /// A plain text document.
    pub fn text(id: String, text: String, source: &str) -> Self {
        Record {
            id,
            text,
            source: source.to_string(),
            messages: None,
            prompt: None,
            chosen: None,
            rejected: None,
        }
    }

    /// A conversation; its `text` is the turns as `role: content` lines.
    pub fn chat(id: String, messages: Vec<Message>, source: &str) -> Self {
        let text = messages
            .iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect::<Vec<_>>()
            .join("\n");
        Record {
            messages: Some(messages),
            ..Record::text(id, text, source)
        }
    }

    /// Every text field, for filters and dedup that judge a record as a whole: `text`, plus a
    /// preference pair's answers (a conversation's `text` already holds every turn).
    pub fn all_text(&self) -> std::borrow::Cow<'_, str> {
        match (&self.chosen, &self.rejected) {
            (Some(chosen), Some(rejected)) => format!("{}\n{chosen}\n{rejected}", self.text).into(),
            _ => self.text.as_str().into(),
        }
    }

    /// Recomputes `text` from the structured fields after they were rewritten.
    pub fn render_text(&mut self) {
        if let Some(messages) = &self.messages {
            self.text = Record::chat(String::new(), messages.clone(), "").text;
        } else if let Some(prompt) = &self.prompt {
            self.text = prompt.clone();
        }
    }

    /// A preference pair; its `text` is the prompt.
    pub fn preference(
        id: String,
        prompt: String,
        chosen: String,
        rejected: String,
        source: &str,
    ) -> Self {
        Record {
            chosen: Some(chosen),
            rejected: Some(rejected),
            prompt: Some(prompt.clone()),
            ..Record::text(id, prompt, source)
        }
    }
}

/// A chunk of a shard's lines, read as one buffer: no allocation per line, and a stage that
/// passes a record through unchanged can write it from here without a copy.
pub struct LineBlock {
    pub bytes: Vec<u8>,
    /// Line ranges, without the newline.
    pub lines: Vec<Range<usize>>,
    /// The 1-based line number of the first line in its shard.
    pub first_line: usize,
    /// The shard's file name, for errors.
    shard: Arc<str>,
}

impl LineBlock {
    /// Bytes read per block: a few thousand typical documents, enough for a parallel batch.
    pub const BYTES: usize = 4 << 20;

    /// Line `i` of the block as a record.
    pub fn record(&self, i: usize) -> Result<Record, String> {
        serde_json::from_slice(&self.bytes[self.lines[i].clone()])
            .map_err(|e| format!("{}:{}: not a record: {e}", self.shard, self.first_line + i))
    }

    /// Reads the next block of about `target` bytes from `input`, whole lines only: `carry`
    /// holds the unfinished last line of the previous block. `None` at the end of the input.
    pub(crate) fn read(
        input: &mut impl Read,
        carry: &mut Vec<u8>,
        first_line: usize,
        target: usize,
        shard: &Arc<str>,
    ) -> std::io::Result<Option<LineBlock>> {
        // `carry` holds no newline; read until the block has a complete line and its target size.
        let mut bytes = std::mem::take(carry);
        let (mut has_newline, mut at_end) = (false, false);
        while !(has_newline && bytes.len() >= target) {
            let start = bytes.len();
            // Into spare capacity, without zeroing it first.
            bytes.reserve(target);
            if input.by_ref().take(target as u64).read_to_end(&mut bytes)? == 0 {
                at_end = true;
                break;
            }
            has_newline |= memchr::memchr(b'\n', &bytes[start..]).is_some();
        }
        // Whatever follows the last newline waits for the next block, unless the input ended.
        if !at_end {
            let last = memchr::memrchr(b'\n', &bytes).expect("the block has a newline");
            carry.extend_from_slice(&bytes[last + 1..]);
            bytes.truncate(last + 1);
        }
        let mut lines = Vec::with_capacity(bytes.len() / 512);
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &bytes) {
            lines.push(start..end);
            start = end + 1;
        }
        if start < bytes.len() {
            lines.push(start..bytes.len());
        }
        Ok((!lines.is_empty()).then_some(LineBlock {
            bytes,
            lines,
            first_line,
            shard: shard.clone(),
        }))
    }
}

/// Reads a JSONL shard in [`LineBlock`]s.
pub struct ShardLines {
    file: File,
    name: Arc<str>,
    carry: Vec<u8>,
    lines_read: usize,
}

impl ShardLines {
    pub fn open(path: &Path) -> Result<Self, String> {
        let name: Arc<str> = path
            .file_name()
            .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy())
            .into();
        let file = File::open(path).map_err(|e| format!("{name}: {e}"))?;
        Ok(ShardLines {
            file,
            name,
            carry: Vec::new(),
            lines_read: 0,
        })
    }

    /// The next block of whole lines; `None` at the end of the shard.
    pub fn next_block(&mut self) -> Result<Option<LineBlock>, String> {
        let first_line = self.lines_read + 1;
        let block = LineBlock::read(
            &mut self.file,
            &mut self.carry,
            first_line,
            LineBlock::BYTES,
            &self.name,
        )
        .map_err(|e| format!("{}:{first_line}: {e}", self.name))?;
        self.lines_read += block.as_ref().map_or(0, |b| b.lines.len());
        Ok(block)
    }
}

/// The record shards of a split in a collect or clean artifact, in order.
pub fn shards(dir: &Path, split: &str) -> Result<Vec<PathBuf>, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with(&format!("{split}-")) && name.ends_with(".jsonl")
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Read and write buffer size for shards: large enough that system calls do not show in
/// profiles of the data stages (the default 8 KiB costs tens of thousands per 100 MB).
pub const IO_BUFFER: usize = 1 << 20;

/// What one split's shards hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SplitSummary {
    pub documents: u64,
    /// Bytes of `text`, UTF-8.
    pub text_bytes: u64,
    pub shards: Vec<String>,
}

/// Writes records of one split into numbered JSONL shards of at most `max_documents` each.
pub struct ShardWriter {
    dir: PathBuf,
    split: &'static str,
    max_documents: u64,
    file: Option<BufWriter<File>>,
    in_shard: u64,
    summary: SplitSummary,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: &'static str, max_documents: u64) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            split,
            max_documents: max_documents.max(1),
            file: None,
            in_shard: 0,
            summary: SplitSummary::default(),
        }
    }

    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        self.write_json(&serde_json::to_string(record)?, record.text.len())
    }

    /// Writes a record already serialised (by a parallel worker) as one JSON line.
    pub fn write_json(&mut self, json: &str, text_bytes: usize) -> io::Result<()> {
        self.write_line(json.as_bytes(), text_bytes)
    }

    /// Writes one JSON line given as bytes (without its newline).
    pub fn write_line(&mut self, json: &[u8], text_bytes: usize) -> io::Result<()> {
        if self.file.is_none() || self.in_shard == self.max_documents {
            self.next_shard()?;
        }
        let file = self.file.as_mut().expect("a shard is open");
        file.write_all(json)?;
        file.write_all(b"\n")?;
        self.in_shard += 1;
        self.summary.documents += 1;
        self.summary.text_bytes += text_bytes as u64;
        Ok(())
    }

    fn next_shard(&mut self) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
        }
        let name = format!("{}-{:05}.jsonl", self.split, self.summary.shards.len());
        self.file = Some(BufWriter::with_capacity(
            IO_BUFFER,
            File::create(self.dir.join(&name))?,
        ));
        self.summary.shards.push(name);
        self.in_shard = 0;
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<SplitSummary> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
        }
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hold_whole_lines_whatever_the_read_sizes() {
        let text = "a\nbb\n\nccccccccccccccc\nd\neeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee\nf";
        let expected: Vec<&str> = text.split('\n').collect();
        for target in [1, 2, 3, 7, 16, 100] {
            let (mut input, mut carry) = (text.as_bytes(), Vec::new());
            let mut lines: Vec<String> = Vec::new();
            while let Some(block) =
                LineBlock::read(&mut input, &mut carry, lines.len() + 1, target, &"t".into())
                    .unwrap()
            {
                // Line numbers continue across blocks.
                assert_eq!(block.first_line, lines.len() + 1);
                lines.extend(
                    block.lines.iter().map(|range| {
                        String::from_utf8(block.bytes[range.clone()].to_vec()).unwrap()
                    }),
                );
            }
            assert_eq!(lines, expected, "target {target}");
        }
    }

    #[test]
    fn shards_roll_over_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = ShardWriter::new(dir.path(), "train", 2);
        let records: Vec<Record> = (0..5)
            .map(|i| Record::text(format!("d{i}"), format!("text {i}"), "test"))
            .collect();
        for r in &records {
            writer.write(r).unwrap();
        }
        let summary = writer.finish().unwrap();
        assert_eq!(
            summary.shards,
            [
                "train-00000.jsonl",
                "train-00001.jsonl",
                "train-00002.jsonl"
            ]
        );
        assert_eq!(summary.documents, 5);
        let back: Vec<Record> = summary
            .shards
            .iter()
            .flat_map(|s| {
                std::fs::read_to_string(dir.path().join(s))
                    .unwrap()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect();
        assert_eq!(back, records);
    }

    #[test]
    fn chat_and_preference_records_keep_their_fields() {
        let chat = Record::chat(
            "c".into(),
            vec![
                Message {
                    role: "user".into(),
                    content: "hi".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: "hello".into(),
                },
            ],
            "gen",
        );
        assert_eq!(chat.text, "user: hi\nassistant: hello");
        let json = serde_json::to_string(&chat).unwrap();
        assert!(
            json.contains("\"messages\"") && !json.contains("\"prompt\""),
            "{json}"
        );
        let pref = Record::preference("p".into(), "q".into(), "good".into(), "bad".into(), "gen");
        let back: Record = serde_json::from_str(&serde_json::to_string(&pref).unwrap()).unwrap();
        assert_eq!(back, pref);
    }
}
